"""One evaluation pass over a model: capture, fidelity metrics, perplexity and probe answers.

Per document of L tokens:

1. The prefix (all but the last ``n_tail`` tokens, or all but the questions and answers of a
   probe) runs densely as a chunked prefill and fills the KV cache (and, with a trained
   indexer, the indexer's key cache); the tail runs once densely and once per method with the
   global layers' attention restricted to the method's selection over the whole context (a
   prefill chunk, the paper's setting). Perplexity is scored on the tail; a probe's question is
   answered when every answer token is the argmax.
2. Fidelity metrics use the dense passes' captures: ``n_queries`` query positions evenly
   spread over [L/4, L) (below m*B = L/4 every scaled-budget HISA setting is exact), every
   global layer; with a trained indexer the selections come from its q, k, w (computed from the
   captured layer inputs) and the attention mass from the layer's real heads; in the proxy
   study every KV head's own q/k are the indexer.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

import hisa
from .attention import Router, attach_hooks, routed, select_keys
from .documents import document_ids
from .methods import Method, full_index_scores
from .metrics import (attention_mass, attention_probs, block_occupancy, iou, oracle_recall,
                      positive_iou, positive_recall)


def budget_methods(L: int, *, topk: int | None = None, block_sizes=(32, 64, 128),
                   extras: bool = True, variants: bool = True) -> list[Method]:
    """The compared settings at context L. Scaled budget: k = L/16, m*B = 4k (so HISA prunes
    for queries past L/4); pass ``topk=2048`` for the DSA defaults (m*B = 8192). ``extras``:
    HISA at twice the pool (B = 64) and block-sparse (k // B blocks of B = k / 8 tokens, the
    same token budget as flat); ``variants``: the eval-only stage-1 variants at B = 64 and the
    linear stage 1 at every B."""
    k = topk or max(L // 16, 16)
    pool = 4 * k
    out = [Method("dense"), Method("flat", topk=k)]
    for B in block_sizes:
        if pool // B >= 2:
            out.append(Method("hisa", topk=k, block_size=B, block_topk=pool // B))
    B = 64 if 64 in block_sizes else block_sizes[0]
    if extras:
        out += [Method("hisa", topk=k, block_size=B, block_topk=2 * pool // B),
                Method("block_sparse", topk=k, block_size=max(16, k // 8))]
    if variants:
        out += [Method("hisa_max", topk=k, block_size=B, block_topk=pool // B),
                Method("hisa_adaptive", topk=k, block_size=B, block_topk=pool // B),
                Method("hisa_centred", topk=k, block_size=B, block_topk=pool // B)]
        out += [Method("hisa_linear", topk=k, block_size=b, block_topk=pool // b)
                for b in block_sizes if pool // b >= 2]
    return out


def corpus_ids(tokenizer, n_tokens: int, cache_dir, offset_chars: int = 0) -> torch.Tensor:
    """Austen token ids (kept for the diagnose module and older callers)."""
    from .austen import austen_text
    from .documents import text_ids
    return text_ids(tokenizer, austen_text(cache_dir), n_tokens, offset_chars=offset_chars,
                    what="Austen text")


def _forward(model, ids, cache, router, *, logits_to_keep: int = 0):
    attach_hooks(model)
    with torch.no_grad(), routed(router):
        out = model(ids.unsqueeze(0).to(model.device), past_key_values=cache, use_cache=True,
                    logits_to_keep=logits_to_keep)
    return out


@dataclass
class Capture:
    q: dict       # layer -> [Hq, L, Dh] real post-RoPE queries
    k: dict       # layer -> [Hkv, L, Dh] real keys
    scale: dict   # layer -> float
    hidden: dict  # layer -> [L, d_model] attention inputs (the indexer's input)


def _merge_capture(cap: dict, hid: dict | None = None) -> Capture:
    q, k, s, h = {}, {}, {}, {}
    for layer, parts in cap.items():
        q[layer] = torch.cat([p[0] for p in parts], dim=1)
        k[layer] = torch.cat([p[1] for p in parts], dim=1)
        s[layer] = parts[-1][2]
        if hid:
            h[layer] = torch.cat(hid[layer])
    return Capture(q, k, s, h)


def chunk_runs(lm, ids: torch.Tensor, n_prefix: int, methods, *, indexers=None,
               capture: bool, precision: str = "fp32", backend: str = "auto",
               chunk: int = 2048, decode: str = "prefill", progress=None):
    """Dense prefix once (chunked), then the tail ``ids[n_prefix:]`` per method: one sparse
    chunk, or with ``decode="paged"`` (trained indexers only) one token per forward through
    the paged decode ops (:mod:`hisa.eval.paged`).

    Returns ({label: tail logits fp32 [T_tail, V]}, Capture or None).
    """
    if decode not in ("prefill", "paged"):
        raise ValueError(f"decode: expected 'prefill' or 'paged', got {decode!r}")
    if decode == "paged" and (indexers is None or capture):
        raise ValueError("decode='paged' needs trained indexers and capture=False")
    from transformers import DynamicCache
    model = lm.model
    cap, hid = ({}, {}) if capture else (None, None)
    cache = DynamicCache(config=model.config)
    pre = Router(lm.global_layers, capture=cap, hidden=hid, indexers=indexers)
    for s in range(0, n_prefix, chunk):
        _forward(model, ids[s:min(n_prefix, s + chunk)], cache, pre, logits_to_keep=1)
        if progress is not None:
            progress(f"prefix {min(n_prefix, s + chunk)}/{n_prefix}")
    logits = {}
    for m in methods:
        r = Router(lm.global_layers, method=m, sparse_from=n_prefix, indexers=indexers,
                   index_keys=dict(pre.index_keys), precision=precision, backend=backend,
                   capture=cap if (capture and m.name == "dense") else None,
                   hidden=hid if (capture and m.name == "dense") else None,
                   decode=decode, capacity=ids.numel())
        c = copy.deepcopy(cache)
        if decode == "paged":
            steps = [_forward(model, ids[t:t + 1], c, r).logits[0, -1:].float()
                     for t in range(n_prefix, ids.numel())]
            logits[m.label] = torch.cat(steps)
        else:
            logits[m.label] = _forward(model, ids[n_prefix:], c, r).logits[0].float()
        if progress is not None:
            progress(f"tail: {m.label}")
    return logits, (_merge_capture(cap, hid) if capture else None)


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits[:-1].cpu(), targets[1:].cpu())
    return math.exp(float(nll))


def _query_positions(L: int, n_queries: int, device) -> torch.Tensor:
    return torch.linspace(L // 4, L - 1, n_queries).round().long().unique().to(device)


def _method_record(m: Method, idx, flat, fscores, full, probs, mass_flat, ks, ke, *, layer,
                   head, qpos):
    B = m.block_size
    mm = m.block_topk if m.name != "block_sparse" else max(2, m.topk // B)
    return dict(label=m.label, method=m, layer=layer, head=head, pos=qpos.cpu(),
                iou=iou(flat, idx).cpu(),
                iou_positive=positive_iou(flat, idx, full, ks).cpu(),
                recall=positive_recall(flat, fscores, idx).cpu(),
                oracle=oracle_recall(flat, fscores, ks, ke, block_size=B, block_topk=mm).cpu(),
                mass=(attention_mass(probs, idx, ks) / mass_flat.clamp_min(1e-12)).cpu(),
                mass_flat=mass_flat.cpu(), occupancy=block_occupancy(flat, ks, B).cpu())


def fidelity_records(cap: Capture, methods, *, n_queries: int, device: str, indexers=None,
                     precision: str = "fp32", backend: str = "auto", progress=None):
    """Per (method, layer, head) per-query metric tensors plus the query positions; and per
    layer the indexer's own quality (flat top-k mass over the true attention's top-k mass)."""
    L = next(iter(cap.k.values())).shape[1]
    qpos = _query_positions(L, n_queries, device)
    n = qpos.numel()
    ks = torch.zeros(n, dtype=torch.int32, device=device)
    ke = (qpos + 1).to(torch.int32)
    recs, quality = [], {}
    sel_methods = [m for m in methods if m.name not in ("dense", "flat")]
    flat_k = next(m.topk for m in methods if m.name == "flat")
    for layer in sorted(cap.q):
        Q, K = cap.q[layer].to(device), cap.k[layer].to(device)
        Hkv = K.shape[0]
        G = Q.shape[0] // Hkv
        if indexers is not None:
            ix = indexers[layer]
            with torch.no_grad():
                x = cap.hidden[layer].to(device)
                k_i = ix.keys(x, torch.arange(L, device=device))                    # [L, D]
                q_i, w_i = ix.queries(x[qpos], qpos)                                # [n, H, D]
            probs = _grouped_probs(Q, K, qpos, cap.scale[layer])                   # [n, Hq, L]
            groups = [(0, q_i, k_i, w_i, probs)]
        else:
            groups = []
            for g in range(Hkv):
                q = Q[g * G:(g + 1) * G, qpos].transpose(0, 1).contiguous()         # [n, G, D]
                groups.append((g, q, K[g].contiguous(), torch.full((n, G), 1.0 / G,
                                                                    device=device),
                               attention_probs(q, K[g], qpos, cap.scale[layer])))
        for head, q, k, w, probs in groups:
            flat, fscores = _flat(q, k, w, ks, ke, flat_k, precision, backend)
            full = full_index_scores(q, k, w)
            mass_flat = attention_mass(probs, flat, ks)
            best = torch.topk(probs.mean(1), min(flat_k, L), dim=-1).values.sum(-1)
            quality.setdefault(layer, []).append((mass_flat / best.clamp_min(1e-12)).cpu())
            for m in sel_methods:
                if precision == "fp8" or m.name in ("hisa", "hisa3", "block_sparse"):
                    idx = select_keys(m, q, k, w, ks, ke, precision=precision, backend=backend)
                else:
                    idx = m.select(q, k, w, ks, ke, full_scores=full)
                recs.append(_method_record(m, idx, flat, fscores, full, probs, mass_flat, ks,
                                           ke, layer=layer, head=head, qpos=qpos))
            if progress is not None:
                progress(f"metrics layer {layer}")
    return recs, {ly: torch.cat(v) for ly, v in quality.items()}


def _grouped_probs(Q, K, qpos, scale):
    """Real attention of every query head (grouped over KV heads), [n, Hq, L]."""
    Hkv, G = K.shape[0], Q.shape[0] // K.shape[0]
    parts = [attention_probs(Q[g * G:(g + 1) * G, qpos].transpose(0, 1), K[g], qpos, scale)
             for g in range(Hkv)]
    return torch.cat(parts, dim=1)


def _flat(q, k, w, ks, ke, topk, precision, backend):
    """Flat top-k and its scores (the FP8 operands when ``precision`` is fp8)."""
    if precision == "fp8":
        from hisa.distill.indexer import LightningIndexer
        q8, k8, k_scale, w8 = LightningIndexer.fp8(q, k, w)
        return hisa.dsa_index(q8, k8, w8, ks, ke, k_scale=k_scale, topk=topk,
                              return_scores=True, backend=backend)
    return hisa.dsa_index(q, k, w, ks, ke, topk=topk, return_scores=True, backend=backend)


def probe_hits(logits: dict, probe) -> dict:
    """{(label, depth): [hit, ...]} for each question of ``probe`` (teacher-forced argmax)."""
    out = {}
    for label, lg in logits.items():
        for qn in probe.questions:
            a = qn.answer_at - probe.n_prefix                  # tail-relative
            target = probe.ids[qn.answer_at:qn.answer_at + qn.answer_len]
            pred = lg[a - 1:a - 1 + qn.answer_len].argmax(-1).cpu()
            out.setdefault((label, round(qn.depth, 2)), []).append(
                bool(torch.equal(pred, target)))
    return out


def evaluate_text(lm, ids: torch.Tensor, n_prefix: int, plans, *, n_queries: int,
                  indexers=None, precision="fp32", backend="auto", chunk=2048, progress=None,
                  capture: bool = True, decode: str = "prefill"):
    """One document: the union of the plans' methods over one dense prefix.

    ``plans`` is [(budget, methods)]. Returns ({label: tail perplexity}, {budget: (records,
    indexer quality)} or {} when not capturing, {label: tail logits}).
    """
    methods, seen = [], set()
    for _, ms in plans:
        for m in ms:
            if m.label not in seen:
                seen.add(m.label)
                methods.append(m)
    logits, cap = chunk_runs(lm, ids, n_prefix, methods, indexers=indexers, capture=capture,
                             precision=precision, backend=backend, chunk=chunk, decode=decode,
                             progress=progress)
    tail = ids[n_prefix:]
    ppl = {label: perplexity(lg, tail) for label, lg in logits.items()}
    fid = {}
    if capture:
        fid = {b: fidelity_records(cap, ms, n_queries=n_queries, device=lm.device,
                                   indexers=indexers, precision=precision, backend=backend,
                                   progress=progress) for b, ms in plans}
    return ppl, fid, logits
