"""Attention of a Hugging Face model routed through the indexer under test.

The evaluation registers one attention implementation, ``"hisa_eval"``, with transformers'
``AttentionInterface``. Models call it with their post-RoPE queries and keys, so nothing of the
model's code is copied: the function

* records the queries and keys of the global-attention layers when capturing, and
* restricts the attention of the chosen queries to the keys a :class:`Method` selects, per KV
  head: the KV group's query heads are the index heads (uniform weights), the shared key head is
  the index key, the MQA shape of DSA. This is a proxy for a trained indexer, not one.

Everything else (sliding-window layers, dense runs) goes to transformers' SDPA path unchanged.
Batch size 1 without padding is assumed (the evaluation never pads).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .methods import Method

IMPL = "hisa_eval"


@dataclass
class Router:
    """What the registered attention does right now.

    Attributes:
        global_layers: layer indices whose attention the indexer replaces.
        method: selection for sparse queries, or None for dense attention everywhere.
        sparse_from: queries at absolute position >= this use ``method`` (earlier ones dense).
        capture: when a dict, filled with ``{layer: (q [Hq, T, D], k [Hkv, S, D], scale)}``.
        selected: when a dict, filled with ``{layer: int32 [Hkv, T, K]}`` absolute selections.
    """
    global_layers: frozenset
    method: Method | None = None
    sparse_from: int = 0
    capture: dict | None = None
    selected: dict | None = None
    calls: int = field(default=0)


_ACTIVE: list[Router] = []


@contextmanager
def routed(router: Router):
    """Make ``router`` drive the ``hisa_eval`` attention inside the block."""
    _ACTIVE.append(router)
    try:
        yield router
    finally:
        _ACTIVE.pop()


def selection_to_mask(idx: torch.Tensor, ks: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Boolean [T, S] mask of the selected keys (offsets relative to ``ks``, -1 ignored)."""
    T = idx.shape[0]
    mask = torch.zeros(T, num_keys + 1, dtype=torch.bool, device=idx.device)
    col = torch.where(idx >= 0, idx.long() + ks.long().unsqueeze(1), num_keys)
    mask.scatter_(1, col, True)
    return mask[:, :num_keys]


def _sparse_attention(r: Router, module, query, key, value, scaling, layer):
    """query [1, Hq, T, D], key/value [1, Hkv, S, D]; returns [1, T, Hq, Dv]."""
    _, Hq, T, _ = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    G = Hq // Hkv
    pos = torch.arange(S - T, S, device=query.device)                       # absolute positions
    causal = torch.arange(S, device=query.device).unsqueeze(0) <= pos.unsqueeze(1)  # [T, S]
    rows = torch.nonzero(pos >= r.sparse_from).squeeze(1)
    masks = []
    for g in range(Hkv):
        mask = causal.clone()
        if rows.numel():
            q_idx = query[0, g * G:(g + 1) * G, rows].transpose(0, 1).float()  # [t, G, D]
            k_idx = key[0, g].float()                                           # [S, D]
            ks = torch.zeros(rows.numel(), dtype=torch.int32, device=query.device)
            ke = (pos[rows] + 1).to(torch.int32)
            w = torch.full((rows.numel(), G), 1.0 / G, device=query.device)
            sel = r.method.select(q_idx, k_idx, w, ks, ke)
            mask[rows] = selection_to_mask(sel, ks, S)
            if r.selected is not None:
                r.selected.setdefault(layer, []).append(sel)
        masks.append(mask)
    attn_mask = torch.stack(masks).repeat_interleave(G, dim=0).unsqueeze(0)     # [1, Hq, T, S]
    v = value.repeat_interleave(G, dim=1)
    k = key.repeat_interleave(G, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, k, v, attn_mask=attn_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def hisa_eval_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                        scaling: float | None = None, **kwargs):
    """The registered attention function (signature of transformers' attention interface)."""
    r = _ACTIVE[-1] if _ACTIVE else None
    layer = getattr(module, "layer_idx", None)
    if r is None or layer not in r.global_layers:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"the evaluation runs batch size 1, got {query.shape[0]}")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    r.calls += 1
    if r.capture is not None:
        r.capture.setdefault(layer, []).append(
            (query[0].detach().float().cpu(), key[0].detach().float().cpu(), scale))
    if r.method is None or r.method.name == "dense":
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    return _sparse_attention(r, module, query, key, value, scale, layer)


AttentionInterface.register(IMPL, hisa_eval_attention)
AttentionMaskInterface.register(IMPL, sdpa_mask)
