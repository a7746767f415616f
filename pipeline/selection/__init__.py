"""Selection: which channels leave. The scorers (``scorers``), the plan file and the global budget
allocation (``plan``), measured sensitivity, progressive pruning in rounds.

May import: ``pipeline.calibration``, ``pipeline.model``, ``pipeline.data`` and the top-level modules.
"""
