"""hisa.integrations.transformers on tiny random DSA models of the pinned transformers (CPU).

Two regimes: "covering" settings (m * B >= every context) where HISA must reproduce the stock
indexer exactly, so selections and logits equal the stock model's; "pruning" settings where it
must keep the stock format, equal the library's own hisa_index on the captured operands, and
differ from the stock selection only inside blocks it pruned.
"""
from __future__ import annotations

import functools
import subprocess
import sys
import types

import pytest
import torch

from hf_models import (MODEL_TYPES, PRIMARY, assert_topk_agrees, capture_indexers,
                       check_model_format, independent_scores, indexer_rope, indexers,
                       output_of, tiny_model, visible_sets, windows)

import hisa
from hisa.integrations import _transformers_cache as side_table
from hisa.integrations import _transformers_models as specs
from hisa.integrations.transformers import (PINNED_TRANSFORMERS, UnsupportedTransformersError,
                                            disable_hisa, enable_hisa, hisa_indexers)

transformers = pytest.importorskip("transformers")

#: m * B = 96 < the contexts below, so HISA prunes; (6 - 2) * 16 + 2 = 66 >= 64.
PRUNE = dict(block_size=16, block_topk=6)
#: Relative slack (of a row's largest |score|) for ties between fp32 implementations summing
#: 16 heads x 64 dims in different orders: a few ulps of the largest terms.
ROW_TIE_TOL = 1e-5
GEN_TOKENS = 36
TOPK = 64


@functools.lru_cache(maxsize=None)
def model(model_type: str, dtype=torch.float32, attn: str | None = None):
    return tiny_model(model_type, dtype=dtype, attn=attn)


def pinned(model_type: str) -> None:
    """Skip unless the installed code is the pinned one (test_pinned_code fails loudly then)."""
    try:
        specs.check_model_code(next(s for s in specs.MODELS if s.model_type == model_type))
    except UnsupportedTransformersError as e:
        pytest.skip(f"installed transformers is not the pinned {PINNED_TRANSFORMERS}: {e}")


@pytest.fixture(params=PRIMARY)
def model_type(request):
    pinned(request.param)
    return request.param


@pytest.fixture(params=list(MODEL_TYPES))
def any_model_type(request):
    pinned(request.param)
    return request.param


def cover(context: int) -> dict:
    """Settings whose m * B covers ``context`` keys, so HISA keeps every block; m >= 4 gives
    (m - 2) * 32 + 2 >= index_topk = 64. (No larger: the reference scores all m * B.)"""
    return dict(block_size=32, block_topk=max(4, -(-context // 32)))


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (batch, length), generator=g)


def run(m, **inputs):
    with torch.no_grad(), capture_indexers(m) as cap:
        out = m(**inputs)
    return output_of(out), cap.calls


def generate(m, input_ids, attention_mask=None, **kw):
    with torch.no_grad(), capture_indexers(m) as cap:
        out = m.generate(input_ids, attention_mask=attention_mask, max_new_tokens=GEN_TOKENS,
                         min_new_tokens=GEN_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, **kw)
    return out, cap.calls


def assert_same_calls(stock_calls, hisa_calls):
    assert len(stock_calls) == len(hisa_calls) > 0
    for a, b in zip(stock_calls, hisa_calls):
        check_model_format(b, TOPK)
        assert visible_sets(a) == visible_sets(b), "a visible selection differs from stock"


def flat_and_hisa(call, *, block_size, block_topk):
    """Per batch row: (base, ks, ke, flat dsa_index, hisa_index) on the captured operands,
    windows from the call's mask relative to the row's first visible key (where the adapter
    starts the row's blocks). The flat selection stands in for the stock indexer's (the
    covering and drift tests pin that they agree); it shares hisa_index's arithmetic and
    tie-breaking, so where HISA keeps every block the two are equal entry for entry."""
    q, w = call.operands()
    _, ks, ke = windows(call.mask)
    rows = []
    for b in range(q.shape[0]):
        seen = ke[b] > ks[b]
        base = int(ks[b][seen].min()) if bool(seen.any()) else 0
        n = int(ke[b].max()) - base if bool(seen.any()) else 0
        k = call.keys[b, base:base + n]
        rks = torch.where(seen, ks[b] - base, 0).int()
        rke = torch.where(seen, ke[b] - base, 0).int()
        flat = hisa.dsa_index(q[b], k, w[b], rks, rke, topk=TOPK, backend="torch")
        mine = hisa.hisa_index(q[b], k, w[b], rks, rke, topk=TOPK, block_size=block_size,
                               block_topk=block_topk, backend="torch")
        rows.append((base, rks, rke, flat, mine))
    return rows


def rel_sets(idx):
    return [set(r[r >= 0].tolist()) for r in idx]


def assert_matches_own_hisa(call, *, block_size, block_topk):
    """The adapter's output equals hisa_index on the captured q, k, w (pooled from scratch),
    and differs from the flat (stock) selection only in blocks HISA selected nothing from.
    Returns how many query rows differ from the flat selection."""
    vis = visible_sets(call)
    pruned_rows = 0
    for b, (base, rks, rke, flat, mine) in enumerate(flat_and_hisa(
            call, block_size=block_size, block_topk=block_topk)):
        got = [{p - base for p in s} for s in vis[b]]
        assert got == rel_sets(mine), f"batch row {b}: adapter != hisa_index on its operands"
        for s, (f, h) in enumerate(zip(rel_sets(flat), rel_sets(mine))):
            if f == h:
                continue
            pruned_rows += 1
            used = {p // block_size for p in h}
            assert len(used) <= block_topk
            stray = [p for p in f - h if p // block_size in used]
            assert not stray, f"row ({b}, {s}): stock keys {stray} missing from kept blocks"
    return pruned_rows


# --- covering settings: HISA is the stock indexer ---------------------------------------------

def test_prefill_covering_equals_stock(any_model_type):
    m, x = model(any_model_type), ids(2, 384)
    ref, stock = run(m, input_ids=x)
    with enable_hisa(m, **cover(384)):
        got, mine = run(m, input_ids=x)
    assert_same_calls(stock, mine)
    assert torch.equal(ref, got)


def test_generate_covering_equals_stock(any_model_type):
    if any_model_type == "hy_v4_vl":
        pytest.skip("the VL text tower has no LM head to generate with")
    m, x = model(any_model_type), ids(2, 150, seed=2)
    ref, stock = generate(m, x)
    with enable_hisa(m, **cover(150 + GEN_TOKENS)):
        got, mine = generate(m, x)
    assert_same_calls(stock, mine)
    assert torch.equal(ref.sequences, got.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ref.logits, got.logits))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_prefill_covering_equals_stock(model_type, padding_side):
    m, x = model(model_type), ids(2, 200, seed=3)
    mask = torch.ones_like(x)
    pad = slice(0, 70) if padding_side == "left" else slice(130, 200)
    mask[1, pad] = 0
    ref, stock = run(m, input_ids=x, attention_mask=mask)
    with enable_hisa(m, **cover(200)):
        got, mine = run(m, input_ids=x, attention_mask=mask)
    assert_same_calls(stock, mine)
    assert torch.equal(ref, got)


def test_left_padded_generate_covering_equals_stock(model_type):
    m, x = model(model_type), ids(2, 140, seed=4)
    mask = torch.ones_like(x)
    mask[0, :50] = 0
    ref, stock = generate(m, x, mask)
    with enable_hisa(m, **cover(140 + GEN_TOKENS)):
        got, mine = generate(m, x, mask)
    assert_same_calls(stock, mine)
    assert torch.equal(ref.sequences, got.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ref.logits, got.logits))


@pytest.mark.parametrize("dtype,attn", [(torch.bfloat16, "sdpa"), (torch.float32, "eager")])
def test_prefill_covering_other_dtype_and_attention(dtype, attn):
    pinned("deepseek_v32")
    m, x = model("deepseek_v32", dtype, attn), ids(2, 256, seed=5)
    mask = torch.ones_like(x)
    mask[1, :40] = 0
    ref, stock = run(m, input_ids=x, attention_mask=mask)
    with enable_hisa(m, **cover(256)):
        got, mine = run(m, input_ids=x, attention_mask=mask)
    assert_same_calls(stock, mine)
    assert torch.equal(ref, got)


# --- pruning settings -------------------------------------------------------------------------

def count_pooling(monkeypatch) -> list[int]:
    """Blocks the side table pools, per call of its pooling function."""
    pooled, means = [], side_table.block_means

    def counting(keys, block_size, fp8):
        pooled.append(keys.shape[0] // block_size)
        return means(keys, block_size, fp8)

    monkeypatch.setattr(side_table, "block_means", counting)
    return pooled


def test_pruned_generation_at_1k(model_type, monkeypatch):
    """~1K context, 36 decode steps with the model's cache: format, equality with hisa_index on
    the captured operands (pooled from scratch, so the incremental side table is right),
    differences from the stock selection only inside pruned blocks, and every block pooled
    once (not re-pooled each step)."""
    m, x = model(model_type), ids(1, 980, seed=6)
    pooled = count_pooling(monkeypatch)
    with enable_hisa(m, **PRUNE):
        out, calls = generate(m, x)
    assert out.sequences.shape[1] == 980 + GEN_TOKENS
    pruned = 0
    for call in calls:
        check_model_format(call, TOPK)
        pruned += assert_matches_own_hisa(call, **PRUNE)
    assert pruned > 0, "the pruning settings never pruned: the test would prove nothing"
    # keys 0 .. 980 + 35 - 1 went through the cache: each complete block pooled once per layer
    layers = sum(side_table.table_entry(layer) is not None for layer in out.cache.layers)
    assert sum(pooled) == layers * ((980 + GEN_TOKENS - 1) // PRUNE["block_size"])


def test_pruned_prefill_matches_own_hisa(any_model_type):
    m, x = model(any_model_type), ids(2, 300, seed=16)
    mask = torch.ones_like(x)
    mask[0, :45] = 0
    with enable_hisa(m, **PRUNE):
        _, calls = run(m, input_ids=x, attention_mask=mask)
    assert calls
    pruned = 0
    for call in calls:
        check_model_format(call, TOPK)
        pruned += assert_matches_own_hisa(call, **PRUNE)
    assert pruned > 0


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_pruned_prefill_matches_each_sequence_alone(padding_side):
    """Blocks start at each row's first visible key, so a padded row selects what its
    sequence selects alone (up to fp32 ties: the padded batch's operands differ by ulps)."""
    pinned("deepseek_v32")
    m, x = model("deepseek_v32"), ids(2, 260, seed=7)
    n_pad = 90
    short = x[1, :260 - n_pad].clone()
    mask = torch.ones_like(x)
    if padding_side == "left":
        x[1] = torch.cat([torch.zeros(n_pad, dtype=x.dtype), short])
        mask[1, :n_pad] = 0
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        offset = n_pad
    else:
        mask[1, 260 - n_pad:] = 0
        positions = torch.arange(260).expand(2, 260)
        offset = 0
    with enable_hisa(m, **PRUNE):
        _, batch_calls = run(m, input_ids=x, attention_mask=mask, position_ids=positions)
        _, alone_calls = run(m, input_ids=short[None])
    assert len(batch_calls) == len(alone_calls)
    for bc, ac in zip(batch_calls, alone_calls):
        check_model_format(bc, TOPK)
        assert_matches_own_hisa(bc, **PRUNE)
        real = slice(offset, offset + 260 - n_pad)
        padded = [{p - offset for p in s} for s in visible_sets(bc)[1][real]]
        alone = visible_sets(ac)[0]
        q, w = ac.operands()
        scores = torch.einsum("shd,td->sht", q[0].float(), ac.keys[0].float()).clamp_min(0)
        scores = torch.einsum("sh,sht->st", w[0], scores)
        vis, _, _ = windows(ac.mask)
        for s, (a, b) in enumerate(zip(padded, alone)):
            if a != b:
                kth = min(float(scores[s, list(a)].min()), float(scores[s, list(b)].min()))
                slack = ROW_TIE_TOL * float(scores[s][vis[0, s]].abs().max())
                for p in a ^ b:
                    assert abs(float(scores[s, p]) - kth) <= slack, \
                        f"query {s}: padded and alone selections differ beyond ties"


def test_right_padded_generation_is_refused():
    pinned("deepseek_v32")
    m, x = model("deepseek_v32"), ids(2, 60, seed=8)
    mask = torch.ones_like(x)
    mask[1, 40:] = 0
    with enable_hisa(m, **cover(60 + GEN_TOKENS)), \
            pytest.raises(ValueError, match="padding_side"):
        generate(m, x, mask)


def test_packed_sequences_in_one_row():
    """position_ids that restart mark packed sequences: each query sees its own sequence
    only, and HISA equals stock in the covering regime (blocks straddle the boundary)."""
    pinned("deepseek_v32")
    m, x = model("deepseek_v32"), ids(1, 300, seed=9)
    pos = torch.cat([torch.arange(170), torch.arange(130)])[None]
    # transformers detects packing only without a cache (a training-style forward)
    ref, stock = run(m, input_ids=x, position_ids=pos, use_cache=False)
    with enable_hisa(m, **cover(300)):
        got, mine = run(m, input_ids=x, position_ids=pos, use_cache=False)
    _, ks, _ = windows(mine[0].mask)
    assert int(ks[0, -1]) == 170, "the mask did not separate the packed sequences"
    assert_same_calls(stock, mine)
    assert torch.equal(ref, got)


def test_fp8_scoring():
    pinned("deepseek_v32")
    m, x = model("deepseek_v32"), ids(1, 300, seed=10)
    with enable_hisa(m, fp8=True, **PRUNE):
        _, calls = run(m, input_ids=x)
    for call in calls:
        check_model_format(call, TOPK)
        q, w = call.operands()
        q8, q_scale = hisa.quantize_fp8(q[0], group_size=q.shape[-1])
        k8, k_scale = hisa.quantize_fp8(call.keys[0], group_size=q.shape[-1])
        _, ks, ke = windows(call.mask)
        want = hisa.hisa_index(q8, k8, w[0] * q_scale, ks[0].int(), ke[0].int(),
                               k_scale=k_scale, topk=TOPK, backend="torch", **PRUNE)
        assert [set(s) for s in visible_sets(call)[0]] == rel_sets(want)


# --- the cache's lifecycle --------------------------------------------------------------------

def test_beam_search_reorders_the_cache():
    """Beam search reorders the cache every step (reorder_cache): covering HISA still equals
    the stock beams, and pruned HISA equals hisa_index on what the reordered cache holds."""
    pinned("deepseek_v32")
    m, x = model("deepseek_v32"), ids(1, 120, seed=11)
    ref, _ = generate(m, x, num_beams=3)
    with enable_hisa(m, **cover(120 + GEN_TOKENS)):
        got, _ = generate(m, x, num_beams=3)
    assert torch.equal(ref.sequences, got.sequences)
    with enable_hisa(m, **PRUNE):
        _, calls = generate(m, x, num_beams=3)
    for call in calls:
        check_model_format(call, TOPK)
        assert_matches_own_hisa(call, **PRUNE)


def test_static_cache(monkeypatch):
    """StaticCache writes the indexer keys in place into a preallocated buffer: covering HISA
    equals the stock model, pruned HISA equals hisa_index, each block pooled once."""
    pinned("deepseek_v32")
    m, x = model("deepseek_v32"), ids(2, 110, seed=17)
    ref, _ = generate(m, x, cache_implementation="static")
    with enable_hisa(m, **cover(110 + GEN_TOKENS)):
        got, _ = generate(m, x, cache_implementation="static")
    assert torch.equal(ref.sequences, got.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ref.logits, got.logits))
    pooled = count_pooling(monkeypatch)
    with enable_hisa(m, **PRUNE):
        out, calls = generate(m, x, cache_implementation="static")
    assert isinstance(out.cache, transformers.StaticCache)
    for call in calls:
        check_model_format(call, TOPK)
        assert_matches_own_hisa(call, **PRUNE)
    assert sum(pooled) == 2 * 2 * ((110 + GEN_TOKENS - 1) // PRUNE["block_size"])


def test_crop_and_reset_rebuild_the_pooled_blocks(monkeypatch):
    pinned("deepseek_v32")
    m, x = model("deepseek_v32"), ids(1, 200, seed=12)
    pooled = count_pooling(monkeypatch)
    cache = transformers.DynamicCache(config=m.config)
    with enable_hisa(m, **PRUNE), torch.no_grad(), capture_indexers(m) as cap:
        m(input_ids=x, cache=cache, use_cache=True)
        cache.crop(-37)                                   # 163 keys left: a partial block
        for step in range(20):                            # decode past the cropped blocks
            m(input_ids=x[:, 163 + step:164 + step], cache=cache, use_cache=True)
        cache.reset()
        m(input_ids=x[:, :150], cache=cache, use_cache=True)
    for call in cap.calls:
        check_model_format(call, TOPK)
        assert_matches_own_hisa(call, **PRUNE)
    # per layer: 12 blocks of the prefill, 10 again after the crop (163 keys) and the one the
    # decode steps complete (at 176), 9 after the reset
    assert pooled == [12, 12, 10, 10, 1, 1, 9, 9]
    assert side_table.table_entry(cache.layers[0]).length == 150


# --- switching on and off ---------------------------------------------------------------------

def test_disable_restores_stock_bit_for_bit(model_type):
    m, x = model(model_type), ids(2, 160, seed=13)
    with torch.no_grad():
        ref = m(input_ids=x).logits
    handle = enable_hisa(m, **PRUNE)
    assert len(handle.indexers) == len(indexers(m)) == len(hisa_indexers(m))
    with pytest.raises(ValueError, match="already enabled"):
        enable_hisa(m, **PRUNE)
    with torch.no_grad():
        pruned = m(input_ids=x).logits
    assert not torch.equal(ref, pruned)
    assert disable_hisa(m) == len(indexers(m))
    assert handle.disable() == 0 and disable_hisa(m) == 0
    assert all("forward" not in i.__dict__ and "_hisa_state" not in i.__dict__
               for i in indexers(m))
    with torch.no_grad():
        assert torch.equal(m(input_ids=x).logits, ref)
    with enable_hisa(m, **PRUNE):
        with torch.no_grad():
            assert torch.equal(m(input_ids=x).logits, pruned)
    with torch.no_grad():
        assert torch.equal(m(input_ids=x).logits, ref)


def test_accelerate_hooks_survive():
    pinned("deepseek_v32")
    hooks = pytest.importorskip("accelerate.hooks")
    ModelHook, add_hook_to_module, remove_hook_from_module = (
        hooks.ModelHook, hooks.add_hook_to_module, hooks.remove_hook_from_module)

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    m, x = model("deepseek_v32"), ids(1, 150, seed=14)
    idx = indexers(m)[0]
    with torch.no_grad():
        ref = m(input_ids=x).logits
    add_hook_to_module(idx, Count())
    hooked_forward = idx.__dict__["forward"]
    try:
        with enable_hisa(m, **PRUNE):
            with torch.no_grad():
                got = m(input_ids=x).logits
            assert idx.__dict__["forward"] is hooked_forward
        assert Count.calls == 1 and not torch.equal(ref, got)
        with torch.no_grad():
            assert torch.equal(m(input_ids=x).logits, ref)
        assert Count.calls == 2
    finally:
        remove_hook_from_module(idx)
        idx.__dict__.pop("forward", None)   # accelerate leaves the bound stock method behind


# --- errors -----------------------------------------------------------------------------------

def test_bad_settings_are_refused():
    pinned("deepseek_v32")
    m = model("deepseek_v32")
    for kw, err, match in [(dict(block_size=0), ValueError, "block_size"),
                           (dict(block_size=2.0), TypeError, "block_size"),
                           (dict(block_topk=1), ValueError, "block_topk"),
                           (dict(block_size=16, block_topk=5), ValueError, "block_topk >= 6"),
                           (dict(backend="cuda"), ValueError, "backend"),
                           (dict(fp8=1), TypeError, "fp8")]:
        with pytest.raises(err, match=match):
            enable_hisa(m, **kw)
    assert hisa_indexers(m) == []
    with pytest.raises(ValueError, match="no|found none"):
        enable_hisa(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model"):
        enable_hisa("model")


def test_masks_hisa_cannot_honour_are_refused():
    pinned("deepseek_v32")
    m = model("deepseek_v32")
    idx = indexers(m)[0]
    h = torch.randn(1, 8, 64)
    pe, _ = indexer_rope(m, h, torch.arange(8)[None])
    q_resid = torch.randn(1, 8, 32)
    causal = torch.ones(8, 8).tril().bool()[None]
    with enable_hisa(m, **PRUNE), torch.no_grad():
        idx(h, q_resid, pe, causal, None)                 # fine
        bias = torch.zeros(1, 8, 8).masked_fill(~causal, float("-inf"))
        bias[0, 5, 2] = -1.5
        with pytest.raises(ValueError, match="biases"):
            idx(h, q_resid, pe, bias, None)
        gap = causal.clone()
        gap[0, 6, 3] = False
        with pytest.raises(ValueError, match="contiguous"):
            idx(h, q_resid, pe, gap, None)
        with pytest.raises(ValueError, match="attention_mask"):
            idx(h, q_resid, pe, causal[:, :, :7], None)
        with pytest.raises(TypeError, match="DynamicIndexedLayer"):
            idx(h, q_resid, pe, causal, None, cache=transformers.DynamicCache())


# --- drift ------------------------------------------------------------------------------------

DRIFT_POSITIONS = 160   # > index_topk, so the stock top-k actually selects
DRIFT_OFFSET = 900      # positions far from 0, so a wrong RoPE convention shows


def drift_check(model_type: str) -> None:
    """The installed stock indexer of every layer, called directly, selects a top-k of the
    independently computed scores; the adapter's operands give those scores too."""
    m = model(model_type)
    family = next(s for s in specs.MODELS if s.model_type == model_type).family.name
    g = torch.Generator().manual_seed(15)
    h = torch.randn(1, DRIFT_POSITIONS, 64, generator=g)
    q_resid = torch.randn(1, DRIFT_POSITIONS, 32, generator=g)
    positions = torch.arange(DRIFT_POSITIONS)[None] + DRIFT_OFFSET
    pe, theta = indexer_rope(m, h, positions)
    causal = torch.ones(DRIFT_POSITIONS, DRIFT_POSITIONS).tril().bool()[None]
    for idx in indexers(m):
        with torch.no_grad():
            stock = type(idx).forward(idx, h, q_resid, pe, causal, positions)
            want = independent_scores(idx, family, h, q_resid, positions, theta)
            assert_topk_agrees(stock, want.float(), causal, TOPK, row_tol=ROW_TIE_TOL)
            q, k, w = specs.indexer_operands(idx, specs.find_model(idx), h, q_resid, pe)
            mine = torch.einsum("bsh,bsht->bst", w,
                                torch.einsum("bshd,btd->bsht", q, k).clamp_min(0))
        torch.testing.assert_close(mine.double(), want, rtol=1e-4, atol=1e-6)


def test_drift_stock_indexer_matches_the_math(any_model_type):
    drift_check(any_model_type)


def test_drift_check_catches_a_missing_relu(monkeypatch):
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as mod
    monkeypatch.setattr(mod, "F", types.SimpleNamespace(relu=lambda x: x))
    with pytest.raises(AssertionError):
        drift_check("deepseek_v32")


@pytest.mark.parametrize("model_type,other", [
    ("deepseek_v32", "apply_rotary_pos_emb_interleave"),
    ("glm_moe_dsa", "apply_rotary_pos_emb")])
def test_drift_check_catches_a_flipped_rope(monkeypatch, model_type, other):
    mod = sys.modules[specs.find_model(indexers(model(model_type))[0]).module]
    flipped = getattr(mod, other, None) or getattr(
        sys.modules["transformers.models.deepseek_v32.modeling_deepseek_v32"], other)
    monkeypatch.setattr(mod, next(s.rope for s in specs.MODELS if s.model_type == model_type),
                        flipped)
    with pytest.raises(AssertionError):
        drift_check(model_type)


def test_pinned_code():
    """The suite runs against the pinned transformers, and its DSA code is the fingerprinted
    code (a new release that changed any piece fails here, loudly)."""
    assert transformers.__version__ == PINNED_TRANSFORMERS, (
        f"transformers {transformers.__version__} installed; the adapter is pinned to "
        f"{PINNED_TRANSFORMERS} (pip install 'hisa-indexer[transformers]')")
    for spec in specs.MODELS:
        specs.check_model_code(spec)


def test_changed_code_is_refused(monkeypatch):
    pinned("deepseek_v32")
    spec = specs.MODELS[0]
    fake = dict(spec.fingerprints, indexer="0" * 16)
    monkeypatch.setattr(specs, "MODELS", (type(spec)(**{**spec.__dict__,
                                                        "fingerprints": tuple(fake.items())}),)
                        + specs.MODELS[1:])
    with pytest.raises(UnsupportedTransformersError,
                       match=rf"DeepseekV32Indexer .*{PINNED_TRANSFORMERS}"):
        enable_hisa(model("deepseek_v32"))
    assert hisa_indexers(model("deepseek_v32")) == []


def test_changed_signature_is_named(monkeypatch):
    """A release whose indexer forward takes other arguments is refused, and the message says
    how the signature changed."""
    pinned("deepseek_v32")
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as mod

    def forward(self, hidden_states, q_resid, position_embeddings, attention_mask,
                past_key_values=None):
        raise AssertionError("never called")

    monkeypatch.setattr(mod.DeepseekV32Indexer, "forward", forward)
    monkeypatch.setattr(specs, "source_digest", lambda obj: "changed")
    with pytest.raises(UnsupportedTransformersError, match=r"takes \('self', 'hidden_states', "
                                                          r"'q_resid', .*'past_key_values'\)"):
        enable_hisa(model("deepseek_v32"))


def test_missing_code_is_refused(monkeypatch):
    """An older release without the DSA cache layers (or model file) is refused cleanly."""
    from transformers import cache_utils
    monkeypatch.delattr(cache_utils, "DynamicIndexedLayer")
    with pytest.raises(UnsupportedTransformersError, match=r"DynamicIndexedLayer \(missing"):
        specs.check_model_code(specs.MODELS[0])
    gone = type(specs.MODELS[0])(**{**specs.MODELS[0].__dict__,
                                    "module": "transformers.models.no_such_model.modeling"})
    with pytest.raises(UnsupportedTransformersError, match=r"DeepseekV32Indexer \(missing"):
        specs.check_model_code(gone)


def test_changed_attributes_are_refused():
    pinned("deepseek_v32")
    m = model("deepseek_v32")
    idx = indexers(m)[0]
    saved = idx.softmax_scale
    idx.softmax_scale = 1.0
    try:
        with pytest.raises(UnsupportedTransformersError, match="softmax_scale"):
            enable_hisa(m)
    finally:
        idx.softmax_scale = saved
    assert hisa_indexers(m) == []


def test_importing_hisa_does_not_import_transformers():
    code = ("import sys, hisa, hisa.integrations; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_readme_example_runs():
    """The README's "Use with transformers" tiny example runs as written."""
    pinned("deepseek_v32")
    import pathlib
    import re
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("## Use with transformers"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
