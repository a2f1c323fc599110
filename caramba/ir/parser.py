"""Parse the text form written by `printer` back into a Graph (print -> parse -> print is the identity)."""
from __future__ import annotations

import json
import re
from typing import Any

from caramba.errors import ParseError
from caramba.ir import symbolic
from caramba.ir.graph import Graph, Node, Value
from caramba.ir.types import DType, TensorType

_NAME = r"%([A-Za-z0-9_.\-]+)"
_HEADER = re.compile(r"graph @([A-Za-z0-9_.]+)\((.*)\) \{$")
_SYMBOL = re.compile(r"symbol ([A-Za-z_][A-Za-z0-9_]*) in \[(-?\d+), (-?\d+)\]$")
_NODE = re.compile(r"(.+?) = ([A-Za-z_][A-Za-z0-9_.]*)\((.*?)\)(?: \{(.*)\})?(?: loc\((\".*\")\))?$")
_FLOAT = re.compile(r"-?(\d+\.\d*|\d*\.\d+)(e[+-]?\d+)?|-?\d+e[+-]?\d+")
_KEYWORDS = {"none": None, "true": True, "false": False, "inf": float("inf"), "-inf": float("-inf"),
             "nan": float("nan")}
_DTYPES = {d.value: d for d in DType}


def split_top(text: str, sep: str = ",") -> list[str]:
    """Split at `sep` outside brackets, parentheses, angle-bracketed expressions and strings."""
    parts, depth, start, quote = [], 0, 0, False
    i = 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == '"':
                quote = False
        elif c == '"':
            quote = True
        elif c in "([{<":
            depth += 1
        elif c in ")]}>":
            depth -= 1
        elif c == sep and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
        i += 1
    tail = text[start:].strip()
    if tail or parts:
        parts.append(tail)
    return parts


def parse_type(text: str) -> TensorType:
    m = re.fullmatch(r"([a-z0-9]+)\[(.*)\]", text.strip())
    if not m or m.group(1) not in _DTYPES:
        raise ParseError(f"bad type {text!r}: expected dtype[dims], e.g. f32[batch, seq, 64]")
    try:
        dims = [symbolic.parse(d) for d in split_top(m.group(2))]
    except (ValueError, TypeError, SyntaxError) as e:
        raise ParseError(f"bad type {text!r}: {e}") from None
    if any(isinstance(d, int) and d < 0 for d in dims):
        raise ParseError(f"bad type {text!r}: dimensions cannot be negative")
    return TensorType(tuple(dims), _DTYPES[m.group(1)])


def parse_attr(text: str) -> Any:
    text = text.strip()
    if text.startswith("["):
        return tuple(parse_attr(p) for p in split_top(text[1:-1]))
    if text.startswith("<") and text.endswith(">"):
        return symbolic.parse(text[1:-1])
    if text.startswith('"'):
        return json.loads(text)
    if text in _KEYWORDS:
        return _KEYWORDS[text]
    if text in _DTYPES:
        return _DTYPES[text]
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    raise ParseError(f"bad attribute value {text!r}")


def _parse_typed_value(text: str) -> tuple[str, TensorType]:
    m = re.fullmatch(_NAME + r": (.*)", text.strip())
    if not m:
        raise ParseError(f"expected '%name: type', got {text!r}")
    return m.group(1), parse_type(m.group(2))


class _Parser:
    def __init__(self, text: str) -> None:
        self.lines = [(i + 1, ln.strip()) for i, ln in enumerate(text.splitlines()) if ln.strip()
                      and not ln.strip().startswith("//")]
        self.env: dict[str, Value] = {}

    def fail(self, lineno: int, msg: str) -> ParseError:
        return ParseError(f"line {lineno}: {msg}")

    def run(self) -> Graph:
        if not self.lines:
            raise ParseError("empty IR text: expected 'graph @name(...) {'")
        lineno, head = self.lines[0]
        m = _HEADER.match(head)
        if not m:
            raise self.fail(lineno, f"expected 'graph @name(%input: type, ...) {{', got {head!r}")
        g = Graph(m.group(1))
        try:
            for part in split_top(m.group(2)):
                name, t = _parse_typed_value(part)
                self.env[name] = g.add_input(name, t)
        except ParseError as e:
            raise self.fail(lineno, str(e)) from None
        body = self.lines[1:]
        if not body or body[-1][1] != "}":
            raise self.fail(self.lines[-1][0], "missing closing '}' of the graph")
        for lineno, line in body[:-1]:
            try:
                self.statement(g, line)
            except ParseError as e:
                raise self.fail(lineno, str(e)) from None
            except (ValueError, TypeError, KeyError) as e:
                raise self.fail(lineno, f"{e} in {line!r}") from None
        return g

    def statement(self, g: Graph, line: str) -> None:
        if m := _SYMBOL.match(line):
            g.add_symbol(m.group(1), int(m.group(2)), int(m.group(3)))
        elif line.startswith("param "):
            name, t = _parse_typed_value(line[len("param "):])
            self.env[name] = g.add_param(name, t)
        elif line.startswith("return"):
            g.outputs = [self.use(n.strip()) for n in split_top(line[len("return"):])]
        elif m := _NODE.match(line):
            self.node(g, m)
        else:
            raise ParseError(f"cannot parse {line!r}")

    def node(self, g: Graph, m: re.Match) -> None:
        outs = [Value(*_parse_typed_value(p)) for p in split_top(m.group(1))]
        inputs = tuple(self.use(a) for a in split_top(m.group(3)))
        attrs = {}
        for item in split_top(m.group(4) or ""):
            key, _, val = item.partition("=")
            attrs[key.strip()] = parse_attr(val)
        loc = json.loads(m.group(5)) if m.group(5) else ""
        g.append(Node(m.group(2), inputs, tuple(outs), attrs, loc))
        for v in outs:
            self.env[v.name] = v

    def use(self, ref: str) -> Value:
        m = re.fullmatch(_NAME, ref.strip())
        if not m:
            raise ParseError(f"expected a value reference like %x, got {ref!r}")
        try:
            return self.env[m.group(1)]
        except KeyError:
            raise ParseError(f"%{m.group(1)} is used before it is defined") from None


def parse_graph(text: str) -> Graph:
    """Parse IR text. Weights are not part of the text: attach them with `graph.weights.update(...)`."""
    return _Parser(text).run()
