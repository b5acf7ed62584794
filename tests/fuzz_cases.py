"""Shape fuzzer shared by the CPU (interpreter) and GPU tiers: hypothesis draws valid shapes,
strides, windows, page tables, dtypes and non-finite values, and every public op is compared with
its reference on them.

Inputs are integer-valued (hisa.testing.inputs.make_exact_indexer_inputs, make_paged_inputs with
exact=True), so kernel and reference scores are bit-identical and the selections must be
identical, ties included. Where a stage's arithmetic cannot be exact (HISA's FP8 re-quantized
block means), the check falls back to the output contract, or to the regime where every block
is kept and HISA must equal the flat indexer exactly. A tier passes its sizes in a ``Profile``.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

try:
    from hypothesis import strategies as st
except ImportError:    # the check_* functions work without hypothesis; the strategies need it
    st = None

import hisa
from hisa.cache import PAGE_SIZE, PagedIndexerCache, pooled_views
from hisa.cache.factory import make_paged_inputs
from hisa.ops.dsa.naive import naive_topk
from hisa.ops.indexer.naive import eligible_blocks
from hisa.testing.compare import canonical_rows, check_index_format
from hisa.testing.inputs import make_exact_indexer_inputs

# Hypothesis (6.170 does) draws some integers from the constants of the project's modules in
# sys.modules, so a derandomized test draws another sequence once one more of them is imported.
# The public ops import their Triton modules on first use, inside the first check that needs
# them; imported here, every draw of a fuzz test sees the same modules whether or not checks
# ran before it, and tests/gpu/replay_fuzz.py lists the cases a run of its file draws.
try:
    import hisa.ops.dsa.decode_kernels  # noqa: F401,E402
    import hisa.ops.dsa.prefill  # noqa: F401,E402
    import hisa.ops.indexer.decode_kernels  # noqa: F401,E402
    import hisa.ops.indexer.decode_super  # noqa: F401,E402
    import hisa.ops.indexer.pipeline  # noqa: F401,E402
except ImportError:    # no triton: the checks cannot import these either
    pass

NAN, INF = float("nan"), float("inf")
POISON = -7
#: Pooled FP8 rows of non-exact appends: the fp32 block sum runs in another order than the
#: twin's, so a mean may move by an ulp and its FP8 value by one e4m3 step (2**-3 relative).
POOL_RTOL = 2.0 ** -3


@dataclass(frozen=True)
class Profile:
    """Sizes of one tier."""

    device: str
    max_keys: int            # longest packed sequence / request
    max_queries: int         # queries per packed sequence
    heads: tuple
    head_dims: tuple
    dtypes: tuple            # prefill q / k dtypes
    max_topk: int
    block_sizes: tuple       # prefill B (decode uses multiples of 64)
    #: topk / block_topk drawn from these sets instead of ranges (on a GPU each new value is a
    #: new kernel specialisation, compiled once; the interpreter compiles nothing)
    topks: tuple | None = None
    block_topks: tuple | None = None


def draw_topk(draw, p: Profile) -> int:
    return draw(st.sampled_from(p.topks) if p.topks else st.integers(1, p.max_topk))


def draw_block_topk(draw, p: Profile, topk: int, block_size: int) -> int:
    m = draw(st.sampled_from(p.block_topks) if p.block_topks else st.integers(2, 6))
    return max(m, -(-topk // block_size))


def strided(x: torch.Tensor, fill) -> torch.Tensor:
    """The same values with a non-unit innermost stride (every other element of a wider
    buffer whose other elements hold ``fill``)."""
    fp8 = x.dtype == torch.float8_e4m3fn
    wide = torch.full((*x.shape[:-1], 2 * x.shape[-1]), fill, device=x.device,
                      dtype=torch.float32 if fp8 else x.dtype).to(x.dtype)
    view = wide[..., ::2]
    view.copy_(x)
    return view


def inject(tensor: torch.Tensor, value: float, rng: random.Random, count: int = 3):
    """Put ``value`` at ``count`` random entries (fp8 through fp32)."""
    if tensor.numel() == 0:
        return tensor
    flat = tensor.float().flatten().clone()
    for _ in range(count):
        flat[rng.randrange(flat.numel())] = value
    return flat.view(tensor.shape).to(tensor.dtype)


def selected_match(got: torch.Tensor, want: torch.Tensor) -> None:
    # got may come from the GPU and want from the CPU twin: compare on the CPU.
    assert torch.equal(canonical_rows(got).cpu(), canonical_rows(want).cpu()), "selections differ"


def _prefill_cases(draw, p: Profile):
    n = draw(st.integers(1, 3))
    lens = [draw(st.integers(0, p.max_keys)) for _ in range(n)]
    qlens = [draw(st.integers(0, min(L, p.max_queries))) for L in lens]
    B = draw(st.sampled_from(p.block_sizes))
    topk = draw_topk(draw, p)
    m = draw_block_topk(draw, p, topk, B)
    return dict(lens=lens, qlens=qlens, heads=draw(st.sampled_from(p.heads)),
                dim=draw(st.sampled_from(p.head_dims)), dtype=draw(st.sampled_from(p.dtypes)),
                topk=topk, block_size=B, block_topk=m,
                strides=draw(st.sets(st.sampled_from(["q", "weights", "k_scale", "ks", "ke"]))),
                nonfinite=draw(st.sampled_from([None, ("q", NAN), ("k", NAN), ("k", INF),
                                                ("k_scale", INF), ("weights", NAN),
                                                ("weights", -INF)])),
                seed=draw(st.integers(0, 2**16)))


def prefill_cases(p: Profile):
    """Hypothesis strategy of prefill cases."""
    return st.composite(_prefill_cases)(p)


def check_prefill(case: dict, p: Profile) -> None:
    dtype = case["dtype"]
    inp = make_exact_indexer_inputs(case["lens"], heads=case["heads"], head_dim=case["dim"],
                                    dtype=dtype, query_lens=case["qlens"], device=p.device,
                                    seed=case["seed"])
    rng = random.Random(case["seed"])
    if case["nonfinite"] is not None:
        where, value = case["nonfinite"]
        fp8 = dtype == torch.float8_e4m3fn
        if where == "k_scale" and not fp8:
            where = "weights"
        if where == "k" and fp8 and math.isinf(value):
            value = NAN                                  # e4m3fn has no infinity
        if where == "k_scale":
            inp.k_scale = inject(inp.k_scale, value, rng)
        else:
            setattr(inp, where, inject(getattr(inp, where), value, rng))
    q, k, w, ks, ke, k_scale = inp.q, inp.k, inp.weights, inp.ks, inp.ke, inp.k_scale
    s = case["strides"]
    args = (strided(q, 0) if "q" in s else q, k, strided(w, 1e6) if "weights" in s else w,
            strided(ks, 0) if "ks" in s else ks, strided(ke, 0) if "ke" in s else ke)
    if k_scale is not None and "k_scale" in s:
        k_scale = strided(k_scale, 1e6)
    topk, T = case["topk"], q.shape[0]
    kw = dict(k_scale=k_scale, topk=topk)
    out = torch.full((T, topk), POISON, dtype=torch.int32, device=p.device)
    got, sc = hisa.dsa_index(*args, out=out, return_scores=True, backend="triton", **kw)
    want, want_sc = hisa.dsa_index(*inp.args(), return_scores=True, backend="torch", **kw)
    check_index_format(got, ks, ke, topk)
    selected_match(got, want)
    torch.testing.assert_close(sc.sort(1).values.cpu(), want_sc.sort(1).values.cpu(),
                               equal_nan=True, rtol=0, atol=0)
    hk = dict(kw, block_size=case["block_size"], block_topk=case["block_topk"])
    got = hisa.hisa_index(*args, backend="triton", **hk)
    check_index_format(got, ks, ke, topk, exact_count=False)
    if dtype == torch.float32:     # exact fp32 means: the pruned selections agree exactly
        selected_match(got, hisa.hisa_index(*inp.args(), backend="torch", **hk))
    # A query with at most m eligible blocks keeps them all and gets the flat set (contract
    # section 2), per query: a call in which no query prunes runs the flat kernels, so the
    # rows that test the pipeline are the non-pruning ones of a call in which others prune.
    first, end = eligible_blocks(ks, ke, case["block_size"])
    whole = (end - first <= case["block_topk"]).cpu()
    if bool(whole.any()):
        selected_match(got.cpu()[whole], want.cpu()[whole])


def _decode_cases(draw, p: Profile):
    batch = draw(st.integers(1, 3))
    B = draw(st.sampled_from([64, 128]))
    topk = draw_topk(draw, p)
    return dict(lens=[draw(st.integers(0, 2 * p.max_keys)) for _ in range(batch)],
                next_n=draw(st.sampled_from([1, 2])), two_d=draw(st.booleans()),
                heads=draw(st.sampled_from(p.heads)), dim=draw(st.sampled_from(p.head_dims)),
                q_dtype=draw(st.sampled_from([torch.float32, torch.float8_e4m3fn])),
                block_size=B, block_topk=draw_block_topk(draw, p, topk, B),
                topk=topk, extra_columns=draw(st.integers(0, 2)),
                strides=draw(st.sets(st.sampled_from(["weights", "seq_lens", "block_table"]))),
                nonfinite=draw(st.sampled_from([None, ("q", NAN), ("weights", INF),
                                                ("weights", NAN), ("k_scale", NAN)])),
                seed=draw(st.integers(0, 2**16)))


def decode_cases(p: Profile):
    """Hypothesis strategy of decode cases."""
    return st.composite(_decode_cases)(p)


def check_decode(case: dict, p: Profile) -> None:
    inp = make_paged_inputs(case["lens"], next_n=case["next_n"], heads=case["heads"],
                            head_dim=case["dim"], block_size=case["block_size"],
                            q_dtype=case["q_dtype"], seq_lens_2d=case["two_d"],
                            extra_columns=case["extra_columns"], seed=case["seed"],
                            device=p.device, exact=True)
    rng = random.Random(case["seed"])
    if case["nonfinite"] is not None:
        where, value = case["nonfinite"]
        if where == "k_scale":
            scales = inp.cache.kv_cache[:, PAGE_SIZE * case["dim"]:].view(torch.float32)
            used = inp.block_table[inp.block_table >= 0].long()
            if used.numel():
                scales[used[rng.randrange(used.numel())], rng.randrange(PAGE_SIZE)] = value
        elif where == "q" and case["q_dtype"] == torch.float32:
            inp.q = inject(inp.q, value, rng)
        else:
            inp.weights = inject(inp.weights, value, rng)
    s = case["strides"]
    w = strided(inp.weights, 1e6) if "weights" in s else inp.weights
    lens = strided(inp.seq_lens, 10**6) if "seq_lens" in s else inp.seq_lens
    bt = strided(inp.block_table, 10**6) if "block_table" in s else inp.block_table
    topk, rows = case["topk"], inp.weights.shape[0]
    kv, pooled = inp.cache.kv_cache, inp.cache.pooled_cache
    out = torch.full((rows, topk), POISON, dtype=torch.int32, device=p.device)
    got = hisa.dsa_index_paged(inp.q, kv, w, lens, bt, topk=topk, out=out, backend="triton")
    want = hisa.dsa_index_paged(*inp.args(), topk=topk, backend="torch")
    row_lens = inp.row_lengths()
    check_index_format(got, torch.zeros_like(row_lens), row_lens, topk)
    selected_match(got, want)
    hk = dict(topk=topk, block_size=case["block_size"], block_topk=case["block_topk"])
    got = hisa.hisa_index_paged(inp.q, kv, pooled, w, lens, bt, backend="triton", **hk)
    check_index_format(got, torch.zeros_like(row_lens), row_lens, topk, exact_count=False)
    blocks = -(-max(case["lens"]) // case["block_size"])
    if blocks <= case["block_topk"]:                     # every block kept: the flat set
        selected_match(got, want)


def _append_cases(draw, p: Profile):
    n = draw(st.integers(1, 3))
    return dict(lens=[draw(st.integers(0, 2 * p.max_keys)) for _ in range(n)],
                block_size=draw(st.sampled_from([64, 128])),
                dim=draw(st.sampled_from(p.head_dims)),
                fp8_input=draw(st.booleans()), ue8m0=draw(st.booleans()),
                max_chunk=draw(st.sampled_from([1, 7, 64, 200])), padding=draw(st.booleans()),
                strided_scale=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def append_cases(p: Profile):
    """Hypothesis strategy of append cases."""
    return st.composite(_append_cases)(p)


def check_append(case: dict, p: Profile) -> None:
    """Two caches driven by the same interleaved chunked appends, Triton and torch."""
    rng = random.Random(case["seed"])
    g = torch.Generator().manual_seed(case["seed"])
    D, B = case["dim"], case["block_size"]
    lens = case["lens"]
    n_pages = [-(-L // PAGE_SIZE) for L in lens]
    P = sum(n_pages) + 2
    perm = torch.randperm(P, generator=g).tolist()
    table = torch.full((len(lens), max(n_pages + [1]) + 1), -1, dtype=torch.int32)
    start = 0
    for r, n in enumerate(n_pages):
        table[r, :n] = torch.tensor(perm[start:start + n], dtype=torch.int32)
        start += n
    table = table.to(p.device)
    keys = [torch.randint(-4, 5, (L, D), generator=g).float().to(p.device) for L in lens]
    caches = [PagedIndexerCache(P, head_dim=D, block_size=B, ue8m0=case["ue8m0"],
                                device=p.device) for _ in range(2)]
    done = [0] * len(lens)
    while any(d < L for d, L in zip(done, lens)):
        ks, slots, pos, rows = [], [], [], []
        for r, L in enumerate(lens):
            if done[r] == L or rng.random() < 0.3:
                continue
            n = min(L - done[r], rng.randint(1, case["max_chunk"]))
            pr = torch.arange(done[r], done[r] + n, device=p.device)
            ks.append(keys[r][done[r]:done[r] + n])
            slots.append(table[r, pr // PAGE_SIZE].long() * PAGE_SIZE + pr % PAGE_SIZE)
            pos.append(pr)
            rows.append(torch.full((n,), r, dtype=torch.int32, device=p.device))
            done[r] += n
        if not ks:
            continue
        if case["padding"]:                             # padding tokens, as a padded batch
            ks.append(keys[0][:1] if lens[0] else torch.zeros(1, D, device=p.device))
            slots.append(torch.tensor([-1], device=p.device))
            pos.append(torch.tensor([0], device=p.device))
            rows.append(torch.zeros(1, dtype=torch.int32, device=p.device))
        k, sl, po, ri = torch.cat(ks), torch.cat(slots), torch.cat(pos), torch.cat(rows)
        k_scale = None
        if case["fp8_input"]:
            k, k_scale = hisa.quantize_fp8(k, ue8m0=case["ue8m0"])
            if case["strided_scale"]:
                k_scale = strided(k_scale, 1e6)
        for cache, backend in zip(caches, ("triton", "torch")):
            cache.append(k, sl, po, k_scale=k_scale, block_table=table, req_indices=ri,
                         backend=backend)
    a, b = caches
    assert torch.equal(a.kv_cache, b.kv_cache), "key pages differ"
    if case["ue8m0"]:       # power-of-two scales: exact block sums, identical pooled bytes
        assert torch.equal(a.pooled_cache, b.pooled_cache), "pooled rows differ"
    else:
        (va, sa), (vb, sb) = pooled_views(a.pooled_cache, D), pooled_views(b.pooled_cache, D)
        torch.testing.assert_close(sa, sb, rtol=1e-6, atol=0, equal_nan=True)
        fa = va.contiguous().view(torch.float8_e4m3fn).float() * sa[:, None]
        fb = vb.contiguous().view(torch.float8_e4m3fn).float() * sb[:, None]
        ok = ~torch.isnan(sb)
        if bool(ok.any()):
            torch.testing.assert_close(fa[ok], fb[ok], rtol=POOL_RTOL,
                                       atol=float(sb[ok].max()) * 2 ** -9)


def _quant_cases(draw):
    group = draw(st.sampled_from([16, 32, 64, 128]))
    return dict(rows=draw(st.integers(0, 6)), groups=draw(st.integers(1, 3)), group=group,
                default_group=draw(st.booleans()), ue8m0=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
                scale=draw(st.sampled_from([1e-6, 1.0, 300.0])),
                nonfinite=draw(st.sampled_from([None, NAN, INF])),
                seed=draw(st.integers(0, 2**16)))


def quant_cases():
    """Hypothesis strategy of quant cases."""
    return st.composite(_quant_cases)()


def check_quant(case: dict) -> None:
    g = torch.Generator().manual_seed(case["seed"])
    n = case["groups"] * case["group"]
    x = (torch.randn(case["rows"], n, generator=g) * case["scale"])
    if case["nonfinite"] is not None and x.numel():
        x[0, 0] = case["nonfinite"]
    x = x.to(case["dtype"])
    group = min(128, n) if case["default_group"] else case["group"]
    if case["default_group"] and n % group:
        return
    v, s = hisa.quantize_fp8(x, group_size=None if case["default_group"] else group,
                             ue8m0=case["ue8m0"])
    xs = x.float().reshape(case["rows"], n // group, group)
    amax = xs.abs().amax(-1) if x.numel() else torch.zeros(case["rows"], n // group)
    want = amax.clamp_min(1e-4) / 448
    if case["ue8m0"]:
        want = torch.exp2(torch.ceil(torch.log2(want)))
    s = s.reshape(want.shape)
    torch.testing.assert_close(s, want, rtol=0, atol=0, equal_nan=True)
    deq = v.float().reshape(xs.shape) * s.unsqueeze(-1)
    finite = torch.isfinite(s).unsqueeze(-1).expand_as(xs)
    # e4m3 keeps 3 mantissa bits: half an ulp is 2**-4 relative; subnormals step 2**-9 * scale
    err = (deq - xs).abs()[finite]
    bound = (xs.abs() * 2 ** -4 + s.unsqueeze(-1) * 2 ** -9).expand_as(xs)[finite]
    assert bool((err <= bound * (1 + 1e-6)).all())
    nan_groups = torch.isnan(s)
    assert bool((v.view(torch.uint8).reshape(xs.shape)[nan_groups] == 0x7F).all())


def _window_cases(draw):
    n = draw(st.integers(1, 5))
    q = [draw(st.integers(0, 9)) for _ in range(n)]
    extra = [draw(st.integers(0, 9)) for _ in range(n)]
    return dict(q=q, k=[a + b for a, b in zip(q, extra)], same=draw(st.booleans()),
                int64=draw(st.booleans()))


def window_cases():
    """Hypothesis strategy of window cases."""
    return st.composite(_window_cases)()


def check_windows(case: dict) -> None:
    dt = torch.int64 if case["int64"] else torch.int32
    cq = torch.tensor([0] + case["q"], dtype=torch.int64).cumsum(0).to(dt)
    k = case["q"] if case["same"] else case["k"]
    ck = torch.tensor([0] + k, dtype=torch.int64).cumsum(0).to(dt)
    ks, ke = hisa.windows_from_cu_seqlens(cq, None if case["same"] else ck)
    want_s, want_e, start = [], [], 0
    for ql, kl in zip(case["q"], k):
        for i in range(ql):
            want_s.append(start)
            want_e.append(start + kl - ql + i + 1)
        start += kl
    assert ks.dtype == ke.dtype == torch.int32
    assert ks.tolist() == want_s and ke.tolist() == want_e


def _sparse_cases(draw):
    return dict(T=draw(st.integers(0, 12)), Hq=draw(st.integers(1, 4)),
                S=draw(st.integers(1, 40)), K=draw(st.integers(1, 9)),
                Dk=draw(st.sampled_from([4, 8, 16])), Dv=draw(st.sampled_from([4, 8])),
                tile=draw(st.integers(1, 5)), seed=draw(st.integers(0, 2**16)))


def sparse_cases():
    """Hypothesis strategy of sparse cases."""
    return st.composite(_sparse_cases)()


def check_sparse(case: dict) -> None:
    import hisa.ops.sparse_attn.naive as sparse_naive
    g = torch.Generator().manual_seed(case["seed"])
    T, Hq, S, K, Dk, Dv = (case[x] for x in ("T", "Hq", "S", "K", "Dk", "Dv"))
    q = torch.randn(T, Hq, Dk, generator=g)
    k, v = torch.randn(S, Dk, generator=g), torch.randn(S, Dv, generator=g)
    ks = torch.randint(0, S, (T,), generator=g, dtype=torch.int32)
    idx = torch.full((T, K), -1, dtype=torch.int32)
    for t in range(T):
        n = int(torch.randint(0, min(K, S - int(ks[t])) + 1, (1,), generator=g))
        idx[t, :n] = torch.randperm(S - int(ks[t]), generator=g)[:n].to(torch.int32)
    cap = sparse_naive.NAIVE_TILE_BYTES
    sparse_naive.NAIVE_TILE_BYTES = 4 * K * (Dk + Dv + Hq) * case["tile"]   # tiles of `tile`
    try:
        got = hisa.sparse_attention_reference(q, k, v, idx, ks)
    finally:
        sparse_naive.NAIVE_TILE_BYTES = cap
    want = torch.zeros(T, Hq, Dv, dtype=torch.float64)
    for t in range(T):
        sel = (idx[t][idx[t] >= 0].long() + int(ks[t]))
        if sel.numel():
            logits = q[t].double() @ k[sel].double().T / math.sqrt(Dk)      # [Hq, n]
            want[t] = torch.softmax(logits, -1) @ v[sel].double()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def check_topk_reference(scores: torch.Tensor, topk: int) -> None:
    """naive_topk against a Python sort under the rule (positions marked outside excluded)."""
    from hisa.ops.dsa.naive import is_outside
    cols, _ = naive_topk(scores, topk)
    outside = is_outside(scores)
    for r in range(scores.shape[0]):
        row = scores[r].tolist()
        inside = [i for i in range(len(row)) if not outside[r, i]]
        order = sorted(inside, key=lambda i: (1, 0.0, i) if math.isnan(row[i])
                       else (0, -row[i], i))[:topk]
        assert cols[r][cols[r] >= 0].tolist() == order
