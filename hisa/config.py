"""HISA parameters as one frozen, validated object (the paper's names: B, m, k; and the optional
super-block level above blocks: super_size, super_topk)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from .utils.validate import check_hisa_params, check_super_params


#: What the super-block level costs per query besides its scores, in scored-pair equivalents:
#: the super-block pooling, one more selection and two more launches. Calibrated on the H200
#: sweep (benchmarks/results/round3/long_*_h200.jsonl, three levels against two, FP8 keys,
#: B = 128, m = 64): 2 x 128 paid at 1M keys (1.03-1.14x decode, 1.10-1.13x chunks) and not
#: at 512K (0.82-0.99x), so 1,792 <= X < 3,840; 16 x 64 paid for decode at 512K (1.06-1.13x)
#: and not at 256K (0.84-0.96x), so 896 <= X < 2,816. 2,048 puts the crossovers at 576K keys
#: (2 x 128) and 410K (16 x 64). One measured point disagrees: 16 x 64 prefill chunks at 512K
#: (0.89x; decode pays there). The first-principles guess this replaces (256) sent every
#: 256K-512K call to a third level that was 5-18 % slower.
SUPER_LEVEL_OVERHEAD_PAIRS = 2048


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
        >>> long = HisaConfig(super_size=2, super_topk=128)      # 1M-token contexts
    """

    block_size: int = 128
    block_topk: int = 64
    topk: int = 2048
    super_size: int | None = None
    super_topk: int | None = None

    def __post_init__(self) -> None:
        topk, block_size, block_topk = check_hisa_params(
            topk=self.topk, block_size=self.block_size, block_topk=self.block_topk)
        # Integral numpy scalars are accepted and stored as ints (the dataclass is frozen).
        object.__setattr__(self, "topk", topk)
        object.__setattr__(self, "block_size", block_size)
        object.__setattr__(self, "block_topk", block_topk)
        sup = check_super_params(block_topk=self.block_topk, super_size=self.super_size,
                                 super_topk=self.super_topk)
        for name, value in sup.items():
            object.__setattr__(self, name, value)

    @property
    def candidates(self) -> int:
        """Tokens scored exactly per query in stage 2 (m * B)."""
        return self.block_size * self.block_topk

    @property
    def levels(self) -> int:
        """2 (blocks, tokens) or 3 (super-blocks, blocks, tokens)."""
        return 2 if self.super_size is None else 3

    def pairs_per_query(self, num_keys: int) -> int:
        """Scores per query that sees ``num_keys`` keys (README "Cost"): NB block scores (with
        the super-block level: NS super-block scores and at most ms * Bs block scores) plus at
        most m * B token scores."""
        nb = -(-num_keys // self.block_size)
        tokens = min(nb, self.block_topk) * self.block_size
        if self.super_size is None:
            return nb + tokens
        return -(-nb // self.super_size) + min(nb, self.super_topk * self.super_size) + tokens

    def super_level_pays(self, num_keys: int) -> bool:
        """Whether the super-block level scores fewer pairs than two levels at this context,
        overhead included. False for a two-level config, and always False while every
        super-block is kept (at most ms * Bs * B keys), where three levels equal two."""
        if self.super_size is None:
            return False
        two = replace(self, super_size=None, super_topk=None).pairs_per_query(num_keys)
        return self.pairs_per_query(num_keys) + SUPER_LEVEL_OVERHEAD_PAIRS < two

    def for_context(self, num_keys: int) -> "HisaConfig":
        """This config where its super-block level pays at ``num_keys`` keys, else the same
        config with two levels: the routing rule for a serving engine that knows its longest
        context (one config per model, or per length bucket)."""
        if self.super_level_pays(num_keys):
            return self
        return replace(self, super_size=None, super_topk=None)

    def kwargs(self) -> dict:
        """Keyword arguments of :func:`hisa.hisa_index` / :func:`hisa.hisa_index_paged` (the
        super-block ones only when the third level is on)."""
        kw = {"block_size": self.block_size, "block_topk": self.block_topk, "topk": self.topk}
        if self.super_size is not None:
            kw.update(super_size=self.super_size, super_topk=self.super_topk)
        return kw
