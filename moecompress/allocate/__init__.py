"""Allocation: per-item bit-widths under a byte budget, from a CostTable to a BitPlan. Pure functions."""
from moecompress.allocate.allocation import Allocation, allocate, copies_bytes, to_bit_plan
from moecompress.allocate.plot import plot_bits_heatmap
from moecompress.allocate.report import allocation_report
from moecompress.allocate.rules import AllocationRules, Budget

__all__ = [
    "Allocation", "AllocationRules", "Budget", "allocate", "allocation_report", "copies_bytes", "plot_bits_heatmap",
    "to_bit_plan",
]
