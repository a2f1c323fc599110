"""Target "metal": caramba's fused ops as Metal Shading Language kernels, dispatched on Apple GPUs through
torch.mps.compile_shader; elsewhere the same rendered MSL runs on the CPU through the emulator
(CARAMBA_METAL_EMULATE=1), as Triton's interpreter runs target "cuda"'s kernels.

msl.py reads rendered MSL (kernel signatures, threadgroup declarations, the dialect Apple's compiler takes),
emulator.py builds and launches it on the CPU against shim/metal_stdlib with compile_shader's calling convention,
lint.py compile-checks it with clang's address spaces, shaders.py compiles a library once per process (compile_shader
on a Mac, the emulator elsewhere). The kernels: elementwise.py (norms, RoPE, SwiGLU), kv_append.py (quantize on
write, the append error flag), attention.py (decode with split-K and its combine, prefill); kernels.py maps the fused
op families to them, chunking.py picks partitions and threadgroup sizes, backend.py declares the target. Importing
this package registers the backend and imports nothing heavy.
"""
from caramba.codegen.backend import register
from caramba.codegen.metal.backend import BACKEND

register(BACKEND)
