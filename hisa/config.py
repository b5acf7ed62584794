"""HISA parameters as one frozen, validated object (the paper's names: B, m, k)."""
from __future__ import annotations

from dataclasses import dataclass

from .utils.validate import check_hisa_params


@dataclass(frozen=True)
class HisaConfig:
    """Block size B, block budget m and token budget k of HISA.

    Defaults are the paper's and DeepSeek-V3.2's: B = 128, m = 64 (8,192 candidate tokens per
    query), k = 2048.

    Example:
        >>> cfg = HisaConfig(block_size=64, block_topk=128)
        >>> hisa.hisa_index(q, k, w, ks, ke, **cfg.kwargs())
    """

    block_size: int = 128
    block_topk: int = 64
    topk: int = 2048

    def __post_init__(self) -> None:
        topk, block_size, block_topk = check_hisa_params(
            topk=self.topk, block_size=self.block_size, block_topk=self.block_topk)
        # Integral numpy scalars are accepted and stored as ints (the dataclass is frozen).
        object.__setattr__(self, "topk", topk)
        object.__setattr__(self, "block_size", block_size)
        object.__setattr__(self, "block_topk", block_topk)

    @property
    def candidates(self) -> int:
        """Tokens scored exactly per query in stage 2 (m * B)."""
        return self.block_size * self.block_topk

    def kwargs(self) -> dict:
        return {"block_size": self.block_size, "block_topk": self.block_topk, "topk": self.topk}
