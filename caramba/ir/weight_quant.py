"""Weight-only quantization formats (compile(weights=...)): the spec, reference quantize / dequantize in plain torch,
and the checks a stored quantized weight must pass. Every kernel and exporter is tested against these functions.

A linear weight W (N out, K in) is stored in one of two formats, always per output row, so that quantizing rows
separately and concatenating them (fuse_linears' q|k|v) gives the same bytes as quantizing the concatenation:

    int8 (per output channel, symmetric)
      codes   int8 (N, K)          q = clamp(round_half_even(w / s), -127, 127); -128 unused
      scales  fp32 (N,)            s = amax(|w_row|) / 127 in fp32 (a row of zeros: s = 0, codes 0)
      decode  ŵ = q * s in fp32, then rounded once to the compute dtype
    int4 (groups of g = 32, 64 or 128 consecutive inputs of a row; "int4" is g = 32, symmetric)
      codes   uint8 (N, Kp / 2)    nibble-packed: byte j = u[2j] | u[2j + 1] << 4 (low nibble = even input), Kp =
                                   ceil(K / g) * g; ONNX's INT4/UINT4 packing and MatMulNBits' blob layout
      scales  fp16 (N, Kp / g)     symmetric: d = fp16(m / -8), m the group's element of largest magnitude with its
                                   sign (the KV cache's q4_0 rule: m decodes exactly, the opposite extreme lands on
                                   +7); asymmetric: d = fp16((hi - lo) / 15) with lo = min(w, 0), hi = max(w, 0)
      zeros   uint8 (N, Kp / g)    asymmetric only: z = clamp(round_half_even(-lo / d), 0, 15); symmetric: z = 8
      codes   u = clamp(round_half_even(w / d) + z, 0, 15), computed against the stored fp16 d in fp32
      decode  ŵ = (u - z) * d, exact in fp32 (a 5-bit integer times an 11-bit significand), then rounded once to
              the compute dtype

Padding: a K that is not a multiple of g is padded with zeros to Kp. The padding is quantized like any zero, so
it decodes to exactly 0 (symmetric code 8; asymmetric code z, since the range [lo, hi] always holds 0), and the
last group's scale is that of its real elements (zeros change neither the largest magnitude nor lo <= 0 <= hi).
Decoding drops the padding: ŵ[:, :K]. A group whose scale is 0 (all zeros, or an fp16 underflow) decodes to zeros.

Why fp32 scales for int8 and fp16 for int4: one int8 scale covers a whole row of K >= 64 weights, so fp32 costs at
most 0.5 bits per weight (0.016 at K = 2048), and it keeps rows of small weights exact: an fp16 scale of a row
whose amax is below 127 * 2^-14 = 0.0078 would be subnormal and lose precision. An int4 scale covers g weights,
where fp32 would cost 1 bit per weight at g = 32 (a fifth of the format); fp16 costs half that, every realistic
group's scale is a normal fp16 number, and codes computed against the rounded scale keep the error bound d / 2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from caramba.errors import CarambaError
from caramba.ir.quant import pack_nibbles, safe_divide, unpack_nibbles

INT4_GROUPS = (32, 64, 128)
# how a quantized weight W's tensors are named, as graph params and in a quantized checkpoint: W.qcodes, ...
SUFFIXES = {"codes": ".qcodes", "scales": ".qscales", "zeros": ".qzeros"}
SPELLINGS = "'int8', 'int4' (= 'int4:g32:sym'), 'int4:g64', 'int4:g128:asym', ..."
_FP16_MAX = torch.finfo(torch.float16).max


class WeightSpecError(CarambaError, ValueError):
    """A weight quantization spec that names no format (compile(weights=...), --weights)."""


class WeightQuantError(CarambaError, ValueError):
    """A weight that cannot be quantized (NaN/inf, a scale past fp16), or stored quantized tensors that do not
    hold a weight of the expected format and shape."""


@dataclass(frozen=True)
class WeightSpec:
    """How linear weights are stored: bits 8 (per output channel, symmetric) or 4 (groups along the input dim,
    symmetric or with a zero point). str() is the canonical spelling: int8, int4:g32:sym, int4:g128:asym."""

    bits: int
    group: int = 0  # int4: inputs per scale; int8: 0 (one scale per output row)
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits == 8:
            if self.group or not self.symmetric:
                raise WeightSpecError(f"int8 weights are per output channel and symmetric (got group={self.group}, "
                                      f"symmetric={self.symmetric}); group sizes and zero points apply to int4")
        elif self.bits == 4:
            if self.group not in INT4_GROUPS:
                raise WeightSpecError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUPS))}, got "
                                      f"{self.group!r}")
        else:
            raise WeightSpecError(f"weights are quantized to 8 or 4 bits, got bits={self.bits!r}; use {SPELLINGS}")

    @property
    def zero_point(self) -> bool:
        return not self.symmetric

    def __str__(self) -> str:
        return "int8" if self.bits == 8 else f"int4:g{self.group}:{'sym' if self.symmetric else 'asym'}"

    def attrs(self, in_features: int, weight_dtype: Any) -> dict[str, Any]:
        """The attributes of the quantized ops (ops_quant.py) for a weight of `in_features` inputs."""
        return {"bits": self.bits, "group": self.group, "zero_point": self.zero_point, "in_features": in_features,
                "weight_dtype": weight_dtype}

    @staticmethod
    def of_attrs(attrs: Mapping[str, Any]) -> "WeightSpec":
        return WeightSpec(attrs["bits"], attrs["group"], not attrs["zero_point"])


def parse_weights(spec: Any) -> WeightSpec | None:
    """A WeightSpec from what compile(weights=...) and --weights take: None (float weights), a WeightSpec, a string
    ('int8', 'int4', 'int4:g64', 'int4:asym', 'int4:g128:asym', 'int4:g32:sym'; case-insensitive) or a mapping
    {"bits": 4, "group": 64, "symmetric": False} ("dtype": "int4" may stand for "bits")."""
    if spec is None or isinstance(spec, WeightSpec):
        return spec
    if isinstance(spec, Mapping):
        return _from_mapping(spec)
    if not isinstance(spec, str):
        raise WeightSpecError(f"weights must be a string such as {SPELLINGS}, a mapping or None; got "
                              f"{type(spec).__name__}")
    head, *parts = [p.strip() for p in spec.strip().lower().split(":")]
    bits = {"int8": 8, "int4": 4}.get(head)
    if bits is None:
        raise WeightSpecError(f"unknown weight format {spec!r}; use {SPELLINGS}")
    group, symmetric = (32 if bits == 4 else 0), True
    seen: set[str] = set()
    for part in parts:
        what = "group" if part.startswith("g") and part[1:].isdigit() else part
        if what in seen or (what in ("sym", "asym") and seen & {"sym", "asym"}):
            raise WeightSpecError(f"weights {spec!r}: {part!r} repeats a setting; use {SPELLINGS}")
        seen.add(what)
        if what == "group":
            group = int(part[1:])
        elif part in ("sym", "asym"):
            symmetric = part == "sym"
        else:
            raise WeightSpecError(f"weights {spec!r}: unknown part {part!r} (a group size g32 / g64 / g128, or sym "
                                  f"/ asym); use {SPELLINGS}")
    if bits == 8 and parts:
        raise WeightSpecError(f"weights {spec!r}: int8 is per output channel and symmetric, it takes no "
                              f"{':'.join(parts)!r}; group sizes and zero points apply to int4 (e.g. 'int4:g64')")
    return WeightSpec(bits, group, symmetric)


def _from_mapping(spec: Mapping) -> WeightSpec:
    unknown = sorted(set(spec) - {"bits", "dtype", "group", "symmetric"})
    if unknown:
        raise WeightSpecError(f"weights mapping has unknown key(s) {unknown}; it takes bits (or dtype), group, "
                              f"symmetric")
    if ("bits" in spec) == ("dtype" in spec):
        raise WeightSpecError("weights mapping needs exactly one of bits (8 or 4) or dtype ('int8' or 'int4')")
    bits = spec["bits"] if "bits" in spec else {"int8": 8, "int4": 4}.get(str(spec["dtype"]).lower())
    if isinstance(bits, bool) or bits not in (8, 4):
        raise WeightSpecError(f"weights mapping: bits must be 8 or 4 (dtype 'int8' or 'int4'), got "
                              f"{spec.get('bits', spec.get('dtype'))!r}")
    group = spec.get("group", 32 if bits == 4 else 0)
    symmetric = spec.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise WeightSpecError(f"weights mapping: symmetric must be True or False, got {symmetric!r}")
    if isinstance(group, bool) or not isinstance(group, int):
        raise WeightSpecError(f"weights mapping: group must be an integer ({', '.join(map(str, INT4_GROUPS))}), "
                              f"got {group!r}")
    return WeightSpec(bits, group, symmetric)


# ---------------------------------------------------------------------------------------------------------------
# Quantized weights
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class QWeight:
    """One quantized weight: codes, scales and (asymmetric int4) zero points of an (out_features, in_features)
    weight, as the module doc lays them out."""

    spec: WeightSpec
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    in_features: int

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by role: codes, scales and, with a zero point, zeros."""
        out = {"codes": self.codes, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self.codes, self.scales, self.zeros, bits=self.spec.bits, group=self.spec.group,
                                 in_features=self.in_features, dtype=dtype)


@dataclass(frozen=True, eq=False)
class StoredWeights:
    """The quantized weights a model carries (caramba.models.load of a quantized checkpoint sets it as the module's
    `caramba_weights`): compile uses them as they are, by param name, instead of quantizing the float weights
    (which then hold the decoded values, so the module computes what the quantized model computes)."""

    spec: WeightSpec
    weights: Mapping[str, QWeight]
    embeddings: bool = False  # the embedding table and the LM head are among them


def padded_inputs(in_features: int, group: int) -> int:
    """Kp: the inputs a row stores (int4: whole groups; int8: K)."""
    return -(-in_features // group) * group if group else in_features


def quantize_weight(w: torch.Tensor, spec: WeightSpec | str) -> QWeight:
    """Quantize an (N, K) float weight to `spec` (module doc). NaN/inf, or an int4 group whose fp16 scale would
    overflow, is a WeightQuantError."""
    spec = parse_weights(spec)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2 or 0 in w.shape:
        raise WeightQuantError(f"quantize_weight takes a non-empty 2-D float weight (out, in), got "
                               f"{getattr(w, 'dtype', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}")
    if not bool(torch.isfinite(w).all()):
        raise WeightQuantError(f"cannot quantize a weight holding NaN or inf to {spec}")
    k = w.shape[1]
    x = w.detach().float()
    if spec.bits == 8:
        s = x.abs().amax(1) / 127
        q = safe_divide(x, s[:, None]).round().clamp(-127, 127).to(torch.int8)
        return QWeight(spec, q.contiguous(), s.contiguous(), None, k)
    g = spec.group
    xb = F.pad(x, (0, padded_inputs(k, g) - k)).unflatten(-1, (-1, g))  # (N, G, g)
    if spec.symmetric:
        m = xb.gather(-1, xb.abs().argmax(-1, keepdim=True))  # signed element of largest magnitude
        d = _fp16(m / -8, spec)
        z = torch.full_like(d, 8.0)
        zeros = None
    else:
        lo, hi = xb.amin(-1, keepdim=True).clamp(max=0), xb.amax(-1, keepdim=True).clamp(min=0)
        d = _fp16((hi - lo) / 15, spec)
        z = safe_divide(-lo, d.float()).round().clamp(0, 15)
        zeros = z.squeeze(-1).to(torch.uint8).contiguous()
    u = (safe_divide(xb, d.float()).round() + z).clamp(0, 15).to(torch.uint8)
    return QWeight(spec, pack_nibbles(u.flatten(-2)).contiguous(), d.squeeze(-1).contiguous(), zeros, k)


def dequantize_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, *, bits: int,
                      group: int, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight the tensors hold, (..., in_features) in `dtype`: decoded in fp32 and rounded once (saturating at
    ±65504 for fp16). Works on any leading dims, so an embedding decodes just the rows it gathered."""
    if bits == 8:
        w = codes.float() * scales.float().unsqueeze(-1)
    else:
        u = unpack_nibbles(codes).unflatten(-1, (-1, group)).float()  # (..., G, g)
        z = 8.0 if zeros is None else zeros.float().unsqueeze(-1)
        w = ((u - z) * scales.float().unsqueeze(-1)).flatten(-2)[..., :in_features]
    if dtype == torch.float16:
        w = w.clamp(-_FP16_MAX, _FP16_MAX)
    return w.to(dtype)


def _fp16(d: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    d16 = d.to(torch.float16)
    if not bool(torch.isfinite(d16).all()):
        raise WeightQuantError(f"cannot quantize to {spec}: a group's scale {d.abs().max().item():g} overflows fp16; "
                               f"keep this weight in float or use int8 (fp32 scales)")
    return d16


# ---------------------------------------------------------------------------------------------------------------
# What stored tensors must look like
# ---------------------------------------------------------------------------------------------------------------
def expected_shapes(spec: WeightSpec, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...],
                                                                                               torch.dtype]]:
    """role -> (shape, dtype) of the tensors of an (out, in) weight in `spec`."""
    if spec.bits == 8:
        return {"codes": ((out_features, in_features), torch.int8), "scales": ((out_features,), torch.float32)}
    blocks = padded_inputs(in_features, spec.group) // spec.group
    out = {"codes": ((out_features, blocks * spec.group // 2), torch.uint8),
           "scales": ((out_features, blocks), torch.float16)}
    if spec.zero_point:
        out["zeros"] = ((out_features, blocks), torch.uint8)
    return out


def check_stored(name: str, tensors: Mapping[str, torch.Tensor], spec: WeightSpec, out_features: int,
                 in_features: int) -> QWeight:
    """The QWeight of stored tensors (role -> tensor) of an (out, in) weight, after checking every role is there
    with its shape and dtype, scales are finite and zero points are 4-bit; a WeightQuantError names what is wrong."""
    want = expected_shapes(spec, out_features, in_features)
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        raise WeightQuantError(f"{name}: a {spec} weight stores {', '.join(want)}; missing {missing}, unexpected "
                               f"{extra}")
    for role, (shape, dtype) in want.items():
        t = tensors[role]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise WeightQuantError(f"{name}.{role}: expected {dtype} {shape} for a {spec} weight of shape "
                                   f"({out_features}, {in_features}), got {t.dtype} {tuple(t.shape)}")
    if not bool(torch.isfinite(tensors["scales"]).all()):
        raise WeightQuantError(f"{name}.scales holds NaN or inf")
    if "zeros" in tensors and int(tensors["zeros"].max()) > 15:
        raise WeightQuantError(f"{name}.zeros holds {int(tensors['zeros'].max())}, past the 4-bit range 0..15")
    return QWeight(spec, tensors["codes"], tensors["scales"], tensors.get("zeros"), in_features)
