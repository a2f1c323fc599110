"""Graph analyses of the IR on networkx: order and cycles, live ranges and peak memory, the critical path, layer
isomorphism and fusion coverage (for the compile report and `caramba compile --check-layers`)."""
from caramba.analysis.graphs import (LiveRange, PeakMemory, check_acyclic, critical_path, live_ranges,
                                     memory_by_step, node_bytes, peak_activation_memory, to_networkx,
                                     topological_order)
from caramba.analysis.layers import (LayerCheck, LayerMismatch, check_layers, layer_mismatches, layer_of,
                                     layer_subgraphs, layer_variants)
from caramba.analysis.coverage import LayerCoverage, Leftover, fusion_coverage

__all__ = [
    "LayerCheck", "LayerCoverage", "LayerMismatch", "Leftover", "LiveRange", "PeakMemory", "check_acyclic",
    "check_layers", "critical_path", "fusion_coverage", "layer_mismatches", "layer_of", "layer_subgraphs",
    "layer_variants", "live_ranges", "memory_by_step", "node_bytes", "peak_activation_memory", "to_networkx",
    "topological_order",
]
