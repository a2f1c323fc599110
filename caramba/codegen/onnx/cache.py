"""The KV cache in ONNX: kv_append and the cached attention ops as graph inputs/outputs and standard ops.

Layout: caramba's runtime layout (runtime/kv_cache.py, runtime/quant.py), so the runner binds a KVCache's own
buffers and a cache moves between targets unchanged: per layer and cached tensor a codes tensor (batch, T, W) and,
for q8_0/q4_0, an fp16 scales tensor (batch, T, n_blocks). Names follow Hugging Face Optimum's
`past_key_values.{i}.key` / `present.{i}.key` (k -> key, v -> value, k_sem -> key_sem, k_geo -> key_geo, scales
add `_scales`). Optimum's float caches are (batch, kv_heads, T, head_dim); caramba keeps (batch, T, kv_heads·head_dim)
for every kind (the same bytes per token, one layout whatever the kind): metadata `caramba.cache` says so.

Two ways to write the step's tokens (`mode`):
- "concat" (opset 23): inputs hold the past (batch, past, W), outputs the present (batch, past + seq, W):
  present = ScatterND(Concat(past, new), [b, positions[b, s]], new). Concat appends at `past` (right for every
  row of an even batch); ScatterND moves each ragged row's tokens to its own positions. ORT copies the whole past
  every step (what Attention-23's own past/present does too).
- "scatter" (opset 24): inputs and outputs are the whole preallocated buffers (batch, max_seq_len, W) and
  present = TensorScatter(past, new, write_indices = positions[:, 0]); a runner that binds past and present to
  one buffer gets the write in place. Attention reads Slice(present, 0, ctx), ctx = the longest row after the
  write, so its cost follows the used length, not the buffer.

Reads decode through the storage kind exactly as runtime/quant.py does (q8_0: DequantizeLinear with fp32 scales,
block qblock; q4_0: nibbles unpacked with BitwiseAnd / BitShift, DequantizeLinear with zero point 8; nf4: the
same nibbles through a Gather of the level table times the scale; fp16: Cast),
then every layer runs one Attention (opset 23) with 3-D inputs: key j visible to the query at position p iff
j <= p (bool mask, per row). DBA is one Attention over per-head [q_sem·s_sem ‖ q_geo·s_geo] and [k_sem ‖ k_geo]
with scale 1 (SPEC §1 step 5).
"""
from __future__ import annotations

from dataclasses import dataclass

from caramba.codegen.onnx.emit import onnx_dtype
from caramba.codegen.onnx.ops import Lowering
from caramba.errors import UnsupportedOpError
from caramba.ir.graph import Node
from caramba.ir.types import DType
from caramba.runtime.quant import code_width, n_blocks, padded_features, parse_kind

MODES = ("concat", "scatter")
ONNX_NAMES = {"k": "key", "v": "value", "k_sem": "key_sem", "k_geo": "key_geo"}
SUPPORTED_KINDS = ("fp32", "fp16", "q8_0", "q4_0", "nf4")


@dataclass(frozen=True)
class CachePart:
    """One cache tensor of the ONNX model: a layer's codes or scales of one cached tensor."""

    layer: int
    tensor: str  # k, v, k_sem, k_geo
    part: str  # "codes" or "scales"
    input: str
    output: str
    dtype: DType
    width: int  # last dim


def cache_parts(n_layers: int, features: dict[str, int], kinds: dict[str, str], qblock: int) -> list[CachePart]:
    parts = []
    for i in range(n_layers):
        for name, f in features.items():
            kind = parse_kind(kinds[name])
            base = ONNX_NAMES[name]
            parts.append(CachePart(i, name, "codes", f"past_key_values.{i}.{base}", f"present.{i}.{base}",
                                   DType.from_torch(kind.code_dtype), code_width(kind, f, qblock)))
            if kind.block_scaled:
                parts.append(CachePart(i, name, "scales", f"past_key_values.{i}.{base}_scales",
                                       f"present.{i}.{base}_scales", DType.f16, n_blocks(kind, f, qblock)))
    return parts


def check_kinds(kinds: dict[str, str], residual_len: int) -> None:
    bad = {n: k for n, k in kinds.items() if k not in SUPPORTED_KINDS}
    if bad:
        raise UnsupportedOpError(f"target 'onnx' stores KV caches as {', '.join(SUPPORTED_KINDS)}; {bad} has no "
                                 f"runner here (numpy, which ORT binds buffers through, has no bf16): pick one of "
                                 f"those kinds, or target='eager'")
    if residual_len:
        raise UnsupportedOpError(f"target 'onnx' does not implement the fp16 residual ring (cache_residual_len="
                                 f"{residual_len}); use cache_residual_len=0 (or q8_0, which needs no ring), or "
                                 f"target='eager'")


class CacheLowering:
    """Graph-wide pieces of the cached graph: cache inputs/outputs, the write indices, ctx and the mask."""

    def __init__(self, lw: Lowering, mode: str, parts: list[CachePart], positions: str, seq_len: str,
                 qblock: int, features: dict[str, int], kinds: dict[str, str], max_seq_len: int) -> None:
        if mode not in MODES:
            raise ValueError(f"cache mode must be one of {MODES}, got {mode!r}")
        self.lw, self.b, self.mode, self.qblock = lw, lw.b, mode, qblock
        self.features, self.kinds = features, kinds
        self.parts = {(p.layer, p.tensor, p.part): p for p in parts}
        self.positions = positions
        past_dim = "past_sequence_length" if mode == "concat" else max_seq_len
        for p in parts:
            self.b.add_input(p.input, p.dtype, ["batch_size", past_dim, p.width])
        b = self.b
        self.write_idx = b.op("Gather", [positions, b.const(0)], "write_idx", axis=1)  # (B,)
        if mode == "concat":
            first = parts[0].input
            past = b.op("Shape", [first], "past", start=1, end=2)
            self.ctx = b.op("Add", [past, seq_len], "ctx")
            self.scatter_idx = self._scatter_indices()
        else:
            last = b.op("Gather", [positions, b.op("Sub", [seq_len, b.const([1])])], "last_pos", axis=1)  # (B, 1)
            self.ctx = b.op("Add", [b.op("ReduceMax", [last], "max_pos", keepdims=0), b.const(1)], "ctx")
            self.ctx = b.op("Reshape", [self.ctx, b.const([1])], "ctx")
            past = b.op("Sub", [self.ctx, seq_len], "past")
        b.bind_dim("past", past)
        keys = b.op("Range", [b.const(0), b.op("Squeeze", [self.ctx]), b.const(1)], "keys")  # (ctx,)
        pos3 = b.op("Unsqueeze", [positions, b.const([2])], "pos3")  # (B, S, 1)
        self.mask = b.op("Unsqueeze", [b.op("LessOrEqual", [keys, pos3], "visible"), b.const([1])], "mask")
        self.present: dict[int, dict[str, tuple[str, str | None]]] = {}
        self.outputs: list[tuple[str, CachePart]] = []

    def _scatter_indices(self) -> str:
        """(B, S, 2) int64: [b, positions[b, s]], where ScatterND puts each row's tokens."""
        b, shape = self.b, self.b.op("Shape", [self.positions], "pos_shape")
        batch = b.op("Gather", [shape, b.const(0)], "batch")
        rows = b.op("Unsqueeze", [b.op("Range", [b.const(0), batch, b.const(1)], "rows"), b.const([1])])
        rows = b.op("Expand", [rows, shape], "rows")
        both = [b.op("Unsqueeze", [x, b.const([2])]) for x in (rows, self.positions)]
        return b.op("Concat", both, "scatter_idx", axis=2)

    # -- write ----------------------------------------------------------------------------------------------------
    def append(self, n: Node) -> list[str]:
        """kv_append: quantize/cast the step's tokens and write them; remembers each tensor's present."""
        layer = n.attrs["layer"]
        self.present[layer] = {}
        for name, x in zip(n.attrs["names"], n.inputs[1:]):
            codes, scales = self._encode(self.lw[x], x.type.dtype, name)
            stored = [(codes, "codes"), (scales, "scales")] if scales is not None else [(codes, "codes")]
            written = [self._write(value, self.parts[(layer, name, part)]) for value, part in stored]
            self.present[layer][name] = (written[0], written[1] if len(written) > 1 else None)
        return [self.write_idx]  # the rows' lengths value orders nothing in ONNX: data edges go through present

    def _write(self, new: str, part: CachePart) -> str:
        b = self.b
        if self.mode == "concat":
            full = b.op("Concat", [part.input, new], "cat", axis=1)
            out, = b.op("ScatterND", [full, self.scatter_idx, new], outputs=[b.claim(part.output)])
        else:
            out, = b.op("TensorScatter", [part.input, new, self.write_idx], outputs=[b.claim(part.output)], axis=1)
        self.outputs.append((out, part))
        return out

    def _encode(self, x: str, dtype: DType, name: str) -> tuple[str, str | None]:
        kind = parse_kind(self.kinds[name])
        if not kind.block_scaled:
            return self.lw.cast(x, dtype, DType.from_torch(kind.code_dtype)), None
        quantize = {"q8_0": self._quantize_q8_0, "q4_0": self._quantize_q4_0, "nf4": self._quantize_nf4}
        return quantize[kind.name](x, dtype, name)

    def _blocks(self, x: str, dtype: DType, name: str) -> str:
        """(B, S, F) -> (B, S, nb, qblock) fp32, zero-padded to whole blocks (quant._blocks)."""
        b, f = self.b, self.features[name]
        x32 = self.lw.cast(x, dtype, DType.f32)
        fp = padded_features(f, self.qblock)
        if fp != f:
            x32 = b.op("Pad", [x32, b.const([0, 0, 0, 0, 0, fp - f])], "pad")
        return b.op("Reshape", [x32, b.const([0, 0, fp // self.qblock, self.qblock])], "blocks")

    def _divide(self, xb: str, d16: str) -> str:
        """xb / fp32(d16), 0 where d16 == 0 (quant._divide)."""
        b = self.b
        d = b.op("Cast", [d16], "d32", to=onnx_dtype(DType.f32))
        zero = b.op("Equal", [d, b.const(0.0, DType.f32)], "d_zero")
        safe = b.op("Where", [zero, b.const(1.0, DType.f32), d], "d_safe")
        return b.op("Where", [zero, b.const(0.0, DType.f32), b.op("Div", [xb, safe])], "x_over_d")

    def _quantize_q8_0(self, x: str, dtype: DType, name: str) -> tuple[str, str]:
        b = self.b
        xb = self._blocks(x, dtype, name)
        amax = b.op("ReduceMax", [b.op("Abs", [xb]), b.const([-1])], "amax", keepdims=1)
        d16 = b.op("Cast", [b.op("Div", [amax, b.const(127.0, DType.f32)])], "d16", to=onnx_dtype(DType.f16))
        q = b.op("Round", [self._divide(xb, d16)], "q")
        q = b.op("Clip", [q, b.const(-127.0, DType.f32), b.const(127.0, DType.f32)], "q")
        codes = b.op("Reshape", [b.op("Cast", [q], to=onnx_dtype(DType.i8)), b.const([0, 0, -1])], "q8_codes")
        return codes, b.op("Squeeze", [d16, b.const([-1])], "q8_scales")

    def _quantize_q4_0(self, x: str, dtype: DType, name: str) -> tuple[str, str]:
        b = self.b
        xb = self._blocks(x, dtype, name)
        at = b.op("ArgMax", [b.op("Abs", [xb])], "argmax", axis=-1, keepdims=1, select_last_index=0)
        m = b.op("GatherElements", [xb, at], "signed_absmax", axis=-1)
        d16 = b.op("Cast", [b.op("Div", [m, b.const(-8.0, DType.f32)])], "d16", to=onnx_dtype(DType.f16))
        q = b.op("Add", [b.op("Round", [self._divide(xb, d16)]), b.const(8.0, DType.f32)], "q")
        q = b.op("Clip", [q, b.const(0.0, DType.f32), b.const(15.0, DType.f32)], "q")
        q = b.op("Cast", [q], "q4", to=onnx_dtype(DType.u8))
        return self._pack(q), b.op("Squeeze", [d16, b.const([-1])], "q4_scales")

    def _quantize_nf4(self, x: str, dtype: DType, name: str) -> tuple[str, str]:
        """q = how many of the fp32 midpoints between NF4 levels lie strictly below x / d16 (torch.bucketize)."""
        from caramba.runtime.quant import _NF4_MIDPOINTS_T

        b = self.b
        xb = self._blocks(x, dtype, name)
        amax = b.op("ReduceMax", [b.op("Abs", [xb]), b.const([-1])], "amax", keepdims=1)
        d16 = b.op("Cast", [amax], "d16", to=onnx_dtype(DType.f16))
        v = b.op("Unsqueeze", [self._divide(xb, d16), b.const([-1])], "v")
        below = b.op("Less", [b.const(_NF4_MIDPOINTS_T.numpy(), DType.f32), v], "below")
        q = b.op("ReduceSum", [b.op("Cast", [below], to=onnx_dtype(DType.i64)), b.const([-1])], "nf4", keepdims=0)
        q = b.op("Cast", [q], "nf4", to=onnx_dtype(DType.u8))
        return self._pack(q), b.op("Squeeze", [d16, b.const([-1])], "nf4_scales")

    def _pack(self, q: str) -> str:
        """(B, S, nb, qblock) uint8 codes in [0, 15] -> (B, S, Fp/2): byte j = code[2j] | code[2j+1] << 4."""
        b = self.b
        pairs = b.op("Reshape", [q, b.const([0, 0, -1, 2])], "pairs")  # (B, S, Fp/2, 2): (even, odd) features
        last = b.const([-1])
        lo = b.op("Slice", [pairs, b.const([0]), b.const([1]), last], "lo")
        hi = b.op("Slice", [pairs, b.const([1]), b.const([2]), last], "hi")
        hi = b.op("BitShift", [hi, b.const(4, DType.u8)], "hi", direction="LEFT")
        return b.op("Reshape", [b.op("BitwiseOr", [lo, hi]), b.const([0, 0, -1])], "packed")

    def _unpack(self, codes: str) -> str:
        """(B, T, Fp/2) packed bytes -> (B, T, Fp) uint8 codes, even feature from the low nibble."""
        b, last = self.b, self.b.const([-1])
        lo = b.op("Unsqueeze", [b.op("BitwiseAnd", [codes, b.const(15, DType.u8)]), last], "lo")
        hi = b.op("Unsqueeze", [b.op("BitShift", [codes, b.const(4, DType.u8)], direction="RIGHT"), last], "hi")
        return b.op("Reshape", [b.op("Concat", [lo, hi], axis=-1), b.const([0, 0, -1])], "codes")

    # -- read -----------------------------------------------------------------------------------------------------
    def read(self, layer: int, name: str, dtype: DType) -> str:
        """(B, ctx, F) in dtype: the present decoded through its kind."""
        b = self.b
        codes, scales = self.present[layer][name]
        if self.mode == "scatter":
            codes = b.op("Slice", [codes, b.const([0]), self.ctx, b.const([1])], "ctx_codes")
            if scales is not None:
                scales = b.op("Slice", [scales, b.const([0]), self.ctx, b.const([1])], "ctx_scales")
        kind = parse_kind(self.kinds[name])
        if not kind.block_scaled:
            return self.lw.cast(codes, DType.from_torch(kind.code_dtype), dtype)
        s32 = b.op("Cast", [scales], "scales32", to=onnx_dtype(DType.f32))
        if kind.name == "q8_0":
            x = b.op("DequantizeLinear", [codes, s32], "dq8", axis=-1, block_size=self.qblock)
        elif kind.name == "q4_0":
            zp = b.op("Expand", [b.const(8, DType.u8), b.op("Shape", [scales])], "zp")
            x = b.op("DequantizeLinear", [self._unpack(codes), s32, zp], "dq4", axis=-1, block_size=self.qblock)
        else:  # nf4: a level table lookup times the block's scale (no DequantizeLinear form)
            from caramba.runtime.quant import NF4_LEVELS

            idx = b.op("Cast", [self._unpack(codes)], "idx", to=onnx_dtype(DType.i64))
            levels = b.op("Gather", [b.const(list(NF4_LEVELS), DType.f32), idx], "levels", axis=0)
            blocks = b.op("Reshape", [levels, b.const([0, 0, -1, self.qblock])], "level_blocks")
            x = b.op("Mul", [blocks, b.op("Unsqueeze", [s32, b.const([-1])])], "dnf4")
            x = b.op("Reshape", [x, b.const([0, 0, -1])], "dnf4")
        f = self.features[name]
        if padded_features(f, self.qblock) != f:
            x = b.op("Slice", [x, b.const([0]), b.const([f]), b.const([-1])], "unpad")
        if dtype == DType.f16:  # quant.dequantize saturates instead of overflowing to inf
            x = b.op("Clip", [x, b.const(-65504.0, DType.f32), b.const(65504.0, DType.f32)], "sat")
        return self.lw.cast(x, DType.f32, dtype)

    # -- attention ------------------------------------------------------------------------------------------------
    def attention(self, n: Node) -> list[str]:
        lw, b = self.lw, self.b
        layer, heads, hkv = n.attrs["layer"], n.inputs[0].type.shape[1], n.attrs["kv_heads"]
        q_dt = n.inputs[0].type.dtype
        if n.op == "cached_attention":
            q, scale = lw[n.inputs[0]], float(n.attrs["scale"])
            k = self.read(layer, "k", q_dt)
        else:
            q = b.op("Concat", [self._scaled(lw[n.inputs[0]], n.attrs["scale_sem"], q_dt),
                                self._scaled(lw[n.inputs[1]], n.attrs["scale_geo"], q_dt)], "q_cat", axis=-1)
            scale = 1.0
            per_head = [b.op("Reshape", [self.read(layer, t, q_dt), b.const([0, 0, hkv, -1])], "k_heads")
                        for t in ("k_sem", "k_geo")]
            k = b.op("Reshape", [b.op("Concat", per_head, "k_cat", axis=-1), b.const([0, 0, -1])], "k_cat")
        v = self.read(layer, "v", q_dt)
        q3 = b.op("Reshape", [b.op("Transpose", [q], perm=[0, 2, 1, 3]), b.const([0, 0, -1])], "q3")
        y = b.op("Attention", [q3, k, v, self.mask], "attention", scale=scale, q_num_heads=heads, kv_num_heads=hkv)
        y = b.op("Reshape", [y, b.const([0, 0, heads, n.attrs["v_head_dim"]])], "y4")
        return [b.op("Transpose", [y], "attn_out", perm=[0, 2, 1, 3])]

    def _scaled(self, q: str, scale: float, dtype: DType) -> str:
        return self.b.op("Mul", [q, self.b.const(scale, dtype)], "q_scaled")


def register(cl: CacheLowering) -> dict:
    """The cache ops' lowerings bound to one graph's CacheLowering (merged over ops.OPS by the model builder)."""
    return {"kv_append": lambda lw, n: cl.append(n), "cached_attention": lambda lw, n: cl.attention(n),
            "cached_decoupled_attention": lambda lw, n: cl.attention(n)}


