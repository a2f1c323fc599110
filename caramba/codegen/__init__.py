"""Code generation from the post-pass IR, one package per target, each registering its Backend (backend.py):
eager/ (the reference interpreter), triton/ (target "cuda"), metal/ (target "metal"), onnx/ (target "onnx")."""
from caramba.codegen import eager, metal, onnx, triton  # noqa: F401  (each registers its backend)
