"""DIPrune pipeline: export, calibration, scoring, planning, rewriting, evaluation and benchmarking stages."""

__version__ = "0.1.0"
