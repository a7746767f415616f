"""The model file a run works on: exported from torch (``export``, ``export_spec``), loaded, canonicalized
and analysed once (``prepare``), run on onnxruntime (``runtime``), and bridged back to torch for the
optional training stages (``torch_bridge``).

May import: ``pipeline.data`` and the top-level modules.
"""
