"""Sensitivity: how much each routed expert (or expert projection) would be damaged at each candidate
bit-width -> artifacts.CostTable, read by allocate."""
from moecompress.sensitivity.stage import METHODS, SensitivityOptions, estimate_costs

__all__ = ["METHODS", "SensitivityOptions", "estimate_costs"]
