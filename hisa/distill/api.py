"""``distill``: train lightning indexers for a frozen causal LM, end to end.

Text -> windows -> one captured dense pass per window -> :func:`train_indexers` -> a weights
file and its card. The committed indexers of the evaluation come from
``hisa distill --model gemma3`` (see :mod:`hisa.distill.cli` and the card beside the weights).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from .capture import cached_capture, capture_key
from .indexer import IndexerConfig, IndexerSet, save_indexers
from .train import DistillConfig, curve_json, machine, train_indexers


def layer_rope_theta(config, layer: int) -> float:
    """RoPE base of ``layer`` (per-layer-type parameters in transformers 5, else rope_theta)."""
    params = getattr(config, "rope_parameters", None)
    types = getattr(config, "layer_types", None)
    if isinstance(params, dict):
        if types and types[layer] in params and isinstance(params[types[layer]], dict):
            return float(params[types[layer]].get("rope_theta", 10000.0))
        if "rope_theta" in params:
            return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def indexer_configs(model_config, layers, cfg: DistillConfig) -> dict[int, IndexerConfig]:
    return {int(i): IndexerConfig(hidden_size=int(model_config.hidden_size), heads=cfg.heads,
                                  head_dim=cfg.head_dim, rope_dim=cfg.rope_dim,
                                  rope_theta=layer_rope_theta(model_config, int(i)))
            for i in layers}


def parse_windows(spec: str) -> list[int]:
    """"16384x2,4096x3" -> [16384, 16384, 4096, 4096, 4096]."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        length, _, count = part.partition("x")
        try:
            n, c = int(length), int(count or 1)
        except ValueError:
            raise ValueError(f"windows: expected LENGTHxCOUNT[,...], got {spec!r}") from None
        if n < 2 or c < 1:
            raise ValueError(f"windows: expected length >= 2 and count >= 1, got {part!r}")
        out += [n] * c
    if not out:
        raise ValueError(f"windows: expected at least one window, got {spec!r}")
    return out


def place_windows(n_tokens: int, train: list[int], heldout: list[int]) -> tuple[list, list]:
    """Training windows laid end to end from the start of the text, held-out windows from its
    end, so no token is shared. Returns ([(start, length)], [(start, length)])."""
    need = sum(train) + sum(heldout)
    if need > n_tokens:
        raise ValueError(f"windows: {need} tokens asked for, the text has {n_tokens}")
    tr, pos = [], 0
    for n in train:
        tr.append((pos, n))
        pos += n
    ho, pos = [], n_tokens
    for n in heldout:
        pos -= n
        ho.append((pos, n))
    return tr, ho


def distill(model: torch.nn.Module, text_ids: torch.Tensor, *, layers, windows: list[int],
            heldout: list[int], config: DistillConfig = DistillConfig(), model_name: str = "",
            text_name: str = "text", cache_dir: str | Path | None = None, chunk: int = 2048,
            out: str | Path | None = None, card_extra: dict | None = None, log=print
            ) -> tuple[IndexerSet, dict]:
    """Train lightning indexers for ``layers`` of a frozen ``model`` on ``text_ids``.

    Args:
        model: a transformers causal LM loaded with ``attn_implementation="hisa_eval"``.
        text_ids: int [N] token ids of the training text.
        layers: layer indices that get an indexer (for DSA: the global-attention layers).
        windows / heldout: window lengths (see :func:`place_windows`).
        config: shapes, steps and optimiser (:class:`DistillConfig`).
        cache_dir: where captures are stored (None: recomputed, never stored).
        chunk: prefill chunk of the capture pass.
        out: when given, ``<out>.safetensors`` and ``<out>.json`` are written.

    Returns:
        (indexers in eval mode, the card dict).

    Example:
        >>> ix, card = distill(lm.model, ids, layers=[5, 11, 17], windows=[4096] * 4,
        ...                    heldout=[4096], config=DistillConfig(steps=200))
    """
    layers = sorted(int(i) for i in layers)
    if not layers:
        raise ValueError("layers: expected at least one layer index, got none")
    device = next(model.parameters()).device
    tr, ho = place_windows(int(text_ids.numel()), windows, heldout)
    t0 = time.time()

    def grab(span, what):
        start, n = span
        ids = text_ids[start:start + n]
        key = capture_key(model_name or "model", text_name, start, ids, layers)
        t = time.time()
        cap = cached_capture(model, ids, layers, key=key, cache_dir=cache_dir, chunk=chunk)
        log(f"captured {what} window [{start}, {start + n}) in {time.time() - t:.0f} s")
        return cap

    train_caps = [grab(s, "training") for s in tr]
    held_caps = [grab(s, "held-out") for s in ho]
    capture_s = time.time() - t0
    cfgs = indexer_configs(model.config, layers, config)
    t1 = time.time()
    indexers, curve = train_indexers(train_caps, held_caps, cfgs, config, model_name=model_name,
                                     device=str(device), log=log)
    train_s = time.time() - t1
    first, last = curve[0], curve[-1]
    card = {
        "model": model_name, "layers": layers, "text": text_name,
        "windows": [{"start": s, "length": n} for s, n in tr],
        "heldout_windows": [{"start": s, "length": n} for s, n in ho],
        "tokens_captured": sum(n for _, n in tr) + sum(n for _, n in ho),
        "steps": config.steps, "seed": config.seed, "config": _config_json(config),
        "row_key_pairs_seen_per_layer": config.steps * config.pairs_per_step,
        "heldout_kl_initial": first.heldout_kl, "heldout_kl": last.heldout_kl,
        "heldout_topk_mass": last.heldout_mass, "train_kl_final": last.train_kl,
        "loss_curve": curve_json(curve),
        "wall_seconds": {"capture": round(capture_s), "train": round(train_s),
                         "capture_passes": [c.seconds for c in train_caps + held_caps]},
        "machine": machine(),
        "command": " ".join(["hisa"] + sys.argv[1:]) if sys.argv else None,
    }
    card.update(card_extra or {})
    if out is not None:
        save_indexers(indexers, out, card)
    return indexers, card


def _config_json(cfg: DistillConfig) -> dict:
    from dataclasses import asdict
    return asdict(cfg)
