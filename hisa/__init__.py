"""hisa: hierarchical (block-then-token) sparse-attention indexer for DSA models.

Distributed as ``hisa-indexer``; imported as ``hisa``.
"""
from ._version import __version__
from .cache import PagedIndexerCache, paged_cache_append
from .config import HisaConfig
from .ops.dsa.index import dsa_index
from .ops.dsa.paged import dsa_index_paged
from .ops.indexer.decode import hisa_index_paged
from .ops.indexer.prefill import WindowPlan, hisa_index, plan_windows
from .ops.sparse_attn.naive import sparse_attention_reference
from .utils.quant import dequantize_fp8, quantize_fp8
from .utils.seqlens import windows_from_cu_seqlens

__all__ = [
    "HisaConfig",
    "WindowPlan",
    "PagedIndexerCache",
    "dequantize_fp8",
    "dsa_index",
    "dsa_index_paged",
    "hisa_index",
    "hisa_index_paged",
    "paged_cache_append",
    "plan_windows",
    "quantize_fp8",
    "sparse_attention_reference",
    "windows_from_cu_seqlens",
]
