"""Value types: element dtypes and tensor types with symbolic shapes."""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from caramba.ir import symbolic
from caramba.ir.symbolic import Dim


class DType(enum.Enum):
    f64 = "f64"
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    i64 = "i64"
    i32 = "i32"
    i16 = "i16"
    i8 = "i8"
    u8 = "u8"
    bool = "bool"

    @property
    def torch(self) -> torch.dtype:
        return _TO_TORCH[self]

    @property
    def is_float(self) -> bool:
        return self in (DType.f64, DType.f32, DType.f16, DType.bf16)

    @property
    def itemsize(self) -> int:
        return self.torch.itemsize

    @staticmethod
    def from_torch(dt: torch.dtype) -> "DType":
        try:
            return _FROM_TORCH[dt]
        except KeyError:
            raise TypeError(f"caramba has no IR dtype for {dt}; supported: {sorted(str(d) for d in _FROM_TORCH)}") from None

    @staticmethod
    def parse(name: str) -> "DType":
        """Accepts IR names (f16), torch names (float16, torch.float16) and common aliases (fp16, half)."""
        key = name.lower().removeprefix("torch.")
        if key in _ALIASES:
            return _ALIASES[key]
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(d.value for d in DType)} (or fp32/fp16/bf16)")

    def __str__(self) -> str:
        return self.value


_TO_TORCH = {
    DType.f64: torch.float64, DType.f32: torch.float32, DType.f16: torch.float16, DType.bf16: torch.bfloat16,
    DType.i64: torch.int64, DType.i32: torch.int32, DType.i16: torch.int16, DType.i8: torch.int8,
    DType.u8: torch.uint8, DType.bool: torch.bool,
}
_FROM_TORCH = {v: k for k, v in _TO_TORCH.items()}
_ALIASES = {d.value: d for d in DType} | {str(t).removeprefix("torch."): d for d, t in _TO_TORCH.items()} | {
    "fp64": DType.f64, "fp32": DType.f32, "fp16": DType.f16, "half": DType.f16, "float": DType.f32,
    "double": DType.f64, "long": DType.i64, "int": DType.i32,
}


@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: DType

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(symbolic.canonical(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    def with_shape(self, shape) -> "TensorType":
        return TensorType(tuple(shape), self.dtype)

    def with_dtype(self, dtype: DType) -> "TensorType":
        return TensorType(self.shape, dtype)

    def concrete(self, bindings) -> tuple[int, ...]:
        return tuple(symbolic.evaluate(d, bindings) for d in self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(symbolic.to_str(d) for d in self.shape)}]"
