"""HISA inside SGLang 0.5.23: a ``sglang.srt.plugins`` entry point (see docs/engines.md).

Turn it on with ``HISA_SGLANG`` (``1``, or options such as ``block_size=128,block_topk=64``;
see :func:`hisa.integrations._engine_common.parse_options`) and, if the server restricts its
plugins, name it in ``SGLANG_PLUGINS=hisa``. Unset, the plugin changes nothing.

Hooks (AROUND, through SGLang's ``HookRegistry``) on the DSA ``Indexer``:

* ``_get_topk_ragged`` (extend): HISA over the requests' keys gathered B-aligned from the index
  cache; the result goes through the same output transform the engine's top-k would apply
  (ragged KV offsets, page-table slots, or raw offsets when top-k fusion is off);
* ``_get_topk_paged`` (decode, target-verify, draft-extend): HISA over the ``[pages, 64, 1,
  132]`` index cache with its pooled companion, one query row per request row as the engine's
  own split path does, CUDA-graph safe;
* ``_forward_cuda_k_only`` (the engine's shortcut when every key fits in the top-k): unchanged,
  then the blocks it completed are pooled.

and on ``DSATokenToKVPool`` page movers (``move_kv_cache``, ``get_cpu_copy`` /
``load_cpu_copy``): pooled rows follow whole pages; a move they cannot follow turns HISA decode
off for the process with a logged reason.

The adaptation functions take the engine's objects by attribute and run without SGLang (the
contract tests drive them with restated metadata); only :func:`register` imports SGLang.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..cache.layout import PAGE_SIZE
from ..utils.backend import resolve_backend
from ._engine_common import (PluginOptions, PooledCacheRegistry, as_engine_pages,
                             carry_pooled_rows, decode_select, gather_request_keys, keep_on,
                             log_fallback, logger, options_reason, parse_options, pool_step,
                             prefill_select, prefill_windows, request_layout, step_tokens)

ENV_VAR = "HISA_SGLANG"
PINNED_VERSION = "0.5.23"
ENGINE = "SGLang"
INDEXER = "sglang.srt.layers.attention.dsa.dsa_indexer.Indexer"
KV_POOL = "sglang.srt.mem_cache.memory_pool.DSATokenToKVPool"
HEAD_DIM = 128

#: Pooled companions of the index caches of this process.
POOLED = PooledCacheRegistry()


@dataclass
class EngineFacts:
    """What the hooks read from SGLang besides their arguments (filled by :func:`register`).

    ``fused_topk``: the engine's ``SGLANG_DSA_FUSE_TOPK`` (its top-k also maps positions to KV
    slots); ``decode_off``: a process-wide reason HISA decode must not run (set when the engine
    moves KV in a way the pooled rows cannot follow); ``get_pool``: the DSA KV pool getter.
    """

    fused_topk: bool = True
    decode_off: str | None = None
    get_pool: object = None
    state_reason: object = None

    def decode_reason(self) -> str | None:
        """``decode_off``, after asking the engine once (lazily: its configuration is published
        after plugins load) whether something moves KV pages behind the forward pass."""
        if self.state_reason is not None:
            self.decode_off = self.decode_off or self.state_reason()
            self.state_reason = None
        return self.decode_off


FACTS = EngineFacts()


def index_pages(pool, layer_id: int) -> torch.Tensor:
    """The layer's index cache as uint8 [P, 64 * 132] (ValueError if not plain 64-token pages)."""
    if getattr(pool, "index_page_size", PAGE_SIZE) != PAGE_SIZE:
        raise ValueError(f"index_page_size {pool.index_page_size} (expected {PAGE_SIZE})")
    if getattr(pool, "index_kpool", 1) != 1:
        raise ValueError(f"index_kpool {pool.index_kpool} (pooled K cache variant)")
    owned = pool.get_index_k_with_scale_buffer(layer_id=layer_id)
    if hasattr(pool, "get_broadcastable_index_k_with_scale_buffer"):
        read = pool.get_broadcastable_index_k_with_scale_buffer(layer_id)
        if read.data_ptr() != owned.data_ptr():
            raise ValueError("the layer reads a broadcast copy of its index cache (DSA cache "
                             "layer split)")
    return as_engine_pages(owned, HEAD_DIM)


def layer_reason(indexer, pool, layer_id: int, q_fp8: torch.Tensor, weights: torch.Tensor,
                 metadata) -> str | None:
    """Why this call must run the engine's own top-k, or None."""
    if getattr(indexer, "num_init_tokens", 0) or getattr(indexer, "num_local_tokens", 0):
        return "forced init/local tokens (num_init_tokens / num_local_tokens)"
    if getattr(indexer, "dsa_enable_prefill_cp", False):
        return "prefill context parallelism (dsa_enable_prefill_cp)"
    if q_fp8.dtype != torch.float8_e4m3fn:
        return f"q dtype {q_fp8.dtype} (expected float8_e4m3fn)"
    if weights.dtype != torch.float32:
        return f"weights dtype {weights.dtype} (expected float32)"
    if q_fp8.shape[-1] != HEAD_DIM:
        return f"index head dim {q_fp8.shape[-1]} (expected {HEAD_DIM})"
    am = metadata.attn_metadata
    if getattr(am, "indexer_logical_page_table", None) is not None:
        return "pool-translated index page table"
    if getattr(am, "page_size", PAGE_SIZE) != PAGE_SIZE:
        return f"page size {am.page_size} (expected {PAGE_SIZE})"
    try:
        index_pages(pool, layer_id)
    except ValueError as err:
        return f"index cache: {err}"
    return None


def transform_output(local: torch.Tensor, metadata, *, fused: bool,
                     row_batch: torch.Tensor | None, backend: str = "auto") -> torch.Tensor:
    """Apply the engine's top-k output transform to positions ``local`` int32 [T, K] (-1 pad).

    Unfused: the positions themselves. Fused RAGGED: position + ``topk_indices_offset[row]``
    (the row's request start in the ragged KV). Fused PAGED: the KV slot of the position,
    ``real_page_table[b, p // 64] * 64 + p % 64`` with ``b = row_batch[row]`` (identity when
    None). -1 stays -1. On CUDA (``backend`` "auto") one Triton launch
    (:func:`hisa.cache.slots.positions_to_slots`); the torch ops below are its twin.
    """
    if not fused or getattr(metadata, "force_unfused_topk", False):
        return local
    method = getattr(metadata.topk_transform_method, "name", str(metadata.topk_transform_method))
    am = metadata.attn_metadata
    if method not in ("RAGGED", "PAGED"):
        raise ValueError(f"topk_transform_method: expected PAGED or RAGGED, got {method}")
    if resolve_backend(backend, local.device) == "triton":
        from ..cache.slots import positions_to_slots
        if method == "RAGGED":
            offset = am.topk_indices_offset[:local.shape[0]].to(torch.int32).contiguous()
            return positions_to_slots(local, offset=offset)
        return positions_to_slots(local, table=am.real_page_table, rows=row_batch)
    # int32 throughout: the engine's own top-k writes int32 slots from an int32 page table, so
    # every slot it can address fits (and the decode hook runs this per layer: no widening
    # copies, no final cast, where the int32 inputs allow it).
    valid = local >= 0
    pos = local.clamp_min(0)
    if method == "RAGGED":
        out = pos + am.topk_indices_offset[:local.shape[0]].to(torch.int32).unsqueeze(1)
    elif method == "PAGED":
        # Row i's table row: i itself (decode rows) or its request.
        table = am.real_page_table
        rows = table[:local.shape[0]] if row_batch is None else table[row_batch.long()]
        page = torch.gather(rows, 1, (pos // PAGE_SIZE).long())
        out = page * PAGE_SIZE + pos % PAGE_SIZE
    else:
        raise ValueError(f"topk_transform_method: expected PAGED or RAGGED, got {method}")
    return torch.where(valid, out, -1).to(torch.int32)


def _pooled_for(pages: torch.Tensor, options: PluginOptions) -> torch.Tensor | None:
    if not options.decode or options.mode != "hisa":
        return None
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return POOLED.get_or_create(pages, HEAD_DIM, capturing=capturing)


def pool_tokens(pages: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                block_table: torch.Tensor, req: torch.Tensor | None, options: PluginOptions, *,
                forward_batch=None, layer_id: int | None = None) -> None:
    """Pool the blocks these tokens completed (no-op when decode HISA is off). ``req``: each
    token's block-table row, None when token i is row i (decode rows).

    With ``forward_batch`` and ``layer_id``, the step's tokens are built once per forward pass
    and kept on it for the pass's later layers (see :func:`shared_step_tokens`).
    """
    pooled = _pooled_for(pages, options)
    if pooled is not None:
        n = slots.shape[0]
        tokens = shared_step_tokens(forward_batch, layer_id, slots, positions[:n],
                                    block_table, None if req is None else req[:n],
                                    pages.shape[0])
        pool_step(pages, pooled, tokens, head_dim=HEAD_DIM, block_size=options.block_size,
                  backend=options.backend)


def shared_step_tokens(forward_batch, layer_id: int | None, slots: torch.Tensor,
                       positions: torch.Tensor, block_table: torch.Tensor,
                       req: torch.Tensor | None, num_pages: int):
    """:func:`step_tokens`, built once per forward pass and kept on ``forward_batch``.

    SGLang hands one ``ForwardBatch`` to every layer of a pass, whose index caches share the
    page count, so only the first indexer layer of a pass pays for the token grid (about ten
    small kernels). Kept tokens are reused only by a later layer of the same pass: layers run
    in increasing ``layer_id``, so a call whose layer is not above the last user's starts a
    new pass and rebuilds them. (A batch object can outlive its pass with its input buffers
    refilled in place: the CUDA-graph runners' warm-up and debug replays rerun a capture-time
    batch; its tensors' addresses do not change, their values do.) The key also holds the
    inputs' addresses and sizes and whether a graph is being captured: tokens derived eagerly
    are constants to a graph and tokens derived inside a capture hold their values only at
    replay, so neither is reused across that line.
    """
    key = (num_pages, _capturing()) + _addresses(slots, positions, block_table, req)

    def build():
        rows = torch.arange(slots.shape[0], device=slots.device) if req is None else req
        return step_tokens(slots, positions, block_table, rows, num_pages)

    return kept_for_pass(forward_batch, "_hisa_step_tokens", layer_id, key, build)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _addresses(*tensors) -> tuple:
    return tuple(None if t is None else (t.data_ptr(), tuple(t.shape), t.dtype)
                 for t in tensors)


def kept_for_pass(forward_batch, name: str, layer_id: int | None, key: tuple,
                  build: Callable[[], object]):
    """``build()``, once per forward pass: kept on ``forward_batch`` as ``name`` and reused
    by a later layer of the same pass with an equal ``key`` (the rules and why: see
    :func:`shared_step_tokens`)."""
    kept = getattr(forward_batch, name, None)
    if (kept is not None and layer_id is not None and kept[0] == key
            and kept[2] is not None and layer_id > kept[2]):
        setattr(forward_batch, name, (key, kept[1], layer_id))
        return kept[1]
    value = build()
    if forward_batch is not None:
        keep_on(forward_batch, name, (key, value, layer_id))
    return value


def topk_ragged(indexer, forward_batch, layer_id: int, q_fp8: torch.Tensor,
                weights: torch.Tensor, metadata, *, pool, options: PluginOptions,
                topk_result: torch.Tensor | None = None) -> torch.Tensor:
    """HISA top-k for an extend batch, in the output format of ``Indexer._get_topk_ragged``.

    ``q_fp8`` [T_all, H, D] fp8, ``weights`` [T_all, H, 1] fp32; the first ``T = len(ks)`` rows
    are real. Query t of request ``r = token_to_batch_idx[t]`` sees the first ``ke[t] - ks[t]``
    keys of r.
    """
    topk = indexer.index_topk
    pages = index_pages(pool, layer_id)
    ks, ke = metadata.get_indexer_kvcache_range()
    T = ks.shape[0]
    req = metadata.get_token_to_batch_idx()[:T]
    table = metadata.get_page_table_64()
    if topk_result is None:
        topk_result = torch.full((q_fp8.shape[0], topk), -1, dtype=torch.int32,
                                 device=q_fp8.device)
    if table.shape[0] == 0 or T == 0:
        return topk_result
    seq_lens = metadata.get_indexer_seq_len()
    total = int(metadata.get_indexer_seq_len_cpu().sum())       # host tensor: no sync
    # Where each request's keys go (the same for every layer), then each layer's gather,
    # which refuses a kept layout built for another total.
    layout = kept_for_pass(
        forward_batch, "_hisa_request_layout", layer_id,
        (options.block_size, total) + _addresses(seq_lens),
        lambda: request_layout(seq_lens, total=total, block_size=options.block_size))
    keys = gather_request_keys(pages, table, seq_lens, total=total, head_dim=HEAD_DIM,
                               block_size=options.block_size, backend=options.backend,
                               layout=layout)
    # The windows and their plan (the one host read) once per pass, as the step's tokens.
    windows = kept_for_pass(
        forward_batch, "_hisa_prefill_windows", layer_id,
        (_capturing(), pages.shape[0], keys.k.shape[0], topk, options)
        + _addresses(ks, ke, req, table, seq_lens),
        lambda: prefill_windows(keys, ke - ks, req, topk=topk, options=options))
    local = prefill_select(q_fp8[:T], weights[:T, :, 0].contiguous(), None, None, keys,
                           topk=topk, options=options, windows=windows)
    topk_result[:T] = transform_output(local, metadata, fused=FACTS.fused_topk, row_batch=req,
                                       backend=options.backend)
    return topk_result


def paged_row_lengths(forward_batch, metadata, rows: int) -> torch.Tensor | None:
    """Visible keys of each query row, int32 [rows, 1], chosen as the engine's paged path does
    (its 2-D context lengths when present, else the expanded lengths for target-verify /
    draft-extend and the plain lengths for decode); None if they do not cover ``rows``."""
    mode = forward_batch.forward_mode
    ctx = getattr(metadata, "paged_mqa_ctx_lens_2d", None)
    if ctx is not None:
        lens = ctx
    elif mode.is_target_verify() or mode.is_draft_extend_v2():
        lens = metadata.get_seqlens_expanded()
    else:
        lens = metadata.get_seqlens_int32()
    if lens.numel() != rows:
        return None
    return lens.reshape(rows, 1).to(torch.int32)


def topk_paged(indexer, forward_batch, layer_id: int, q_fp8: torch.Tensor,
               weights: torch.Tensor, metadata, *, pool, options: PluginOptions,
               pooled: torch.Tensor | None, lens: torch.Tensor) -> torch.Tensor:
    """HISA top-k for decode / target-verify / draft-extend rows (``_get_topk_paged``'s format).

    Row i (of ``rows = sum(extend lens)``) is its own single-row request with block-table row
    ``get_page_table_64()[i]`` (the engine expands the table per row) and ``lens[i]`` keys; rows
    past ``rows`` (padding) are -1. Device ops only: CUDA-graph safe.
    """
    rows = lens.shape[0]
    table = metadata.get_page_table_64()
    pages = index_pages(pool, layer_id)
    q = q_fp8[:rows].unsqueeze(1)                                       # [rows, 1, H, D]
    w = weights[:rows, :, 0]
    local = decode_select(q, pages, pooled, w, lens, table[:rows], topk=indexer.index_topk,
                          options=options)
    out = transform_output(local, metadata, fused=FACTS.fused_topk, row_batch=None,
                           backend=options.backend)
    if rows < q_fp8.shape[0]:
        pad = torch.full((q_fp8.shape[0] - rows, out.shape[1]), -1, dtype=out.dtype,
                         device=out.device)
        out = torch.cat([out, pad])
    return out


def paged_rows(metadata) -> int:
    return int(sum(metadata.get_dsa_extend_len_cpu()))


def around_get_topk_paged(original, indexer, forward_batch, layer_id, q_fp8, weights, metadata,
                          *, options: PluginOptions | None = None):
    """AROUND hook of ``Indexer._get_topk_paged``: pool the rows' completed blocks, then HISA
    (or, with a logged reason, the engine's own top-k).

    Row i pools through page-table row i; a page table with fewer rows than the step has query
    rows (not expanded per row) would pool through the wrong rows, so the layer is marked stale
    instead and decodes with the engine's kernels from then on.
    """
    options = options or OPTIONS[0]
    pool = FACTS.get_pool()
    reason = ("no indexer metadata" if metadata is None else
              layer_reason(indexer, pool, layer_id, q_fp8, weights, metadata))
    if reason is not None:
        log_fallback(ENGINE, "decode", reason)
        return original(indexer, forward_batch, layer_id, q_fp8, weights, metadata)
    pages = index_pages(pool, layer_id)
    rows = paged_rows(metadata)
    table = metadata.get_page_table_64()
    if table.shape[0] < rows:
        POOLED.mark_stale(pages, "the page table is not expanded per query row")
    else:
        pool_tokens(pages, forward_batch.out_cache_loc[:rows], forward_batch.positions[:rows],
                    table[:rows], None, options, forward_batch=forward_batch,
                    layer_id=layer_id)
    pooled = _pooled_for(pages, options)
    lens = paged_row_lengths(forward_batch, metadata, rows)
    reason = FACTS.decode_reason() or options_reason(options, indexer.index_topk, "decode")
    if lens is None:
        reason = "decode row lengths do not cover the query rows"
    if reason is None and options.mode == "hisa" and pooled is None:
        reason = POOLED.stale_reason(pages) or "no pooled cache for this layer"
    if reason is not None:
        log_fallback(ENGINE, "decode", reason)
        return original(indexer, forward_batch, layer_id, q_fp8, weights, metadata)
    return topk_paged(indexer, forward_batch, layer_id, q_fp8, weights, metadata, pool=pool,
                      options=options, pooled=pooled, lens=lens)


def around_get_topk_ragged(original, indexer, enable_dual_stream, forward_batch, layer_id, q_fp8,
                           weights, metadata, topk_result=None, *,
                           options: PluginOptions | None = None):
    """AROUND hook of ``Indexer._get_topk_ragged``: pool the extend's completed blocks, then
    HISA (or, with a logged reason, the engine's own top-k)."""
    options = options or OPTIONS[0]
    pool = FACTS.get_pool()
    reason = ("no indexer metadata" if metadata is None else
              layer_reason(indexer, pool, layer_id, q_fp8, weights, metadata))
    if reason is None:
        ks, _ = metadata.get_indexer_kvcache_range()
        T = ks.shape[0]
        pool_tokens(index_pages(pool, layer_id), forward_batch.out_cache_loc[:T],
                    forward_batch.positions[:T], metadata.get_page_table_64(),
                    metadata.get_token_to_batch_idx()[:T], options,
                    forward_batch=forward_batch, layer_id=layer_id)
        reason = options_reason(options, indexer.index_topk, "prefill")
        if reason is None:
            return topk_ragged(indexer, forward_batch, layer_id, q_fp8, weights, metadata,
                               pool=pool, options=options, topk_result=topk_result)
    log_fallback(ENGINE, "prefill", reason)
    return original(indexer, enable_dual_stream, forward_batch, layer_id, q_fp8, weights,
                    metadata, topk_result)


def around_forward_k_only(original, indexer, x, positions, forward_batch, layer_id, act_quant,
                          metadata, return_indices=True, *, num_tokens=None, topk_result=None,
                          options: PluginOptions | None = None):
    """AROUND hook of ``Indexer._forward_cuda_k_only``: the engine stores keys, then we pool."""
    options = options or OPTIONS[0]
    result = original(indexer, x, positions, forward_batch, layer_id, act_quant, metadata,
                      return_indices, num_tokens=num_tokens, topk_result=topk_result)
    if not options.decode or options.mode != "hisa":
        return result
    pool = FACTS.get_pool()
    try:
        pages = index_pages(pool, layer_id)
    except ValueError:
        return result
    n = forward_batch.out_cache_loc.shape[0] if num_tokens is None else num_tokens
    if metadata is None:
        POOLED.mark_stale(pages, "a key-only step ran without indexer metadata")
        return result
    if forward_batch.forward_mode.is_extend_without_speculative():
        req = metadata.get_token_to_batch_idx()[:n]
    else:
        req = None                                    # token i is row i
    pool_tokens(pages, forward_batch.out_cache_loc[:n], positions[:n],
                metadata.get_page_table_64(), req, options, forward_batch=forward_batch,
                layer_id=layer_id)
    return result


def page_runs(locs: torch.Tensor) -> torch.Tensor | None:
    """Pages of token locations that come as whole pages in order (each run of 64 starts on a
    page boundary and is contiguous), int64; None if ``locs`` is not made of whole pages."""
    locs = locs.long().flatten()
    if locs.numel() % PAGE_SIZE:
        return None
    runs = locs.view(-1, PAGE_SIZE)
    if not bool(_whole(runs).all()):
        return None
    return runs[:, 0] // PAGE_SIZE


def around_move_kv_cache(original, kv_pool, tgt_loc, src_loc):
    """AROUND hook of ``DSATokenToKVPool.move_kv_cache``: rows follow whole-page moves; any
    other move turns HISA decode off (a moved completing key would leave its block unpooled)."""
    src, dst = page_runs(src_loc), page_runs(tgt_loc)
    if src is not None and dst is not None and src.numel() == dst.numel():
        for _, rows in POOLED.items():
            carry_pooled_rows(rows, src, dst)
    elif tgt_loc.numel():
        FACTS.decode_off = "the engine moved KV slots below page granularity (move_kv_cache)"
        POOLED.mark_all_stale(FACTS.decode_off)
    return original(kv_pool, tgt_loc, src_loc)


def around_get_cpu_copy(original, kv_pool, indices, *args, **kwargs):
    """AROUND hook of ``DSATokenToKVPool.get_cpu_copy``: the pooled rows of the whole pages
    travel with the copy (the pages a retracted request will need back)."""
    out = original(kv_pool, indices, *args, **kwargs)
    pages = _request_pages(indices)
    out["hisa_pooled"] = [(key, rows[pages].cpu()) for key, rows in POOLED.items()]
    return out


def around_load_cpu_copy(original, kv_pool, cpu_copy, indices, *args, **kwargs):
    """AROUND hook of ``DSATokenToKVPool.load_cpu_copy``: restore the rows at the new pages.

    A copy without saved rows, or whose whole pages do not pair with the new locations' whole
    pages, cannot be restored: HISA decode is turned off for the process instead.
    """
    result = original(kv_pool, cpu_copy, indices, *args, **kwargs)
    saved = cpu_copy.get("hisa_pooled") if isinstance(cpu_copy, dict) else None
    current = dict(POOLED.items())
    if not current:
        return result
    pages = _request_pages(indices)
    restored = 0
    for key, rows in saved or []:
        if key in current and rows.shape[0] == pages.numel():
            current[key][pages] = rows.to(current[key].device)
            restored += 1
    if restored != len(current):
        FACTS.decode_off = "a host copy of KV pages came back without its pooled rows"
        POOLED.mark_all_stale(FACTS.decode_off)
    return result


def _request_pages(indices: torch.Tensor) -> torch.Tensor:
    """The pages whose every location is in ``indices`` (a request's locations in order): the
    only pages that can hold the last 64 keys of a complete block. A trailing partial page
    belongs to an incomplete block, whose pooled row is never read."""
    locs = indices.long().flatten()
    runs = locs[:locs.numel() // PAGE_SIZE * PAGE_SIZE].view(-1, PAGE_SIZE)
    return runs[_whole(runs), 0] // PAGE_SIZE


def _whole(runs: torch.Tensor) -> torch.Tensor:
    """Which rows of [n, 64] token locations are one whole page in order."""
    step = torch.arange(PAGE_SIZE, device=runs.device)
    return (runs[:, 0] % PAGE_SIZE == 0) & (runs == runs[:, :1] + step).all(1)


#: Options of this process, set by :func:`register` (one slot so hooks can read them).
OPTIONS: list = [PluginOptions()]

HOOKS = (
    (f"{INDEXER}._get_topk_paged", around_get_topk_paged),
    (f"{INDEXER}._get_topk_ragged", around_get_topk_ragged),
    (f"{INDEXER}._forward_cuda_k_only", around_forward_k_only),
    (f"{KV_POOL}.move_kv_cache", around_move_kv_cache),
    (f"{KV_POOL}.get_cpu_copy", around_get_cpu_copy),
    (f"{KV_POOL}.load_cpu_copy", around_load_cpu_copy),
)


def register() -> None:
    """``sglang.srt.plugins`` entry point: registers the AROUND hooks (SGLang applies them).

    Does nothing unless ``HISA_SGLANG`` is set; raises RuntimeError on an SGLang other than the
    pinned 0.5.23.
    """
    options = parse_options(ENV_VAR, os.environ.get(ENV_VAR))
    if options is None:
        return
    from importlib.metadata import version
    found = version("sglang")
    if found.split("+")[0] != PINNED_VERSION:
        raise RuntimeError(f"{ENV_VAR} is set but the installed SGLang is {found}; the HISA "
                           f"plugin is written and tested against SGLang {PINNED_VERSION} only")
    from sglang.srt.environ import envs
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    OPTIONS[0] = options
    FACTS.fused_topk = bool(envs.SGLANG_DSA_FUSE_TOPK.get())
    FACTS.get_pool = _engine_pool_getter
    FACTS.state_reason = _engine_state_reason
    for target, hook in HOOKS:
        HookRegistry.register(target, hook, HookType.AROUND)
    logger.info("hisa: SGLang DSA indexer hooks registered (%s)", options)


def _engine_pool_getter():
    from sglang.srt.layers.attention.dsa import dsa_indexer
    return dsa_indexer.get_token_to_kv_pool()


def _engine_state_reason() -> str | None:
    """Engine features that write index-cache pages outside the forward pass, where the pooled
    rows cannot follow (see docs/engines.md)."""
    from sglang.srt.runtime_context import get_disagg, get_memory
    memory, disagg = get_memory(), get_disagg()
    if getattr(memory, "enable_hierarchical_cache", False):
        return "hierarchical cache (HiCache) loads pages from host memory"
    if getattr(disagg, "disaggregation_mode", "null") == "decode":
        return "PD-disaggregated decode instance (KV pages arrive by transfer)"
    return None
