"""Target "eager": the reference interpreter. No kernels: the shared kernel executor runs every node's torch
reference, which is the ground truth every other target is tested against."""
from caramba.codegen.backend import Availability, Backend, Kernels, register

NAME = "eager"

BACKEND = register(Backend(
    name=NAME,
    summary="the reference interpreter (plain torch, slow and exact): the ground truth of every other target",
    availability=lambda: Availability(True, "plain torch: runs everywhere"),
    auto_rank=100,
    kernels=lambda device, options: Kernels(),
    reference=True,
))
