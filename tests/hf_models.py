"""Tiny random transformers DSA models and the tools the integration tests share: capturing
what the indexers see and return, and an independent computation of the indexer's math.

The independent math is written from the DSA description (DeepSeek-V3.2's reference indexer,
docs/background/dsa-implementations.md section 1), not from transformers' code: ReLU per head
before the gate-weighted head sum, the gate scaled by H ** -0.5, the dot products by D ** -0.5,
RoPE on R of the D dims in the layout each model family uses. It is what a drifted indexer (a
dropped ReLU, a flipped RoPE convention) disagrees with.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hisa.integrations._transformers_models import find_model, indexer_operands  # noqa: E402

#: Shapes of every tiny model: 16 index heads of dim 64 (what the Triton kernels take, so the
#: GPU and interpreter tiers use the same models), index_topk 64. Sixteen heads make exact
#: score ties (every head's dot product <= 0, so the score is exactly 0) rare enough that the
#: stock and HISA top-k agree entry for entry, which the logits tests need. No pad token:
#: nn.Embedding would zero its row, and a generated pad token (a random model emits any id)
#: would have all-zero indexer scores, a tie that each top-k breaks its own way.
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_group=1,
            topk_group=1, num_experts_per_tok=2, kv_lora_rank=32, q_lora_rank=32,
            qk_rope_head_dim=16, v_head_dim=16, qk_nope_head_dim=16, index_topk=64,
            index_head_dim=64, index_n_heads=16, first_k_dense_replace=1,
            max_position_embeddings=4096, pad_token_id=None, eos_token_id=None,
            bos_token_id=None)

#: Model types with a tiny test model: (config class, model class, config extras, attention).
#: Names resolve under ``transformers`` (a dotted name under ``transformers.models``).
MODEL_TYPES = {
    "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM", dict(num_hidden_layers=2),
                     "sdpa"),
    # three layers, the middle one sharing the first one's top-k (GLM-5's IndexShare)
    "glm_moe_dsa": ("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM",
                    dict(num_hidden_layers=3, indexer_types=["full", "shared", "full"]), "sdpa"),
    "axk2": ("AXK2Config", "AXK2ForCausalLM", dict(num_hidden_layers=2), "sdpa"),
    # a sliding-window layer (no indexer, a sliding cache layer) between two DSA layers
    "dots3_note": ("Dots3NoteTextConfig", "Dots3NoteForCausalLM",
                   dict(num_hidden_layers=3, layer_types=["indexed_attention", "sliding_attention",
                                                          "indexed_attention"],
                        swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_q_lora_rank=32,
                        swa_kv_lora_rank=32, swa_head_dim=32, swa_qk_nope_head_dim=16,
                        swa_v_head_dim=16), "sdpa"),
    "hy_v4": ("HYV4Config", "HYV4ForCausalLM",
              dict(num_hidden_layers=3, indexer_types=["full", "shared", "full"]), "eager"),
    # the text tower of the VL model (no LM head); its M-RoPE equals plain RoPE on text
    "hy_v4_vl": ("hy_v4_vl.configuration_hy_v4_vl.HYV4VLTextConfig",
                 "hy_v4_vl.modeling_hy_v4_vl.HYV4VLTextModel",
                 dict(num_hidden_layers=2, rope_parameters=dict(
                     rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2])),
                 "eager"),
}
#: The models the whole suite runs on; the others run the drift and equality core.
PRIMARY = ("deepseek_v32", "glm_moe_dsa")


def _resolve(name: str):
    if "." not in name:
        return getattr(transformers, name)
    module, attr = name.rsplit(".", 1)
    return getattr(__import__(f"transformers.models.{module}", fromlist=[attr]), attr)


#: How each family applies RoPE inside the indexer: DeepSeek-V3.2 half-split on the first R
#: dims (its reference code, after DeepSeek's Nov-2025 fix); GLM-5 interleaved pairs; the HY-V4
#: models as their 5.24.0 files do it (no public reference to check them against).
ROPE_LAYOUT = {"deepseek_v32": ("half", "first"), "glm_moe_dsa": ("pairs", "first"),
               "hy_v4": ("half", "last"), "hy_v4_vl": ("pairs", "last")}


def tiny_model(model_type: str, *, dtype=torch.float32, attn: str | None = None,
               seed: int = 0, **overrides):
    cfg_name, model_name, extra, default_attn = MODEL_TYPES[model_type]
    cfg = _resolve(cfg_name)(**{**TINY, **extra, **overrides})
    cfg._attn_implementation = attn or default_attn
    torch.manual_seed(seed)
    model = _resolve(model_name)(cfg).eval()
    return model.to(dtype)


def output_of(out) -> torch.Tensor:
    """Logits, or the last hidden state of a model without an LM head."""
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def indexer_rope(model, hidden: torch.Tensor, positions: torch.Tensor):
    """(cos, sin) the model hands its DSA layers, and the RoPE base they use."""
    base = getattr(model, "model", model)
    rope = base.rotary_emb
    params = model.config.rope_parameters
    if "rope_theta" not in params:                  # per layer type (hybrid models)
        return rope(hidden, positions, "indexed_attention"), \
            params["indexed_attention"]["rope_theta"]
    return rope(hidden, positions), params["rope_theta"]


def indexers(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if find_model(m) is not None]


@dataclass
class IndexerCall:
    """One indexer call: its inputs, its output, and the cache's keys right after it."""

    module: torch.nn.Module
    args: tuple
    kwargs: dict
    out: torch.Tensor                      # int32 [B, S, width]
    keys: torch.Tensor                     # [B, T, D] every key visible to the call
    mask: torch.Tensor                     # the indexer's attention mask [B, S, T]

    def operands(self):
        """(q [B, S, H, D], w fp32 [B, S, H]) as the adapter computes them."""
        hidden, q_resid, pos_emb = self.args[:3]
        q, _, w = indexer_operands(self.module, find_model(self.module), hidden, q_resid,
                                   pos_emb)
        return q, w


@dataclass
class Capture:
    calls: list[IndexerCall] = field(default_factory=list)

    def of(self, module) -> list[IndexerCall]:
        return [c for c in self.calls if c.module is module]


@contextmanager
def capture_indexers(model):
    """Record every indexer call of ``model`` (stock or HISA forward alike)."""
    cap, handles, pending = Capture(), [], {}

    def pre(module, args, kwargs):
        pending[id(module)] = (args, dict(kwargs))

    def post(module, args, kwargs, out):
        a, kw = pending.pop(id(module))
        full = (a + (None,) * 6)[:6]
        cache = kw.get("cache", full[5])
        if cache is not None:
            keys = cache.layers[module.layer_idx].indexer_keys
        else:
            keys = indexer_operands(module, find_model(module), a[0], a[1], a[2])[1]
        cap.calls.append(IndexerCall(module, a, kw, out.clone(), keys.clone(), a[3].clone()))

    for m in indexers(model):
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        yield cap
    finally:
        for h in handles:
            h.remove()


def windows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(visible bool [B, S, T], ks, ke [B, S]) of an indexer mask (bool or additive)."""
    vis = mask if mask.dtype == torch.bool else mask == 0
    T = vis.shape[-1]
    pos = torch.arange(T)
    cnt = vis.sum(-1)
    ks = torch.where(cnt > 0, torch.where(vis, pos, T).amin(-1), 0)
    ke = torch.where(cnt > 0, torch.where(vis, pos, -1).amax(-1) + 1, 0)
    assert bool(((ke - ks) == cnt).all()), "non-contiguous window in a test mask"
    return vis, ks, ke


def visible_sets(call: IndexerCall) -> list[list[set[int]]]:
    """Per [b][s], the selected positions that the mask leaves visible."""
    vis, _, _ = windows(call.mask)
    out = []
    for b in range(call.out.shape[0]):
        rows = []
        for s in range(call.out.shape[1]):
            sel = call.out[b, s].long()
            rows.append(set(sel[vis[b, s, sel]].tolist()))
        out.append(rows)
    return out


def check_model_format(call: IndexerCall, index_topk: int) -> None:
    """The stock output format: int32 [B, S, min(topk, T)], unique positions in [0, T), every
    visible selected key counted, exactly min(topk, visible) of them visible."""
    out, T = call.out, call.mask.shape[-1]
    B, S = out.shape[:2]
    assert out.dtype == torch.int32 and out.shape == (B, S, min(index_topk, T)), out.shape
    assert bool(((out >= 0) & (out < T)).all()), "position outside the key axis"
    srt = out.sort(-1).values
    assert not bool((srt[..., 1:] == srt[..., :-1]).any()), "duplicate position in a row"
    vis, ks, ke = windows(call.mask)
    n_vis = torch.gather(vis, 2, out.long()).sum(-1)
    assert bool((n_vis == (ke - ks).clamp(max=index_topk)).all()), "visible count wrong"


def _rope(x: torch.Tensor, angles: torch.Tensor, layout: str, where: str, R: int):
    """Rotate R of x's last-axis dims by ``angles`` [..., R/2]: "half" pairs dim i with
    i + R/2 (NeoX), "pairs" rotates (2i, 2i+1) (interleaved); on the first or last R dims."""
    D = x.shape[-1]
    lo = 0 if where == "first" else D - R
    part = x[..., lo:lo + R]
    cos, sin = angles.cos(), angles.sin()
    if layout == "half":
        a, b = part[..., :R // 2], part[..., R // 2:]
        rot = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    else:
        a, b = part[..., 0::2], part[..., 1::2]
        rot = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    return torch.cat([x[..., :lo], rot, x[..., lo + R:]], dim=-1)


def independent_scores(module, family: str, hidden: torch.Tensor, q_resid: torch.Tensor,
                       positions: torch.Tensor, rope_theta: float) -> torch.Tensor:
    """fp64 indexer scores I [B, S, S] (queries x keys of this call, no mask) from the
    module's weights: I = sum_h gate_h H^-1/2 ReLU(q_h . k) D^-1/2."""
    layout, where = ROPE_LAYOUT[family]
    H, D, R = module.n_heads, module.head_dim, module.qk_rope_head_dim
    f64 = torch.float64
    B, S, _ = hidden.shape
    q = (q_resid.to(f64) @ module.wq_b.weight.to(f64).T).view(B, S, H, D)
    norm = module.k_norm
    k = torch.nn.functional.layer_norm(hidden.to(f64) @ module.wk.weight.to(f64).T, (D,),
                                       norm.weight.to(f64), norm.bias.to(f64), norm.eps)
    inv_freq = 1.0 / rope_theta ** (torch.arange(0, R, 2, dtype=f64) / R)
    angles = positions.to(f64)[..., None] * inv_freq                       # [B, S, R/2]
    q = _rope(q, angles[:, :, None], layout, where, R)
    k = _rope(k, angles, layout, where, R)
    gate = (hidden.to(f64) @ module.weights_proj.weight.to(f64).T) * H ** -0.5   # [B, S, H]
    dots = torch.einsum("bshd,btd->bsht", q, k).clamp_min(0) * D ** -0.5
    return torch.einsum("bsh,bsht->bst", gate, dots)


def assert_topk_agrees(selected: torch.Tensor, scores: torch.Tensor, visible: torch.Tensor,
                       k: int, *, row_tol: float) -> None:
    """``selected`` [B, S, W] holds a top-k of ``scores`` over ``visible`` keys, up to ties
    within ``row_tol * max |row|`` of the k-th score."""
    B, S, _ = selected.shape
    for b in range(B):
        for s in range(S):
            vis = visible[b, s]
            n = min(k, int(vis.sum()))
            if n == 0:
                continue
            row = scores[b, s].masked_fill(~vis, -math.inf)
            sel = selected[b, s].long()
            sel = sel[vis[sel]]
            assert sel.numel() == n, f"row ({b}, {s}): {sel.numel()} visible picks, want {n}"
            kth = row.topk(n).values[-1]
            slack = row_tol * float(row[vis].abs().max())
            worst = float(row[sel].min())
            assert worst >= float(kth) - slack, \
                f"row ({b}, {s}): picked a key scoring {worst}, below the k-th {float(kth)}"
