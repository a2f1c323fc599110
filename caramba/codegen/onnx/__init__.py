"""Target "onnx": the post-pass cached graph as one ONNX model (model.py, ops.py, cache.py) run by ONNX Runtime
with IO binding (runner.py)."""
