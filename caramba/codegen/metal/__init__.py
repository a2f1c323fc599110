"""Target "metal": caramba's fused ops as Metal Shading Language kernels, dispatched on Apple GPUs through
torch.mps.compile_shader; on Linux the same rendered MSL runs on the CPU (METAL.md's design).

So far: msl.py reads rendered MSL (kernel signatures, threadgroup declarations, the dialect Apple's compiler
takes), emulator.py builds and launches it on the CPU against shim/metal_stdlib with compile_shader's calling
convention, lint.py compile-checks it with clang's address spaces, shaders.py compiles a library once per process
(compile_shader on a Mac, the emulator elsewhere) and elementwise.py holds the norm, RoPE and SwiGLU kernels. The
cache append and attention kernels and the Backend record come next: until then importing this package registers
nothing and imports nothing heavy.
"""
