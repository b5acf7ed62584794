"""Restatements of what vLLM 0.33.0 and SGLang 0.5.23 do around the indexer, for the contract
tests: their quantize-and-cache layout and their gather (as their own tests define them), their
flat selection semantics (plain fp32 loops, no shared code with hisa), and builders of their
metadata objects with the fields the plugins read. Written from the engines' source, in this
project's words; the drift tests check the field names and layouts against the installed files.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

PAGE = 64
D = 128
ROW = D + 4
FP8 = torch.float8_e4m3fn


# --- the indexer K cache --------------------------------------------------------------------

def new_cache(num_pages: int) -> torch.Tensor:
    """vLLM's bound indexer cache: uint8 [P, 64, 132] (a 3-D view of dense pages)."""
    return torch.zeros(num_pages, PAGE, ROW, dtype=torch.uint8)


def engine_quant_and_cache(kv_cache: torch.Tensor, k: torch.Tensor, slots: torch.Tensor) -> None:
    """The engines' ``indexer_k_quant_and_cache`` with ``scale_fmt="ue8m0"``, quant block 128:
    per token scale = 2 ** ceil(log2(max(amax, 1e-4) / 448)), values x / scale cast to e4m3;
    page ``s // 64`` holds the 64 tokens' values first (token-major, D bytes each) then their
    64 fp32 scales; negative slots are skipped (padding)."""
    flat = kv_cache.view(kv_cache.shape[0], -1)                       # [P, 64 * 132]
    kf = k.float()
    scale = torch.exp2(torch.ceil(torch.log2(kf.abs().amax(1).clamp_min(1e-4) / 448.0)))
    vals = (kf / scale[:, None]).clamp(-448, 448).to(FP8).view(torch.uint8)   # [T, D]
    keep = slots >= 0
    page, off = slots[keep] // PAGE, slots[keep] % PAGE
    cols = off[:, None] * D + torch.arange(D, device=flat.device)
    flat[page[:, None], cols] = vals[keep]
    scols = PAGE * D + off[:, None] * 4 + torch.arange(4, device=flat.device)
    flat[page[:, None], scols] = scale[keep].contiguous().view(torch.uint8).view(-1, 4)


def engine_read(kv_cache: torch.Tensor, pages: torch.Tensor, offs: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 values [n, D], fp32 scales [n]) of cached tokens at (page, offset) pairs."""
    flat = kv_cache.reshape(kv_cache.shape[0], -1)
    pages, offs = pages.long(), offs.long()
    vals = flat[pages[:, None], offs[:, None] * D + torch.arange(D, device=flat.device)]
    sc = flat[pages[:, None], PAGE * D + offs[:, None] * 4 + torch.arange(4, device=flat.device)]
    return vals.contiguous().view(FP8), sc.contiguous().view(torch.float32).view(-1)


def engine_gather(kv_cache: torch.Tensor, block_table: torch.Tensor, cu_seq_lens: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``cp_gather_indexer_k_quant_cache``: request r's position i goes to row cu[r] + i, from
    page ``block_table[r, i // 64]`` offset ``i % 64``. Returns (fp8 [S, D], fp32 [S])."""
    pages, offs = [], []
    for r in range(block_table.shape[0]):
        pos = torch.arange(int(cu_seq_lens[r + 1] - cu_seq_lens[r]))
        pages.append(block_table[r, pos // PAGE])
        offs.append(pos % PAGE)
    if not pages:
        return torch.zeros(0, D).to(FP8), torch.zeros(0)
    return engine_read(kv_cache, torch.cat(pages), torch.cat(offs))


# --- flat selection as the engines compute it ------------------------------------------------

def mqa_logits(q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """logits[t, s] = sum_h w[t, h] * relu(q[t, h] . key[s]) with dequantized fp32 keys."""
    return torch.einsum("th,ths->ts", w.float(),
                        torch.relu(torch.einsum("thd,sd->ths", q.float(), keys.float())))


def topk_rows(logits: torch.Tensor, lengths: torch.Tensor, topk: int) -> torch.Tensor:
    """Top-k column of each row among its first ``lengths[t]`` columns, -1 padded (the
    engines' ``top_k_per_row`` with row_starts = 0, row_ends = lengths)."""
    out = torch.full((logits.shape[0], topk), -1, dtype=torch.int32)
    for t in range(logits.shape[0]):
        n = int(lengths[t])
        if n <= 0:
            continue
        kk = min(topk, n)
        out[t, :kk] = torch.topk(logits[t, :n], kk).indices.to(torch.int32)
    return out


def request_keys(kv_cache, block_row, length) -> torch.Tensor:
    """fp32 dequantized keys [length, D] of one request."""
    pos = torch.arange(length)
    v, s = engine_read(kv_cache, block_row[pos // PAGE], pos % PAGE)
    return v.float() * s[:, None]


# --- a request-level model of a serving engine's paged state ---------------------------------

class Pages:
    """A shuffled free list of pages (the block manager)."""

    def __init__(self, num_pages: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(num_pages, generator=g).tolist()

    def take(self, n: int) -> list:
        out, self.free = self.free[:n], self.free[n:]
        return out

    def give(self, pages) -> None:
        """Freed pages go first in line (LIFO), so the tests' next allocation reuses them."""
        self.free = list(pages) + self.free


@dataclass
class Req:
    """One request: its raw keys (fp32, one per position) and pages; ``done`` keys cached."""

    keys: torch.Tensor
    pages: list = field(default_factory=list)
    done: int = 0

    def slots(self, start: int, stop: int) -> list:
        return [self.pages[p // PAGE] * PAGE + p % PAGE for p in range(start, stop)]

    def grow(self, alloc: Pages, upto: int) -> None:
        need = -(-upto // PAGE) - len(self.pages)
        if need > 0:
            self.pages += alloc.take(need)


def table(reqs, width: int) -> torch.Tensor:
    bt = torch.full((len(reqs), width), -1, dtype=torch.int32)
    for i, r in enumerate(reqs):
        bt[i, :len(r.pages)] = torch.tensor(r.pages, dtype=torch.int32)
    return bt


def random_keys(n: int, seed: int) -> torch.Tensor:
    """Keys with a slow drift so blocks differ (HISA has something to rank)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, D, generator=g)
    drift = torch.randn(n // 128 + 1, D, generator=g).repeat_interleave(128, 0)[:n]
    return k + 2.0 * drift


# --- vLLM 0.33.0 metadata ---------------------------------------------------------------------

@dataclass
class Step:
    """One engine step: decode requests (first) and prefill requests with their new tokens."""

    decodes: list            # [(Req, new_tokens)]
    prefills: list           # [(Req, new_tokens)]
    width: int | None = None   # block-table columns; default: the widest request, at least 16

    def __post_init__(self):
        for r, n in self.decodes + self.prefills:
            if not 1 <= n <= r.keys.shape[0] - r.done:
                raise ValueError(f"Step: expected 1 <= new tokens <= {r.keys.shape[0] - r.done} "
                                 f"(keys left in the request: {r.keys.shape[0]} keys, "
                                 f"{r.done} cached), got {n}")
        if self.width is None:
            self.width = max([16] + [len(r.pages) for r, _ in self.decodes + self.prefills])


def to_device(obj, device):
    """Move every tensor of a (nested) metadata namespace to ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, list):
        return [to_device(x, device) for x in obj]
    if isinstance(obj, SimpleNamespace):
        return SimpleNamespace(**{k: to_device(v, device) for k, v in vars(obj).items()})
    return obj


def vllm_step_metadata(step: Step, *, native_next_n: bool = True, chunk_budget: int | None = None,
                       query_split: int | None = None, pad_decodes: int = 0):
    """The indexer metadata vLLM's builder makes for ``step`` (CPU tensors), plus slots.

    ``native_next_n``: decode rows [B, next_n] (False: one row per token, the flattened path);
    ``chunk_budget``: most keys per prefill chunk (requests split into chunks like the
    builder); ``query_split``: most query rows per chunk (continuations set skip_kv_gather);
    ``pad_decodes``: CUDA-graph padding requests (seq_len 0, slot -1, one token each).
    """
    reqs = [r for r, _ in step.decodes] + [r for r, _ in step.prefills]
    new = [n for _, n in step.decodes] + [n for _, n in step.prefills]
    seq = [r.done + n for r, n in zip(reqs, new)]
    bt = table(reqs, step.width)
    slots = []
    for r, n in zip(reqs, new):
        slots += r.slots(r.done, r.done + n)
    nd = len(step.decodes)
    n_dec_tok = sum(new[:nd])
    if pad_decodes:
        slots = slots[:n_dec_tok] + [-1] * pad_decodes + slots[n_dec_tok:]
        bt = torch.cat([bt[:nd], torch.zeros(pad_decodes, step.width, dtype=torch.int32),
                        bt[nd:]])
        seq = seq[:nd] + [0] * pad_decodes + seq[nd:]
        new = new[:nd] + [1] * pad_decodes + new[nd:]
        nd += pad_decodes
        n_dec_tok += pad_decodes
    md = SimpleNamespace(seq_lens=torch.tensor(seq, dtype=torch.int32), max_seq_len=max(seq),
                         slot_mapping=torch.tensor(slots, dtype=torch.int64),
                         num_decodes=nd, num_decode_tokens=n_dec_tok,
                         num_prefills=len(step.prefills),
                         num_prefill_tokens=sum(new[nd:]), decode=None, prefill=None,
                         positions=None, block_table=bt)
    if nd:
        md.decode = _decode_md(bt[:nd], seq[:nd], new[:nd], native_next_n)
    if step.prefills:
        md.prefill = SimpleNamespace(chunks=_chunks(bt, seq, new, nd, n_dec_tok, chunk_budget,
                                                    query_split),
                                     max_prefill_seq_len=max(seq[nd:]), row_shard_sizes=None)
    return md


def _decode_md(bt, seq, new, native):
    dl = torch.tensor(new, dtype=torch.int32)
    m = max(new)
    if native:
        L = torch.tensor(seq, dtype=torch.int32).unsqueeze(1)
        sl = (L - m + 1 + torch.arange(m, dtype=torch.int32)).clamp_min(0).to(torch.int32)
        return SimpleNamespace(block_table=bt, seq_lens=sl, decode_lens=dl,
                               requires_padding=min(new) != m, schedule_metadata=None,
                               global_seq_lens=None, indices=None)
    lens, rows = [], []
    for b, (L, n) in enumerate(zip(seq, new)):
        for j in range(n):
            lens.append(L - n + j + 1 if L else 0)
            rows.append(b)
    return SimpleNamespace(block_table=bt[torch.tensor(rows)],
                           seq_lens=torch.tensor(lens, dtype=torch.int32).unsqueeze(1),
                           decode_lens=torch.ones(len(lens), dtype=torch.int32),
                           requires_padding=False, schedule_metadata=None, global_seq_lens=None,
                           indices=None)


def _chunks(bt, seq, new, nd, n_dec_tok, budget, query_split):
    chunks, r = [], nd
    qstart = n_dec_tok
    while r < len(seq):
        end, total = r, 0
        while end < len(seq) and (budget is None or total + seq[end] <= budget or end == r):
            total += seq[end]
            end += 1
        lens = seq[r:end]
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)
        ks, ke = [], []
        for i, (L, n) in enumerate(zip(lens, new[r:end])):
            for j in range(n):
                ks.append(int(cu[i]))
                ke.append(int(cu[i]) + L - n + j + 1)
        nq = len(ks)
        step = query_split or max(nq, 1)
        for q0 in range(0, max(nq, 1), step):
            q1 = min(nq, q0 + step)
            chunks.append(SimpleNamespace(
                block_table=bt[r:end], cu_seqlen_ks=torch.tensor(ks[q0:q1], dtype=torch.int32),
                cu_seqlen_ke=torch.tensor(ke[q0:q1], dtype=torch.int32), cu_seq_lens=cu,
                token_to_seq=torch.repeat_interleave(torch.arange(end - r, dtype=torch.int32),
                                                     torch.tensor(lens)),
                total_seq_lens=total, max_seqlen_k=max(lens), token_start=qstart + q0,
                token_end=qstart + q1, num_reqs=end - r, skip_kv_gather=q0 > 0,
                local_cu_seq_lens=cu, local_total_seq_lens=total,
                max_local_total_seq_lens=total, pcp_deinterleave_idx=None))
        qstart += nq
        r = end
    return chunks


def vllm_flat_reference(kv_cache, md, q, w, topk: int, buf: torch.Tensor) -> None:
    """What vLLM's own ``sparse_attn_indexer`` writes, restated in fp32: prefill rows the
    top-k of their compressed row (offsets from cu_seqlen_ks), decode rows the top-k positions
    of their request among ``seq_lens[b, j]`` keys; -1 elsewhere. (For uneven decode rows the
    weights are taken per token, as the plugin does; see pack_decode_rows.)"""
    if md.num_prefills and md.prefill is not None:
        for c in md.prefill.chunks:
            k8, sc = engine_gather(kv_cache, c.block_table, c.cu_seq_lens)
            keys = k8.float() * sc[:, None]
            ks, ke = c.cu_seqlen_ks.long(), c.cu_seqlen_ke.long()
            rows = torch.arange(c.token_start, c.token_end)
            for start in ks.unique().tolist():
                sel = ks == start
                t = rows[sel]
                lg = mqa_logits(q[t], keys[start:int(ke[sel].max())], w[t])
                buf[t, :topk] = topk_rows(lg, ke[sel] - start, topk)
    if md.num_decodes and md.decode is not None:
        rows = decode_rows(md)
        for b in sorted({v[0] for v in rows.values()}):
            toks = [t for t, v in rows.items() if v[0] == b]
            lens = torch.tensor([rows[t][2] for t in toks])
            keys = request_keys(kv_cache, md.decode.block_table[b], int(lens.max()))
            lg = mqa_logits(q[toks], keys, w[toks])
            buf[toks, :topk] = topk_rows(lg, lens, topk)


def decode_rows(md) -> dict:
    """token -> (block-table row, row in request, visible keys) of the decode half."""
    dec, out = md.decode, {}
    sl = dec.seq_lens
    if sl.shape[1] == 1:
        for t in range(md.num_decode_tokens):
            out[t] = (t, 0, int(sl[t, 0]))
        return out
    start = 0
    for b, n in enumerate(dec.decode_lens.tolist()):
        for j in range(n):
            out[start + j] = (b, j, int(sl[b, j]))
        start += n
    return out


class FakeVllmEngine:
    """The engine side of :func:`hisa.integrations.vllm.run_indexer` on the CPU: its own
    kernels are :func:`vllm_flat_reference`, its key insert :func:`engine_quant_and_cache`."""

    def __init__(self, md=None, *, capturing=False, reason=None, decode_off=None):
        self.md, self._capturing, self._reason = md, capturing, reason
        self.decode_off = decode_off
        self.original_calls = []

    def metadata(self, call):
        return self.md

    def original(self, call, md):
        md = md if md is not None else self.md
        self.original_calls.append(md)
        buf = call["topk_indices_buffer"]
        if not call["skip_k_cache_insert"]:
            self.insert_keys(call["k"][:md.slot_mapping.shape[0]], call["kv_cache"],
                             md.slot_mapping, 128, "ue8m0")
        if not call["skip_topk_buffer_clear"]:
            buf[:call["hidden_states"].shape[0]] = -1
        vllm_flat_reference(call["kv_cache"], md, call["q_quant"], call["weights"],
                            call["topk_tokens"], buf)
        return buf

    def insert_keys(self, k, kv_cache, slot_mapping, quant_block_size, scale_fmt):
        engine_quant_and_cache(kv_cache, k, slot_mapping)

    def capturing(self):
        return self._capturing

    def static_reason(self, call):
        return self._reason

    def row_shard(self, prefill_md, num_decode_tokens):
        return None

    def decode_reason(self):
        return self.decode_off

    def dense_mha_skip(self, call):
        return False


def vllm_call(kv_cache, md, q, w, *, topk, buf=None, k=None, skip_insert=True):
    """The keyword arguments DeepseekV32Attention passes to ``sparse_attn_indexer``."""
    from hisa.integrations.vllm import DEFAULTS
    T = q.shape[0]
    if buf is None:
        buf = torch.full((T + 3, topk + 8), 7777, dtype=torch.int32)   # wider than topk, poisoned
    call = dict(hidden_states=torch.zeros(T, 4), k_cache_prefix="layers.0.attn.indexer.k_cache",
                kv_cache=kv_cache, q_quant=q, q_scale=None, k=k, weights=w,
                quant_block_size=128, scale_fmt="ue8m0", topk_tokens=topk, head_dim=D,
                max_model_len=4096, total_seq_lens=4096, topk_indices_buffer=buf,
                skip_k_cache_insert=skip_insert, use_pcp=False, pcp_shard_decode_requests=False,
                dense_mha_metadata_layer_name="", **DEFAULTS)
    call["skip_topk_buffer_clear"] = False
    return call


def random_queries(T: int, H: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 q [T, H, D] and fp32 weights [T, H] with the q scale folded in (as the engines do)."""
    g = torch.Generator().manual_seed(seed)
    qf = torch.randn(T, H, D, generator=g)
    scale = qf.abs().amax(-1).clamp_min(1e-4) / 448.0
    q = (qf / scale[..., None]).clamp(-448, 448).to(FP8)
    w = torch.randn(T, H, generator=g) * H ** -0.5 * scale * D ** -0.5
    return q, w.float()


class VllmSim:
    """A vLLM-like engine on the CPU: pages, requests, and steps that write the step's keys
    with :func:`engine_quant_and_cache` (as the fused norm/rope kernel does before the indexer
    runs) and then call :func:`hisa.integrations.vllm.run_indexer` with the step's metadata."""

    def __init__(self, num_pages: int = 160, *, heads: int = 4, seed: int = 0,
                 device: str = "cpu"):
        from hisa.integrations._engine_common import PooledCacheRegistry
        self.device = torch.device(device)
        self.kv = new_cache(num_pages).to(self.device)
        self.alloc = Pages(num_pages, seed)
        self.registry = PooledCacheRegistry()
        self.heads, self.seed = heads, seed

    def request(self, length: int, seed: int, prefix: Req | None = None, shared: int = 0) -> Req:
        keys = random_keys(length, seed)
        req = Req(keys)
        if prefix is not None:                     # prefix-cache hit on `shared` full pages
            req.keys[:shared * PAGE] = prefix.keys[:shared * PAGE]
            req.pages = list(prefix.pages[:shared])
            req.done = shared * PAGE
        return req

    def step(self, decodes, prefills, options, *, topk: int, engine=None, **md_kwargs):
        for r, n in decodes + prefills:
            r.grow(self.alloc, r.done + n)
        md = to_device(vllm_step_metadata(Step(decodes, prefills), **md_kwargs), self.device)
        valid = md.slot_mapping >= 0
        keys = torch.cat([r.keys[r.done:r.done + n] for r, n in decodes + prefills])
        pads = int((~valid).sum())
        n_dec = sum(n for _, n in decodes)
        keys = torch.cat([keys[:n_dec], torch.zeros(pads, D), keys[n_dec:]]).to(self.device)
        engine_quant_and_cache(self.kv, keys, md.slot_mapping)
        self.seed += 1
        T = md.slot_mapping.shape[0]
        q, w = (x.to(self.device) for x in random_queries(T, self.heads, self.seed))
        call = vllm_call(self.kv, md, q, w, topk=topk)
        call["topk_indices_buffer"] = call["topk_indices_buffer"].to(self.device)
        engine = engine if engine is not None else FakeVllmEngine(md)
        engine.md = md
        from hisa.integrations.vllm import run_indexer
        run_indexer(call, md, engine, options, self.registry)
        for r, n in decodes + prefills:
            r.done += n
        return SimpleNamespace(buf=call["topk_indices_buffer"], md=md, q=q, w=w, call=call,
                               engine=engine)

    def free(self, req: Req) -> None:
        self.alloc.give(req.pages)
        req.pages, req.done = [], 0


# --- SGLang 0.5.23 ----------------------------------------------------------------------------

class Method:
    """Stand-in for SGLang's TopkTransformMethod members (the plugin reads ``.name``)."""

    def __init__(self, name):
        self.name = name


class SglMetadata:
    """The accessors of SGLang's ``DSAIndexerMetadata`` the plugin reads, over restated
    ``DSAMetadata`` fields (page_size, real_page_table, topk_indices_offset, ...)."""

    def __init__(self, *, ks, ke, token_to_batch, table, seq_lens, extend_lens, method,
                 expanded=None, offsets=None):
        self._ks, self._ke, self._tok, self._seq = ks, ke, token_to_batch, seq_lens
        self._extend, self._expanded = extend_lens, expanded
        self.topk_transform_method = Method(method)
        self.force_unfused_topk = False
        self.paged_mqa_ctx_lens_2d = None
        self.attn_metadata = SimpleNamespace(page_size=PAGE, real_page_table=table,
                                             page_table_1=None, topk_indices_offset=offsets,
                                             indexer_logical_page_table=None)

    def get_indexer_kvcache_range(self):
        return self._ks, self._ke

    def get_token_to_batch_idx(self):
        return self._tok

    def get_page_table_64(self):
        return self.attn_metadata.real_page_table

    def get_indexer_seq_len(self):
        return self._seq

    def get_indexer_seq_len_cpu(self):
        return self._seq.cpu()

    def get_seqlens_int32(self):
        return self._seq

    def get_seqlens_expanded(self):
        return self._expanded

    def get_dsa_extend_len_cpu(self):
        return list(self._extend)


class Mode:
    def __init__(self, kind):
        self.kind = kind

    def is_target_verify(self):
        return self.kind == "verify"

    def is_draft_extend_v2(self):
        return False

    def is_extend_without_speculative(self):
        return self.kind == "extend"

    def is_decode_or_idle(self):
        return self.kind == "decode"


class SglPool:
    """``DSATokenToKVPool``'s index-cache side: one uint8 [P, 64 * 132] buffer per layer, with
    the engine's retract offload (``get_cpu_copy`` / ``load_cpu_copy`` by token location) and
    ``move_kv_cache``, restated."""

    index_page_size = PAGE
    index_kpool = 1

    def __init__(self, num_pages):
        self.buf = torch.zeros(num_pages, PAGE * ROW, dtype=torch.uint8)

    def get_index_k_with_scale_buffer(self, layer_id):
        return self.buf

    def _token_bytes(self, locs):
        page, off = locs // PAGE, locs % PAGE
        vals = self.buf[page[:, None], off[:, None] * D + torch.arange(D)]
        sc = self.buf[page[:, None], PAGE * D + off[:, None] * 4 + torch.arange(4)]
        return vals, sc

    def _put(self, locs, vals, sc):
        page, off = locs // PAGE, locs % PAGE
        self.buf[page[:, None], off[:, None] * D + torch.arange(D)] = vals
        self.buf[page[:, None], PAGE * D + off[:, None] * 4 + torch.arange(4)] = sc

    def get_cpu_copy(self, indices, mamba_indices=None, req_pool_index=None):
        return {"kv": None, "index_k": self._token_bytes(indices.long())}

    def load_cpu_copy(self, cpu_copy, indices, mamba_indices=None, req_pool_index=None):
        self._put(indices.long(), *cpu_copy["index_k"])

    def move_kv_cache(self, tgt_loc, src_loc):
        self._put(tgt_loc.long(), *self._token_bytes(src_loc.long()))


class SglSim:
    """An SGLang-like engine on the CPU: requests in pages, extend and decode steps that store
    the step's keys (as ``_store_index_k_cache`` does) and then call the plugin's hooks."""

    def __init__(self, num_pages: int = 120, *, heads: int = 4, seed: int = 0, topk: int = 32):
        self.pool = SglPool(num_pages)
        self.alloc = Pages(num_pages, seed)
        self.heads, self.seed, self.topk = heads, seed, topk
        self.indexer = SimpleNamespace(index_topk=topk, num_init_tokens=0, num_local_tokens=0,
                                       dsa_enable_prefill_cp=False)
        self.original_calls = 0

    def store(self, reqs_new):
        slots, pos = [], []
        for r, n in reqs_new:
            r.grow(self.alloc, r.done + n)
            slots += r.slots(r.done, r.done + n)
            pos += list(range(r.done, r.done + n))
        keys = torch.cat([r.keys[r.done:r.done + n] for r, n in reqs_new])
        slots = torch.tensor(slots, dtype=torch.int64)
        engine_quant_and_cache(self.pool.buf.view(-1, PAGE, ROW), keys, slots)
        return slots, torch.tensor(pos, dtype=torch.int64)

    def extend(self, reqs_new, options, *, method="RAGGED", pad_rows=0):
        """An extend batch (prefix in cache, ``n`` new tokens each) through the ragged hook."""
        from hisa.integrations import sglang as plug
        slots, pos = self.store(reqs_new)
        seq = [r.done + n for r, n in reqs_new]
        cu = [0] + torch.tensor(seq).cumsum(0).tolist()
        ks, ke, tok = [], [], []
        for b, ((r, n), L) in enumerate(zip(reqs_new, seq)):
            for j in range(n):
                ks.append(cu[b])
                ke.append(cu[b] + L - n + j + 1)
                tok.append(b)
        T = len(ks)
        md = SglMetadata(ks=torch.tensor(ks, dtype=torch.int32),
                         ke=torch.tensor(ke, dtype=torch.int32),
                         token_to_batch=torch.tensor(tok, dtype=torch.int32),
                         table=table([r for r, _ in reqs_new], 16),
                         seq_lens=torch.tensor(seq, dtype=torch.int32),
                         extend_lens=[n for _, n in reqs_new], method=method,
                         offsets=torch.tensor([cu[b] for b in tok], dtype=torch.int32))
        fb = SimpleNamespace(out_cache_loc=slots, positions=pos, forward_mode=Mode("extend"))
        q, w = self.queries(T + pad_rows)
        out = plug.around_get_topk_ragged(self._original_ragged, self.indexer, False, fb, 0,
                                          q, w.unsqueeze(-1), md, None, options=options)
        for r, n in reqs_new:
            r.done += n
        return SimpleNamespace(out=out, md=md, q=q, w=w, fb=fb)

    def decode(self, reqs, options, *, next_n=1, pad_rows=0, expand_table=True):
        """Decode (next_n 1) or target-verify (next_n > 1) rows through the paged hook; the
        page table is expanded per row as the engine's own metadata does (``expand_table``)."""
        from hisa.integrations import sglang as plug
        slots, pos = self.store([(r, next_n) for r in reqs])
        seq = [r.done + next_n for r in reqs]
        rows = len(reqs) * next_n
        bt = table(reqs, 16).repeat_interleave(next_n if expand_table else 1, 0)
        expanded = torch.tensor([L - next_n + 1 + j for L in seq for j in range(next_n)],
                                dtype=torch.int32)
        md = SglMetadata(ks=None, ke=None, token_to_batch=None, table=bt,
                         seq_lens=torch.tensor(seq, dtype=torch.int32),
                         extend_lens=[next_n] * len(reqs), method="PAGED",
                         expanded=expanded)
        mode = Mode("decode" if next_n == 1 else "verify")
        fb = SimpleNamespace(out_cache_loc=slots, positions=pos, forward_mode=mode)
        q, w = self.queries(rows + pad_rows)
        out = plug.around_get_topk_paged(self._original_paged, self.indexer, fb, 0, q,
                                         w.unsqueeze(-1), md, options=options)
        for r in reqs:
            r.done += next_n
        return SimpleNamespace(out=out, md=md, q=q, w=w, fb=fb, lens=expanded)

    def queries(self, n):
        self.seed += 1
        return random_queries(n, self.heads, self.seed)

    def _original_ragged(self, indexer, dual, fb, layer_id, q, w, md, topk_result=None):
        self.original_calls += 1
        return torch.full((q.shape[0], indexer.index_topk), -2, dtype=torch.int32)

    def _original_paged(self, indexer, fb, layer_id, q, w, md):
        self.original_calls += 1
        return torch.full((q.shape[0], indexer.index_topk), -2, dtype=torch.int32)
