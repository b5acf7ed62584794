"""Context-parallel indexing: exact HISA and flat selection over a key cache sharded across ranks.

Built on ``torch.distributed`` (NCCL on GPUs, gloo on CPU). Each rank holds a shard of the keys
(:class:`ShardLayout`: contiguous or interleaved) and of the pooled block cache; queries are the
same on every rank, and every rank returns the selection the single-process op would return on
the unsharded keys. Design, exchanges and bytes per step: docs/distributed.md.

=====================  ========================================================================
op                     single-process twin
=====================  ========================================================================
``hisa_index``         :func:`hisa.hisa_index` (packed prefill)
``dsa_index``          :func:`hisa.dsa_index`
``hisa_index_paged``   :func:`hisa.hisa_index_paged` (decode, no host sync)
``dsa_index_paged``    :func:`hisa.dsa_index_paged`
``cache_append``       :func:`hisa.paged_cache_append` on a rank's shard
=====================  ========================================================================
"""
from .comm import count_bytes
from .decode import cache_append, dsa_index_paged, hisa_index_paged
from .layout import BlockMap, ShardLayout
from .prefill import dsa_index, hisa_index, shard_keys

__all__ = [
    "BlockMap",
    "ShardLayout",
    "cache_append",
    "count_bytes",
    "dsa_index",
    "dsa_index_paged",
    "hisa_index",
    "hisa_index_paged",
    "shard_keys",
]
