"""Graph analysis and rewrite passes over ONNX models (never imports ``pipeline``)."""
