"""Attention of a Hugging Face model routed through the indexer under test.

The evaluation registers one attention implementation, ``"hisa_eval"``, with transformers'
``AttentionInterface``, and a forward pre-hook on each global layer's attention module
(:func:`attach_hooks`). Models call the attention with their post-RoPE queries and keys and the
pre-hook sees the module's input hidden state, so nothing of the model's code is copied:

* capturing records the global layers' queries, new keys and input hidden states;
* with a trained indexer (:class:`hisa.distill.IndexerSet`) the pre-hook computes the indexer's
  keys for every new token (an indexer key cache beside the model's KV cache, as in DSA) and its
  queries and weights for the sparse rows; the attention then restricts those rows to the keys
  the :class:`Method` selects from the indexer's scores, one selection shared by all heads;
* without one (the proxy study) each KV head's query group is the index heads with uniform
  weights and the shared key head is the index key (DSA's MQA shape) - raw attention scores
  standing in for an indexer.

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
        capture: when a dict, filled with ``{layer: [(q [Hq, T, D], k [Hkv, T, D], scale)]}``
            per forward call (the call's new keys only).
        hidden: when a dict, filled with ``{layer: [x [T, d_model]]}``, the attention input.
        indexers: trained indexers by layer, or None for the raw-attention proxy.
        index_keys: ``{layer: fp32 [S, D]}`` indexer keys of every token seen so far; grows
            with each call (new tensors, so a dict copied from another router is not mutated).
        precision: "fp32" or "fp8" (the contract's FP8 operands, for the Triton kernels).
        backend: passed to the selection ops ("auto", "torch" or "triton").
        selected: when a dict, filled with ``{layer: [int32 [t, K]]}`` selections.
        decode: "prefill" (the sparse rows select through the prefill ops) or "paged" (a
            one-token call selects through the paged decode ops, :mod:`hisa.eval.paged`).
        capacity: tokens the paged caches must hold (the whole sequence).
    """
    global_layers: frozenset
    method: Method | None = None
    sparse_from: int = 0
    capture: dict | None = None
    hidden: dict | None = None
    indexers: object | None = None
    index_keys: dict = field(default_factory=dict)
    precision: str = "fp32"
    backend: str = "auto"
    selected: dict | None = None
    decode: str = "prefill"
    capacity: int = 0
    calls: int = 0
    _queries: dict = field(default_factory=dict)
    _paged: dict = field(default_factory=dict)

    def paged_row(self, n_rows: int) -> bool:
        """This call is one decode step that runs through a paged op."""
        from .paged import has_paged_op
        return (self.decode == "paged" and n_rows == 1 and self.method is not None
                and has_paged_op(self.method))


_ACTIVE: list[Router] = []


@contextmanager
def routed(router: Router):
    """Make ``router`` drive the ``hisa_eval`` attention inside the block."""
    _ACTIVE.append(router)
    try:
        yield router
    finally:
        _ACTIVE.pop()


def _pre_hook(module, args, kwargs):
    r = _ACTIVE[-1] if _ACTIVE else None
    layer = getattr(module, "layer_idx", None)
    if r is None or layer not in r.global_layers:
        return None
    x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if x.shape[0] != 1:
        raise ValueError(f"the evaluation runs batch size 1, got {x.shape[0]}")
    x = x[0].detach()                                                          # [T, d_model]
    if r.hidden is not None:
        r.hidden.setdefault(layer, []).append(x.float().cpu())
    if r.indexers is None or layer not in r.indexers:
        return None
    ix = r.indexers[layer]
    prev = r.index_keys.get(layer)
    start = 0 if prev is None else prev.shape[0]
    pos = torch.arange(start, start + x.shape[0], device=x.device)
    with torch.no_grad():
        k_new = ix.keys(x, pos)                                                # [T, D]
        r.index_keys[layer] = k_new if prev is None else torch.cat([prev, k_new])
        rows = pos >= r.sparse_from
        if r.method is not None and r.method.name != "dense" and bool(rows.any()):
            r._queries[layer] = ix.queries(x[rows], pos[rows])                 # [t, H, D], [t, H]
        if r.paged_row(x.shape[0]):
            from .paged import PagedLayer
            if layer in r._paged:
                r._paged[layer].append(k_new, backend=r.backend)
            else:
                r._paged[layer] = PagedLayer.build(
                    r.index_keys[layer], max(r.capacity, start + 1),
                    block_size=r.method.block_size or 128, backend=r.backend)
    return None


def attach_hooks(model: torch.nn.Module) -> None:
    """Register the pre-hook on every attention module that has a ``layer_idx`` (idempotent)."""
    if getattr(model, "_hisa_eval_hooked", False):
        return
    for name, mod in model.named_modules():
        if name.endswith("self_attn") and hasattr(mod, "layer_idx"):
            mod.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    model._hisa_eval_hooked = True


def selection_to_mask(idx: torch.Tensor, ks: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Boolean [T, S] mask of the selected keys (offsets relative to ``ks``, -1 ignored)."""
    T = idx.shape[0]
    mask = torch.zeros(T, num_keys + 1, dtype=torch.bool, device=idx.device)
    col = torch.where(idx >= 0, idx.long() + ks.long().unsqueeze(1), num_keys)
    mask.scatter_(1, col, True)
    return mask[:, :num_keys]


def select_keys(method: Method, q, k, w, ks, ke, *, precision: str = "fp32",
                backend: str = "auto", full_scores=None) -> torch.Tensor:
    """``method.select`` on fp32 operands, or on the contract's FP8 operands."""
    if precision == "fp8":
        from hisa.distill.indexer import LightningIndexer
        q8, k8, k_scale, w8 = LightningIndexer.fp8(q, k, w)
        return method.select(q8, k8, w8, ks, ke, k_scale=k_scale, backend=backend)
    if precision != "fp32":
        raise ValueError(f"precision: expected 'fp32' or 'fp8', got {precision!r}")
    return method.select(q, k, w, ks, ke, backend=backend, full_scores=full_scores)


def _sparse_attention(r: Router, module, query, key, value, scaling, layer):
    """query [1, Hq, T, D], key/value [1, Hkv, S, D]; returns [1, T, Hq, Dv]."""
    _, Hq, T, _ = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    G = Hq // Hkv
    pos = torch.arange(S - T, S, device=query.device)                       # absolute positions
    causal = torch.arange(S, device=query.device).unsqueeze(0) <= pos.unsqueeze(1)  # [T, S]
    rows = torch.nonzero(pos >= r.sparse_from).squeeze(1)
    ks = torch.zeros(rows.numel(), dtype=torch.int32, device=query.device)
    ke = (pos[rows] + 1).to(torch.int32)
    if r.indexers is not None and layer in r.indexers:
        mask = causal.clone()
        if rows.numel():
            if layer not in r.index_keys:
                raise RuntimeError(f"layer {layer}: no indexer keys; the pre-hook that computes "
                                   "them is missing (call attach_hooks(model) first)")
            k_idx = r.index_keys[layer]
            if k_idx.shape[0] != S:
                raise RuntimeError(f"layer {layer}: {k_idx.shape[0]} indexer keys for {S} "
                                   "attention keys (the indexer cache is out of step)")
            q_idx, w = r._queries[layer]
            if r.paged_row(rows.numel()):
                sel = r._paged[layer].select(r.method, q_idx, w, backend=r.backend)
            else:
                sel = select_keys(r.method, q_idx, k_idx, w, ks, ke, precision=r.precision,
                                  backend=r.backend)
            mask[rows] = selection_to_mask(sel, ks, S)
            if r.selected is not None:
                r.selected.setdefault(layer, []).append(sel)
        attn_mask = mask.view(1, 1, T, S)                       # shared by all heads
    else:
        masks = []
        for g in range(Hkv):
            mask = causal.clone()
            if rows.numel():
                q_idx = query[0, g * G:(g + 1) * G, rows].transpose(0, 1).float()  # [t, G, D]
                k_idx = key[0, g].float()                                           # [S, D]
                w = torch.full((rows.numel(), G), 1.0 / G, device=query.device)
                sel = r.method.select(q_idx, k_idx, w, ks, ke, backend=r.backend)
                mask[rows] = selection_to_mask(sel, ks, S)
                if r.selected is not None:
                    r.selected.setdefault(layer, []).append(sel)
            masks.append(mask)
        attn_mask = torch.stack(masks).repeat_interleave(G, dim=0).unsqueeze(0)  # [1, Hq, T, S]
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
        T = query.shape[2]
        r.capture.setdefault(layer, []).append(
            (query[0].detach().float().cpu(), key[0, :, -T:].detach().float().cpu(), scale))
    if r.method is None or r.method.name == "dense":
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    return _sparse_attention(r, module, query, key, value, scale, layer)


AttentionInterface.register(IMPL, hisa_eval_attention)
AttentionMaskInterface.register(IMPL, sdpa_mask)
