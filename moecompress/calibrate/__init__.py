"""Calibration: run text through a MoE model and record, per MoE layer, expert popularity, co-activation,
activation paths and per-expert input Hessians (-> artifacts.CalibrationStats)."""
from moecompress.calibrate.dataset import CalibrationData, DatasetSpec, build_calibration_data
from moecompress.calibrate.options import CalibrationOptions
from moecompress.calibrate.run import calibrate

__all__ = ["CalibrationData", "CalibrationOptions", "DatasetSpec", "build_calibration_data", "calibrate"]
