"""One evaluation pass over a model: capture, fidelity metrics, perplexity and needle accuracy.

Per context length L (a slice of the Austen text):

1. The first ``L - N`` tokens run densely (their keys fill the KV cache); the last N tokens run
   once densely and once per method with their attention restricted to the method's selection
   over the whole cache (a prefill chunk, the paper's setting). The dense passes capture every
   global layer's post-RoPE q/k; perplexity is scored on those N tokens.
2. Fidelity metrics use the captured q/k: ``n_queries`` query positions evenly spread over
   [L/4, L) (below m*B = L/4 every HISA setting is exact), every layer and KV head.
3. Needles: a sentence with a random code at depth d of an L-token haystack; the question and
   the answer are the sparse chunk; a hit means every answer token is the argmax (greedy
   decoding would produce the answer).
"""
from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass

import torch

import hisa
from .attention import Router, routed
from .austen import austen_text
from .methods import Method, full_index_scores
from .metrics import (attention_mass, attention_probs, block_occupancy, iou, oracle_recall,
                      positive_iou, positive_recall)


def budget_methods(L: int, *, topk: int | None = None, block_sizes=(32, 64, 128),
                   extras: bool = True) -> list[Method]:
    """The compared settings at context L. Scaled budget: k = L/16, m*B = 4k (so HISA prunes
    for queries past L/4); pass ``topk=2048`` for the DSA defaults (m*B = 8192). Block-sparse
    keeps k // B blocks of B = k / 8 tokens (8 blocks, the same token budget as flat). HISA with
    the linear stage 1 (``hisa_linear``, the fix kept from docs/fidelity.md) runs at every B."""
    k = topk or max(L // 16, 16)
    pool = 4 * k
    out = [Method("dense"), Method("flat", topk=k)]
    for B in block_sizes:
        if pool // B >= 2:
            out.append(Method("hisa", topk=k, block_size=B, block_topk=pool // B))
    if extras:
        B = 64 if 64 in block_sizes else block_sizes[0]
        out += [Method("hisa", topk=k, block_size=B, block_topk=2 * pool // B),
                Method("block_sparse", topk=k, block_size=max(16, k // 8)),
                Method("hisa_max", topk=k, block_size=B, block_topk=pool // B),
                Method("hisa_adaptive", topk=k, block_size=B, block_topk=pool // B),
                Method("hisa_centred", topk=k, block_size=B, block_topk=pool // B)]
    out += [Method("hisa_linear", topk=k, block_size=b, block_topk=pool // b)
            for b in block_sizes if pool // b >= 2]
    return out


def corpus_ids(tokenizer, n_tokens: int, cache_dir, offset_chars: int = 0) -> torch.Tensor:
    text = austen_text(cache_dir)
    chunk = text[offset_chars:offset_chars + 8 * n_tokens]
    ids = tokenizer(chunk, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < n_tokens:
        raise ValueError(f"Austen text too short for {n_tokens} tokens from {offset_chars}")
    return ids[:n_tokens]


def _forward(model, ids, cache, router):
    with torch.no_grad(), routed(router):
        out = model(ids.unsqueeze(0).to(model.device), past_key_values=cache, use_cache=True)
    return out


def _chunk_runs(lm, ids: torch.Tensor, n_tail: int, methods, *, capture: bool, progress=None):
    """Dense prefix once, then the tail per method. Returns ({label: tail logits}, capture)."""
    model = lm.model
    split = ids.numel() - n_tail
    cap = {} if capture else None
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    _forward(model, ids[:split], cache, Router(lm.global_layers, capture=cap))
    logits = {}
    for m in methods:
        r = Router(lm.global_layers, method=m, sparse_from=split,
                   capture=cap if (capture and m.name == "dense") else None)
        logits[m.label] = _forward(model, ids[split:], copy.deepcopy(cache), r).logits[0].float()
        if progress is not None:
            progress.update(1)
    return logits, cap


@dataclass
class Capture:
    q: dict      # layer -> [Hq, L, D]
    k: dict      # layer -> [Hkv, L, D]
    scale: dict  # layer -> float


def _merge_capture(cap: dict) -> Capture:
    q, k, s = {}, {}, {}
    for layer, parts in cap.items():
        q[layer] = torch.cat([p[0] for p in parts], dim=1)
        k[layer] = parts[-1][1]
        s[layer] = parts[-1][2]
    return Capture(q, k, s)


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits[:-1].cpu(), targets[1:].cpu())
    return math.exp(float(nll))


def fidelity_records(cap: Capture, methods, *, n_queries: int, device: str, progress=None):
    """Per (method, layer, head) per-query metric tensors plus the query positions."""
    L = next(iter(cap.k.values())).shape[1]
    qpos = torch.linspace(L // 4, L - 1, n_queries).round().long().unique().to(device)
    n = qpos.numel()
    ks = torch.zeros(n, dtype=torch.int32, device=device)
    ke = (qpos + 1).to(torch.int32)
    recs = []
    sel_methods = [m for m in methods if m.name not in ("dense", "flat")]
    flat_k = next(m.topk for m in methods if m.name == "flat")
    for layer in sorted(cap.q):
        Q, K = cap.q[layer].to(device), cap.k[layer].to(device)
        Hkv = K.shape[0]
        G = Q.shape[0] // Hkv
        for g in range(Hkv):
            q = Q[g * G:(g + 1) * G, qpos].transpose(0, 1).contiguous()        # [n, G, D]
            k = K[g].contiguous()
            w = torch.full((n, G), 1.0 / G, device=device)
            flat, fscores = hisa.dsa_index(q, k, w, ks, ke, topk=flat_k, return_scores=True)
            full = full_index_scores(q, k, w)          # once per (layer, head), for the variants
            probs = attention_probs(q, k, qpos, cap.scale[layer])
            mass_flat = attention_mass(probs, flat, ks)
            for m in sel_methods:
                idx = m.select(q, k, w, ks, ke, full_scores=full)
                B = m.block_size
                mm = m.block_topk if m.name != "block_sparse" else max(2, m.topk // B)
                recs.append(dict(
                    label=m.label, method=m, layer=layer, head=g, pos=qpos.cpu(),
                    iou=iou(flat, idx).cpu(),
                    iou_positive=positive_iou(flat, idx, full, ks).cpu(),
                    recall=positive_recall(flat, fscores, idx).cpu(),
                    oracle=oracle_recall(flat, fscores, ks, ke, block_size=B,
                                         block_topk=mm).cpu(),
                    mass=(attention_mass(probs, idx, ks) / mass_flat.clamp_min(1e-12)).cpu(),
                    mass_flat=mass_flat.cpu(),
                    occupancy=block_occupancy(flat, ks, B).cpu()))
            if progress is not None:
                progress.update(1)
    return recs


NEEDLE_COLOURS = ("blue", "red", "green", "silver", "amber", "violet", "golden", "grey")
NEEDLE_THINGS = ("door", "lantern", "carriage", "garden gate", "music box", "writing desk")


def needle_prompt(tokenizer, filler: torch.Tensor, depth: float, L: int, rng: random.Random):
    """(prefix ids, tail ids, answer token count): haystack with the needle, then Q + A."""
    colour, thing = rng.choice(NEEDLE_COLOURS), rng.choice(NEEDLE_THINGS)
    code = str(rng.randint(10000, 99999))
    needle = f" The secret code of the {colour} {thing} is {code}. "
    question = (f"\n\nQuestion: what is the secret code of the {colour} {thing}?\n"
                f"Answer: The secret code of the {colour} {thing} is")
    enc = lambda s: tokenizer(s, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n_ids, q_ids, a_ids = enc(needle), enc(question), enc(" " + code + ".")
    n_fill = L - n_ids.numel() - q_ids.numel() - a_ids.numel()
    at = int(round(depth * n_fill))
    hay = filler[:n_fill]
    prefix = torch.cat([hay[:at], n_ids, hay[at:]])
    return prefix, torch.cat([q_ids, a_ids]), a_ids.numel()


def needle_hits(lm, L: int, depths, methods, *, cache_dir, trials: int = 1, seed: int = 0,
                progress=None) -> dict:
    """{(label, depth): accuracy over ``trials`` needles}."""
    filler = corpus_ids(lm.tokenizer, L, cache_dir, offset_chars=1_000_000)
    rng = random.Random(seed)
    hits = {}
    for depth in depths:
        for _ in range(trials):
            prefix, tail, n_ans = needle_prompt(lm.tokenizer, filler, depth, L, rng)
            ids = torch.cat([prefix, tail])
            logits, _ = _chunk_runs(lm, ids, tail.numel(), methods, capture=False,
                                    progress=progress)
            target = tail[-n_ans:]
            for label, lg in logits.items():
                pred = lg[-n_ans - 1:-1].argmax(-1).cpu()
                ok = bool(torch.equal(pred, target))
                hits.setdefault((label, depth), []).append(ok)
    return {key: sum(v) / len(v) for key, v in hits.items()}


def evaluate_context(lm, L: int, methods, *, cache_dir, n_tail: int, n_queries: int,
                     progress=None):
    """Perplexity of the last ``n_tail`` tokens per method and fidelity records at length L."""
    ids = corpus_ids(lm.tokenizer, L, cache_dir)
    logits, cap = _chunk_runs(lm, ids, n_tail, methods, capture=True, progress=progress)
    tail = ids[-n_tail:]
    ppl = {label: perplexity(lg, tail) for label, lg in logits.items()}
    recs = fidelity_records(_merge_capture(cap), methods, n_queries=n_queries,
                            device=lm.device, progress=progress)
    return ppl, recs
