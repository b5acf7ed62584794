"""The transformers DSA indexers the adapter supports, how it reads their q, k and weights, and
the checks that refuse an indexer whose code is not the code the adapter was tested against.

Supported families (transformers 5.24.0):

============  ========================================  ===========================  ===========
family        indexer classes (model types)             RoPE in the indexer          key norm
============  ========================================  ===========================  ===========
deepseek_v32  DeepseekV32Indexer (deepseek_v32),        half-split, first R dims     model dtype
              AXK2Indexer (axk2)
glm_moe_dsa   GlmMoeDsaIndexer (glm_moe_dsa),           interleaved pairs, first R   model dtype
              Dots3NoteTextIndexer (dots3_note)
hy_v4         HYV4Indexer (hy_v4)                       half-split, last R dims      fp32
hy_v4_vl      HYV4VLIndexer (hy_v4_vl)                  interleaved pairs, last R,   fp32
                                                        computed in fp32
============  ========================================  ===========================  ===========

The adapter applies each model file's own RoPE function, so it reproduces whatever convention
the file has; the table is what the drift tests check it against. (hy_v4_vl's RoPE helper is
the interleaved one although a comment in its attention calls it non-interleaved: the tests
pin the code as it is in 5.24.0.)

All of them score ``I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s])`` with
``w = weights_proj(x) * H ** -0.5 * softmax_scale`` (the positive softmax scale moves from the
dot product into the gate, ``ReLU(c x) = c ReLU(x)`` for ``c > 0``), over the keys the model's
cache returns from ``update_indexer``, and return ``int32 [B, S, min(index_topk, T)]`` positions.

Not supported, and why (same transformers version):

* ``mistral_large4`` (MistralLarge4TextIndexer): no ``q_resid`` argument; its q comes from a
  LayerNorm of the hidden states and is multiplied by a position-dependent softmax scaling, and
  some layers skip RoPE: a different indexer, not this shape.
* ``glm5_next`` (Glm5NextTextIndexer): scores learned-gate compressed "k-pools" and expands the
  selected pools back to tokens, with its own packed cache state: already a two-level selector.
* ``deepseek_v4`` (DeepseekV4Indexer): a lightning indexer, but over compressed KV entries
  (one per ``compress_rate`` tokens, built inside the indexer by its own gated, overlapping
  compressor and kept in the CSA compressor cache, not ``update_indexer``), with another
  signature ``(hidden_states, q_residual, position_ids, cache, layer_idx)``, its own RoPE
  positions for the entries and a causality rule in units of entries (-1 sentinels): HISA over
  those entries would need its own adapter.
* ``minimax_m3_vl`` (MiniMaxM3VLIndexer): per-head block selection (``[B, H, S, topk_blocks]``),
  not one token top-k per query.
* ``qwen4_exp`` (Qwen4ExpTextQSAIndexer): selects from compressed key blocks with its own budget.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
from dataclasses import dataclass

import torch

#: The transformers release the adapter was written and tested against (the ``transformers``
#: extra pins it). The source fingerprints below are this release's.
PINNED_TRANSFORMERS = "5.24.0"

#: The stock indexer's forward parameters, in order; the replacement takes the same.
INDEXER_FORWARD_PARAMS = ("self", "hidden_states", "q_resid", "position_embeddings",
                          "attention_mask", "position_ids", "cache")

#: Every indexer attribute the adapter reads, and its type.
INDEXER_ATTRIBUTES = {"wq_b": torch.nn.Linear, "wk": torch.nn.Linear,
                      "k_norm": torch.nn.LayerNorm, "weights_proj": torch.nn.Linear,
                      "n_heads": int, "head_dim": int, "qk_rope_head_dim": int,
                      "index_topk": int, "softmax_scale": float, "layer_idx": int}

#: The cache code the adapter relies on: ``update_indexer`` appends (or writes in place) and
#: returns the layer's whole key buffer; the layers' ``indexer_keys``,
#: ``is_indexer_initialized`` and (static) ``indexer_cumulative_length`` give the state before
#: an append, which is how the pooled side table notices reorder / crop / reset.
CACHE_PIECES = {"Cache.update_indexer": "45eda5e044ee8a90",
                "DynamicIndexedLayer": "805cb0e238052c61",
                "StaticIndexedLayer": "cea38f4a1c01ebe1"}


class UnsupportedTransformersError(RuntimeError):
    """The installed transformers' indexer differs from the one the adapter was tested on."""


@dataclass(frozen=True)
class IndexerFamily:
    """How one family of indexers computes q, k and the gate from its own submodules."""

    name: str
    rope_dims_first: bool   # RoPE on dims [0, R) (else on [D - R, D))
    key_norm_fp32: bool     # k_norm runs in its (fp32) weight dtype, result cast back


@dataclass(frozen=True)
class IndexerModel:
    """One supported model type: where its indexer lives and the fingerprints of its code."""

    model_type: str
    module: str             # the modeling module (transformers.models.<type>.modeling_<type>)
    indexer: str            # indexer class name
    attention: str          # the attention class that calls the indexer and consumes its output
    rope: str               # the module-level RoPE function the indexer applies
    family: IndexerFamily
    fingerprints: tuple[tuple[str, str], ...]   # (piece, sha256 prefix) in transformers 5.24.0


DEEPSEEK_V32 = IndexerFamily("deepseek_v32", rope_dims_first=True, key_norm_fp32=False)
GLM_MOE_DSA = IndexerFamily("glm_moe_dsa", rope_dims_first=True, key_norm_fp32=False)
HY_V4 = IndexerFamily("hy_v4", rope_dims_first=False, key_norm_fp32=True)
HY_V4_VL = IndexerFamily("hy_v4_vl", rope_dims_first=False, key_norm_fp32=True)


def _model(model_type, indexer, attention, rope, family, fingerprints):
    return IndexerModel(model_type, f"transformers.models.{model_type}.modeling_{model_type}",
                        indexer, attention, rope, family, tuple(fingerprints.items()))


MODELS = (
    _model("deepseek_v32", "DeepseekV32Indexer", "DeepseekV32Attention", "apply_rotary_pos_emb",
           DEEPSEEK_V32, {"indexer": "de03001a752dc281", "attention": "e23ebb00c5c9df92",
                          "rope": "ea234325c15de475"}),
    _model("glm_moe_dsa", "GlmMoeDsaIndexer", "GlmMoeDsaAttention",
           "apply_rotary_pos_emb_interleave", GLM_MOE_DSA,
           {"indexer": "d7312bad3ce855bb", "attention": "fab579bb2f873d72",
            "rope": "8ed90f4983a65a1e"}),
    _model("axk2", "AXK2Indexer", "AXK2Attention", "apply_rotary_pos_emb", DEEPSEEK_V32,
           {"indexer": "e67525f979d54b5b", "attention": "b208b3bd2adc097d",
            "rope": "ea234325c15de475"}),
    _model("dots3_note", "Dots3NoteTextIndexer", "Dots3NoteTextAttention",
           "apply_rotary_pos_emb_interleave", GLM_MOE_DSA,
           {"indexer": "e12e82a96e6301be", "attention": "febda14a126d7f96",
            "rope": "8ed90f4983a65a1e"}),
    _model("hy_v4", "HYV4Indexer", "HYV4Attention", "apply_rotary_pos_emb", HY_V4,
           {"indexer": "9aac134e84ee6644", "attention": "22d49863640df011",
            "rope": "ea234325c15de475"}),
    _model("hy_v4_vl", "HYV4VLIndexer", "HYV4VLAttention", "apply_rotary_pos_emb", HY_V4_VL,
           {"indexer": "9e9ab4f33c069021", "attention": "8f401679e75c68ab",
            "rope": "808e718766d5abba"}),
)


def source_digest(obj) -> str:
    """sha256 prefix of an object's source (decorators unwrapped): the drift fingerprint."""
    src = inspect.getsource(inspect.unwrap(obj))
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def installed_transformers() -> str:
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"hisa.integrations.transformers needs transformers=="
                          f"{PINNED_TRANSFORMERS}: pip install 'hisa-indexer[transformers]'"
                          ) from e
    return transformers.__version__


def model_pieces(spec: IndexerModel) -> dict[str, object]:
    """The code objects whose sources are fingerprinted for ``spec`` (None where missing)."""
    try:
        mod = importlib.import_module(spec.module)
    except ImportError:
        mod = None
    return {"indexer": getattr(mod, spec.indexer, None),
            "attention": getattr(mod, spec.attention, None), "rope": getattr(mod, spec.rope, None)}


def cache_pieces() -> dict[str, object]:
    from transformers import cache_utils
    return {"Cache.update_indexer": getattr(cache_utils.Cache, "update_indexer", None),
            "DynamicIndexedLayer": getattr(cache_utils, "DynamicIndexedLayer", None),
            "StaticIndexedLayer": getattr(cache_utils, "StaticIndexedLayer", None)}


def _digest(obj) -> str:
    if obj is None:
        return "missing"
    try:
        return source_digest(obj)
    except (OSError, TypeError):
        return "no source"


def _signature_note(indexer_cls) -> str:
    if indexer_cls is None:
        return ""
    params = tuple(inspect.signature(inspect.unwrap(indexer_cls.forward)).parameters)
    if params == INDEXER_FORWARD_PARAMS:
        return ""
    return (f"; {indexer_cls.__name__}.forward takes {params}, the adapter expects "
            f"{INDEXER_FORWARD_PARAMS}")


def check_model_code(spec: IndexerModel) -> None:
    """Refuse (UnsupportedTransformersError) unless the indexer, its RoPE function, the
    attention that consumes its output and the cache code are byte-for-byte those of
    transformers 5.24.0 (compared through source fingerprints), whatever the version string."""
    version = installed_transformers()
    pieces = model_pieces(spec)
    want = dict(spec.fingerprints)
    wrong = []
    labels = {"indexer": spec.indexer, "attention": spec.attention, "rope": spec.rope}
    for name, obj in pieces.items():
        got = _digest(obj)
        if got != want[name]:
            wrong.append(f"{labels[name]} ({got} != {want[name]})")
    for name, obj in cache_pieces().items():
        got = _digest(obj)
        if got != CACHE_PIECES[name]:
            wrong.append(f"transformers.cache_utils.{name} ({got} != {CACHE_PIECES[name]})")
    if wrong:
        raise UnsupportedTransformersError(
            f"transformers {version}: the {spec.model_type} DSA code differs from transformers "
            f"{PINNED_TRANSFORMERS}, the version hisa's adapter was tested against, in "
            f"{', '.join(wrong)}{_signature_note(pieces['indexer'])}. HISA is not enabled, "
            f"rather than replacing an indexer whose math may have changed (a missing ReLU or "
            f"a flipped RoPE convention would give silently wrong selections). Install "
            f"transformers=={PINNED_TRANSFORMERS} (pip install 'hisa-indexer[transformers]').")


def check_indexer_module(module: torch.nn.Module, name: str) -> None:
    """The attributes the adapter reads exist, have the expected types and agree in shape."""
    for attr, kind in INDEXER_ATTRIBUTES.items():
        value = getattr(module, attr, None)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UnsupportedTransformersError(
                f"{name}: expected attribute {attr} of type {kind.__name__}, got "
                f"{type(value).__name__}")
    H, D, R = module.n_heads, module.head_dim, module.qk_rope_head_dim
    checks = (("wq_b.out_features", module.wq_b.out_features, H * D),
              ("wk.out_features", module.wk.out_features, D),
              ("weights_proj.out_features", module.weights_proj.out_features, H),
              ("k_norm.normalized_shape", tuple(module.k_norm.normalized_shape), (D,)),
              ("softmax_scale", module.softmax_scale, D ** -0.5))
    for attr, got, want in checks:
        if got != want:
            raise UnsupportedTransformersError(f"{name}: expected {attr} = {want}, got {got}")
    if not 0 <= R <= D or R % 2:
        raise UnsupportedTransformersError(
            f"{name}: expected an even qk_rope_head_dim in [0, head_dim={D}], got {R}")


def indexer_operands(module: torch.nn.Module, spec: IndexerModel, hidden_states: torch.Tensor,
                     q_resid: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The indexer's own q, k and gate for this call, from its submodules and its model file's
    RoPE function (so a kernel the model swapped in for that function is used here too).

    Returns:
        (q [B, S, H, D] in the model's dtype, k [B, S, D] (the keys this call appends to the
         cache), w fp32 [B, S, H] with ``H ** -0.5`` and the softmax scale folded in).
    """
    family = spec.family
    B, S, _ = hidden_states.shape
    H, D, R = module.n_heads, module.head_dim, module.qk_rope_head_dim
    cos, sin = position_embeddings
    rope = getattr(importlib.import_module(spec.module), spec.rope)
    q = module.wq_b(q_resid).view(B, S, H, D)                                  # [B, S, H, D]
    k = module.wk(hidden_states)                                               # [B, S, D]
    if family.key_norm_fp32:
        k = module.k_norm(k.to(module.k_norm.weight.dtype)).to(hidden_states.dtype)
    else:
        k = module.k_norm(k)
    k = k.unsqueeze(2)                                                         # [B, S, 1, D]
    sizes, rot = ([R, D - R], 0) if family.rope_dims_first else ([D - R, R], 1)
    q_parts, k_parts = list(q.split(sizes, dim=-1)), list(k.split(sizes, dim=-1))
    q_parts[rot], k_parts[rot] = rope(q_parts[rot], k_parts[rot], cos, sin, unsqueeze_dim=2)
    q = torch.cat(q_parts, dim=-1)                                             # [B, S, H, D]
    k = torch.cat(k_parts, dim=-1).squeeze(2)                                  # [B, S, D]
    gate = module.weights_proj(hidden_states.to(module.weights_proj.weight.dtype)).float()
    return q, k, gate * (H ** -0.5) * module.softmax_scale                     # w [B, S, H]


def find_model(module: torch.nn.Module) -> IndexerModel | None:
    """The supported model whose indexer class ``module`` is exactly (not a subclass)."""
    cls = type(module)
    for spec in MODELS:
        if cls.__module__ == spec.module and cls.__name__ == spec.indexer:
            return spec
    return None
