"""HISA parameters as one frozen, validated object (the paper's names: B, m, k; and the optional
super-block level above blocks: super_size, super_topk)."""
from __future__ import annotations

from dataclasses import dataclass

from .utils.validate import check_hisa_params, check_super_params


@dataclass(frozen=True)
class HisaConfig:
    """Block size B, block budget m and token budget k of HISA, and the optional third level.

    Defaults are the paper's and DeepSeek-V3.2's: B = 128, m = 64 (8,192 candidate tokens per
    query), k = 2048, two levels. ``super_size`` / ``super_topk`` (both or neither) add
    super-blocks of ``super_size`` blocks above the block stage, for 256K-1M-token contexts
    (see ``hisa/ops/indexer/README.md``, "Three levels").

    Example:
        >>> cfg = HisaConfig(block_size=64, block_topk=128)
        >>> hisa.hisa_index(q, k, w, ks, ke, **cfg.kwargs())
        >>> long = HisaConfig(super_size=16, super_topk=64)      # 1M-token contexts
    """

    block_size: int = 128
    block_topk: int = 64
    topk: int = 2048
    super_size: int | None = None
    super_topk: int | None = None

    def __post_init__(self) -> None:
        check_hisa_params(topk=self.topk, block_size=self.block_size, block_topk=self.block_topk)
        check_super_params(block_topk=self.block_topk, super_size=self.super_size,
                           super_topk=self.super_topk)

    @property
    def candidates(self) -> int:
        """Tokens scored exactly per query in stage 2 (m * B)."""
        return self.block_size * self.block_topk

    @property
    def levels(self) -> int:
        """2 (blocks, tokens) or 3 (super-blocks, blocks, tokens)."""
        return 2 if self.super_size is None else 3

    def kwargs(self) -> dict:
        """Keyword arguments of :func:`hisa.hisa_index` / :func:`hisa.hisa_index_paged` (the
        super-block ones only when the third level is on)."""
        kw = {"block_size": self.block_size, "block_topk": self.block_topk, "topk": self.topk}
        if self.super_size is not None:
            kw.update(super_size=self.super_size, super_topk=self.super_topk)
        return kw
