"""A DSA lightning indexer for one attention layer of a frozen model, and its weights file.

Shapes follow DeepSeek-V3.2's indexer, fed from the layer's own input: for the layer's
normalised input hidden state x [T, d_model] (what the attention module receives),

    q[t, h] = RoPE(Wq x[t])[h]                       # [T, H, D]
    k[s]    = RoPE(LayerNorm(Wk x[s]))               # [S, D]
    w[t, h] = (Ww x[t])[h] * H^-0.5 * D^-0.5         # [T, H], the softmax scale folded in
    I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s])

RoPE rotates the first ``rope_dim`` dimensions of q and k (rotate-half pairs (i, i + r/2)) with
the layer's absolute positions; the rest carry no position. I is exactly the contract's score
(``docs/contract.md``), so ``hisa.dsa_index`` / ``hisa.hisa_index`` run on (q, k, w) directly;
for the FP8 kernels, :meth:`LightningIndexer.fp8` quantizes q per (token, head) and k per token
and folds q's scale into w, as DSA does.

Weights files are safetensors (bf16 tensors, so three Gemma layers take about 8 MB) with the
configuration in the file's metadata, plus a JSON card beside it (``<name>.json``).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

FORMAT = "hisa-lightning-indexer/1"


@dataclass(frozen=True)
class IndexerConfig:
    """Shape of one lightning indexer.

    Attributes:
        hidden_size: d_model of the host layer's input.
        heads: index heads H (the Triton kernels take a power of two in [16, 128]).
        head_dim: D (the kernels take 64 or 128).
        rope_dim: leading dimensions of q and k that RoPE rotates (even, <= head_dim).
        rope_theta: RoPE base (the host layer's, so positions mean the same to both).
    """
    hidden_size: int
    heads: int = 16
    head_dim: int = 128
    rope_dim: int = 64
    rope_theta: float = 1_000_000.0

    def __post_init__(self):
        for name in ("hidden_size", "heads", "head_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if not (0 <= self.rope_dim <= self.head_dim and self.rope_dim % 2 == 0):
            raise ValueError(f"rope_dim: expected an even int in [0, head_dim={self.head_dim}], "
                             f"got {self.rope_dim!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta: expected > 0, got {self.rope_theta!r}")


def rope_rotate(x: torch.Tensor, positions: torch.Tensor, rope_dim: int,
                theta: float) -> torch.Tensor:
    """Rotate the first ``rope_dim`` dims of x [T, ..., D] by positions [T] (rotate-half)."""
    if rope_dim == 0:
        return x
    half = rope_dim // 2
    inv = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    ang = positions.to(device=x.device, dtype=torch.float32).unsqueeze(1) * inv   # [T, r/2]
    shape = (ang.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    cos, sin = ang.cos().view(shape), ang.sin().view(shape)
    x1, x2, rest = x[..., :half], x[..., half:rope_dim], x[..., rope_dim:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


class LightningIndexer(nn.Module):
    """One layer's indexer: q, k, w from that layer's input hidden state (see module doc).

    ``block_log_temp`` is used only by the optional block-level training term (the scale of
    the block scores inside that term's softmax); selection never reads it.
    """

    def __init__(self, config: IndexerConfig):
        super().__init__()
        self.config = config
        H, D, d = config.heads, config.head_dim, config.hidden_size
        self.wq = nn.Linear(d, H * D, bias=False)
        self.wk = nn.Linear(d, D, bias=False)
        self.k_norm = nn.LayerNorm(D)
        self.ww = nn.Linear(d, H, bias=False)
        self.block_log_temp = nn.Parameter(torch.zeros(()))
        self.weight_scale = H ** -0.5 * D ** -0.5

    def keys(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [S, d_model], positions [S] -> k fp32 [S, D]."""
        c = self.config
        k = self.k_norm(self.wk(x.to(self.wk.weight.dtype)))
        return rope_rotate(k, positions, c.rope_dim, c.rope_theta).float()

    def queries(self, x: torch.Tensor, positions: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, d_model], positions [T] -> (q fp32 [T, H, D], w fp32 [T, H])."""
        c = self.config
        x = x.to(self.wq.weight.dtype)
        q = self.wq(x).view(x.shape[0], c.heads, c.head_dim)
        q = rope_rotate(q, positions, c.rope_dim, c.rope_theta)
        w = self.ww(x) * self.weight_scale
        return q.float(), w.float()

    def scores(self, q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """I [T, S] = sum_h w[t, h] ReLU(q[t, h] . k[s]) (no causal mask)."""
        return torch.einsum("ths,th->ts", torch.relu(torch.einsum("thd,sd->ths", q, k)), w)

    @staticmethod
    def fp8(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor):
        """FP8 operands of the contract: (q_fp8 [T, H, D], k_fp8 [S, D], k_scale [S], w' [T, H])
        with q's per-(token, head) scale folded into w'."""
        from ..utils.quant import quantize_fp8
        D = q.shape[-1]
        q8, q_scale = quantize_fp8(q.contiguous(), group_size=D)        # scale [T, H]
        k8, k_scale = quantize_fp8(k.contiguous(), group_size=D)        # scale [S]
        return q8, k8, k_scale, (w * q_scale).contiguous()


class IndexerSet(nn.Module):
    """The indexers of a model's chosen layers, by layer index, plus what they were made for."""

    def __init__(self, configs: dict[int, IndexerConfig], *, model: str = ""):
        super().__init__()
        if not configs:
            raise ValueError("configs: expected at least one layer, got none")
        self.model = model
        self.by_layer = nn.ModuleDict({str(int(i)): LightningIndexer(c)
                                       for i, c in sorted(configs.items())})

    @property
    def layers(self) -> list[int]:
        return [int(i) for i in self.by_layer]

    def __getitem__(self, layer: int) -> LightningIndexer:
        return self.by_layer[str(int(layer))]

    def __contains__(self, layer) -> bool:
        return str(layer) in self.by_layer


def save_indexers(indexers: IndexerSet, path: str | Path, card: dict | None = None
                  ) -> tuple[Path, Path]:
    """Write ``<path>.safetensors`` (bf16 tensors, configs in the metadata) and ``<path>.json``.

    Returns the two paths. ``card`` is any JSON-serialisable description (training data,
    steps, losses, machine); the layer configs are added to it.
    """
    from safetensors.torch import save_file

    base = Path(path)
    if base.suffix == ".safetensors":
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"layers.{n}": t.detach().to(torch.bfloat16).contiguous().cpu()
               for n, t in indexers.by_layer.state_dict().items()}
    configs = {str(i): asdict(indexers[i].config) for i in indexers.layers}
    meta = {"format": FORMAT, "model": indexers.model, "configs": json.dumps(configs)}
    weights = base.with_suffix(".safetensors")
    save_file(tensors, str(weights), metadata=meta)
    card = dict(card or {}, format=FORMAT, model=indexers.model, layers=indexers.layers,
                configs=configs, weights_file=weights.name,
                weights_bytes=weights.stat().st_size)
    card_path = base.with_suffix(".json")
    card_path.write_text(json.dumps(card, indent=1) + "\n")
    return weights, card_path


def load_indexers(path: str | Path, *, device: str | torch.device = "cpu") -> IndexerSet:
    """Read a weights file written by :func:`save_indexers` (fp32 parameters, eval mode)."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    if not path.exists():
        raise FileNotFoundError(f"indexer weights {path} do not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: expected format {FORMAT!r}, got {meta.get('format')!r}")
        state = {name: f.get_tensor(name) for name in f.keys()}
    configs = {int(i): IndexerConfig(**c) for i, c in json.loads(meta["configs"]).items()}
    out = IndexerSet(configs, model=meta.get("model", ""))
    state = {n[len("layers."):]: t.float() for n, t in state.items()}
    out.by_layer.load_state_dict(state)
    return out.to(device).eval()


def count_parameters(indexers: IndexerSet) -> int:
    return sum(p.numel() for p in indexers.parameters())


def default_config(hidden_size: int, rope_theta: float, *, heads: int = 16, head_dim: int = 128,
                   rope_dim: int = 64) -> IndexerConfig:
    return IndexerConfig(hidden_size=hidden_size, heads=heads, head_dim=head_dim,
                         rope_dim=rope_dim, rope_theta=float(rope_theta))
