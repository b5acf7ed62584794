"""One dense pass of the frozen model over a training window, keeping what distillation needs.

Per chosen layer: the attention module's input hidden state x [L, d_model] (the indexer's
input), and the layer's real post-RoPE queries [Hq, L, Dh] and keys [Hkv, L, Dh] with its
softmax scale (the target attention). The window runs as a chunked prefill through the model's
own KV cache (``chunk`` tokens per forward), so memory stays bounded at 16K-32K tokens on CPU,
and the vocabulary projection runs for the last token only. Captures are stored in bf16 under
the cache directory (never the repository) and reused by later runs.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..eval.attention import Router, attach_hooks, routed


@dataclass
class WindowCapture:
    """bf16 captures of one window, by layer."""
    hidden: dict   # layer -> [L, d_model]
    q: dict        # layer -> [Hq, L, Dh]
    k: dict        # layer -> [Hkv, L, Dh]
    scale: dict    # layer -> float
    seconds: float | None = None   # wall time of the dense pass that made it

    @property
    def length(self) -> int:
        return next(iter(self.hidden.values())).shape[0]

    def to_dict(self) -> dict:
        return {"hidden": self.hidden, "q": self.q, "k": self.k, "scale": self.scale,
                "seconds": self.seconds}


def prefill(model: torch.nn.Module, ids: torch.Tensor, router: Router, *, chunk: int,
            cache=None, logits_to_keep: int = 1, progress=None):
    """Run ``ids`` [L] through ``model`` in chunks under ``router``; returns (cache, last
    output). ``progress(n_done, n_total)`` is called after each chunk."""
    from transformers import DynamicCache

    attach_hooks(model)
    if cache is None:
        cache = DynamicCache(config=model.config)
    out = None
    n = ids.numel()
    with torch.no_grad(), routed(router):
        for s in range(0, n, chunk):
            part = ids[s:s + chunk].unsqueeze(0).to(model.device)
            out = model(part, past_key_values=cache, use_cache=True,
                        logits_to_keep=logits_to_keep)
            if progress is not None:
                progress(min(s + chunk, n), n)
    return cache, out


def capture_window(model: torch.nn.Module, ids: torch.Tensor, layers, *, chunk: int = 2048,
                   progress=None) -> WindowCapture:
    """Dense chunked pass over ``ids`` [L] capturing ``layers``' inputs and q/k (bf16, CPU)."""
    layers = frozenset(int(i) for i in layers)
    cap, hid = {}, {}
    t0 = time.time()
    prefill(model, ids, Router(layers, capture=cap, hidden=hid), chunk=chunk, progress=progress)
    out = WindowCapture({}, {}, {}, {}, seconds=round(time.time() - t0, 1))
    for layer in sorted(layers):
        if layer not in cap:
            raise ValueError(f"layer {layer} was never called through the hisa_eval attention "
                             "(is the model loaded with attn_implementation='hisa_eval'?)")
        out.hidden[layer] = torch.cat(hid[layer]).to(torch.bfloat16)
        out.q[layer] = torch.cat([p[0] for p in cap[layer]], dim=1).to(torch.bfloat16)
        out.k[layer] = torch.cat([p[1] for p in cap[layer]], dim=1).to(torch.bfloat16)
        out.scale[layer] = float(cap[layer][-1][2])
    return out


def capture_key(model_name: str, text: str, start: int, ids: torch.Tensor, layers) -> str:
    h = hashlib.sha1(ids.to(torch.int64).numpy().tobytes()).hexdigest()[:12]
    lay = "-".join(str(i) for i in sorted(layers))
    return f"{model_name}_{text}_{start}_{ids.numel()}_L{lay}_{h}"


def cached_capture(model: torch.nn.Module, ids: torch.Tensor, layers, *, key: str,
                   cache_dir: str | Path | None, chunk: int = 2048,
                   progress=None) -> WindowCapture:
    """:func:`capture_window`, stored as ``<cache_dir>/distill/<key>.pt`` (None: not stored)."""
    path = None if cache_dir is None else Path(cache_dir) / "distill" / f"{key}.pt"
    if path is not None and path.exists():
        d = torch.load(path, weights_only=True)
        return WindowCapture(d["hidden"], d["q"], d["k"], d["scale"], d.get("seconds"))
    cap = capture_window(model, ids, layers, chunk=chunk, progress=progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(cap.to_dict(), tmp)
        tmp.replace(path)
    return cap
