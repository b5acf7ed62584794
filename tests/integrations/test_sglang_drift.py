"""Drift tests: what the SGLang plugin relies on, checked against the installed SGLang 0.5.23
(``.ci/engines.sh`` installs it with ``--no-deps``).

Checked how: ``import sglang`` needs orjson and the rest of SGLang's tree, so no SGLang module
imports here. ``sglang/srt/plugins/hook_registry.py`` uses only the standard library: it is
loaded from its file and exercised for real (AROUND hooks on a method, as the plugin
registers them). Everything else (the DSA Indexer, its metadata and top-k transforms, the KV
pool) is read from the installed source files with ``ast``. Skipped when SGLang is absent.
"""
import ast
import importlib.util
import sys
import types

import pytest

from hisa.integrations import sglang as plugin

from .drift import Source, defaults, fields, params, require, self_attrs

ROOT = require("sglang", plugin.PINNED_VERSION)
INDEXER = "srt/layers/attention/dsa/dsa_indexer.py"


@pytest.fixture(scope="module")
def indexer():
    return Source(ROOT, INDEXER)


def test_hooked_method_signatures(indexer):
    assert params(indexer.method("Indexer", "_get_topk_paged")) == \
        ["self", "forward_batch", "layer_id", "q_fp8", "weights", "metadata"]
    assert params(indexer.method("Indexer", "_get_topk_ragged")) == \
        ["self", "enable_dual_stream", "forward_batch", "layer_id", "q_fp8", "weights",
         "metadata", "topk_result"]
    k_only = indexer.method("Indexer", "_forward_cuda_k_only")
    assert params(k_only) == ["self", "x", "positions", "forward_batch", "layer_id",
                              "act_quant", "metadata", "return_indices", "num_tokens",
                              "topk_result"]
    assert defaults(k_only) == {"return_indices": True, "num_tokens": None, "topk_result": None}
    assert params(indexer.method("Indexer", "forward_cuda")) == \
        ["self", "x", "q_lora", "positions", "forward_batch", "layer_id", "return_indices",
         "use_cuda_graph"]
    used = {"index_topk", "num_init_tokens", "num_local_tokens", "dsa_enable_prefill_cp"}
    assert used <= self_attrs(indexer.method("Indexer", "__init__"))


def test_paged_and_ragged_conventions(indexer):
    """Rows = sum of extend lengths, weights [T, H, 1], the [pages, 64, 1, 132] cache, padding
    rows -1; ragged windows from get_indexer_kvcache_range with the transform at ks."""
    paged = ast.unparse(indexer.method("Indexer", "_get_topk_paged"))
    for s in ("q_offset = sum(metadata.get_dsa_extend_len_cpu())",
              "block_tables = metadata.get_page_table_64()",
              "head_dim_with_sf = 132", "weights = weights.squeeze(2)",
              "seqlens_32 = metadata.get_seqlens_expanded()",
              "topk_result = metadata.topk_transform(logits, self.index_topk)"):
        assert s in paged, s
    assert indexer.has("padding = torch.full( (pad_len, topk_result.shape[1]), -1,")
    ragged = ast.unparse(indexer.method("Indexer", "_get_topk_ragged"))
    for s in ("ks, ke = metadata.get_indexer_kvcache_range()",
              "weights = weights.squeeze(-1)",
              "block_tables = metadata.get_logical_page_table()",
              "raw_topk_result = metadata.topk_transform(logits, self.index_topk, ks=ks)",
              "topk_result[:q_offset] = raw_topk_result"):
        assert s in ragged, s
    fwd = ast.unparse(indexer.method("Indexer", "forward_cuda"))
    assert "self._get_topk_paged(forward_batch, layer_id, q_fp8, weights, metadata)" in fwd
    assert "self._get_topk_ragged(enable_dual_stream, forward_batch, layer_id, q_fp8, " \
           "weights, metadata)" in fwd
    assert "get_token_to_kv_pool" in {a.name for n in indexer.tree.body
                                      if isinstance(n, ast.ImportFrom) for a in n.names}


def test_metadata_accessors():
    src = Source(ROOT, "srt/layers/attention/dsa/dsa_indexer_metadata.py")
    for name in ("get_seqlens_int32", "get_page_table_64", "get_seqlens_expanded",
                 "get_indexer_kvcache_range", "get_indexer_seq_len_cpu", "get_indexer_seq_len",
                 "get_dsa_extend_len_cpu", "get_token_to_batch_idx"):
        src.method("DSAIndexerMetadata", name)
    assert {"attn_metadata", "topk_transform_method", "paged_mqa_ctx_lens_2d",
            "force_unfused_topk"} <= set(fields(src.klass("DSAIndexerMetadata")))
    backend = Source(ROOT, "srt/layers/attention/dsa_backend.py")
    assert {"page_size", "real_page_table", "page_table_1", "topk_indices_offset",
            "indexer_logical_page_table", "cu_seqlens_q"} <= \
        set(fields(backend.klass("DSAMetadata")))


def test_topk_transform_semantics():
    """What the plugin's transform_output restates: PAGED maps position p of row r to
    real_page_table[r, p // page] * page + p % page, RAGGED adds the row's offset, unfused
    returns offsets from row_starts; fusion is on by default."""
    src = Source(ROOT, "srt/layers/attention/dsa/dsa_topk_backend.py")
    assert {"PAGED", "RAGGED"} <= {t.id for n in src.klass("TopkTransformMethod").body
                                   if isinstance(n, ast.Assign) for t in n.targets}
    assert src.has("real_page_table[row, p // page_size] * page_size + (p % page_size)")
    assert src.has("topk_local_indices = topk_col_indices.to(torch.int32) - "
                   "row_starts_unsqueezed")
    assert src.has("if not envs.SGLANG_DSA_FUSE_TOPK.get() or force_unfused_topk:")
    env = Source(ROOT, "srt/environ.py")
    assert env.has("SGLANG_DSA_FUSE_TOPK = EnvBool(True)")
    assert env.has('SGLANG_PLUGINS = EnvStr("")')


def test_index_cache_layout():
    """[pages, 64 * (128 + 4)] uint8: each page's key bytes, then its fp32 scales; page 64."""
    pool = Source(ROOT, "srt/mem_cache/memory_pool.py")
    for s in ("quant_block_size = 128", "assert index_head_dim == 128",
              "assert physical_page_size == 64, ("):
        assert pool.has(s), s
    for name, want in (("move_kv_cache", ["self", "tgt_loc", "src_loc"]),
                       ("get_cpu_copy", ["self", "indices", "mamba_indices", "req_pool_index"]),
                       ("load_cpu_copy", ["self", "kv_cache_cpu_dict", "indices",
                                          "mamba_indices", "req_pool_index"]),
                       ("get_index_k_with_scale_buffer", ["self", "layer_id"])):
        assert params(pool.method("DSATokenToKVPool", name)) == want, name
    cache = Source(ROOT, "srt/mem_cache/index_key_cache.py")
    assert cache.has("* (pool.index_head_dim + pool.index_head_dim // pool.quant_block_size * 4)")
    assert cache.has("key_bytes = page_size * self.pool.index_head_dim")
    assert cache.has("# Each physical page stores all key bytes followed by all scale bytes.")


def test_engine_state_readers():
    ctx = Source(ROOT, "srt/runtime_context.py")
    ctx.function("get_memory")
    ctx.function("get_disagg")
    assert "def move_kv_cache" not in Source(ROOT, "srt/speculative/eagle_worker_common.py").text
    assert Source(ROOT, "srt/speculative/eagle_worker_common.py").has(
        "token_to_kv_pool.move_kv_cache(tgt_slots, src_slots)")


def test_plugin_group_and_selection():
    src = Source(ROOT, "srt/plugins/__init__.py")
    assert ast.literal_eval(src.assigned("GENERAL_PLUGINS_GROUP")) == "sglang.srt.plugins"
    assert src.has("allowed_str = envs.SGLANG_PLUGINS.get()")
    assert src.has("HookRegistry.apply_hooks()")


@pytest.fixture
def hook_registry():
    """SGLang's real hook registry, loaded from its file (stdlib only)."""
    path = ROOT / "srt/plugins/hook_registry.py"
    spec = importlib.util.spec_from_file_location("_sglang_hook_registry", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_around_hooks_wrap_methods_as_the_plugin_expects(hook_registry):
    """An AROUND hook on ``module.Class.method`` receives (original, self, *args, **kwargs):
    the calling convention of the plugin's around_* functions; the entry point registers one
    AROUND hook per target."""
    target = types.ModuleType("hisa_probe_target")

    class Indexer:
        def _get_topk_paged(self, forward_batch, layer_id, q_fp8, weights, metadata):
            return ("original", layer_id)

    target.Indexer = Indexer
    sys.modules["hisa_probe_target"] = target
    seen = []

    def around(original, indexer, forward_batch, layer_id, q_fp8, weights, metadata):
        seen.append(isinstance(indexer, Indexer))
        return original(indexer, forward_batch, layer_id, q_fp8, weights, metadata)

    try:
        reg = hook_registry.HookRegistry
        reg.register("hisa_probe_target.Indexer._get_topk_paged", around,
                     hook_registry.HookType.AROUND)
        reg.apply_hooks()
        assert Indexer()._get_topk_paged(None, 3, None, None, None) == ("original", 3)
        assert seen == [True]
    finally:
        hook_registry.HookRegistry.reset()
        sys.modules.pop("hisa_probe_target")
    assert {t.rsplit(".", 1)[0] for t, _ in plugin.HOOKS} == {plugin.INDEXER, plugin.KV_POOL}
    assert plugin.INDEXER == "sglang." + INDEXER[:-3].replace("/", ".") + ".Indexer"


def test_entry_point_declared():
    from importlib.metadata import entry_points
    eps = [e for e in entry_points(group="sglang.srt.plugins") if e.name == "hisa"]
    if not eps:
        pytest.skip("hisa is not installed as a distribution (run from a source checkout)")
    assert eps[0].value == "hisa.integrations.sglang:register"
