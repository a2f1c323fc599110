"""Runtime: KV-cache storage kinds, preallocated KV caches, generation settings, sampling and speculative rounds."""
from caramba.runtime.executor import CacheConfig, CachedProgram, Executor
from caramba.runtime.generate_config import GenerateConfig, GenerateConfigError, SpeculativeConfig
from caramba.runtime.generator import GenerationStats, Generator
from caramba.runtime.kernel_executor import InterpreterExecutor, KernelExecutor
from caramba.runtime.kv_cache import (TENSOR_LAYOUTS, CachedTensor, CacheError, CacheOverflowError, CacheSpec,
                                      KVCache, LayerCache, resolve_kinds)
from caramba.ir.quant import (CACHE_KINDS, KIND_NAMES, NF4_LEVELS, CacheKind, CacheKindError, NonFiniteError,
                                   QTensor, bytes_per_element, code_width, dequantize, n_blocks, nbytes, pack_nibbles,
                                   parse_kind, quantize, unpack_nibbles)
from caramba.runtime.sampling import probs_after_filters, sample_next
from caramba.runtime.speculative import AdaptiveK, RoundResult, commit, greedy_round, speculative_round
from caramba.runtime.speculative_generator import SpeculativeGenerator, SpeculativeStats

__all__ = [
    "CacheConfig", "CachedProgram", "Executor", "GenerationStats", "Generator", "InterpreterExecutor", "KernelExecutor",
    "AdaptiveK", "GenerateConfig", "GenerateConfigError", "RoundResult", "SpeculativeConfig", "commit",
    "greedy_round", "probs_after_filters", "sample_next", "speculative_round",
    "SpeculativeGenerator", "SpeculativeStats",
    "CACHE_KINDS", "KIND_NAMES", "NF4_LEVELS", "TENSOR_LAYOUTS", "CacheError", "CacheKind", "CacheKindError",
    "CacheOverflowError", "CacheSpec", "CachedTensor", "KVCache", "LayerCache", "NonFiniteError", "QTensor",
    "bytes_per_element", "code_width", "dequantize", "n_blocks", "nbytes", "pack_nibbles", "parse_kind",
    "quantize", "resolve_kinds", "unpack_nibbles",
]
