"""HISA inside vLLM 0.33.0: a ``vllm.general_plugins`` entry point (see docs/engines.md).

Turn it on with one environment variable, ``HISA_VLLM`` (``1``, or options such as
``block_size=128,block_topk=64,decode=off``; see
:func:`hisa.integrations._engine_common.parse_options`). Unset, the plugin changes nothing.

The hook. vLLM 0.33.0's CUDA DeepSeek-V3.2 / GLM-5 attention
(``vllm.models.deepseek_v32.attention``) calls the Python function
``vllm.model_executor.layers.sparse_attn_indexer.sparse_attn_indexer`` directly, so an
out-of-tree ``SparseAttnIndexer`` class alone would never run there. The plugin therefore
replaces that function (in its module, right after the module is imported, before any model
module binds the name) and also registers an out-of-tree ``SparseAttnIndexer`` whose
``forward_cuda`` routes through the same replacement, for models that use the class. The
replacement keeps the engine's signature and writes the same ``topk_indices_buffer``: prefill
rows hold offsets from ``cu_seqlen_ks`` (the compressed-row convention: row_starts = 0,
row_ends = ke - ks), decode rows request positions, -1 where empty, ``topk_tokens`` columns.

What this module runs without vLLM: :func:`run_indexer` and the helpers take the engine's
metadata objects by attribute and an ``engine`` object for the few engine operations they need
(its own kernels for fallbacks, its key insert, its TP row-shard exchange), so the contract tests
and the GPU tier drive it with restated metadata. Only :func:`register` and
:class:`VllmEngine` import vLLM.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import os
import sys

import torch

from ..utils.validate import FP8_DTYPE
from ..utils.backend import on_device_of, resolve_backend
from ._engine_common import (PluginOptions, PooledCacheRegistry, PrefillWindows, RequestLayout,
                             StepTokens, after_import, as_engine_pages, decode_select,
                             gather_request_keys, keep_on, log_fallback, logger, options_reason,
                             packed_request_layout, parse_options, planned_windows, pool_step,
                             prefill_select, prefill_windows, rows_view, step_tokens,
                             windows_key)

ENV_VAR = "HISA_VLLM"
PINNED_VERSION = "0.33.0"
LAYER_MODULE = "vllm.model_executor.layers.sparse_attn_indexer"
ENGINE = "vLLM"

#: Parameters of vLLM 0.33.0's ``sparse_attn_indexer`` in order, with the defaults of the
#: optional tail (restated; tests/integrations/test_vllm_drift.py pins them to the source).
PARAMS = ("hidden_states", "k_cache_prefix", "kv_cache", "q_quant", "q_scale", "k", "weights",
          "quant_block_size", "scale_fmt", "topk_tokens", "head_dim", "max_model_len",
          "total_seq_lens", "topk_indices_buffer", "skip_k_cache_insert", "use_pcp",
          "pcp_shard_decode_requests", "dense_mha_metadata_layer_name", "use_fp4_cache",
          "dcp_rank", "dcp_world_size", "cp_kv_cache_interleave_size", "skip_topk_buffer_clear",
          "candidate_blocks", "candidate_block_size", "candidate_write", "topk_backend")
DEFAULTS = {"use_fp4_cache": False, "dcp_rank": 0, "dcp_world_size": 1,
            "cp_kv_cache_interleave_size": 1, "skip_topk_buffer_clear": False,
            "candidate_blocks": None, "candidate_block_size": 0, "candidate_write": False,
            "topk_backend": "auto"}

#: The pooled companions of every indexer layer of this process.
POOLED = PooledCacheRegistry()

#: Why HISA decode must not run in this process (set from the engine configuration when the
#: indexer layers are built: something writes KV pages outside the forward pass), or None.
DECODE_OFF: list = [None]


def bind_call(args: tuple, kwargs: dict) -> dict:
    """The call's arguments by name (positional, keyword, then the engine's defaults)."""
    if len(args) > len(PARAMS):
        raise TypeError(f"sparse_attn_indexer: expected at most {len(PARAMS)} positional "
                        f"arguments, got {len(args)}")
    call = dict(zip(PARAMS, args))
    for name, value in kwargs.items():
        if name not in PARAMS:
            raise TypeError(f"sparse_attn_indexer: unexpected argument {name!r}")
        if name in call:
            raise TypeError(f"sparse_attn_indexer: argument {name!r} given twice")
        call[name] = value
    for name, value in DEFAULTS.items():
        call.setdefault(name, value)
    missing = [p for p in PARAMS if p not in call]
    if missing:
        raise TypeError(f"sparse_attn_indexer: missing arguments {missing}")
    return call


def call_reason(call: dict, md) -> str | None:
    """Why this call must run the engine's own indexer (shapes HISA does not serve), or None."""
    if call["use_fp4_cache"] or call["q_scale"] is not None:
        return "MXFP4 indexer cache (use_fp4_cache)"
    if call["candidate_blocks"] is not None:
        return "DeepSeek-V4.1 two-level candidate blocks"
    if call["dcp_world_size"] > 1:
        return "decode context parallelism (dcp_world_size > 1)"
    if call["use_pcp"]:
        return "prefill context parallelism (use_pcp)"
    if call["q_quant"].dtype != FP8_DTYPE:
        return f"q_quant dtype {call['q_quant'].dtype} (expected float8_e4m3fn)"
    try:
        as_engine_pages(call["kv_cache"], call["head_dim"])
    except ValueError as err:
        return f"indexer cache layout: {err}"
    decode = getattr(md, "decode", None)
    if decode is not None and (getattr(decode, "indices", None) is not None or
                               getattr(decode, "global_seq_lens", None) is not None):
        return "varlen (SM100) or DCP decode rows"
    return None


def _narrow(md, **fields):
    """A shallow copy of the metadata with some fields replaced (dataclass or plain object)."""
    if dataclasses.is_dataclass(md):
        return dataclasses.replace(md, **fields)
    out = copy.copy(md)
    for name, value in fields.items():
        setattr(out, name, value)
    return out


def prefill_only(md):
    """The metadata with its decode half removed (row offsets kept: num_decode_tokens stays)."""
    return _narrow(md, num_decodes=0, decode=None)


def decode_only(md):
    """The metadata with its prefill half removed."""
    return _narrow(md, num_prefills=0, num_prefill_tokens=0, prefill=None)


def chunk_requests(chunk, ks: torch.Tensor) -> torch.Tensor:
    """Block-table row (request in the chunk) of each query from its ``cu_seqlen_ks``.

    A query's ks is its request's start ``cu_seq_lens[r]`` in the chunk's gathered keys; the
    number of requests ending at or before it is r (empty requests end where they start).
    """
    return torch.searchsorted(chunk.cu_seq_lens[1:].contiguous(), ks.contiguous(), right=True)


def decode_token_grid(md) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, positions, request rows, valid) of the decode half, each [rows, next_n].

    With one row per query (plain decode, or vLLM's flattened speculative rows) a row's
    ``seq_lens`` is its query's position + 1. With native next_n > 1 rows (b, j) hold request
    b's j-th decode token when ``j < decode_lens[b]``, at position
    ``seq_lens_common[b] - decode_lens[b] + j``. Device ops only, fixed shapes.
    """
    dec = md.decode
    seq_lens = dec.seq_lens if dec.seq_lens.dim() == 2 else dec.seq_lens.unsqueeze(1)
    n_tok = md.num_decode_tokens
    dev = seq_lens.device
    if seq_lens.shape[1] == 1:
        tok = torch.arange(n_tok, device=dev).unsqueeze(1)
        pos = seq_lens[:n_tok].long() - 1
        return tok, pos, tok.clone(), pos >= 0
    rows, n = dec.decode_lens.shape[0], seq_lens.shape[1]
    d = dec.decode_lens.long()
    start = torch.cumsum(d, 0) - d
    j = torch.arange(n, device=dev)
    tok = start.unsqueeze(1) + j
    valid = j < d.unsqueeze(1)
    pos = md.seq_lens[:rows].long().unsqueeze(1) - d.unsqueeze(1) + j
    req = torch.arange(rows, device=dev).unsqueeze(1).expand(rows, n)
    return torch.where(valid, tok, 0), torch.where(valid, pos, -1), req, valid


def vllm_step_tokens(md, num_pages: int, *, capturing: bool = False) -> list[StepTokens]:
    """The step's tokens to pool (per prefill chunk, and the decode rows), built once per step
    and kept on the metadata object, which vLLM builds afresh every step and shares between the
    layers of a KV-cache group: every indexer layer after the first only gathers and appends.

    ``capturing``: whether this call runs under CUDA-graph capture. The kept tokens are reused
    only by a call on the same side of a capture: tensors derived eagerly are constants to a
    graph (a replay would pool the warm-up step's tokens again, never a block that completes at
    a later step), and tensors derived inside a capture hold their values only at replay.
    Within one capture the layers share them, as eagerly.

    Prefill positions come from the chunk windows (``ke - ks - 1``: with compress ratio 1 and
    no DCP, ``ke - ks`` is the query's causal length), decode positions from
    :func:`decode_token_grid`. The slots are the step's ``slot_mapping``.
    """
    key = (num_pages, capturing)
    cached = getattr(md, "_hisa_step_tokens", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    slots, out = md.slot_mapping, []
    if md.num_prefills > 0 and md.prefill is not None:
        for chunk in md.prefill.chunks:
            ks, ke = chunk.cu_seqlen_ks, chunk.cu_seqlen_ke
            out.append(step_tokens(slots[chunk.token_start:chunk.token_end],
                                   ke.long() - ks.long() - 1, chunk.block_table,
                                   chunk_requests(chunk, ks), num_pages))
    if md.num_decodes > 0 and md.decode is not None and md.num_decode_tokens > 0:
        tok, pos, req, valid = decode_token_grid(md)
        slot = torch.where(valid, slots[tok.clamp_max(max(slots.shape[0] - 1, 0))].long(), -1)
        out.append(step_tokens(slot.flatten(), pos.flatten(),
                               md.decode.block_table[:tok.shape[0]], req.flatten(), num_pages))
    keep_on(md, "_hisa_step_tokens", (key, out))
    return out


def pool_vllm_step(pages: torch.Tensor, pooled: torch.Tensor, md, *, head_dim: int,
                   options: PluginOptions, capturing: bool = False) -> None:
    """Pool the blocks this step completed, for every prefill chunk and the decode rows
    (``capturing`` as in :func:`vllm_step_tokens`)."""
    for tokens in vllm_step_tokens(md, pages.shape[0], capturing=capturing):
        pool_step(pages, pooled, tokens, head_dim=head_dim, block_size=options.block_size,
                  backend=options.backend)


def chunk_layout(chunk, options: PluginOptions) -> RequestLayout:
    """The chunk's request layout (:func:`packed_request_layout` of its ``cu_seq_lens``),
    built by the step's first indexer layer and kept on the chunk like its windows
    (:func:`chunk_windows`), for the same block size and key total."""
    total = int(chunk.total_seq_lens)
    kept = getattr(chunk, "_hisa_request_layout", None)
    if kept is not None and (kept.block_size, kept.total) == (options.block_size, total):
        return kept
    layout = packed_request_layout(chunk.cu_seq_lens, total=total,
                                   block_size=options.block_size, backend=options.backend)
    keep_on(chunk, "_hisa_request_layout", layout)
    return layout


def chunk_windows(chunk, keys, topk: int, options: PluginOptions) -> PrefillWindows:
    """The chunk's :func:`prefill_windows`, built by the step's first indexer layer (the one
    host read of the windows) and kept on the chunk, which vLLM builds afresh every step and
    shares between the layers (as :func:`vllm_step_tokens` relies on): every later layer
    calls the indexer op with their plan and no host sync, so the host runs ahead of the GPU
    instead of draining it once per layer. Kept windows are reused only for the same key
    buffer size, page count, top-k and options (:class:`PrefillWindows` ``key``).
    """
    kept = getattr(chunk, "_hisa_prefill_windows", None)
    if kept is not None and kept.key == windows_key(keys, topk, options):
        return kept
    ks, ke = chunk.cu_seqlen_ks, chunk.cu_seqlen_ke
    if resolve_backend(options.backend, ks.device) == "triton":
        # One launch for every query's request, aligned window and bad-page poison.
        from ..cache.chunk_windows import chunk_windows_triton
        aligned = chunk_windows_triton(chunk.cu_seq_lens, ks, ke, keys.starts, keys.bad_pages)
        windows = planned_windows(keys, *aligned, topk=topk, options=options)
    else:
        windows = prefill_windows(keys, ke - ks, chunk_requests(chunk, ks), topk=topk,
                                  options=options)
    keep_on(chunk, "_hisa_prefill_windows", windows)
    return windows


def run_prefill(call: dict, md, pages: torch.Tensor, engine, options: PluginOptions) -> None:
    """HISA (or flat) top-k of every prefill chunk into ``topk_indices_buffer``.

    Keys are gathered per chunk request-aligned (:func:`gather_request_keys`); a chunk that
    continues the previous one's requests (the engine's ``skip_kv_gather``) reuses them. With
    vLLM's TP prefill row sharding each rank scores its rows, then the engine's exchange runs.
    """
    buf, topk, D = call["topk_indices_buffer"], call["topk_tokens"], call["head_dim"]
    q_all, w_all = call["q_quant"], call["weights"]
    shard = engine.row_shard(md.prefill, md.num_decode_tokens)
    keys = None
    for chunk in md.prefill.chunks:
        if keys is None or not chunk.skip_kv_gather:
            layout = chunk_layout(chunk, options)
            keys = gather_request_keys(pages, chunk.block_table, layout.lens,
                                       total=int(chunk.total_seq_lens), head_dim=D,
                                       block_size=options.block_size, backend=options.backend,
                                       layout=layout)
            if shard is not None:
                # A rank whose rows all lie elsewhere calls no indexer op, which is where a
                # bad page is named: every rank must raise before the exchange (one sync).
                keys.raise_if_bad_pages()
        start, end = chunk.token_start, chunk.token_end
        ks, ke = chunk.cu_seqlen_ks, chunk.cu_seqlen_ke
        if shard is not None:
            narrowed = shard.narrow(chunk)
            if narrowed is None:
                continue
            start, end, ks, ke = narrowed
        if end <= start:
            continue
        if int(chunk.total_seq_lens) == 0:
            buf[start:end, :topk] = -1
            continue
        out = rows_view(buf, start, end, topk)
        if shard is None:
            idx = prefill_select(q_all[start:end], w_all[start:end], None, None, keys,
                                 topk=topk, options=options, out=out,
                                 windows=chunk_windows(chunk, keys, topk, options))
        else:
            idx = prefill_select(q_all[start:end], w_all[start:end], ke - ks,
                                 chunk_requests(chunk, ks), keys, topk=topk, options=options,
                                 out=out)
        if out is None:
            buf[start:end, :topk] = idx
    if shard is not None:
        shard.exchange_topk(buf, topk)


def pack_decode_rows(q: torch.Tensor, weights: torch.Tensor, decode_lens: torch.Tensor,
                     next_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                           torch.Tensor]:
    """Rows of uneven decode requests padded to ``next_n``: (q [B, next_n, H, D], weights
    [B * next_n, H], token of each row [B * next_n], valid [B * next_n]); pad rows are zero.

    vLLM 0.33.0 packs q this way but passes the weights unpacked (``weights[:B * next_n]``),
    pairing some rows with another token's weights; the plugin packs both.
    """
    d = decode_lens.long()
    start = torch.cumsum(d, 0) - d
    j = torch.arange(next_n, device=q.device)
    valid = (j < d.unsqueeze(1)).flatten()
    tok = (start.unsqueeze(1) + j).flatten()
    tok = torch.where(valid, tok, 0)
    q_rows = torch.where(valid.view(-1, 1, 1), q.view(torch.uint8)[tok], 0)
    w_rows = torch.where(valid.view(-1, 1), weights[tok], 0.0)
    B = decode_lens.shape[0]
    return (q_rows.view(FP8_DTYPE).view(B, next_n, *q.shape[1:]), w_rows, tok, valid)


def run_decode(call: dict, md, pages: torch.Tensor, pooled: torch.Tensor | None,
               options: PluginOptions) -> None:
    """HISA (or flat) top-k of the decode rows into ``topk_indices_buffer``.

    Mirrors the engine's row assembly: uniform rows reshape ``q_quant[:num_decode_tokens]`` to
    [B, next_n, H, D] (CUDA-graph safe: fixed shapes, no host sync); uneven rows (the engine's
    ``requires_padding``, an eager path in vLLM too) are packed and unpacked by token.
    """
    dec, n_tok = md.decode, md.num_decode_tokens
    if n_tok == 0:
        return
    buf, topk = call["topk_indices_buffer"], call["topk_tokens"]
    q_all, w_all = call["q_quant"], call["weights"]
    seq_lens = dec.seq_lens if dec.seq_lens.dim() == 2 else dec.seq_lens.unsqueeze(1)
    rows = dec.decode_lens.shape[0]
    uneven = bool(dec.requires_padding) or n_tok % rows != 0
    if uneven:
        q, w, tok, valid = pack_decode_rows(q_all[:n_tok], w_all[:n_tok], dec.decode_lens,
                                            seq_lens.shape[1])
    else:
        q = q_all[:n_tok].reshape(rows, n_tok // rows, *q_all.shape[1:])
        w = w_all[:n_tok]
    out = None if uneven else rows_view(buf, 0, n_tok, topk)
    idx = decode_select(q, pages, pooled, w, seq_lens[:rows].contiguous(),
                        dec.block_table[:rows], topk=topk, options=options, out=out)
    if uneven:
        buf[tok[valid], :topk] = idx[valid]
    elif out is None:
        buf[:n_tok, :topk] = idx


def run_indexer(call: dict, md, engine, options: PluginOptions,
                registry: PooledCacheRegistry = POOLED) -> torch.Tensor:
    """The replacement of vLLM's ``sparse_attn_indexer`` for one layer's call, with the CUDA
    device of the layer's cache current (every launch of the call on one device and stream:
    the prefill chunk's layout and windows launches are not public ops of their own)."""
    with on_device_of(call["kv_cache"]):
        return _run_indexer(call, md, engine, options, registry)


def _run_indexer(call: dict, md, engine, options: PluginOptions,
                 registry: PooledCacheRegistry) -> torch.Tensor:
    """:func:`run_indexer` on the current device.

    ``md`` is the layer's ``DeepseekV32IndexerMetadata``. ``engine`` provides ``original(call,
    md)`` (the engine's own function, with the metadata narrowed to one half when given),
    ``insert_keys(...)``, ``capturing()``, ``static_reason(call)``, ``decode_reason()``,
    ``row_shard(prefill, num_decode_tokens)`` and ``dense_mha_skip(call)`` (see
    :class:`VllmEngine`).

    Order: (1) the engine's key insert when the call asks for it, (2) pooling of the blocks this
    step completed, (3) the engine's dense-MHA early exit, (4) clearing the rows to -1, (5)
    prefill and (6) decode, each by HISA or, with a logged reason, by the engine's own path.
    """
    buf = call["topk_indices_buffer"]
    reason = call_reason(call, md) or engine.static_reason(call)
    if reason is not None:
        log_fallback(ENGINE, "indexer", reason)
        return engine.original(call, None)
    topk, D = call["topk_tokens"], call["head_dim"]
    pages = as_engine_pages(call["kv_cache"], D)
    if not call["skip_k_cache_insert"]:
        n = md.slot_mapping.shape[0]
        engine.insert_keys(call["k"][:n], call["kv_cache"], md.slot_mapping,
                           call["quant_block_size"], call["scale_fmt"])
        call = {**call, "skip_k_cache_insert": True}
    pooled = None
    engine_off = engine.decode_reason()
    if options.decode and options.mode == "hisa" and engine_off is None:
        capturing = engine.capturing()
        pooled = registry.get_or_create(pages, D, capturing=capturing)
        if pooled is not None:
            pool_vllm_step(pages, pooled, md, head_dim=D, options=options,
                           capturing=capturing)
    if engine.dense_mha_skip(call):
        return buf
    if not call["skip_topk_buffer_clear"]:
        buf[:call["hidden_states"].shape[0]] = -1
        call = {**call, "skip_topk_buffer_clear": True}
    if md.num_prefills > 0 and md.prefill is not None:
        why = options_reason(options, topk, "prefill")
        if why is None:
            run_prefill(call, md, pages, engine, options)
        else:
            log_fallback(ENGINE, "prefill", why)
            engine.original(call, prefill_only(md))
    if md.num_decodes > 0 and md.decode is not None:
        why = options_reason(options, topk, "decode")
        if why is None and options.mode == "hisa":
            why = engine_off
        if why is None and options.mode == "hisa" and pooled is None:
            why = registry.stale_reason(pages) or "no pooled cache for this layer"
        if why is None:
            run_decode(call, md, pages, pooled, options)
        else:
            log_fallback(ENGINE, "decode", why)
            engine.original(call, decode_only(md))
    return buf


class VllmEngine:
    """The engine operations :func:`run_indexer` needs, from vLLM 0.33.0 (imported lazily)."""

    def __init__(self, raw_fn) -> None:
        from vllm.config import CUDAGraphMode
        from vllm.forward_context import get_forward_context
        from vllm.model_executor.layers import sparse_attn_indexer as layer
        from vllm.platforms import current_platform
        from vllm.utils.deep_gemm import mqa_logits_use_mx_scales
        from vllm.utils.torch_utils import _resolve_layer_name

        self._raw, self._layer = raw_fn, layer
        self._full = CUDAGraphMode.FULL
        self._context, self._resolve = get_forward_context, _resolve_layer_name
        self._platform, self._mx = current_platform, mqa_logits_use_mx_scales

    def metadata(self, call: dict):
        """The layer's indexer metadata, or None in a profiling run (no metadata dict)."""
        md = self._context().attn_metadata
        if not isinstance(md, dict):
            return None
        return md[self._resolve(call["k_cache_prefix"])]

    def original(self, call: dict, md):
        if md is None:
            return self._raw(**call)
        table = self._context().attn_metadata
        name = self._resolve(call["k_cache_prefix"])
        saved, table[name] = table[name], md
        try:
            return self._raw(**call)
        finally:
            table[name] = saved

    def insert_keys(self, k, kv_cache, slot_mapping, quant_block_size, scale_fmt) -> None:
        from vllm import _custom_ops as ops
        ops.indexer_k_quant_and_cache(k, kv_cache, slot_mapping, quant_block_size, scale_fmt)

    def capturing(self) -> bool:
        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()

    def static_reason(self, call: dict) -> str | None:
        if not self._platform.is_cuda():
            return "not a CUDA platform"
        if self._mx():
            return "SM100 MX-scaled indexer cache (packed UE8M0 scales, not fp32)"
        return None

    def decode_reason(self) -> str | None:
        return DECODE_OFF[0]

    def row_shard(self, prefill_md, num_decode_tokens: int):
        return self._layer.PrefillRowShard.from_metadata(prefill_md, num_decode_tokens)

    def dense_mha_skip(self, call: dict) -> bool:
        fc = self._context()
        if fc.cudagraph_runtime_mode == self._full:
            return False
        name = self._resolve(call["dense_mha_metadata_layer_name"])
        if not name:
            return False
        mla = fc.attn_metadata.get(name)
        pre = getattr(mla, "prefill", None)
        return (bool(getattr(pre, "use_dense_mha", False)) and
                getattr(mla, "num_decode_tokens", -1) == 0 and not self.capturing())


def make_replacement(raw_fn, options: PluginOptions, engine=None):
    """The function that takes ``sparse_attn_indexer``'s place (undecorated; see install)."""
    engine = engine if engine is not None else VllmEngine(raw_fn)

    def sparse_attn_indexer(*args, **kwargs):
        call = bind_call(args, kwargs)
        md = engine.metadata(call)
        if md is None:
            return raw_fn(**call)
        return run_indexer(call, md, engine, options)

    sparse_attn_indexer.__wrapped__ = raw_fn
    sparse_attn_indexer.hisa_options = options
    return sparse_attn_indexer


def rebind(original, replacement) -> int:
    """Point every loaded module attribute that holds ``original`` at ``replacement``."""
    count = 0
    for mod in list(sys.modules.values()):
        try:
            items = list(vars(mod).items())
        except TypeError:
            continue
        for name, value in items:
            if value is original:
                setattr(mod, name, replacement)
                count += 1
    return count


def install(layer_module, options: PluginOptions) -> None:
    """Replace ``sparse_attn_indexer`` in vLLM's layer module and register the OOT class."""
    from vllm.compilation.breakable_cudagraph import eager_break_during_capture
    from vllm.utils.torch_utils import direct_register_custom_op
    from vllm.platforms import current_platform

    original = layer_module.sparse_attn_indexer
    if getattr(original, "hisa_options", None) is not None:
        return
    raw = getattr(original, "__wrapped__", original)
    replacement = eager_break_during_capture(make_replacement(raw, options))
    replacement.hisa_options = options
    rebind(original, replacement)
    layer_module.sparse_attn_indexer = replacement
    logger.info("hisa: vLLM sparse_attn_indexer replaced by HISA (%s)", options)

    def hisa_sparse_attn_indexer_op(*args, **kwargs):
        return replacement(*args, **kwargs)

    hisa_sparse_attn_indexer_op.__signature__ = inspect.signature(raw)
    direct_register_custom_op(op_name="hisa_sparse_attn_indexer",
                              op_func=hisa_sparse_attn_indexer_op,
                              mutates_args=["topk_indices_buffer", "candidate_blocks"],
                              fake_impl=layer_module.sparse_attn_indexer_fake,
                              dispatch_key=current_platform.dispatch_key)
    _register_oot_class(layer_module)


def _register_oot_class(layer_module) -> None:
    """``SparseAttnIndexer`` subclass whose CUDA forward calls the replacement's custom op."""
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.utils.torch_utils import _encode_layer_name

    base = layer_module.SparseAttnIndexer
    if base.__name__ in op_registry_oot:
        return

    class HisaSparseAttnIndexer(base):
        """Built for every indexer layer (DeepseekV32Indexer constructs the class even where
        the model calls the function), while vLLM's configuration is current."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            from vllm.config import get_current_vllm_config
            record_config(get_current_vllm_config())

        def forward_cuda(self, hidden_states, q_quant, k, weights):
            q_values, q_scale = q_quant if isinstance(q_quant, tuple) else (q_quant, None)
            return torch.ops.vllm.hisa_sparse_attn_indexer(
                hidden_states, _encode_layer_name(self.k_cache.prefix), self.k_cache.kv_cache,
                q_values, q_scale, k, weights, self.quant_block_size, self.scale_fmt,
                self.topk_tokens, self.head_dim, self.max_model_len, self.max_total_seq_len,
                self.topk_indices_buffer, self.skip_k_cache_insert, self.use_pcp,
                self.pcp_shard_decode_requests,
                _encode_layer_name(self.dense_mha_metadata_layer_name), self.use_fp4_cache,
                self.dcp_rank, self.dcp_world_size,
                self._parallel_config.cp_kv_cache_interleave_size, False,
                candidate_blocks=self.candidate_blocks,
                candidate_block_size=self.candidate_block_size,
                candidate_write=self.candidate_write, topk_backend=self.topk_backend)

    base.register_oot(HisaSparseAttnIndexer)


def record_config(vllm_config) -> None:
    """Engine features that write indexer pages behind the forward pass turn decode off."""
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        DECODE_OFF[0] = ("a KV connector (transfer or CPU offloading) writes cache pages "
                         "outside the forward pass; pooled rows would not follow them")


def register() -> None:
    """``vllm.general_plugins`` entry point (runs in every vLLM process; idempotent).

    Does nothing unless ``HISA_VLLM`` is set. Otherwise checks the vLLM version (the hook is
    pinned to 0.33.0 and raises RuntimeError on another) and installs the replacement when
    vLLM's layer module is imported (at once if it already is): the API-server process never
    imports model code, so it never pays for it.
    """
    options = parse_options(ENV_VAR, os.environ.get(ENV_VAR))
    if options is None:
        return
    import vllm
    version = getattr(vllm, "__version__", "unknown")
    if version.split("+")[0] != PINNED_VERSION:
        raise RuntimeError(f"{ENV_VAR} is set but the installed vLLM is {version}; the HISA "
                           f"plugin is written and tested against vLLM {PINNED_VERSION} only")
    after_import(LAYER_MODULE, lambda module: install(module, options))
