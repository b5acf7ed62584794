"""Input factories shared by the tests and the benchmarks.

Inputs follow the DeepSeek-V3.2 indexer: q and k quantized to FP8 e4m3 with DeepSeek's group
quantization (q's per-head scale folded into the weights), per-token k scales, fp32 weights.
Random values are drawn fresh from a seeded generator so a failure is reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..utils.quant import quantize_fp8
from ..utils.seqlens import windows_from_cu_seqlens


@dataclass
class IndexerInputs:
    """One packed indexer call: q [T, H, D], k [S, D], weights [T, H], windows, k_scale [S]."""

    q: torch.Tensor
    k: torch.Tensor
    weights: torch.Tensor
    ks: torch.Tensor
    ke: torch.Tensor
    k_scale: torch.Tensor | None

    def args(self) -> tuple:
        return self.q, self.k, self.weights, self.ks, self.ke

    @property
    def num_queries(self) -> int:
        return self.q.shape[0]

    def visible_pairs(self) -> int:
        """(query, key) pairs the flat indexer scores: sum of window lengths."""
        return int((self.ke.long() - self.ks.long()).sum())


def make_indexer_inputs(seq_lens: list[int], *, heads: int = 64, head_dim: int = 128,
                        dtype: torch.dtype = torch.float8_e4m3fn, query_lens: list[int] | None
                        = None, device: str | torch.device = "cpu", seed: int = 0,
                        clustered: bool = False) -> IndexerInputs:
    """Random packed-prefill inputs.

    Args:
        seq_lens: key count of each packed sequence.
        query_lens: queries per sequence (the last ``query_lens[b]`` tokens of it, a prefill
            chunk); defaults to every token (full causal prefill).
        dtype: float8_e4m3fn (with k scales, DeepSeek quantization), bfloat16 or float32.
        clustered: give keys a slowly drifting component, so blocks differ in mean and block
            scores carry signal (i.i.d. keys make every block mean nearly the same).
    """
    dev = torch.device(device)
    # Drawn on the target device: a 128K-token prefill has 1G query values.
    g = torch.Generator(device=dev).manual_seed(seed)
    query_lens = list(seq_lens) if query_lens is None else list(query_lens)
    S, T = sum(seq_lens), sum(query_lens)
    kf = torch.randn(S, head_dim, generator=g, device=dev)
    if clustered and S:
        drift = torch.randn(S // 256 + 1, head_dim, generator=g, device=dev) * 2.0
        kf += drift.repeat_interleave(256, dim=0)[:S]
    qf = torch.randn(T, heads, head_dim, generator=g, device=dev)
    w = torch.randn(T, heads, generator=g, device=dev) * heads ** -0.5
    k_scale = None
    if dtype == torch.float8_e4m3fn:
        k, k_scale = quantize_fp8(kf, group_size=head_dim)
        q, q_scale = quantize_fp8(qf, group_size=head_dim)          # q_scale [T, H]
        w = w * q_scale                                              # folded, as DeepSeek does
    else:
        k, q = kf.to(dtype), qf.to(dtype)
    ks, ke = _packed_windows(seq_lens, query_lens, dev)
    return IndexerInputs(q, k, w.float(), ks, ke, k_scale)


def _packed_windows(seq_lens, query_lens, dev):
    cu_q = torch.tensor([0] + list(query_lens), dtype=torch.int64).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + list(seq_lens), dtype=torch.int64).cumsum(0).to(torch.int32)
    return windows_from_cu_seqlens(cu_q.to(dev), cu_k.to(dev))


#: Largest |value| of the integer-valued operands of :func:`make_exact_indexer_inputs`.
EXACT_MAX = 4


def exact_weights(rows: int, heads: int, *, generator: torch.Generator, device) -> torch.Tensor:
    """fp32 [rows, heads] signed powers of two, 1/2 or 1: with integer operands the head sums
    stay within fp32's 24-bit significand (exact) up to H = 64, D = 128, B = 128 means."""
    e = torch.randint(-1, 1, (rows, heads), generator=generator, device=device).float()
    sign = torch.randint(0, 2, (rows, heads), generator=generator, device=device) * 2 - 1
    return sign * torch.exp2(e)


def make_exact_indexer_inputs(seq_lens: list[int], *, heads: int = 16, head_dim: int = 64,
                              dtype: torch.dtype = torch.float32,
                              query_lens: list[int] | None = None,
                              device: str | torch.device = "cpu", seed: int = 0
                              ) -> IndexerInputs:
    """Packed inputs whose every score is exact in fp32 under any summation order.

    q and k hold integers in [-EXACT_MAX, EXACT_MAX] (exact in e4m3), weights are signed powers
    of two, FP8 keys get power-of-two scales: dot products, head sums and scaling never round,
    so a kernel and the reference compute bit-identical scores, ties included (they are many),
    and their selections must be identical, not merely equal up to ties.
    """
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    query_lens = list(seq_lens) if query_lens is None else list(query_lens)
    S, T = sum(seq_lens), sum(query_lens)
    k = torch.randint(-EXACT_MAX, EXACT_MAX + 1, (S, head_dim), generator=g, device=dev,
                      dtype=torch.int8).float()          # int8 draws: 1 byte a value
    q = torch.randint(-EXACT_MAX, EXACT_MAX + 1, (T, heads, head_dim), generator=g,
                      device=dev).float()
    w = exact_weights(T, heads, generator=g, device=dev)
    k_scale = None
    if dtype == torch.float8_e4m3fn:
        k_scale = torch.exp2(torch.randint(-2, 3, (S,), generator=g, device=dev).float())
    q, k = q.to(dtype), k.to(dtype)
    ks, ke = _packed_windows(seq_lens, query_lens, dev)
    return IndexerInputs(q, k, w, ks, ke, k_scale)
