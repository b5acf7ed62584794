"""Pooled block keys kept beside a transformers cache layer, so decode never re-pools.

transformers keeps the indexer keys of a DSA layer in ``DynamicIndexedLayer.indexer_keys``
``[batch, T, D]`` (grown by concatenation) or ``StaticIndexedLayer.indexer_keys``
``[batch, max_len, D]`` (written in place). HISA needs one representative per block of B keys;
this module keeps them in a side table keyed (weakly) by the cache layer object, one entry per
layer, dropped with the cache.

Each batch row b has a base offset (its first visible key: the left padding) and blocks
``[base + j * B, base + (j + 1) * B)``; block j is pooled once, from the cache's keys, in the
call that completes it (contract section 4). The incomplete tail block never needs a value: it
is forced for every query that sees it, so a zero placeholder stands in.

The table must describe the cache's current keys. Before each append the adapter compares the
layer's key tensor (by identity) and length with what it recorded after the previous call:
anything that rewrote the keys in between (``reorder_cache`` for beam search,
``batch_select_indices``, ``batch_repeat_interleave``, ``crop``, ``reset``, offloading) replaced
the tensor or changed the length, and the entry is rebuilt from the keys the cache holds.
"""
from __future__ import annotations

import weakref

import torch

from .. import dequantize_fp8, quantize_fp8

#: cache layer -> its pooled blocks; entries die with their layer (and so with the cache).
_TABLES: "weakref.WeakKeyDictionary[object, PooledBlocks]" = weakref.WeakKeyDictionary()


def layer_keys_before_append(layer) -> tuple[torch.Tensor | None, int]:
    """(key tensor, number of keys written) of a DSA cache layer, before this call's append."""
    from transformers.cache_utils import DynamicIndexedLayer, StaticIndexedLayer
    if isinstance(layer, StaticIndexedLayer):
        if not layer.is_indexer_initialized:
            return None, 0
        return layer.indexer_keys, int(layer.indexer_cumulative_length)
    if isinstance(layer, DynamicIndexedLayer):
        if not layer.is_indexer_initialized or layer.indexer_keys is None:
            return None, 0
        return layer.indexer_keys, layer.indexer_keys.shape[1]
    raise TypeError(f"cache: expected a DSA cache layer (DynamicIndexedLayer or "
                    f"StaticIndexedLayer) for the indexer, got "
                    f"{'none' if layer is None else type(layer).__name__}; build the "
                    f"cache with the model's config (DynamicCache(config=model.config))")


def block_means(keys: torch.Tensor, block_size: int, fp8: bool) -> torch.Tensor:
    """fp32 means of complete blocks: keys [n * B, D] -> [n, D]. With ``fp8`` the keys are the
    dequantized per-token FP8 values HISA scores (quantization is per token, so pooling the
    blocks one at a time equals quantizing the whole buffer first)."""
    D = keys.shape[-1]
    kf = dequantize_fp8(*quantize_fp8(keys, group_size=D)) if fp8 else keys.float()
    return kf.view(-1, block_size, D).sum(dim=1) / block_size


class PooledBlocks:
    """Completed block means of one cache layer's indexer keys, per batch row."""

    def __init__(self, bases: list[int], *, block_size: int, fp8: bool, head_dim: int,
                 device: torch.device) -> None:
        self.bases = bases
        self.block_size, self.fp8 = block_size, fp8
        self.rows = [torch.empty(0, head_dim, device=device) for _ in bases]  # fp32 [n_b, D]
        self.length = 0
        self.keys_ref = None          # weakref to the layer's key tensor after the last call

    def matches(self, bases: list[int], block_size: int, fp8: bool,
                keys: torch.Tensor | None, length: int) -> bool:
        recorded = self.keys_ref() if self.keys_ref is not None else None
        return (keys is not None and recorded is keys and length == self.length
                and bases == self.bases and (block_size, fp8) == (self.block_size, self.fp8))

    def extend(self, keys: torch.Tensor, filled: int) -> None:
        """Pool every block of ``keys`` [batch, >= filled, D] completed within [0, filled)."""
        B = self.block_size
        for b, base in enumerate(self.bases):
            done = self.rows[b].shape[0]
            complete = max(filled - base, 0) // B
            if complete > done:
                new = block_means(keys[b, base + done * B: base + complete * B], B, self.fp8)
                self.rows[b] = torch.cat([self.rows[b], new])
        self.length = filled

    def pooled(self, b: int, num_keys: int) -> torch.Tensor:
        """Representatives of row b's blocks over its first ``num_keys`` keys (from its base):
        fp32 [ceil(num_keys / B), D], a zero placeholder for an incomplete tail block."""
        nb = -(-num_keys // self.block_size)
        rows = self.rows[b][:nb]
        if rows.shape[0] < nb:
            rows = torch.cat([rows, rows.new_zeros(nb - rows.shape[0], rows.shape[1])])
        return rows


def pooled_blocks_for(layer, keys_before: torch.Tensor | None, length_before: int,
                      keys_after: torch.Tensor, filled: int, bases: list[int], *,
                      block_size: int, fp8: bool) -> PooledBlocks:
    """The layer's up-to-date pooled blocks after an append: the recorded entry extended by the
    blocks this call completed, or a fresh entry pooled from the cache's keys when anything
    other than this adapter's appends changed them (or the settings or row bases changed)."""
    entry = _TABLES.get(layer)
    if entry is None or not entry.matches(bases, block_size, fp8, keys_before, length_before):
        entry = PooledBlocks(bases, block_size=block_size, fp8=fp8,
                             head_dim=keys_after.shape[-1], device=keys_after.device)
        _TABLES[layer] = entry
    entry.extend(keys_after, filled)
    entry.keys_ref = weakref.ref(keys_after)
    return entry


def table_entry(layer) -> PooledBlocks | None:
    """The side-table entry of a cache layer (None before its first HISA call)."""
    return _TABLES.get(layer)
