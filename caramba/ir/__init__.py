"""caramba's IR: typed SSA graphs with symbolic dims, an op registry, text form, verifier and interpreter."""
from caramba.ir.graph import Graph, Node, SymbolRange, Value
from caramba.ir.interpreter import Interpreter, bind_symbols, interpret
from caramba.ir.parser import parse_graph
from caramba.ir.printer import print_graph
from caramba.ir.registry import REQUIRED, OpDef, all_ops, get_op, has_op, register_op
from caramba.ir.types import DType, TensorType
from caramba.ir.verifier import verify

__all__ = [
    "DType", "Graph", "Interpreter", "Node", "OpDef", "REQUIRED", "SymbolRange", "TensorType", "Value", "all_ops",
    "bind_symbols", "get_op", "has_op", "interpret", "parse_graph", "print_graph", "register_op", "verify",
]
