"""Triton kernels for target "cuda": rendered from templates (source.py), cached on disk, imported lazily.

Nothing here imports triton at module import time; each kernel module's launch function loads its kernel
through source.load on first use.
"""
from caramba.codegen.backend import register
from caramba.codegen.triton.backend import BACKEND

register(BACKEND)
