"""The KV cache in ONNX: kv_append and the cached attention ops as graph inputs/outputs and standard ops.

Two cache layouts (`layout`):
- "caramba" (what the runner binds): caramba's runtime layout (runtime/kv_cache.py, ir/quant.py) for every
  kind, so the runner binds a KVCache's own buffers and a cache moves between targets unchanged: per layer and
  cached tensor a codes tensor (batch, T, W) and, for q8_0/q4_0/nf4, an fp16 scales tensor (batch, T, n_blocks).
  Row b writes its tokens at position_ids[b, 0].. and key j is visible to the query at position p iff j <= p,
  so ragged batches need no attention mask.
- "optimum" (what `caramba export-onnx` writes by default, mode "concat" only): fp32/fp16 tensors are
  (batch, kv_heads, T, head_dim) as Hugging Face Optimum and onnxruntime-genai expect; quantized kinds keep
  caramba's (batch, T, W) codes + scales. The model takes `attention_mask` (batch, past + seq): the step's tokens
  are appended at the end (cache index, not position), key j is visible to the step's token i iff
  j <= past + i and attention_mask[b, j] != 0 (left padding is masked); position_ids only drive RoPE.

Names follow Optimum's `past_key_values.{i}.key` / `present.{i}.key` (k -> key, v -> value, k_sem -> key_sem,
k_geo -> key_geo; scales add `_scales`). Ways to write the step's tokens (`mode`):
- "concat" (opset 23): inputs hold the past, outputs the present = Concat(past, new) (caramba layout:
  ScatterND then moves each ragged row's tokens to its own positions). ORT copies the whole past every step.
- "scatter" (opset 24): inputs and outputs are the whole preallocated buffers (batch, max_seq_len, W) and
  present = TensorScatter(past, new, write_indices = positions[:, 0]); bound to one buffer, the write is in place.
  Attention reads Slice(present, 0, ctx), ctx = the longest row after the write.
- "shadow" (opset 24): the KVCache buffers are written in place as in "scatter" but never read; attention reads
  per-layer attention buffers `past_attention.{i}.key` / `.value` (batch, kv_heads, capacity, head_dim) in the
  compute dtype, holding every cached token *as read through its storage kind* (DBA keys already
  [k_sem ‖ k_geo] per head), updated in place by TensorScatter with the step's tokens only; one Attention-24
  reads them under a per-row position mask. No concat, slice or dequantization of the past per step; costs a
  compute-dtype copy of the cache (runner-owned, grown in buckets of CAPACITY_STEP positions).
- "contrib" (opset 24 + com.microsoft, opt-in `ort_contrib=True`): like "shadow", but com.microsoft
  GroupQueryAttention reads and writes the attention buffers (past and present shared, seqlens_k per row).
  Its limits: value head size must equal the q/k head size (DBA and any dv != dk are zero-padded to the larger:
  padding Q and K with zeros leaves the scores unchanged, padded V columns are sliced off the output); its own
  quantized caches take per-tensor or per-channel scales only, not caramba's blocks of 32, so every storage kind
  is quantized into the KVCache and dequantized outside the op into the attention buffers (exact); with a past,
  a step of several tokens needs batch 1 (the runner then runs rows one at a time).

Reads decode through the storage kind exactly as ir/quant.py does (q8_0: DequantizeLinear with fp32 scales,
block qblock; q4_0: nibbles unpacked with BitwiseAnd / BitShift, DequantizeLinear with zero point 8; nf4: the
same nibbles through a Gather of the level table times the scale; fp16: Cast). DBA is one attention over per-head
[q_sem·s_sem ‖ q_geo·s_geo] and [k_sem ‖ k_geo] with scale 1 (SPEC §1 step 5).
"""
from __future__ import annotations

from dataclasses import dataclass

from caramba.codegen.onnx.backend import SUPPORTED_KINDS
from caramba.codegen.onnx.emit import onnx_dtype
from caramba.codegen.onnx.ops import Lowering
from caramba.errors import UnsupportedOpError
from caramba.ir.graph import Node
from caramba.ir.types import DType
from caramba.ir.quant import code_width, n_blocks, padded_features, parse_kind

MODES = ("concat", "scatter", "shadow", "contrib")
LAYOUTS = ("caramba", "optimum")
ONNX_NAMES = {"k": "key", "v": "value", "k_sem": "key_sem", "k_geo": "key_geo"}
KEY_TENSORS = {"standard": ("k",), "decoupled": ("k_sem", "k_geo")}
CAPACITY_STEP = 256  # attention buffers ("shadow", "contrib") grow by this many positions


@dataclass(frozen=True)
class CachePart:
    """One cache tensor of the ONNX model: a layer's codes or scales of one cached tensor, or (shadow/contrib) a
    layer's attention buffer. heads == 0: (batch, T, width); heads > 0: (batch, heads, T, width)."""

    layer: int
    tensor: str  # k, v, k_sem, k_geo; "attn_key" / "attn_value" for attention buffers
    part: str  # "codes", "scales" or "attention"
    input: str
    output: str
    dtype: DType
    width: int  # last dim
    heads: int = 0

    @property
    def seq_axis(self) -> int:
        return 2 if self.heads else 1


def cache_parts(n_layers: int, heads: dict[str, tuple[int, int]], kinds: dict[str, str], qblock: int,
                layout: str = "caramba") -> list[CachePart]:
    """The KVCache's tensors as model inputs/outputs (float kinds head-major in the "optimum" layout)."""
    parts = []
    for i in range(n_layers):
        for name, (h, d) in heads.items():
            kind, f, base = parse_kind(kinds[name]), h * d, ONNX_NAMES[name]
            dtype = DType.from_torch(kind.code_dtype)
            if layout == "optimum" and not kind.block_scaled:
                parts.append(CachePart(i, name, "codes", f"past_key_values.{i}.{base}", f"present.{i}.{base}",
                                       dtype, d, h))
                continue
            parts.append(CachePart(i, name, "codes", f"past_key_values.{i}.{base}", f"present.{i}.{base}",
                                   dtype, code_width(kind, f, qblock)))
            if kind.block_scaled:
                parts.append(CachePart(i, name, "scales", f"past_key_values.{i}.{base}_scales",
                                       f"present.{i}.{base}_scales", DType.f16, n_blocks(kind, f, qblock)))
    return parts


# ONNX Runtime's GroupQueryAttention (CPU) takes only head sizes that are multiples of this
GQA_HEAD_MULTIPLE = 8


def attention_dims(family: str, heads: dict[str, tuple[int, int]], mode: str) -> tuple[int, int, int]:
    """(kv_heads, key head dim, value head dim) of the attention buffers; contrib pads both to the larger, rounded
    up to a multiple of GQA_HEAD_MULTIPLE (zero columns of q and k leave the scores, whose scale is explicit,
    unchanged; zero columns of v are sliced off the output)."""
    h = heads["v"][0]
    dk = sum(heads[n][1] for n in KEY_TENSORS[family])
    dv = heads["v"][1]
    if mode != "contrib":
        return h, dk, dv
    d = -(-max(dk, dv) // GQA_HEAD_MULTIPLE) * GQA_HEAD_MULTIPLE
    return h, d, d


def attention_parts(n_layers: int, family: str, heads: dict[str, tuple[int, int]], mode: str,
                    dtype: DType) -> list[CachePart]:
    if mode not in ("shadow", "contrib"):
        return []
    h, dk, dv = attention_dims(family, heads, mode)
    return [CachePart(i, f"attn_{t}", "attention", f"past_attention.{i}.{t}", f"present_attention.{i}.{t}", dtype,
                      d, h) for i in range(n_layers) for t, d in (("key", dk), ("value", dv))]


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

    def __init__(self, lw: Lowering, mode: str, layout: str, parts: list[CachePart], attn: list[CachePart],
                 positions: str, seq_len: str, qblock: int, heads: dict[str, tuple[int, int]],
                 kinds: dict[str, str], max_seq_len: int, attention_mask: str | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"cache mode must be one of {MODES}, got {mode!r}")
        self.lw, self.b, self.mode, self.layout, self.qblock = lw, lw.b, mode, layout, qblock
        self.heads, self.kinds, self.max_seq_len = heads, kinds, max_seq_len
        self.features = {n: h * d for n, (h, d) in heads.items()}
        self.parts = {(p.layer, p.tensor, p.part): p for p in parts + attn}
        self.positions, self.seq_len = positions, seq_len
        for p in parts + attn:
            self.b.add_input(p.input, p.dtype, self.dims(p, "past"))
        b = self.b
        self.write_idx = b.op("Gather", [positions, b.const(0)], "write_idx", axis=1)  # (B,)
        if mode == "concat":
            past = b.op("Shape", [parts[0].input], "past", start=parts[0].seq_axis, end=parts[0].seq_axis + 1)
            self.ctx = b.op("Add", [past, seq_len], "ctx")
            if layout == "caramba":
                self.scatter_idx = self._scatter_indices()
        else:
            last = b.op("Gather", [positions, b.op("Sub", [seq_len, b.const([1])])], "last_pos", axis=1)  # (B, 1)
            self.ctx = b.op("Add", [b.op("ReduceMax", [last], "max_pos", keepdims=0), b.const(1)], "ctx")
            self.ctx = b.op("Reshape", [self.ctx, b.const([1])], "ctx")
            past = b.op("Sub", [self.ctx, seq_len], "past")
            if mode == "contrib":
                i32 = onnx_dtype(DType.i32)
                self.seqlens_k = b.op("Cast", [b.op("Squeeze", [last, b.const([1])])], "seqlens_k", to=i32)
                self.total = b.op("Cast", [b.op("Squeeze", [self.ctx, b.const([0])])], "total_len", to=i32)
        b.bind_dim("past", past)
        if mode == "shadow":
            first = attn[0].input
            self.mask = self._position_mask(b.op("Squeeze", [b.op("Shape", [first], start=2, end=3)], "capacity"))
        elif layout == "optimum":
            self.mask = self._index_mask(past, attention_mask)
        elif mode != "contrib":
            self.mask = self._position_mask(b.op("Squeeze", [self.ctx]))
        self._windowed: dict[int, str] = {}  # sliding window -> its mask (mask_for)
        self.present: dict[int, dict[str, tuple[str, str | None]]] = {}
        self.new: dict[int, dict[str, str]] = {}  # layer -> tensor -> the step's tokens as read, (B, S, F)
        self.outputs: list[tuple[str, CachePart]] = []

    def dims(self, p: CachePart, which: str) -> list:
        if p.part == "attention":
            seq = "cache_capacity"
        elif self.mode == "concat":
            seq = f"{which}_sequence_length"
        else:
            seq = self.max_seq_len
        return ["batch_size", p.heads, seq, p.width] if p.heads else ["batch_size", seq, p.width]

    def _position_mask(self, n_keys: str) -> str:
        """(B, 1, S, n_keys) bool: key j visible to the query at position p iff j <= p."""
        b = self.b
        keys = b.op("Range", [b.const(0), n_keys, b.const(1)], "keys")
        pos3 = b.op("Unsqueeze", [self.positions, b.const([2])], "pos3")  # (B, S, 1)
        self._query_at = (keys, b.op("Unsqueeze", [pos3, b.const([1])], "pos4"))  # (n_keys,), (B, 1, S, 1)
        return b.op("Unsqueeze", [b.op("LessOrEqual", [keys, pos3], "visible"), b.const([1])], "mask")

    def mask_for(self, window: int) -> str:
        """The attention mask of a layer with a sliding window of `window` keys (0: the plain causal mask): the
        causal mask and key j > p - window."""
        if not window:
            return self.mask
        if window not in self._windowed:
            b = self.b
            keys, query = self._query_at
            low = b.op("Sub", [query, b.const(window)], "window_low")
            self._windowed[window] = b.op("And", [self.mask, b.op("Greater", [keys, low], "in_window")],
                                          f"mask_w{window}")
        return self._windowed[window]

    def _index_mask(self, past: str, attention_mask: str) -> str:
        """(B, 1, S, ctx) bool: key j visible to the step's token i iff j <= past + i and attention_mask[b, j]."""
        b = self.b
        ctx = b.op("Squeeze", [self.ctx])
        keys = b.op("Range", [b.const(0), ctx, b.const(1)], "keys")  # (ctx,)
        rows = b.op("Range", [b.op("Squeeze", [past]), ctx, b.const(1)], "query_index")  # (S,)
        self._query_at = (keys, b.op("Unsqueeze", [rows, b.const([1])], "query_at"))  # (ctx,), (S, 1)
        causal = b.op("LessOrEqual", [keys, self._query_at[1]], "causal")  # (S, ctx)
        keep = b.op("Cast", [attention_mask], "keep", to=onnx_dtype(DType.bool))
        keep = b.op("Unsqueeze", [keep, b.const([1, 2])], "keep")  # (B, 1, 1, ctx)
        return b.op("And", [causal, keep], "mask")

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
        layer, dt = n.attrs["layer"], n.inputs[1].type.dtype
        self.present[layer], self.new[layer] = {}, {}
        for name, x in zip(n.attrs["names"], n.inputs[1:]):
            codes, scales = self._encode(self.lw[x], x.type.dtype, name)
            stored = [(codes, "codes"), (scales, "scales")] if scales is not None else [(codes, "codes")]
            written = [self._write(value, self.parts[(layer, name, part)]) for value, part in stored]
            self.present[layer][name] = (written[0], written[1] if len(written) > 1 else None)
            if self.mode in ("shadow", "contrib"):
                self.new[layer][name] = self._decode(codes, scales, name, dt)
        if self.mode == "shadow":
            self._write_attention(layer)
        return [self.write_idx]  # the rows' lengths value orders nothing in ONNX: data edges go through present

    def _write(self, new: str, part: CachePart) -> str:
        b = self.b
        if self.mode == "concat" and part.heads:  # (B, S, H·d) -> (B, H, S, d), appended at the end
            heads = b.op("Reshape", [new, b.const([0, 0, part.heads, part.width])], "new_heads")
            new = b.op("Transpose", [heads], "new_bhsd", perm=[0, 2, 1, 3])
            out, = b.op("Concat", [part.input, new], outputs=[b.claim(part.output)], axis=2)
        elif self.mode == "concat" and self.layout == "optimum":
            out, = b.op("Concat", [part.input, new], outputs=[b.claim(part.output)], axis=1)
        elif self.mode == "concat":
            full = b.op("Concat", [part.input, new], "cat", axis=1)
            out, = b.op("ScatterND", [full, self.scatter_idx, new], outputs=[b.claim(part.output)])
        else:
            out, = b.op("TensorScatter", [part.input, new, self.write_idx], outputs=[b.claim(part.output)],
                        axis=part.seq_axis)
        self.outputs.append((out, part))
        return out

    def _write_attention(self, layer: int) -> None:
        """shadow: the step's keys ([k_sem ‖ k_geo] per head) and values, as read, into the attention buffers."""
        b = self.b
        for t, new in (("key", self._new_heads(layer, self._key_names(layer), None)),
                       ("value", self._new_heads(layer, ["v"], None))):
            part = self.parts[(layer, f"attn_{t}", "attention")]
            bhsd = b.op("Transpose", [new], f"new_{t}", perm=[0, 2, 1, 3])
            out, = b.op("TensorScatter", [part.input, bhsd, self.write_idx], outputs=[b.claim(part.output)], axis=2)
            self.outputs.append((out, part))
            self.present[layer][f"attn_{t}"] = (out, None)

    def _key_names(self, layer: int) -> list[str]:
        return [n for n in self.new[layer] if n != "v"]

    def _new_heads(self, layer: int, names: list[str], width: int | None) -> str:
        """(B, S, H, d) of the step's tokens of `names` concatenated per head, zero-padded to `width`."""
        b = self.b
        per_head = [b.op("Reshape", [self.new[layer][n], b.const([0, 0, self.heads[n][0], -1])], "heads")
                    for n in names]
        x = per_head[0] if len(per_head) == 1 else b.op("Concat", per_head, "cat_heads", axis=-1)
        return self._pad_last(x, sum(self.heads[n][1] for n in names), width)

    def _pad_last(self, x: str, have: int, want: int | None) -> str:
        if want is None or want == have:
            return x
        return self.b.op("Pad", [x, self.b.const([0, 0, 0, 0, 0, 0, 0, want - have])], "pad_head")

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
        """xb / fp32(d16), 0 where d16 == 0 (quant.safe_divide)."""
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
        from caramba.ir.quant import _NF4_MIDPOINTS_T

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
        """(B, ctx, F) in dtype (caramba layout) or (B, H, ctx, d) (a head-major part): the present, as read."""
        b = self.b
        codes, scales = self.present[layer][name]
        part = self.parts[(layer, name, "codes")]
        if self.mode == "scatter":
            codes = b.op("Slice", [codes, b.const([0]), self.ctx, b.const([1])], "ctx_codes")
            if scales is not None:
                scales = b.op("Slice", [scales, b.const([0]), self.ctx, b.const([1])], "ctx_scales")
        if part.heads:
            return self.lw.cast(codes, part.dtype, dtype)
        return self._decode(codes, scales, name, dtype)

    def _decode(self, codes: str, scales: str | None, name: str, dtype: DType) -> str:
        """(B, T, F) in dtype from (B, T, W) codes and (B, T, nb) scales, exactly as quant.dequantize."""
        b = self.b
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
            from caramba.ir.quant import NF4_LEVELS

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

    def _bhsd(self, layer: int, name: str, dtype: DType, heads: int) -> str:
        """(B, H, ctx, d): the present as read, head-major (a caramba-layout read is reshaped and transposed)."""
        x = self.read(layer, name, dtype)
        if self.parts[(layer, name, "codes")].heads:
            return x
        b = self.b
        return b.op("Transpose", [b.op("Reshape", [x, b.const([0, 0, heads, -1])])], "bhsd", perm=[0, 2, 1, 3])

    # -- attention ------------------------------------------------------------------------------------------------
    def attention(self, n: Node) -> list[str]:
        lw, b = self.lw, self.b
        layer, heads, hkv = n.attrs["layer"], n.inputs[0].type.shape[1], n.attrs["kv_heads"]
        q_dt = n.inputs[0].type.dtype
        if n.op == "cached_attention":
            q, scale, key_names = lw[n.inputs[0]], float(n.attrs["scale"]), ["k"]
        else:
            q = b.op("Concat", [self._scaled(lw[n.inputs[0]], n.attrs["scale_sem"], q_dt),
                                self._scaled(lw[n.inputs[1]], n.attrs["scale_geo"], q_dt)], "q_cat", axis=-1)
            scale, key_names = 1.0, ["k_sem", "k_geo"]
        window, softcap = n.attrs.get("window", 0), float(n.attrs.get("softcap", 0.0))
        if self.mode == "contrib":
            if window or softcap:
                raise UnsupportedOpError(f"layer {layer}: the GroupQueryAttention path (ort_contrib) takes no "
                                         f"sliding window or soft cap here; compile without ort_contrib")
            return [self._group_query_attention(layer, q, heads, hkv, scale, key_names, n.attrs["v_head_dim"])]
        mask = self.mask_for(window)
        cap = {"softcap": softcap} if softcap else {}
        if self.mode == "shadow":
            k, v = self.present[layer]["attn_key"][0], self.present[layer]["attn_value"][0]
            return [b.op("Attention", [q, k, v, mask], "attention", scale=scale, **cap)]
        if self.layout == "optimum":
            keys = [self._bhsd(layer, t, q_dt, hkv) for t in key_names]
            k = keys[0] if len(keys) == 1 else b.op("Concat", keys, "k_cat", axis=-1)
            v = self._bhsd(layer, "v", q_dt, hkv)
            return [b.op("Attention", [q, k, v, mask], "attention", scale=scale, **cap)]
        if len(key_names) == 1:
            k = self.read(layer, "k", q_dt)
        else:
            per_head = [b.op("Reshape", [self.read(layer, t, q_dt), b.const([0, 0, hkv, -1])], "k_heads")
                        for t in key_names]
            k = b.op("Reshape", [b.op("Concat", per_head, "k_cat", axis=-1), b.const([0, 0, -1])], "k_cat")
        v = self.read(layer, "v", q_dt)
        q3 = b.op("Reshape", [b.op("Transpose", [q], perm=[0, 2, 1, 3]), b.const([0, 0, -1])], "q3")
        y = b.op("Attention", [q3, k, v, mask], "attention", scale=scale, q_num_heads=heads, kv_num_heads=hkv, **cap)
        y = b.op("Reshape", [y, b.const([0, 0, heads, n.attrs["v_head_dim"]])], "y4")
        return [b.op("Transpose", [y], "attn_out", perm=[0, 2, 1, 3])]

    def _group_query_attention(self, layer: int, q: str, heads: int, hkv: int, scale: float, key_names: list[str],
                               dv: int) -> str:
        """com.microsoft GroupQueryAttention on the attention buffers (past and present share one buffer)."""
        b = self.b
        pk, pv = self.parts[(layer, "attn_key", "attention")], self.parts[(layer, "attn_value", "attention")]
        d = pk.width
        dq = sum(self.heads[t][1] for t in key_names)
        flat = b.const([0, 0, -1])
        q3 = b.op("Reshape", [b.op("Transpose", [self._pad_last(q, dq, d)], perm=[0, 2, 1, 3]), flat], "q3")
        k3 = b.op("Reshape", [self._new_heads(layer, key_names, d), flat], "k_new")
        v3 = b.op("Reshape", [self._new_heads(layer, ["v"], d), flat], "v_new")
        y, k_out, v_out = b.op("GroupQueryAttention", [q3, k3, v3, pk.input, pv.input, self.seqlens_k, self.total],
                               outputs=[b.fresh("gqa"), b.claim(pk.output), b.claim(pv.output)],
                               domain="com.microsoft", num_heads=heads, kv_num_heads=hkv, scale=scale)
        self.outputs += [(k_out, pk), (v_out, pv)]
        y = b.op("Reshape", [y, b.const([0, 0, heads, d])], "y4")
        if dv != d:
            y = b.op("Slice", [y, b.const([0]), b.const([dv]), b.const([-1])], "unpad_v")
        return b.op("Transpose", [y], "attn_out", perm=[0, 2, 1, 3])

    def _scaled(self, q: str, scale: float, dtype: DType) -> str:
        return self.b.op("Mul", [q, self.b.const(scale, dtype)], "q_scaled")


def register(cl: CacheLowering) -> dict:
    """The cache ops' lowerings bound to one graph's CacheLowering (merged over ops.OPS by the model builder)."""
    return {"kv_append": lambda lw, n: cl.append(n), "cached_attention": lambda lw, n: cl.attention(n),
            "cached_decoupled_attention": lambda lw, n: cl.attention(n)}
