"""The main job, `moecompress quantize`: the stages in order, resumable, reproducible from a recipe."""
from moecompress.pipeline.run import STAGES, quantize

__all__ = ["STAGES", "quantize"]
