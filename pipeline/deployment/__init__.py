"""Deployment: targets and engines, timing on the real runtime, latency models and latency budgets,
board profiles, INT8 / FP16 / mixed precision, trtexec, and the deployment artifacts.

May import: ``pipeline.selection``, ``pipeline.calibration``, ``pipeline.model``, ``pipeline.data``
and the top-level modules.
"""
