"""Code generation from the post-pass IR: triton/ (target "cuda"), onnx/ (target "onnx"); metal/ later."""
