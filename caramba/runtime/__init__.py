"""Runtime: KV-cache storage kinds and the preallocated KV caches the executor reads and writes."""
from caramba.runtime.kv_cache import (TENSOR_LAYOUTS, CachedTensor, CacheError, CacheOverflowError, CacheSpec,
                                      KVCache, LayerCache, resolve_kinds)
from caramba.runtime.quant import (CACHE_KINDS, KIND_NAMES, NF4_LEVELS, CacheKind, CacheKindError, NonFiniteError,
                                   QTensor, bytes_per_element, code_width, dequantize, n_blocks, nbytes, pack_nibbles,
                                   parse_kind, quantize, unpack_nibbles)

__all__ = [
    "CACHE_KINDS", "KIND_NAMES", "NF4_LEVELS", "TENSOR_LAYOUTS", "CacheError", "CacheKind", "CacheKindError",
    "CacheOverflowError", "CacheSpec", "CachedTensor", "KVCache", "LayerCache", "NonFiniteError", "QTensor",
    "bytes_per_element", "code_width", "dequantize", "n_blocks", "nbytes", "pack_nibbles", "parse_kind",
    "quantize", "resolve_kinds", "unpack_nibbles",
]
