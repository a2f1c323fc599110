"""Target "onnx": the post-pass cached graph as one ONNX model (model.py, ops.py, cache.py) run by ONNX Runtime
with IO binding (runner.py); the export's files (export.py). The backend record is in backend.py."""
from caramba.codegen.backend import register
from caramba.codegen.onnx.backend import BACKEND

register(BACKEND)
