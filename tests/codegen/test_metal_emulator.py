"""The Metal emulator (codegen/metal): MSL kernels written here run on the CPU through the shim against float64
torch references in both lane orders; compile_shader's calling convention; the disk cache; seeded bugs (a removed
barrier reads the poisoned arena, a divergent barrier and too much threadgroup memory are reported); the lint."""
from __future__ import annotations

import time

import pytest
import torch

from caramba import flags
from caramba.codegen.metal import emulator, lint, msl
from caramba.codegen.metal.emulator import MetalBuildError, MetalRunError
from caramba.codegen.metal.msl import MetalSourceError

HEADER = """#include <metal_stdlib>
using namespace metal;
"""

RMS_NORM = """
// y = x / sqrt(mean(x^2) + eps) * w, one threadgroup a row: a simd_sum, then a threadgroup reduction of the sums.
kernel void rms_norm_rows(
    device const half* x   [[buffer(0)]],
    device const half* w   [[buffer(1)]],
    device half* y         [[buffer(2)]],
    constant long& d       [[buffer(3)]],   // a Python int
    constant float& eps    [[buffer(4)]],   // a Python float
    uint row               [[threadgroup_position_in_grid]],
    uint tid               [[thread_index_in_threadgroup]],
    uint width             [[threads_per_threadgroup]],
    uint lane              [[thread_index_in_simdgroup]],
    uint sg                [[simdgroup_index_in_threadgroup]],
    uint simdgroups        [[simdgroups_per_threadgroup]])
{
    threadgroup float partial[32];
    threadgroup float inv_rms;
    device const half* xr = x + row * d;
    float acc = 0.0f;
    for (uint i = tid; i < uint(d); i += width) { const float v = float(xr[i]); acc = fma(v, v, acc); }
    acc = simd_sum(acc);
    if (lane == 0) partial[sg] = acc;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid == 0) {
        float total = 0.0f;
        for (uint s = 0; s < simdgroups; ++s) total += partial[s];
        inv_rms = rsqrt(total / float(d) + eps);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint i = tid; i < uint(d); i += width) y[row * d + i] = half(float(xr[i]) * inv_rms * float(w[i]));
}
"""

SIMD_OPS = """
// Per simdgroup: a butterfly sum through simd_shuffle_xor, simd_max, simd_min, and a lane's value broadcast plus
// the value `delta` lanes down. Lists bind as constant arrays.
kernel void simd_ops(
    device const float* v      [[buffer(0)]],
    device float4* out         [[buffer(1)]],
    constant float* scales     [[buffer(2)]],   // [scale]
    constant long* lanes       [[buffer(3)]],   // [broadcast lane, delta]
    uint gid                   [[thread_position_in_grid]])
{
    const float x = v[gid];
    float total = x;
    for (ushort mask = 16; mask > 0; mask >>= 1) total += simd_shuffle_xor(total, mask);
    const float moved = simd_broadcast(x, ushort(lanes[0])) + simd_shuffle_down(x, ushort(lanes[1]));
    out[gid] = float4(total * scales[0], simd_max(x), simd_min(x), moved);
}
"""

GRID_2D = """
// A 2-D grid of 8x4 threadgroups over a 37x11 image, so the last column and row of threadgroups are partial. Each
// thread mirrors its threadgroup row through threadgroup memory, records what it was told and counts itself.
kernel void grid_2d(
    device const float* img     [[buffer(0)]],
    device float* mirrored      [[buffer(1)]],
    device uint4* seen          [[buffer(2)]],   // (threadgroup x, y, its size and the requested one, index)
    device uint4* grid_seen     [[buffer(3)]],   // a threadgroup: (threads x, y, threadgroups x, y)
    device atomic_uint* count   [[buffer(4)]],
    constant long& width        [[buffer(5)]],
    uint2 pos                   [[thread_position_in_grid]],
    uint2 local                 [[thread_position_in_threadgroup]],
    uint2 group                 [[threadgroup_position_in_grid]],
    uint2 size                  [[threads_per_threadgroup]],
    uint2 groups                [[threadgroups_per_grid]],
    uint2 grid                  [[threads_per_grid]],
    ushort2 requested           [[dispatch_threads_per_threadgroup]],
    uint index                  [[thread_index_in_threadgroup]])
{
    threadgroup float tile[4][8];
    const uint at = pos.y * width + pos.x;
    tile[local.y][local.x] = img[at];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    mirrored[at] = tile[local.y][size.x - 1 - local.x];
    seen[at] = uint4(group.x, group.y, size.x * 1000 + size.y * 100 + requested.x * 10 + requested.y, index);
    if (index == 0) grid_seen[group.y * groups.x + group.x] = uint4(grid.x, grid.y, groups.x, groups.y);
    atomic_fetch_add_explicit(count, 1u, memory_order_relaxed);
}
"""

VECTOR_LAYOUT = """
// MSL layouts: a packed_float3 array is (n, 3) floats, a half4 array (n, 4) halves; a float3 takes a float4's room.
kernel void vector_layout(
    device const packed_float3* p   [[buffer(0)]],
    device const half4* h           [[buffer(1)]],
    device float4* out              [[buffer(2)]],
    uint i                          [[thread_position_in_grid]],
    uint simd_width                 [[threads_per_simdgroup]])
{
    const float3 v = float3(p[i]);
    const float4 f = float4(h[i]);
    out[i] = float4(dot(v, v), dot(f, f), float(sizeof(float3)), float(simd_width));
}
"""

KERNELS = HEADER + RMS_NORM + SIMD_OPS + GRID_2D + VECTOR_LAYOUT
BARRIER = "threadgroup_barrier(mem_flags::mem_threadgroup);"


def seeded_bugs() -> str:
    """rms_norm_rows three times, broken: the second barrier removed; a barrier only thread 0 reaches; 32 KiB more
    threadgroup memory."""
    head, _, tail = RMS_NORM.rpartition(BARRIER)
    race = (head + tail).replace("rms_norm_rows", "rms_race")
    divergent = RMS_NORM.replace("rms_norm_rows", "rms_divergent").replace(
        "inv_rms = rsqrt(total / float(d) + eps);", "inv_rms = rsqrt(total / float(d) + eps);\n        " + BARRIER)
    hoard = RMS_NORM.replace("rms_norm_rows", "rms_hoard").replace(
        "threadgroup float inv_rms;", "threadgroup float inv_rms;\n    threadgroup float hoard[8192];")
    return HEADER + race + divergent + hoard


@pytest.fixture(scope="module")
def library() -> emulator.Library:
    return emulator.compile_library(KERNELS)


@pytest.fixture(scope="module")
def buggy() -> emulator.Library:
    return emulator.compile_library(seeded_bugs())


def rms_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.double()
    return xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + eps) * w.double()


def rms_inputs(rows: int = 5, d: int = 1000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(rows, d, generator=g) * 3).half()
    w = (1 + 0.1 * torch.randn(d, generator=g)).half()
    return x, w, torch.zeros_like(x)


# ---- numerics against float64 ----------------------------------------------------------------------------------

@pytest.mark.parametrize("lane_order", [0, 1])
@pytest.mark.parametrize("group", [256, 80])  # 80: the last simdgroup has 16 lanes
def test_rms_norm_matches_float64(library, lane_order, group):
    x, w, y = rms_inputs()
    library.rms_norm_rows(x, w, y, x.shape[1], 1e-6, threads=x.shape[0] * group, group_size=group,
                          lane_order=lane_order)
    torch.testing.assert_close(y.double(), rms_reference(x, w, 1e-6), atol=1e-3, rtol=2e-3)  # ~1 fp16 ulp


@pytest.mark.parametrize("lane_order", [0, 1])
def test_simd_ops_match_float64(library, lane_order):
    n, scale, broadcast, delta = 128, 0.5, 5, 3
    v = torch.randn(n, generator=torch.Generator().manual_seed(1))
    out = torch.zeros(n, 4)
    library.simd_ops(v, out, [scale], [broadcast, delta], threads=n, group_size=64, lane_order=lane_order)
    sg = v.double().view(-1, 32)
    lane = torch.arange(32)
    down = torch.where(lane + delta < 32, lane + delta, lane)  # the top lanes keep their own value
    ref = torch.stack([sg.sum(1, keepdim=True).expand(-1, 32) * scale, sg.amax(1, keepdim=True).expand(-1, 32),
                       sg.amin(1, keepdim=True).expand(-1, 32), sg[:, broadcast:broadcast + 1] + sg[:, down]], -1)
    torch.testing.assert_close(out.double(), ref.reshape(n, 4), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lane_order", [0, 1])
def test_2d_grid_with_partial_edge_threadgroups(library, lane_order):
    h, w, gx, gy = 11, 37, 8, 4
    img = torch.randn(h, w, generator=torch.Generator().manual_seed(2))
    mirrored, seen = torch.zeros(h, w), torch.zeros(h, w, 4, dtype=torch.int32)
    grid_seen, count = torch.zeros(3 * 5, 4, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    library.grid_2d(img, mirrored, seen, grid_seen, count, w, threads=(w, h), group_size=(gx, gy),
                    lane_order=lane_order)
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    size_x, size_y = (w - x // gx * gx).clamp(max=gx), (h - y // gy * gy).clamp(max=gy)  # 5 wide, 3 tall at the edges
    lx, ly = x % gx, y % gy
    assert torch.equal(mirrored, img[y, x // gx * gx + size_x - 1 - lx])
    sizes = size_x * 1000 + size_y * 100 + gx * 10 + gy
    assert torch.equal(seen.long(), torch.stack([x // gx, y // gy, sizes, lx + ly * size_x], -1))
    assert torch.equal(grid_seen.long(), torch.tensor([[w, h, 5, 3]]).expand(15, 4))
    assert count.item() == h * w


def test_vectors_have_msl_layouts(library):
    p, h, out = torch.randn(10, 3), torch.randn(10, 4).half(), torch.zeros(10, 4)
    library.vector_layout(p, h, out, threads=10)
    ref = torch.stack([p.double().square().sum(1), h.double().square().sum(1), torch.full((10,), 16.0),
                       torch.full((10,), 32.0)], -1)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


# ---- calling convention ------------------------------------------------------------------------------------------

def test_a_tensor_binds_from_its_storage_offset(library):
    x, w, _ = rms_inputs(rows=3, d=100)
    storage = torch.full((7 + x.numel(),), float("nan"), dtype=torch.half)
    storage[7:] = x.flatten()
    xs, y = storage[7:].view(3, 100), torch.full((1 + x.numel(),), float("nan"), dtype=torch.half)
    assert xs.storage_offset() == 7
    library.rms_norm_rows(xs, w, y[1:], 100, 1e-6, threads=3 * 64, group_size=64)
    assert y[0].isnan()  # nothing written before the offset
    torch.testing.assert_close(y[1:].view(3, 100).double(), rms_reference(x, w, 1e-6), atol=1e-3, rtol=2e-3)


@pytest.mark.parametrize("bad, match", [
    ("5", "cannot bind a str"),
    (True, "cannot bind a bool"),
    ([1, 2.0], "cannot bind a list"),
    ([], "cannot bind a list"),
    (2.5, "a Python float binds as a 32-bit float; declare it `constant float&`"),
])
def test_bad_arguments_are_type_errors(library, bad, match):
    x, w, y = rms_inputs(rows=1, d=32)
    with pytest.raises(TypeError, match=match):
        library.rms_norm_rows(x, w, y, bad, 1e-6, threads=32)


def test_argument_count_shapes_and_launch_sizes_are_checked(library):
    x, w, y = rms_inputs(rows=1, d=32)
    with pytest.raises(TypeError, match="takes 5 arguments"):
        library.rms_norm_rows(x, w, y, 32)
    with pytest.raises(TypeError, match="a list of floats binds as a float array; declare it `constant float\\*`"):
        library.rms_norm_rows(x, w, y, 32, [1e-6], threads=32)
    with pytest.raises(OverflowError, match="does not fit 64-bit longs"):
        library.rms_norm_rows(x, w, y, 2 ** 63, 1e-6, threads=32)
    with pytest.raises(ValueError, match="contiguous CPU tensors"):
        library.rms_norm_rows(torch.zeros(2, 32).t(), w, y, 32, 1e-6)
    with pytest.raises(ValueError, match="at most 1024"):
        library.rms_norm_rows(x, w, y, 32, 1e-6, threads=2048, group_size=2048)
    with pytest.raises(ValueError, match="same number of dimensions"):
        library.rms_norm_rows(x, w, y, 32, 1e-6, threads=(32, 2), group_size=32)
    with pytest.raises(AttributeError, match="no kernel 'rms'"):
        library.rms


def test_buffer_indices_must_be_0_to_n_minus_1_in_order():
    source = HEADER + SIMD_OPS.replace("[[buffer(2)]]", "[[buffer(9)]]")
    with pytest.raises(MetalSourceError, match=r"indices \[0, 1, 9, 3\] must be 0..3 in parameter order"):
        emulator.compile_library(source)


@pytest.mark.parametrize("change, message", [
    (("uint gid                   [[thread_position_in_grid]]", "uint gid"), "`uint gid` has no \\[\\[attribute\\]\\]"),
    (("uint gid                   [[thread_position_in_grid]]", "threadgroup float* t [[threadgroup(0)]]"),
     "threadgroup memory at dispatch"),
    (("[[thread_position_in_grid]]", "[[stage_in]]"), "\\[\\[stage_in\\]\\] is not supported"),
    (("const float x = v[gid];", "threadgroup float a[4], b[4];\n    const float x = v[gid];"),
     "one threadgroup variable per statement"),
])
def test_signatures_and_declarations_the_emulator_cannot_bind(change, message):
    with pytest.raises(MetalSourceError, match=message):
        emulator.compile_library(HEADER + SIMD_OPS.replace(*change))


FILL = HEADER + """
kernel void fill(device float* out [[buffer(0)]], constant float& value [[buffer(1)]],
                 uint i [[thread_position_in_grid]]) { out[i] = value; }
"""


def test_the_disk_cache_builds_each_library_once(monkeypatch, tmp_path):
    monkeypatch.setenv("CARAMBA_METAL_BUILD_DIR", str(tmp_path / "built"))
    builds = []
    build = emulator._build
    monkeypatch.setattr(emulator, "_build", lambda *a: builds.append(a) or build(*a))
    out = torch.zeros(1000)
    emulator.compile_library(FILL + "// a source of its own\n").fill(out, 2.0)  # threads: out.numel()
    assert len(builds) == 1 and torch.equal(out, torch.full((1000,), 2.0))
    so = builds[0][2]
    assert so.parent == tmp_path / "built" and so.with_suffix(".cpp").exists()
    mtime = so.stat().st_mtime_ns
    monkeypatch.setattr(emulator, "_LOADED", {})  # a fresh process: the file is there, nothing is loaded
    emulator.compile_library(FILL + "// a source of its own\n").fill(out, 3.0)
    assert len(builds) == 1 and so.stat().st_mtime_ns == mtime and torch.equal(out, torch.full((1000,), 3.0))


@pytest.mark.parametrize("change, error", [
    ("out[i] = undefined_value;", "undefined_value"),
    ("float scratch[i + 1]; scratch[0] = value; out[i] = scratch[0];", "variable length array"),  # MSL has none
])
def test_a_compile_error_names_the_cpp_file_and_the_error(change, error):
    with pytest.raises(MetalBuildError, match=rf"(?s)could not build .*/fill_\w+\.cpp.*{error}"):
        emulator.compile_library(FILL.replace("out[i] = value;", change))


def test_the_emulate_flag_is_read_in_flags(monkeypatch):
    monkeypatch.delenv("CARAMBA_METAL_EMULATE", raising=False)
    assert flags.metal_emulate() is False
    monkeypatch.setenv("CARAMBA_METAL_EMULATE", "yes")
    assert flags.metal_emulate() is True
    monkeypatch.setenv("CARAMBA_METAL_EMULATE", "maybe")
    with pytest.raises(ValueError, match="CARAMBA_METAL_EMULATE='maybe'"):
        flags.metal_emulate()


# ---- seeded bugs -------------------------------------------------------------------------------------------------

def test_a_removed_barrier_reads_the_poisoned_arena(buggy):
    x, w, y = rms_inputs()
    buggy.rms_race(x, w, y, x.shape[1], 1e-6, threads=x.shape[0] * 256, group_size=256, lane_order=1)
    # order 1 runs threads 255..1 past the first barrier before thread 0 writes inv_rms: they read NaN
    assert y.isnan().any()


def test_a_divergent_barrier_is_reported_not_hung(buggy):
    x, w, y = rms_inputs()
    start = time.monotonic()
    with pytest.raises(MetalRunError, match=r"rms_divergent: threadgroup \(0,0,0\): divergent barrier: of 256 "
                                            r"threads, 1 wait at threadgroup_barrier.* 255 have returned"):
        buggy.rms_divergent(x, w, y, x.shape[1], 1e-6, threads=x.shape[0] * 256, group_size=256)
    assert time.monotonic() - start < 5


def test_threadgroup_memory_over_32_kib_is_refused(buggy):
    x, w, y = rms_inputs()
    with pytest.raises(MetalRunError, match=r"rms_hoard: .*`hoard` ends at byte 32900, over the 32768 bytes"):
        buggy.rms_hoard(x, w, y, x.shape[1], 1e-6, threads=x.shape[0] * 256, group_size=256)


# ---- the lint ----------------------------------------------------------------------------------------------------

RECURSIVE = HEADER + """
float twice(float x, uint n) { return n == 0 ? x : twice(x, n - 1) * 2.0f; }
kernel void k(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]]) { out[i] = twice(out[i], 3); }
"""
DYNAMIC = HEADER + """
kernel void k(device float* out [[buffer(0)]], constant long& n [[buffer(1)]], uint i [[thread_position_in_grid]]) {
    threadgroup float scratch[n];
    scratch[0] = 0.0f;
    out[i] = scratch[0];
}
"""
CONSTANT_SIZED = HEADER + """
constexpr uint SIMDGROUPS = 4;
kernel void k(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]]) {
    threadgroup float scratch[SIMDGROUPS * 32 + 1];
    scratch[i] = 1.0f;
    out[i] = scratch[i];
}
"""
FUNCTION_CONSTANT = HEADER + """
constant bool use_bias [[function_constant(0)]];
kernel void k(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]]) { out[i] = use_bias; }
"""


@pytest.mark.parametrize("source, problem", [
    (FILL.replace("float", "double"), "line 4: `double`: Metal has no double"),
    (RECURSIVE, "line 4: twice calls itself"),
    (DYNAMIC, "line 5: threadgroup array `scratch[n]`: its size must be an integer constant"),
    (FUNCTION_CONSTANT, "line 4: function constants"),
    (HEADER + SIMD_OPS.replace("[[buffer(3)]]", "[[buffer(2)]]", 1), "indices [0, 1, 2, 2] must be 0..3"),
])
def test_the_dialect_rules_refuse_what_a_mac_refuses(source, problem):
    problems = msl.dialect_problems(source)
    assert any(problem in p for p in problems), problems
    with pytest.raises(MetalSourceError, match="would not compile on a Mac"):
        emulator.compile_library(source)


def test_the_dialect_rules_accept_the_kernels():
    assert msl.dialect_problems(KERNELS) == []
    assert msl.dialect_problems(CONSTANT_SIZED) == []


def test_clang_checks_address_spaces():
    reason = lint.unavailable()
    if reason:
        pytest.skip(reason)
    assert lint.lint(KERNELS) == []
    assert lint.lint(CONSTANT_SIZED) == []
    mixed = lint.lint(KERNELS.replace("device const half* xr = x", "threadgroup const half* xr = x"))
    assert len(mixed) == 1 and "address_space(3)" in mixed[0] and "kernel.metal:" in mixed[0]
    assert any("twice calls itself" in p for p in lint.lint(RECURSIVE))
    assert any("double" in p for p in lint.lint(FILL.replace("float", "double")))
    private_vla = FILL.replace("out[i] = value;", "float scratch[i + 1]; scratch[0] = value; out[i] = scratch[0];")
    assert any("variable length arrays" in p for p in lint.lint(private_vla))


def test_the_lint_says_why_it_cannot_run(monkeypatch):
    monkeypatch.setattr(lint, "CLANG", "clang++-not-installed")
    assert "clang++-not-installed is not on PATH" in lint.unavailable()
    with pytest.raises(lint.LintUnavailable, match="apt-get install clang"):
        lint.lint(KERNELS)
