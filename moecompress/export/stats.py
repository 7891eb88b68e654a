"""The expert statistics a checkpoint ships (format/expert_stats.py), made from the run's calibration."""
from __future__ import annotations

from moecompress.artifacts.calibration_stats import CalibrationStats
from moecompress.format.expert_stats import ExpertStats


def expert_stats_from_calibration(stats: CalibrationStats) -> ExpertStats:
    """Popularity (mass normalised per layer, tokens), layer-to-layer paths (each row's co-use counts normalised to
    sum 1: the share of expert i's next-layer expert uses that went to j; x top_k for expected uses) and the mass
    per domain. Hessians, co-activation and the routing trace stay in the run directory."""
    return ExpertStats.from_counts(mass=stats.mass, tokens=stats.tokens, paths=stats.paths, domains=stats.domains,
                                   domain_mass=stats.domain_mass, experts_paths=stats.experts_paths)
