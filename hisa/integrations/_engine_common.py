"""The engine-independent half of the vLLM and SGLang plugins.

Everything here takes plain tensors the way a serving engine holds them and calls the public
ops (:func:`hisa.hisa_index`, :func:`hisa.hisa_index_paged`, :func:`hisa.dsa_index`,
:func:`hisa.dsa_index_paged`, :func:`hisa.paged_cache_append`); nothing imports vLLM or SGLang,
so the GPU tier and the contract tests run it without the engines installed. The engine glue
(:mod:`hisa.integrations.vllm`, :mod:`hisa.integrations.sglang`) only maps the engine's metadata
onto these functions. The design (where pooled rows live, who writes them, why they stay right)
is written down in ``docs/engines.md``.

Shapes: T query tokens, S key tokens, H index heads, D head dim (128), P pages of 64 tokens,
R requests, W block-table columns, K top-k.
"""
from __future__ import annotations

import importlib.abc
import logging
import sys
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from ..cache.layout import (PAGE_SIZE, SCALE_BYTES, as_pages, page_views,
                            pooled_row_bytes)
from ..cache.paged import paged_cache_append
from ..ops.dsa.index import dsa_index
from ..ops.dsa.paged import NEXT_N_SUPPORTED, dsa_index_paged
from ..ops.indexer.decode import hisa_index_paged
from ..ops.indexer.prefill import WindowPlan, hisa_index, plan_windows
from ..utils.backend import resolve_backend, runs_on_device_of
from ..utils.validate import BACKENDS, FP8_DTYPE

logger = logging.getLogger("hisa.integrations")

_TRUE, _FALSE = ("1", "on", "true", "yes"), ("0", "off", "false", "no")
INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class PluginOptions:
    """What one engine's environment variable turns on (see :func:`parse_options`).

    ``mode`` "hisa" runs HISA; "flat" runs this library's flat DSA ops through the same
    adaptation (for A/B checks against the engine's own kernels).
    """

    block_size: int = 128
    block_topk: int = 64
    prefill: bool = True
    decode: bool = True
    mode: str = "hisa"
    backend: str = "auto"


def _parse_bool(env: str, key: str, text: str) -> bool:
    low = text.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"{env}: expected {key}= one of {_TRUE + _FALSE}, got {text!r}")


def parse_options(env: str, value: str | None) -> PluginOptions | None:
    """Options from an environment variable's value; None when the plugin is off.

    Unset, empty, "0" or "off" leave the engine untouched. "1" or "on" enable the defaults;
    otherwise a comma-separated list of ``key=value`` with keys ``block_size`` (a multiple of
    64), ``block_topk`` (>= 2), ``prefill`` / ``decode`` (on/off per path), ``mode``
    (hisa/flat), ``backend`` (auto/triton/torch).

    Example:
        >>> parse_options("HISA_VLLM", "block_size=128,block_topk=64,decode=off")
    """
    if value is None or value.strip().lower() in ("",) + _FALSE:
        return None
    text = value.strip()
    if text.lower() in _TRUE:
        return PluginOptions()
    fields: dict = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep:
            raise ValueError(f"{env}: expected key=value items, got {item!r}")
        if key in ("block_size", "block_topk"):
            try:
                fields[key] = int(raw)
            except ValueError:
                raise ValueError(f"{env}: expected an int for {key}, got {raw!r}") from None
        elif key in ("prefill", "decode"):
            fields[key] = _parse_bool(env, key, raw)
        elif key == "mode":
            if raw not in ("hisa", "flat"):
                raise ValueError(f"{env}: expected mode= hisa or flat, got {raw!r}")
            fields[key] = raw
        elif key == "backend":
            if raw not in BACKENDS:
                raise ValueError(f"{env}: expected backend= one of {BACKENDS}, got {raw!r}")
            fields[key] = raw
        else:
            raise ValueError(f"{env}: unknown key {key!r} (expected block_size, block_topk, "
                             f"prefill, decode, mode, backend)")
    options = PluginOptions(**fields)
    if options.block_size <= 0 or options.block_size % PAGE_SIZE:
        raise ValueError(f"{env}: expected block_size a positive multiple of {PAGE_SIZE} (a "
                         f"block must end on a page boundary), got {options.block_size}")
    if options.block_topk < 2:
        raise ValueError(f"{env}: expected block_topk >= 2 (two slots hold the forced first and "
                         f"last block), got {options.block_topk}")
    return options


_LOGGED: set = set()


def log_fallback(engine: str, path: str, reason: str) -> None:
    """Say once per (engine, path, reason) that the engine's own kernels run instead."""
    key = (engine, path, reason)
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.warning("hisa: %s %s runs the engine's own indexer: %s", engine, path, reason)


def options_reason(options: PluginOptions, topk: int, path: str) -> str | None:
    """Why HISA cannot serve ``path`` with these options and this call's ``topk``, or None."""
    if not getattr(options, path):
        return f"{path} turned off in the plugin options"
    if options.mode == "hisa" and options.block_size * options.block_topk < topk:
        return (f"block_topk * block_size = {options.block_topk * options.block_size} < the "
                f"model's topk = {topk}")
    return None


def as_engine_pages(kv_cache: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The engine's indexer cache as ``uint8 [P, 64 * (D + 4)]`` (a view, no copy).

    Accepts ``[P, 64 * (D + 4)]`` (SGLang), ``[P, 64, D + 4]`` (vLLM) and ``[P, 64, 1, D + 4]``
    (DeepGEMM's view). Raises ValueError for another shape or a strided page layout (an engine
    that pads its pages; the plugin then falls back to the engine's kernels).
    """
    if kv_cache.dtype != torch.uint8:   # ValueError, not as_pages' TypeError: the plugin falls back
        raise ValueError(f"kv_cache: expected uint8, got {kv_cache.dtype}")
    row = head_dim + SCALE_BYTES
    if kv_cache.dim() == 3 and tuple(kv_cache.shape[1:]) == (PAGE_SIZE, row):
        # vLLM's form; the cache's own check (as_pages) takes the other two.
        if not kv_cache.is_contiguous():
            raise ValueError(f"kv_cache: expected densely packed pages, got strides "
                             f"{tuple(kv_cache.stride())}")
        kv_cache = kv_cache.view(kv_cache.shape[0], PAGE_SIZE * row)
    return as_pages(kv_cache, head_dim)


class PooledCacheRegistry:
    """The pooled-block companion of each layer's indexer cache, found by the cache's storage.

    One ``uint8 [P, D + 4]`` tensor per engine cache tensor (row ``p`` belongs to page ``p``;
    see :mod:`hisa.cache.layout`), created zeroed the first time a layer is seen outside CUDA
    graph capture (engines run eager warm-up steps before they capture). A layer first seen
    inside a capture, or whose pages the engine moved where the rows could not follow, is
    marked stale: from then on it has no companion and decode runs the engine's own kernels,
    because some completed block of it may never have been pooled.
    """

    def __init__(self) -> None:
        self._rows: dict = {}
        self._stale: dict = {}

    @staticmethod
    def _key(pages: torch.Tensor) -> tuple:
        return (str(pages.device), pages.data_ptr(), pages.shape[0])

    def lookup(self, pages: torch.Tensor) -> torch.Tensor | None:
        return self._rows.get(self._key(pages))

    def get_or_create(self, pages: torch.Tensor, head_dim: int, *, capturing: bool
                      ) -> torch.Tensor | None:
        """The companion of ``pages``, or None when the layer is stale (see the class)."""
        key = self._key(pages)
        if key in self._stale:
            return None
        rows = self._rows.get(key)
        if rows is None:
            if capturing:
                self.mark_stale(pages, "layer first seen inside CUDA graph capture")
                return None
            rows = torch.zeros(pages.shape[0], pooled_row_bytes(head_dim), dtype=torch.uint8,
                               device=pages.device)
            self._rows[key] = rows
        return rows

    def mark_stale(self, pages: torch.Tensor, reason: str) -> None:
        key = self._key(pages)
        self._rows.pop(key, None)
        self._stale[key] = reason

    def stale_reason(self, pages: torch.Tensor) -> str | None:
        return self._stale.get(self._key(pages))

    def mark_all_stale(self, reason: str) -> None:
        for key in list(self._rows):
            self._stale[key] = reason
        self._rows.clear()

    def items(self):
        return list(self._rows.items())

    def clear(self) -> None:
        self._rows.clear()
        self._stale.clear()


@dataclass
class StepTokens:
    """One step's tokens to pool, in the form every indexer layer of the step can share.

    ``page`` / ``off`` int64 [T]: where each token's key sits (0 for a slot outside the cache);
    ``slots`` int64 [T]: its slot, -1 outside the cache (skipped); ``positions`` int64 [T];
    ``block_table`` int32 [R, W] and ``req`` int64 [T]: each token's block-table row. The
    layers of a step share slots and positions (one KV-cache group), so an engine glue builds
    this once per step and pools each layer with :func:`pool_step`.
    """

    page: torch.Tensor
    off: torch.Tensor
    slots: torch.Tensor
    positions: torch.Tensor
    block_table: torch.Tensor
    req: torch.Tensor


def step_tokens(slot_mapping: torch.Tensor, positions: torch.Tensor, block_table: torch.Tensor,
                req: torch.Tensor, num_pages: int) -> StepTokens:
    """:class:`StepTokens` of a step; device ops only (no host sync)."""
    slot = slot_mapping.long()
    valid = (slot >= 0) & (slot < num_pages * PAGE_SIZE)
    safe = torch.where(valid, slot, torch.zeros_like(slot))
    return StepTokens(safe // PAGE_SIZE, safe % PAGE_SIZE,
                      torch.where(valid, slot, torch.full_like(slot, -1)), positions.long(),
                      block_table, req.long())


def read_back_keys(pages: torch.Tensor, tokens: StepTokens, head_dim: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys the engine wrote for the step's tokens, read back from its cache:
    (fp8 [T, D], fp32 scales [T]); tokens outside the cache read page 0 (and are skipped)."""
    values, scales = page_views(pages, head_dim)                      # [P, 64, D], [P, 64]
    return values[tokens.page, tokens.off].view(FP8_DTYPE), scales[tokens.page, tokens.off]


def pool_step(pages: torch.Tensor, pooled: torch.Tensor, tokens: StepTokens, *, head_dim: int,
              block_size: int, backend: str = "auto") -> None:
    """Pool every block that a token of this step completed, from the keys the engine wrote.

    A token at position ``p`` completes block ``p // B`` when ``(p + 1) % B == 0``; its block's
    pooled row is written to the row of the token's own page (the block's last page). Keys are
    read back from the engine's cache and handed to :func:`hisa.paged_cache_append` unchanged
    (it rewrites the same bytes), so the pooled rows are computed from exactly what the
    engine's quantize-and-cache step stored. Tokens with a negative position or slot (padding)
    are skipped. No host sync on the Triton backend.

    Args:
        pages: uint8 [P, 64 * (D + 4)]; pooled: uint8 [P, D + 4]; tokens: see
            :class:`StepTokens` (built with the same P).
    """
    if tokens.slots.shape[0] == 0:
        return
    k, k_scale = read_back_keys(pages, tokens, head_dim)
    paged_cache_append(pages, pooled, k, tokens.slots, tokens.positions, k_scale=k_scale,
                       block_table=tokens.block_table, req_indices=tokens.req,
                       block_size=block_size, backend=backend)


@dataclass
class RequestKeys:
    """Keys of R requests gathered from the pages, each request starting at a multiple of B.

    ``k`` fp8 [S_al, D] and ``k_scale`` fp32 [S_al] hold request ``r`` at rows
    ``[starts[r], starts[r] + lengths[r])``; rows between requests are zero keys (scale 1) that
    no window covers. Aligning requests to B makes the prefill blocks the request-relative
    blocks the decode path pools, so a query sees the same blocks before and after its prompt
    ends, and no block straddles two requests.
    """

    k: torch.Tensor
    k_scale: torch.Tensor
    #: int32 [R]: each request's first row.
    starts: torch.Tensor
    #: 0-d bool on the device: a page some request uses lies outside the cache (its keys were
    #: gathered from a clamped page). Read by :meth:`raise_if_bad_pages`, not at the gather.
    bad_pages: torch.Tensor | None = None
    #: (block_table, seq_lens, number of pages) the keys came from, to name a bad page.
    _source: tuple | None = None

    def raise_if_bad_pages(self) -> None:
        """ValueError naming the first out-of-cache page, if any (one host sync)."""
        if self.bad_pages is not None and bool(self.bad_pages):
            raise ValueError(_first_bad_page(*self._source)) from None


def _request_pages(block_table: torch.Tensor, lens: torch.Tensor, total: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(request, position in the request, page) of each of the ``total`` keys, in order; a key
    past its block-table row's W columns gets page -1 (flagged as outside the cache)."""
    R, W = block_table.shape
    req = torch.repeat_interleave(torch.arange(R, device=lens.device), lens, output_size=total)
    pos = torch.arange(total, device=lens.device) - (torch.cumsum(lens, 0) - lens)[req]
    col = pos // PAGE_SIZE
    page = block_table.long()[req, col.clamp_max(W - 1)]
    return req, pos, torch.where(col < W, page, -1)


def _first_bad_page(block_table: torch.Tensor, seq_lens: torch.Tensor, num_pages: int) -> str:
    """The error message for the first key whose page lies outside the cache (host reads)."""
    lens = seq_lens.long()
    req, pos, page = _request_pages(block_table, lens, int(lens.sum()))
    s = int(((page < 0) | (page >= num_pages)).nonzero()[0, 0])
    r, p, W = int(req[s]), int(pos[s]), block_table.shape[1]
    if p // PAGE_SIZE >= W:
        return (f"block_table: request {r} position {p} lies past the table's {W} columns "
                f"({W * PAGE_SIZE} keys)")
    return (f"block_table: request {r} position {p} maps to page {int(page[s])}, outside "
            f"[0, {num_pages})")


@dataclass(frozen=True)
class RequestLayout:
    """Where each of R requests' keys go in a B-aligned gather buffer (:class:`RequestKeys`):
    request ``r`` at rows ``[starts[r], starts[r] + lens[r])`` of ``size`` rows.

    The same for every indexer layer of an engine step (it depends on the step's sequence
    lengths alone), so the plugins build it once per step (:func:`request_layout`) and pass it
    to each layer's :func:`gather_request_keys`: the few small device ops it takes would
    otherwise be host time of every layer, which the GPU waits for once the step's window read
    has drained it (the vLLM prefill plugin's host time per layer exceeded its kernels' time).
    """

    lens: torch.Tensor          # int32 [R], contiguous
    starts: torch.Tensor        # int32 [R]
    #: keys of all requests (the engines' host-side total), and rows of the buffer
    total: int
    size: int
    block_size: int
    #: uint8 0-d bad-page flag, zeroed, for the Triton gathers of this layout to raise (the
    #: layout launch zeroes it: one fill fewer per gather); None: each gather zeroes its own.
    bad: torch.Tensor | None = None


def _aligned_size(total: int, R: int, block_size: int) -> int:
    size = total + R * (block_size - 1)
    if size > INT32_MAX:
        raise ValueError(f"seq_lens: {total} keys over {R} requests need {size} B-aligned rows, "
                         f"more than the int32 windows of the indexer ops address")
    return size


def request_layout(seq_lens: torch.Tensor, *, total: int, block_size: int) -> RequestLayout:
    """The :class:`RequestLayout` of requests with ``seq_lens`` (int [R], device) keys,
    ``total`` = their sum (known on the host), each aligned to ``block_size``; a negative
    count is an empty request. No host sync."""
    size = _aligned_size(total, seq_lens.shape[0], block_size)
    # int32 like the windows the starts become (prefill_select: no casts per call)
    lens = seq_lens.to(torch.int32).clamp_min(0).contiguous()
    padded = (lens + block_size - 1) // block_size * block_size
    starts = torch.cumsum(padded, 0, dtype=torch.int32) - padded                # [R]
    return RequestLayout(lens, starts, total, size, block_size)


def packed_request_layout(cu_seq_lens: torch.Tensor, *, total: int, block_size: int,
                          backend: str = "auto") -> RequestLayout:
    """:func:`request_layout` of the requests packed end to end by ``cu_seq_lens`` (int
    [R + 1], device; vLLM's chunk metadata): one Triton launch on CUDA, which also zeroes the
    gathers' bad-page flag (:mod:`hisa.cache.chunk_windows`), the torch ops elsewhere."""
    R = cu_seq_lens.shape[0] - 1
    if resolve_backend(backend, cu_seq_lens.device) == "triton":
        from ..cache.chunk_windows import chunk_layout_triton
        size = _aligned_size(total, R, block_size)
        lens, starts, bad = chunk_layout_triton(cu_seq_lens, block_size)
        return RequestLayout(lens, starts, total, size, block_size, bad)
    return request_layout(cu_seq_lens[1:] - cu_seq_lens[:-1], total=total,
                          block_size=block_size)


@runs_on_device_of("pages")
def gather_request_keys(pages: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                        *, total: int, head_dim: int, block_size: int,
                        backend: str = "auto", layout: RequestLayout | None = None
                        ) -> RequestKeys:
    """Gather requests' keys from the paged cache into a B-aligned buffer (see RequestKeys).

    Args:
        pages: uint8 [P, 64 * (D + 4)].
        block_table: int32 [R, W], physical page of each 64-token page of a request.
        seq_lens: int [R] keys of each request (device).
        total: sum of ``seq_lens`` (known on the host: the engines keep it for their own
            gathers), so the buffer size needs no host sync.
        backend: "auto" (one Triton launch on CUDA, :mod:`hisa.cache.gather`; the torch ops
            elsewhere), "triton" or "torch".
        layout: this step's :func:`request_layout` of ``seq_lens`` from an earlier layer (built
            here when None); ValueError when it was built for another block size, request
            count or total.

    No host sync: a page outside the cache is clamped for the gather and flagged in
    ``bad_pages``; :func:`prefill_select` folds the flag into the one window read of the
    indexer op and raises the ValueError naming the page. (The indexer op's window read drains
    the GPU, so every launch made before it is host time the GPU waits for: the torch gather
    made 36 small kernels there, this one launch and 9. On an H200 the vLLM prefill chunk's
    overhead over the direct ops fell from 34.7 % to 15.8 % with it,
    ``tests/gpu/engines_overhead.py``.)
    """
    R = block_table.shape[0]
    dev = pages.device
    if layout is None:
        layout = request_layout(seq_lens, total=total, block_size=block_size)
    elif (layout.block_size, layout.lens.shape[0], layout.total) != (block_size, R, total):
        raise ValueError(f"layout: built for (block_size, requests, total) = "
                         f"{(layout.block_size, layout.lens.shape[0], layout.total)}, used with "
                         f"{(block_size, R, total)}")
    lens, starts, size = layout.lens, layout.starts, layout.size
    values, scales = page_views(pages, head_dim)
    num_pages = pages.shape[0]
    if total and num_pages == 0:
        raise ValueError("block_table: requests with keys over a cache of 0 pages")
    if total and block_table.shape[1] == 0:
        raise ValueError("block_table: requests with keys and a table of 0 columns")
    source = (block_table, seq_lens, num_pages)
    if total and resolve_backend(backend, dev, lambda: _check_gather_kernel(head_dim)) == "triton":
        from ..cache.gather import gather_request_keys_triton
        k, k_scale, bad = gather_request_keys_triton(values, scales, block_table, lens, starts,
                                                     size, bad=layout.bad)
        return RequestKeys(k.view(FP8_DTYPE), k_scale, starts, bad, source)
    k = torch.zeros(size, head_dim, dtype=torch.uint8, device=dev)
    k_scale = torch.ones(size, dtype=torch.float32, device=dev)
    if total:
        req, pos, page = _request_pages(block_table, lens, total)
        bad = ((page < 0) | (page >= num_pages)).any()
        safe = page.clamp(0, num_pages - 1)
        dest = starts[req] + pos
        k[dest] = values[safe, pos % PAGE_SIZE]
        k_scale[dest] = scales[safe, pos % PAGE_SIZE]
        return RequestKeys(k.view(FP8_DTYPE), k_scale, starts, bad, source)
    return RequestKeys(k.view(FP8_DTYPE), k_scale, starts)


def _check_gather_kernel(head_dim: int) -> None:
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim: the Triton gather needs a power of two, got {head_dim}")


@dataclass(frozen=True)
class PrefillWindows:
    """A prefill chunk's query windows in its gathered key buffer, and their plan.

    They depend on the step's metadata alone (request lengths, each query's request and
    causal length), not on the layer: the first indexer layer of a step builds them, with the
    call's one host read (:func:`hisa.plan_windows`, which validates them), and every later
    layer of the step passes them to :func:`prefill_select` and reads nothing. ``plan`` is
    None in flat mode (``dsa_index`` reads its windows itself).
    """

    ks: torch.Tensor            # int32 [T]
    ke: torch.Tensor            # int32 [T]
    plan: WindowPlan | None
    #: (rows of the key buffer, page count, top-k, options) the windows were planned for.
    key: tuple


def keep_on(obj, name: str, value) -> None:
    """Keep ``value`` on an engine's per-step object (metadata, batch) for its later layers;
    a frozen or slotted object keeps nothing, and every layer then builds its own."""
    try:
        setattr(obj, name, value)
    except (AttributeError, TypeError):
        pass


def windows_key(keys: RequestKeys, topk: int, options: PluginOptions) -> tuple:
    """What kept :class:`PrefillWindows` must match to serve another layer's ``keys``: the key
    buffer's rows, the cache's page count (a page outside a smaller cache would go unnamed),
    the top-k and the options."""
    return (keys.k.shape[0], None if keys._source is None else keys._source[2], topk, options)


def prefill_windows(keys: RequestKeys, lengths: torch.Tensor, req_of_query: torch.Tensor, *,
                    topk: int, options: PluginOptions) -> PrefillWindows:
    """The windows of :func:`prefill_select` and, in HISA mode, their plan (one host sync).

    A page outside the cache (``keys.bad_pages``) empties every window the wrong way round
    (ks > ke), so the plan's window read fails and the page is named instead. A request index
    outside ``keys`` (inconsistent engine metadata, e.g. vLLM's ``cu_seqlen_ks`` past the last
    request) does the same for its query, read at the nearest request instead of past the
    starts (a device assert on CUDA); :mod:`hisa.cache.chunk_windows` follows the same rule.
    """
    last = max(keys.starts.shape[0] - 1, 0)
    outside = (req_of_query < 0) | (req_of_query > last)
    ks = keys.starts[req_of_query.clamp(0, last)]                               # int32
    ke = ks + lengths.to(torch.int32)
    poison = outside if keys.bad_pages is None else outside | keys.bad_pages
    return planned_windows(keys, torch.where(poison, ke + 1, ks), ke, topk=topk,
                           options=options)


def planned_windows(keys: RequestKeys, ks: torch.Tensor, ke: torch.Tensor, *, topk: int,
                    options: PluginOptions) -> PrefillWindows:
    """:class:`PrefillWindows` of windows ``ks`` / ``ke`` (int32 [T]) over ``keys``, already
    poisoned for a bad page (as :func:`prefill_windows` and
    :func:`hisa.cache.chunk_windows.chunk_windows_triton` do): their plan in HISA mode (the
    one host sync), a ValueError naming the page when the read fails because of one."""
    num_keys = keys.k.shape[0]
    key = windows_key(keys, topk, options)
    if options.mode == "flat":
        return PrefillWindows(ks, ke, None, key)
    try:
        plan = plan_windows(ks, ke, num_keys, topk=topk, block_size=options.block_size,
                            block_topk=options.block_topk,
                            fused=False if options.backend == "torch" else None)
    except ValueError:
        keys.raise_if_bad_pages()         # the page, not the poisoned windows it caused
        raise
    return PrefillWindows(ks, ke, plan, key)


def prefill_select(q: torch.Tensor, weights: torch.Tensor, lengths: torch.Tensor | None,
                   req_of_query: torch.Tensor | None, keys: RequestKeys, *, topk: int,
                   options: PluginOptions, out: torch.Tensor | None = None,
                   windows: PrefillWindows | None = None) -> torch.Tensor:
    """Top-k of packed prefill queries over their requests' gathered keys.

    Query ``t`` of request ``r = req_of_query[t]`` sees the first ``lengths[t]`` keys of its
    request (the engines' ``ke - ks``). Returns int32 [T, topk] offsets from the request start
    (= positions in the request), -1 padded: the engines' compressed-row index convention;
    written into ``out`` (int32 [T, topk], contiguous) when given.

    ``windows``: this chunk's :func:`prefill_windows` from an earlier layer of the same step
    (``lengths`` and ``req_of_query`` are then not read): the call makes no host sync.
    Without it they are built here (one host sync).
    """
    if windows is None:
        windows = prefill_windows(keys, lengths, req_of_query, topk=topk, options=options)
    elif windows.key != windows_key(keys, topk, options):
        raise ValueError(f"windows: planned for (key rows, pages, topk, options) = "
                         f"{windows.key}, used with {windows_key(keys, topk, options)}")
    ks, ke = windows.ks, windows.ke
    try:
        if options.mode == "flat":
            return dsa_index(q, keys.k, weights, ks, ke, k_scale=keys.k_scale, topk=topk,
                             out=out, backend=options.backend)
        return hisa_index(q, keys.k, weights, ks, ke, k_scale=keys.k_scale, topk=topk,
                          block_size=options.block_size, block_topk=options.block_topk,
                          out=out, plan=windows.plan, backend=options.backend)
    except ValueError:
        keys.raise_if_bad_pages()         # the page, not the poisoned windows it caused
        raise


def decode_select(q: torch.Tensor, pages: torch.Tensor, pooled: torch.Tensor | None,
                  weights: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor, *,
                  topk: int, options: PluginOptions, out: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Paged top-k for ``q`` [B, next_n, H, D] over the engine's cache and its pooled rows.

    ``seq_lens`` int32 [B] or [B, next_n] (each row's visible keys), ``block_table`` int32
    [B, W], ``weights`` fp32 [B * next_n, H]. A ``next_n`` the paged ops do not take (3, 4, ...)
    is served as B * next_n single-row requests sharing their request's block-table row. Device
    ops only: no host sync, no data-dependent allocation (CUDA-graph safe on the Triton path).

    Returns:
        int32 [B * next_n, topk] positions in the request, -1 padded (``out`` when given).
    """
    B, n = q.shape[:2]
    if n not in NEXT_N_SUPPORTED:
        if seq_lens.dim() == 1:
            seq_lens = (seq_lens.unsqueeze(1) - n + 1 +
                        torch.arange(n, device=seq_lens.device, dtype=seq_lens.dtype))
            seq_lens = seq_lens.clamp_min(0)
        seq_lens = seq_lens.reshape(B * n, 1).to(torch.int32)
        block_table = block_table.repeat_interleave(n, dim=0)
        q = q.reshape(B * n, 1, *q.shape[2:])
    if options.mode == "flat":
        return dsa_index_paged(q, pages, weights, seq_lens, block_table, topk=topk, out=out,
                               backend=options.backend)
    return hisa_index_paged(q, pages, pooled, weights, seq_lens, block_table, topk=topk,
                            block_size=options.block_size, block_topk=options.block_topk,
                            out=out, backend=options.backend)


def rows_view(buf: torch.Tensor, start: int, end: int, topk: int) -> torch.Tensor | None:
    """``buf[start:end, :topk]`` when it is contiguous (an engine buffer exactly ``topk`` wide),
    so the ops write the engine's buffer directly; None when a copy is needed."""
    view = buf[start:end, :topk]
    return view if view.is_contiguous() else None


def carry_pooled_rows(pooled: torch.Tensor, src_pages: torch.Tensor, dst_pages: torch.Tensor
                      ) -> None:
    """Move pooled rows with their pages (an engine copied pages ``src`` to ``dst``)."""
    pooled[dst_pages.long()] = pooled[src_pages.long()]


# Post-import hooks. The plugins patch a function in an engine module before other engine
# modules copy it with ``from module import name``, without importing the engine's model code
# themselves (an engine's front-end process never imports it; importing it there would cost
# start-up time and may touch the GPU).

_LOCK = threading.Lock()



class _Loader(importlib.abc.Loader):
    """Delegates to the real loader, then runs the callbacks on the executed module."""

    def __init__(self, inner, callbacks: list) -> None:
        self._inner, self._callbacks = inner, callbacks

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        self._inner.exec_module(module)
        for callback in self._callbacks:
            callback(module)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.pending: dict[str, list] = {}

    def find_spec(self, name, path, target=None):
        if name not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        with _LOCK:
            callbacks = self.pending.pop(name, [])
        if spec.loader is not None and callbacks:
            spec.loader = _Loader(spec.loader, callbacks)
        return spec


_FINDER = _Finder()


def after_import(module_name: str, callback: Callable) -> None:
    """Call ``callback(module)`` once ``module_name`` has executed (immediately if loaded)."""
    module = sys.modules.get(module_name)
    if module is not None:
        callback(module)
        return
    with _LOCK:
        _FINDER.pending.setdefault(module_name, []).append(callback)
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
