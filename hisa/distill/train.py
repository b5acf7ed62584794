"""Training loop of the dense warm-up stage: the model frozen, only the indexers learn.

Each window is captured once (:mod:`hisa.distill.capture`); a step draws one window and a set
of query rows from it, and for every chosen layer computes the indexer's keys for the whole
window, its queries and weights for those rows, the target from the real attention of those
rows only, and the KL (:mod:`hisa.distill.objective`). The rows per step scale inversely with
the window length (``pairs_per_step`` row x key pairs), so a 16K window and a 4K window cost
the same. Held-out windows (never trained on) give the held-out KL and top-k mass.
"""
from __future__ import annotations

import math
import platform
import time
from dataclasses import asdict, dataclass, field

import torch

from .capture import WindowCapture
from .indexer import IndexerConfig, IndexerSet
from .objective import attention_targets, block_kl, token_kl, topk_mass_ratio


@dataclass(frozen=True)
class DistillConfig:
    """What to train and how.

    Attributes:
        heads, head_dim, rope_dim: indexer shape (H, D and the RoPE'd part of D).
        steps: optimizer steps.
        pairs_per_step: query rows x keys per layer per step (rows = this // window length).
        min_row: rows are drawn uniformly from [min_row, L) of each window.
        lr, warmup, final_lr_frac: AdamW peak learning rate (DeepSeek's 1e-3), linear warm-up
            steps, then cosine decay to ``final_lr_frac * lr``.
        block_weight, block_size: weight and B of the block-level term (0 = plain recipe).
        heldout_rows: query rows per held-out window (fixed, evenly spaced).
        eval_every: steps between held-out evaluations (also the loss-curve resolution).
        mass_topk: k of the held-out top-k mass ratio (256 = L/16 of a 4K held-out window,
            the scaled budget of the evaluation).
        seed: initialisation and row sampling.
    """
    heads: int = 16
    head_dim: int = 128
    rope_dim: int = 64
    steps: int = 600
    pairs_per_step: int = 1 << 19
    min_row: int = 64
    lr: float = 1e-3
    warmup: int = 20
    final_lr_frac: float = 0.1
    block_weight: float = 0.0
    block_size: int = 64
    heldout_rows: int = 128
    eval_every: int = 50
    mass_topk: int = 256
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.pairs_per_step < 1 or self.heldout_rows < 1:
            raise ValueError("steps, pairs_per_step and heldout_rows: expected >= 1, got "
                             f"{self.steps}, {self.pairs_per_step}, {self.heldout_rows}")
        if self.block_weight < 0:
            raise ValueError(f"block_weight: expected >= 0, got {self.block_weight}")


@dataclass
class StepLog:
    step: int
    train_kl: dict = field(default_factory=dict)      # layer -> mean KL since the last log
    train_block_kl: dict = field(default_factory=dict)
    heldout_kl: dict = field(default_factory=dict)
    heldout_mass: dict = field(default_factory=dict)
    seconds: float = 0.0


def _layer_loss(ix, cap: WindowCapture, layer: int, rows: torch.Tensor, cfg: DistillConfig,
                device):
    x = cap.hidden[layer].to(device).float()                                  # [L, d_model]
    L = x.shape[0]
    k = ix.keys(x, torch.arange(L, device=device))                            # [L, D]
    q, w = ix.queries(x[rows], rows)                                          # [R, H, D], [R, H]
    with torch.no_grad():
        p = attention_targets(cap.q[layer][:, rows.cpu()].to(device), cap.k[layer].to(device),
                              rows, cap.scale[layer])                         # [R, L]
    scores = ix.scores(q, k, w)                                               # [R, L]
    kl = token_kl(scores, p, rows)
    bkl, has = None, None
    if cfg.block_weight > 0:
        bkl, has = block_kl(q, k, w, p, rows, block_size=cfg.block_size,
                            log_temp=ix.block_log_temp)
    return kl, bkl, has, scores, p


def heldout_metrics(indexers: IndexerSet, caps: list[WindowCapture], cfg: DistillConfig,
                    device) -> tuple[dict, dict]:
    """({layer: KL}, {layer: top-k mass ratio}) over fixed rows of the held-out windows."""
    kls, masses = {}, {}
    with torch.no_grad():
        for layer in indexers.layers:
            kl_all, mass_all = [], []
            for cap in caps:
                L = cap.length
                lo = min(cfg.min_row, L - 1)
                rows = torch.linspace(lo, L - 1, cfg.heldout_rows).round().long().unique()
                rows = rows.to(device)
                kl, _, _, scores, p = _layer_loss(indexers[layer], cap, layer, rows, cfg, device)
                kl_all.append(kl)
                mass_all.append(topk_mass_ratio(scores, p, rows, cfg.mass_topk))
            kls[layer] = float(torch.cat(kl_all).mean())
            masses[layer] = float(torch.cat(mass_all).mean())
    return kls, masses


def _lr_at(step: int, cfg: DistillConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    lo = cfg.final_lr_frac
    return cfg.lr * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def train_indexers(windows: list[WindowCapture], heldout: list[WindowCapture],
                   indexer_configs: dict[int, IndexerConfig], cfg: DistillConfig, *,
                   model_name: str = "", device: str = "cpu", log=print
                   ) -> tuple[IndexerSet, list[StepLog]]:
    """Train one indexer per layer on captured windows. Returns (indexers, loss curve)."""
    if not windows:
        raise ValueError("windows: expected at least one captured window, got none")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    indexers = IndexerSet(indexer_configs, model=model_name).to(device).train()
    opt = torch.optim.AdamW(indexers.parameters(), lr=cfg.lr, weight_decay=0.0)
    curve: list[StepLog] = []
    acc = {ly: [] for ly in indexers.layers}
    bacc = {ly: [] for ly in indexers.layers}
    t0 = time.time()
    order = torch.randperm(len(windows), generator=gen).tolist()

    def record(step):
        entry = StepLog(step=step, seconds=round(time.time() - t0, 1))
        entry.train_kl = {ly: sum(v) / len(v) for ly, v in acc.items() if v}
        entry.train_block_kl = {ly: sum(v) / len(v) for ly, v in bacc.items() if v}
        if heldout:
            indexers.eval()
            entry.heldout_kl, entry.heldout_mass = heldout_metrics(indexers, heldout, cfg,
                                                                   device)
            indexers.train()
        for v in list(acc.values()) + list(bacc.values()):
            v.clear()
        curve.append(entry)
        log(f"step {step:5d}  {entry.seconds:7.1f} s  train KL "
            + " ".join(f"L{ly}={v:.3f}" for ly, v in entry.train_kl.items())
            + ("  held-out KL " + " ".join(f"L{ly}={v:.3f}" for ly, v in
                                           entry.heldout_kl.items()) if entry.heldout_kl else "")
            + ("  top-k mass " + " ".join(f"{v:.3f}" for v in entry.heldout_mass.values())
               if entry.heldout_mass else ""))

    record(0)
    for step in range(cfg.steps):
        if not order:
            order = torch.randperm(len(windows), generator=gen).tolist()
        cap = windows[order.pop()]
        L = cap.length
        lo = min(cfg.min_row, L - 1)
        n_rows = max(1, min(L - lo, cfg.pairs_per_step // L))
        rows = (lo + torch.randperm(L - lo, generator=gen)[:n_rows]).sort().values.to(device)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        for layer in indexers.layers:
            kl, bkl, has, _, _ = _layer_loss(indexers[layer], cap, layer, rows, cfg, device)
            loss = kl.mean()
            acc[layer].append(float(loss.detach()))
            if bkl is not None and bool(has.any()):
                bl = bkl[has].mean()
                bacc[layer].append(float(bl))
                loss = loss + cfg.block_weight * bl
            loss.backward()
        opt.step()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            record(step + 1)
    return indexers.eval(), curve


def machine() -> dict:
    import os
    return {"platform": platform.platform(), "processor": platform.processor() or None,
            "cpus": os.cpu_count(), "load_average_1_5_15": [round(x, 1) for x in
                                                            os.getloadavg()],
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def curve_json(curve: list[StepLog]) -> list[dict]:
    return [{k: ({str(a): round(b, 4) for a, b in v.items()} if isinstance(v, dict) else v)
             for k, v in asdict(c).items()} for c in curve]
