"""The whole-model CPU decode step (csrc/lowbit/step.cpp): StepPlan (plan.py) reads a loaded model once, CpuDecoder
(decoder.py) generates with one C++ call per token. See decoder.py."""
from moecompress.runtime.cpu_step.decoder import CpuDecoder, cpu_generate
from moecompress.runtime.cpu_step.plan import StepPlan, UnsupportedModel

__all__ = ["CpuDecoder", "StepPlan", "UnsupportedModel", "cpu_generate"]
