"""The prune: the stage chain prepare -> calibrate -> score -> plan -> apply -> recover -> evaluate ->
report (``orchestrate``), its report, and what is built on it: ``apply`` (a plan file onto a model),
the demo, the calibration-size advice and the model summary of ``diprune inspect``.

May import: every stage package (data, model, calibration, selection, recovery, deployment,
evaluation, training) and the top-level modules; never ``pipeline.job`` or ``pipeline.cli``.
"""
