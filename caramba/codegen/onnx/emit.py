"""A small ONNX graph builder: named values, constants, initializers and symbolic dims as int64 tensors."""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import sympy
import torch
from onnx import TensorProto, helper, numpy_helper

from caramba.errors import UnsupportedOpError
from caramba.ir import symbolic
from caramba.ir.types import DType

ONNX_DTYPES: dict[DType, int] = {
    DType.f64: TensorProto.DOUBLE, DType.f32: TensorProto.FLOAT, DType.f16: TensorProto.FLOAT16,
    DType.bf16: TensorProto.BFLOAT16, DType.i64: TensorProto.INT64, DType.i32: TensorProto.INT32,
    DType.i16: TensorProto.INT16, DType.i8: TensorProto.INT8, DType.u8: TensorProto.UINT8, DType.bool: TensorProto.BOOL,
}
NUMPY_DTYPES: dict[DType, Any] = {
    DType.f64: np.float64, DType.f32: np.float32, DType.f16: np.float16, DType.i64: np.int64, DType.i32: np.int32,
    DType.i16: np.int16, DType.i8: np.int8, DType.u8: np.uint8, DType.bool: np.bool_,
}


def onnx_dtype(d: DType) -> int:
    return ONNX_DTYPES[d]


class Builder:
    """Collects nodes, initializers, inputs and outputs; hands out unique value names.

    `dims` maps a symbol name (batch, seq, past, ...) to a 1-D int64 tensor of one element holding its value at
    run time; `dim(expr)` builds any sympy expression over them (shared, built once per expression)."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.dims: dict[str, str] = {}
        self._dim_cache: dict[Any, str] = {}
        self._const_cache: dict[tuple, str] = {}
        self._names: set[str] = set()
        self._ms_domain = False

    # -- names ------------------------------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_.\-/]", "_", hint) or "v"
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def claim(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"ONNX value name {name!r} is defined twice")
        self._names.add(name)
        return name

    # -- graph pieces -----------------------------------------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence[str], hint: str | None = None, *, outputs: int | Sequence[str] = 1,
           domain: str = "", **attrs: Any) -> Any:
        """Add one node; returns its output name (or the list of names when outputs > 1 or names are given)."""
        if isinstance(outputs, int):
            names = [self.fresh(hint or op_type) for _ in range(outputs)]
        else:
            names = list(outputs)
        if domain == "com.microsoft":
            self._ms_domain = True
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.fresh(f"n.{hint or op_type}"),
                                           domain=domain or None, **attrs))
        return names[0] if isinstance(outputs, int) and outputs == 1 else names

    def const(self, value: Any, dtype: DType | np.dtype | type = np.int64, hint: str = "c") -> str:
        """A small constant as an initializer, shared between uses with the same value and dtype."""
        arr = np.asarray(value, dtype=NUMPY_DTYPES[dtype] if isinstance(dtype, DType) else dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._const_cache:
            name = self.fresh(hint)
            self.initializers.append(numpy_helper.from_array(arr, name))
            self._const_cache[key] = name
        return self._const_cache[key]

    def initializer(self, name: str, tensor: torch.Tensor | np.ndarray) -> str:
        """A weight as an initializer under `name` (bf16 weights are stored as bf16)."""
        self.claim(name)
        if isinstance(tensor, torch.Tensor):
            t = tensor.detach().cpu().contiguous()
            if t.dtype == torch.bfloat16:
                proto = helper.make_tensor(name, TensorProto.BFLOAT16, list(t.shape),
                                           t.view(torch.int16).numpy().tobytes(), raw=True)
                self.initializers.append(proto)
                return name
            tensor = t.numpy()
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(tensor), name))
        return name

    def add_input(self, name: str, dtype: DType, shape: Sequence[Any]) -> str:
        self.claim(name)
        self.inputs.append(helper.make_tensor_value_info(name, onnx_dtype(dtype), list(shape)))
        return name

    def add_output(self, value: str, name: str, dtype: DType, shape: Sequence[Any]) -> str:
        """Expose `value` as graph output `name` (an Identity when the names differ)."""
        if value != name:
            self.claim(name)
            self.op("Identity", [value], outputs=[name])
        self.outputs.append(helper.make_tensor_value_info(name, onnx_dtype(dtype), list(shape)))
        return name

    # -- symbolic dims ----------------------------------------------------------------------------------------
    def bind_dim(self, symbol: str, value: str) -> None:
        """`value`: a 1-D int64 tensor of one element holding the symbol's run-time value."""
        self.dims[symbol] = value

    def dim(self, d: Any) -> str:
        """A 1-D int64 tensor [d] for an int or a sympy expression over the bound symbols."""
        d = symbolic.canonical(d)
        if isinstance(d, int):
            return self.const([d])
        if d in self._dim_cache:
            return self._dim_cache[d]
        out = self._dim_expr(d)
        self._dim_cache[d] = out
        return out

    def _dim_expr(self, e: sympy.Expr) -> str:
        if isinstance(e, sympy.Symbol):
            if e.name not in self.dims:
                raise UnsupportedOpError(f"the ONNX codegen has no run-time value for the symbol {e.name!r}")
            return self.dims[e.name]
        if isinstance(e, sympy.Integer):
            return self.const([int(e)])
        folds: dict[type, Callable[[str, str], str]] = {
            sympy.Add: lambda a, b: self.op("Add", [a, b], "dim"),
            sympy.Mul: lambda a, b: self.op("Mul", [a, b], "dim"),
            sympy.Max: lambda a, b: self.op("Max", [a, b], "dim"),
            sympy.Min: lambda a, b: self.op("Min", [a, b], "dim"),
        }
        for kind, fold in folds.items():
            if isinstance(e, kind):
                args = [self.dim(a) for a in e.args]
                out = args[0]
                for a in args[1:]:
                    out = fold(out, a)
                return out
        if isinstance(e, sympy.floor) and isinstance(e.args[0], sympy.Mul):
            num, den = e.args[0].as_numer_denom()
            return self.op("Div", [self.dim(num), self.dim(den)], "dim")
        raise UnsupportedOpError(f"the ONNX codegen cannot express the dimension {e} yet")

    def shape(self, dims: Sequence[Any]) -> str:
        """A 1-D int64 shape tensor for a shape of ints and sympy expressions."""
        if all(isinstance(symbolic.canonical(d), int) for d in dims):
            return self.const([int(d) for d in dims])
        return self.op("Concat", [self.dim(d) for d in dims], "shape", axis=0)

    # -- model ------------------------------------------------------------------------------------------------
    def prune(self) -> int:
        """Drop nodes no graph output depends on, then initializers nothing reads (e.g. the full-width RoPE table
        gathers a RotaryEmbedding replaced); returns how many nodes went."""
        live = {o.name for o in self.outputs}
        kept = []
        for node in reversed(self.nodes):
            if any(o in live for o in node.output):
                kept.append(node)
                live.update(i for i in node.input if i)
        dropped = len(self.nodes) - len(kept)
        self.nodes = kept[::-1]
        self.initializers = [t for t in self.initializers if t.name in live]
        return dropped

    def model(self, name: str, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
        self.prune()
        graph = helper.make_graph(self.nodes, name, self.inputs, self.outputs, initializer=self.initializers)
        opsets = [helper.make_opsetid("", self.opset)]
        if self._ms_domain:
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        model = helper.make_model(graph, opset_imports=opsets, ir_version=10, producer_name="caramba")
        for k, v in (metadata or {}).items():
            model.metadata_props.add(key=k, value=v)
        return model
