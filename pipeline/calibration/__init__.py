"""Calibration and statistics: the model run over labelled data, per-probe sufficient statistics
(``stats``), the pooling each probe gets, location-aware calibration for dense targets.

May import: ``pipeline.model``, ``pipeline.data`` and the top-level modules (``pipeline.cluster``
lazily, for shards on Ray).
"""
