"""Drift tests: every signature, field and layout the vLLM plugin relies on, checked against the
installed vLLM 0.33.0 (``.ci/engines.sh`` installs it with ``--no-deps``).

Checked how: ``vllm``, ``vllm.envs`` and ``vllm.plugins`` import without a GPU and without
vLLM's dependency tree, so the plugin group is read from the live module and the entry point
is loaded through vLLM's own loader. Everything else (the indexer op, its metadata, the model
caller, the custom-op registry, the fused cache writer) imports CUDA-side modules (zmq, cbor2,
the compiled ops), so it is read from the installed source files with ``ast``.
Skipped with a reason when vLLM is not installed.
"""
import ast
import importlib

import pytest

from hisa.integrations import vllm as plugin

from .drift import Source, calls, decorators, defaults, fields, params, require, self_attrs

ROOT = require("vllm", plugin.PINNED_VERSION)


@pytest.fixture(scope="module")
def layer():
    return Source(ROOT, "model_executor/layers/sparse_attn_indexer.py")


@pytest.fixture(scope="module")
def meta():
    return Source(ROOT, "v1/attention/backends/mla/indexer.py")


def test_indexer_signature(layer):
    fn = layer.function("sparse_attn_indexer")
    assert tuple(params(fn)) == plugin.PARAMS
    assert defaults(fn) == plugin.DEFAULTS
    assert "eager_break_during_capture" in decorators(fn)
    fake = layer.function("sparse_attn_indexer_fake")
    assert tuple(params(fake)) == plugin.PARAMS


def test_indexer_registration(layer):
    (reg,) = [c for c in calls(layer.tree, "direct_register_custom_op")]
    kw = {k.arg: ast.unparse(k.value) for k in reg.keywords}
    assert kw["op_name"] == "'sparse_attn_indexer'"
    assert kw["op_func"] == "sparse_attn_indexer"
    assert kw["mutates_args"] == "['topk_indices_buffer', 'candidate_blocks']"
    assert kw["fake_impl"] == "sparse_attn_indexer_fake"


def test_indexer_conventions(layer):
    """The conventions the replacement reproduces: rows cleared to -1 whole, prefill logits
    compressed (row_starts = 0, row_ends = ke - ks), decode rows [:B * next_n, :topk], the
    fp8 cache viewed as [P, 64, 1, 132], metadata found by the resolved layer name."""
    for snippet in (
        "topk_indices_buffer[: hidden_states.shape[0]] = -1",
        "row_ends = cu_seqlen_ke - cu_seqlen_ks",
        "torch.zeros_like(row_ends) if row_starts is None else row_starts",
        "topk_indices = topk_indices_buffer[row_start:row_end, :topk_tokens]",
        "topk_indices = topk_indices_buffer[:num_padded_tokens, :topk_tokens]",
        "needs_padded_path = decode_metadata.requires_padding or (",
        "num_decode_tokens % decode_lens.shape[0] != 0",
        "seq_lens = decode_metadata.seq_lens[:batch_size]",
        "return kv_cache.unsqueeze(-2)",
        "attn_metadata_narrowed = attn_metadata[k_cache_prefix]",
        "if not isinstance(attn_metadata, dict):",
        "ops.indexer_k_quant_and_cache(",
        "k = k[:num_tokens]",
    ):
        assert layer.has(snippet), snippet


def test_row_shard_interface(layer):
    assert params(layer.method("PrefillRowShard", "from_metadata")) == \
        ["cls", "prefill_metadata", "num_decode_tokens"]
    assert params(layer.method("PrefillRowShard", "narrow")) == ["self", "chunk"]
    assert params(layer.method("PrefillRowShard", "exchange_topk")) == \
        ["self", "topk_buffer", "width"]


def test_custom_op_class(layer):
    cls = layer.klass("SparseAttnIndexer")
    assert "CustomOp.register('sparse_attn_indexer')" in decorators(cls)
    assert params(layer.method("SparseAttnIndexer", "forward_cuda")) == \
        ["self", "hidden_states", "q_quant", "k", "weights"]
    used = {"k_cache", "quant_block_size", "scale_fmt", "topk_tokens", "head_dim",
            "max_model_len", "max_total_seq_len", "topk_indices_buffer", "skip_k_cache_insert",
            "use_fp4_cache", "candidate_blocks", "candidate_block_size", "candidate_write",
            "dense_mha_metadata_layer_name", "topk_backend", "_parallel_config",
            "dcp_world_size", "dcp_rank", "use_pcp", "pcp_shard_decode_requests"}
    assert used <= self_attrs(layer.method("SparseAttnIndexer", "__init__"))


def test_register_oot_keys_by_class_name():
    src = Source(ROOT, "model_executor/custom_op.py")
    oot = src.method("CustomOp", "register_oot")
    assert params(oot) == ["cls", "_decorated_op_cls", "name"]
    assert src.has("reg_name = name if name is not None else cls.__name__")
    new = src.method("CustomOp", "__new__")
    assert "op_registry_oot[op_name]" in ast.unparse(new)
    assert "op_name = cls.__name__" in ast.unparse(new)


def test_metadata_fields(meta):
    assert {"seq_lens", "max_seq_len", "slot_mapping", "num_decodes", "num_decode_tokens",
            "num_prefills", "num_prefill_tokens", "decode", "prefill", "block_table"} <= \
        set(fields(meta.klass("DeepseekV32IndexerMetadata")))
    assert {"block_table", "seq_lens", "decode_lens", "requires_padding", "indices",
            "global_seq_lens"} <= set(fields(meta.klass("DeepSeekV32IndexerDecodeMetadata")))
    assert {"block_table", "cu_seqlen_ks", "cu_seqlen_ke", "cu_seq_lens", "token_to_seq",
            "total_seq_lens", "token_start", "token_end", "num_reqs", "skip_kv_gather"} <= \
        set(fields(meta.klass("DeepseekV32IndexerPrefillChunkMetadata")))
    assert {"chunks", "row_shard_sizes"} <= \
        set(fields(meta.klass("DeepseekV32IndexerPrefillMetadata")))


def test_metadata_conventions(meta):
    """ks = the request's start in the gathered keys, ke = ks + causal length (compress 1, no
    DCP); native next_n rows see L - n + 1 + j keys; flattened rows one query each; the
    indexer's kernel block (page) is 64 tokens on CUDA; the prefill chunk's block table is the
    slice of its requests."""
    for snippet in (
        "tl.store(cu_compressed_seq_len_ks_ptr + out_pos, row_start, mask=mask)",
        "global_ctx = start_pos + 1 + offset",
        "row_start + len_per_token",
        "start_pos = uncompressed_seq_len - query_len",
        "seq_lens.unsqueeze(1) - max_decode_len + 1 + self.offsets_buffer[:max_decode_len]",
        "expanded_offsets + self.arange_buffer[:actual_expanded] + 1",
        "return [1, MultipleOf(16)] if current_platform.is_rocm() else [64]",
        "block_table=block_table[start_idx:end_idx]",
        "skip_kv_gather=query_slice.start > 0",
        "if seq_lens.dim() == 1: seq_lens = seq_lens.unsqueeze(-1)",
    ):
        assert meta.has(snippet), snippet


def test_model_calls_the_function_by_name():
    """DeepSeek-V3.2 / GLM-5 on CUDA call the Python function, not the CustomOp class: the
    reason the plugin replaces the function (the class is covered too)."""
    src = Source(ROOT, "models/deepseek_v32/attention.py")
    imports = [n for n in src.tree.body if isinstance(n, ast.ImportFrom)
               and n.module == plugin.LAYER_MODULE]
    assert imports and "sparse_attn_indexer" in {a.name for n in imports for a in n.names}
    (call,) = calls(src.method("DeepseekV32Attention", "_sparse_indexer_and_attn"),
                    "sparse_attn_indexer")
    kw = {k.arg: ast.unparse(k.value) for k in call.keywords}
    assert kw["skip_topk_buffer_clear"] == "True"
    assert kw["skip_k_cache_insert"] == "not self.use_pcp"
    registry = Source(ROOT, "model_executor/models/registry.py")
    assert registry.has('"GlmMoeDsaForCausalLM": ("vllm.models.deepseek_v32", '
                        '"GlmMoeDsaForCausalLM")')


def test_indexer_cache_binding():
    src = Source(ROOT, "model_executor/models/deepseek_v2.py")
    assert "self.kv_cache = kv_cache.squeeze(1)" in ast.unparse(
        src.method("DeepseekV32IndexerCache", "bind_kv_cache"))
    assert ast.unparse(src.method("DeepseekV32IndexerCache", "uses_shuffled_layout").body[-1]) \
        == "return False"


def test_fused_writer_layout():
    """The key writer that runs before the indexer on CUDA (fused norm/rope): values at
    block_offset * D within the page, the fp32 scale at 64 * D + offset * 4, ue8m0 scale."""
    src = Source(ROOT, "models/deepseek_v32/common/kernels.py")
    fn = ast.unparse(src.function("_fp8_quant_and_cache_write"))
    assert "value_off = block_offset * HEAD_DIM + offsets" in fn
    assert "scale_byte_off = block_start + cache_block_size * HEAD_DIM + block_offset * 4" in fn
    q = ast.unparse(src.function("_fp8_ue8m0_quantize"))
    assert "tl.maximum(amax, 0.0001)" in q and "exp2(tl.math.ceil(tl.math.log2(scale)))" in q


def test_engine_ops_used_by_the_plugin():
    ops = Source(ROOT, "_custom_ops.py")
    assert params(ops.function("indexer_k_quant_and_cache")) == \
        ["k", "kv_cache", "slot_mapping", "quant_block_size", "kv_cache_dtype"]
    assert params(ops.function("cp_gather_indexer_k_quant_cache")) == \
        ["kv_cache", "dst_k", "dst_scale", "block_table", "cu_seq_lens"]
    Source(ROOT, "compilation/breakable_cudagraph.py").function("eager_break_during_capture")
    Source(ROOT, "forward_context.py").function("get_forward_context")
    tu = Source(ROOT, "utils/torch_utils.py")
    for name in ("_resolve_layer_name", "_encode_layer_name", "direct_register_custom_op"):
        tu.function(name)
    Source(ROOT, "utils/deep_gemm.py").function("mqa_logits_use_mx_scales")


def test_plugin_group_live():
    """vllm.plugins imports without a GPU: the group name and the loader that calls func()."""
    plugins = importlib.import_module("vllm.plugins")
    assert plugins.DEFAULT_PLUGINS_GROUP == "vllm.general_plugins"
    src = Source(ROOT, "plugins/__init__.py")
    assert "func()" in ast.unparse(src.function("load_general_plugins"))


def test_entry_point_declared():
    """When this project is installed (pip install -e .), vLLM's loader finds the plugin."""
    from importlib.metadata import entry_points
    eps = [e for e in entry_points(group="vllm.general_plugins") if e.name == "hisa"]
    if not eps:
        pytest.skip("hisa is not installed as a distribution (run from a source checkout)")
    assert eps[0].value == "hisa.integrations.vllm:register"
    assert eps[0].load() is plugin.register


def test_vllm_loader_runs_register_without_model_code(monkeypatch):
    """Through vLLM's own loader: with HISA_VLLM set, register() accepts the installed version
    and defers the patch to the import of the layer module (nothing of it is imported)."""
    import sys

    from hisa.integrations import _engine_common as common
    plugins = importlib.import_module("vllm.plugins")
    found = plugins.load_plugins_by_group("vllm.general_plugins")
    if "hisa" not in found:
        pytest.skip("hisa is not installed as a distribution (run from a source checkout)")
    monkeypatch.setenv("HISA_VLLM", "block_size=128,block_topk=64")
    try:
        found["hisa"]()
        assert plugin.LAYER_MODULE not in sys.modules
        assert plugin.LAYER_MODULE in common._FINDER.pending
    finally:
        common._FINDER.pending.pop(plugin.LAYER_MODULE, None)
