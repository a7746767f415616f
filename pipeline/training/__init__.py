"""Training: the optional torch stages after or before pruning: fine-tuning by distillation
(``finetune``), Grow-Push-Prune's push (``push``) and the training loop they share (``loop``).

May import: ``pipeline.evaluation``, ``pipeline.selection``, ``pipeline.calibration``,
``pipeline.model``, ``pipeline.data`` and the top-level modules.
"""
