"""The op registry: every IR op is declared once, with its signature, shape/dtype rule and reference torch code."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from caramba.ir.types import TensorType

REQUIRED = object()  # sentinel default: the attribute must be given

InferFn = Callable[[Sequence[TensorType], Mapping[str, Any]], Sequence[TensorType]]


@dataclass(frozen=True)
class OpDef:
    """`inputs` names the tensor operands: "x" required, "bias?" optional (only trailing), "*xs" variadic (last).

    `infer(input_types, attrs)` returns the output types symbolically; `impl(*tensors, **attrs)` is the reference
    implementation in plain torch that the interpreter runs and every backend is tested against.
    """

    name: str
    inputs: tuple[str, ...]
    attrs: Mapping[str, Any]
    infer: InferFn
    impl: Callable[..., Any]
    doc: str = ""
    num_outputs: int = 1
    tags: frozenset[str] = field(default_factory=frozenset)

    def arity(self) -> tuple[int, int | None]:
        """(min, max) number of tensor inputs; max None means variadic."""
        required = sum(1 for i in self.inputs if not i.endswith("?") and not i.startswith("*"))
        if any(i.startswith("*") for i in self.inputs):
            return required, None
        return required, len(self.inputs)

    def check_attrs(self, attrs: Mapping[str, Any]) -> str | None:
        """A description of what is wrong with `attrs`, or None."""
        unknown = sorted(set(attrs) - set(self.attrs))
        if unknown:
            return f"unknown attribute(s) {unknown}; {self.name} takes {sorted(self.attrs) or 'no attributes'}"
        missing = sorted(k for k, d in self.attrs.items() if d is REQUIRED and k not in attrs)
        if missing:
            return f"missing required attribute(s) {missing}"
        return None

    def full_attrs(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        """`attrs` with defaults filled in."""
        return {k: attrs.get(k, d) for k, d in self.attrs.items()}


_REGISTRY: dict[str, OpDef] = {}


def register_op(name: str, inputs: Sequence[str], infer: InferFn, *, attrs: Mapping[str, Any] | None = None,
                num_outputs: int = 1, tags: Sequence[str] = (), doc: str = "") -> Callable:
    """Decorator: `@register_op("rsqrt", ["x"], same_type)` over the reference implementation."""

    def wrap(impl: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"op {name!r} is registered twice")
        _REGISTRY[name] = OpDef(name, tuple(inputs), dict(attrs or {}), infer, impl, doc or (impl.__doc__ or "").strip(),
                                num_outputs, frozenset(tags))
        return impl

    return wrap


def get_op(name: str) -> OpDef:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no IR op named {name!r} is registered") from None


def has_op(name: str) -> bool:
    _ensure_loaded()
    return name in _REGISTRY


def all_ops() -> dict[str, OpDef]:
    _ensure_loaded()
    return dict(sorted(_REGISTRY.items()))


def _ensure_loaded() -> None:
    # The definitions register themselves on import; importing here keeps `registry` free of import cycles.
    from caramba.ir import ops_attention, ops_cache, ops_core, ops_fused, ops_quant, ops_views  # noqa: F401
