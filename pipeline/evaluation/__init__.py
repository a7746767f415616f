"""Evaluation: accuracy of a classifier, fidelity to a reference model, dense metrics (detection,
segmentation, sequences) and robustness (noise, adversarial examples).

May import: ``pipeline.model``, ``pipeline.data`` and the top-level modules.
"""
