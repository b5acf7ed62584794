"""HISA in Hugging Face transformers: one call switches every DSA lightning indexer of a loaded
model to HISA's block-then-token selection, one call switches it back.

    >>> from hisa.integrations.transformers import enable_hisa, disable_hisa
    >>> enable_hisa(model, block_size=128, block_topk=64)     # every indexer now runs HISA
    >>> out = model.generate(**inputs, max_new_tokens=64)
    >>> disable_hisa(model)                                    # the stock indexers again
    >>> with enable_hisa(model):                               # or for one block only
    ...     out = model(**inputs)

Supported models, the transformers version and why the others are not:
:mod:`hisa.integrations._transformers_models`.

How it plugs in: the indexer modules stay where they are, with their weights; only their
``forward`` is replaced on the instance (the class is untouched) by one that computes the
indexer's own q, k and gate from its submodules, appends k to the model's cache exactly as the
stock forward does (``cache.update_indexer``), and selects with :func:`hisa.hisa_index`.
:func:`disable_hisa` deletes the instance attribute, so the stock forward runs again, bit for
bit. A model dispatched by accelerate (device maps, offloading) keeps its hooks: the replaced
callable is the one the hook wraps.

What the replacement returns is what the stock indexer returns: ``int32 [B, S, min(index_topk,
T)]`` positions into the cache's key axis, every slot filled. The stock indexer fills a row whose
window holds fewer than ``index_topk`` keys with positions the attention mask blocks (their
score is -inf); the replacement does the same, so eager and SDPA attention, which scatter the
indices into the mask, and a sparse kernel that reads them, see the format they were written
for.

Windows come from the model's own attention mask (left or right padding, packed sequences):
each query must see one contiguous run of keys, which every causal mask with padding gives;
generation after right padding leaves a gap (prompt padding between prompt and new tokens) and
is refused with a ValueError (use ``padding_side="left"``, as transformers itself recommends).
Blocks of row b start at its first visible key, so padding never shifts HISA's blocks: a padded
row ranks the same blocks as its sequence alone.
"""
from __future__ import annotations

import types

import torch

from .. import hisa_index, quantize_fp8
from ..utils.validate import check_backend, check_positive_int
from ._transformers_cache import layer_keys_before_append, pooled_blocks_for
from ._transformers_models import (MODELS, PINNED_TRANSFORMERS, IndexerModel,
                                   UnsupportedTransformersError, check_indexer_module,
                                   check_model_code, find_model, indexer_operands,
                                   installed_transformers)

__all__ = ["HisaHandle", "PINNED_TRANSFORMERS", "UnsupportedTransformersError", "disable_hisa",
           "enable_hisa", "hisa_indexers"]

#: Instance attribute that marks a patched indexer and holds its settings.
_STATE = "_hisa_state"
_MISSING = object()


class _IndexerState:
    """What one patched indexer needs: the settings, its model spec, and how to undo the patch."""

    def __init__(self, spec: IndexerModel, *, block_size: int, block_topk: int, backend: str,
                 fp8: bool, slot: str, previous) -> None:
        self.spec = spec
        self.block_size, self.block_topk, self.backend, self.fp8 = (block_size, block_topk,
                                                                    backend, fp8)
        self.slot, self.previous = slot, previous
        self.patched = None


def _check_counts(block_size: int, block_topk: int, index_topk: int, name: str) -> None:
    # Stock hands attention min(index_topk, visible keys) distinct keys per query. HISA keeps
    # m blocks; when it prunes, the m - 2 unforced ones are full and inside the window and the
    # two forced ones hold at least one visible key each, so (m - 2) * B + 2 >= index_topk is
    # what guarantees as many keys (block_topk * block_size >= topk alone does not).
    if (block_topk - 2) * block_size + 2 < index_topk:
        need = -(-(index_topk - 2) // block_size) + 2
        raise ValueError(
            f"block_topk: expected (block_topk - 2) * block_size + 2 >= index_topk = "
            f"{index_topk} of {name} (so HISA hands attention as many keys as the stock "
            f"indexer), got block_topk={block_topk}, block_size={block_size}; use block_topk "
            f">= {need} at this block_size")


def visible_windows(attention_mask: torch.Tensor, batch: int, queries: int, keys: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query windows [ks, ke) of cache positions from the indexer's attention mask.

    Args:
        attention_mask: bool [B or 1, S, T] (True = visible) or additive float (0 visible,
            the dtype's min or -inf blocked), as the model hands its indexer.

    Returns:
        (ks, ke) int64 [B, S]; a query that sees nothing gets ks = ke.

    Raises:
        ValueError: the mask has another shape, holds additive biases, or some query sees
            keys with a gap between them (one contiguous window per query is what HISA and
            the contract take).
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 3 or \
            tuple(attention_mask.shape[1:]) != (queries, keys) or \
            attention_mask.shape[0] not in (1, batch):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else \
            type(attention_mask).__name__
        raise ValueError(f"attention_mask: expected the indexer mask [{batch}, {queries}, "
                         f"{keys}] (bool or additive float), got {shape}")
    if attention_mask.dtype == torch.bool:
        visible = attention_mask
    else:
        visible = attention_mask == 0
        blocked = attention_mask <= torch.finfo(attention_mask.dtype).min / 2
        if not bool((visible | blocked).all()):
            raise ValueError("attention_mask: expected an additive mask of 0 (visible) and the "
                             "dtype's min or -inf (blocked); a mask with other biases changes "
                             "the stock indexer's ranking in a way HISA's scores do not")
    visible = visible.expand(batch, queries, keys)
    pos = torch.arange(keys, device=visible.device)
    count = visible.sum(-1)
    first = torch.where(visible, pos, keys).amin(-1)
    last = torch.where(visible, pos, -1).amax(-1)
    ks = torch.where(count > 0, first, 0)
    ke = torch.where(count > 0, last + 1, 0)
    gap = (ke - ks) != count
    if bool(gap.any()):
        b, s = (int(i) for i in gap.nonzero()[0])
        raise ValueError(
            f"attention_mask: query {s} of batch row {b} sees {int(count[b, s])} keys spread "
            f"over positions [{int(ks[b, s])}, {int(ke[b, s])}); HISA needs one contiguous "
            f"window per query. Generation after right padding leaves such a gap: pad on the "
            f"left (tokenizer.padding_side = 'left')")
    return ks, ke


def row_bases(ks: torch.Tensor, ke: torch.Tensor) -> list[int]:
    """First visible key of each batch row (0 for a row that sees nothing): blocks start there."""
    seen = ke > ks
    starts = torch.where(seen, ks, torch.iinfo(ks.dtype).max).amin(-1)
    return torch.where(seen.any(-1), starts, 0).tolist()


def model_indices(rel: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, keys: int,
                  width: int) -> torch.Tensor:
    """HISA rows -> the stock indexer's format.

    Args:
        rel: int32 [S, K] offsets from ks, valid entries first, -1 padded (contract format).
        ks, ke: int64 [S] absolute windows; keys: T; width: min(index_topk, T) <= K.

    Returns:
        int32 [S, width] absolute positions, every slot filled: the selected keys, then (where
        fewer than ``width`` were selected) positions outside the window in increasing order,
        which the attention mask blocks, as the stock indexer's -inf-scored picks are.
    """
    sel = rel[:, :width].long()
    valid = sel >= 0
    n_valid = valid.sum(-1, keepdim=True)
    filler = torch.arange(width, device=rel.device) - n_valid          # rank among fillers
    size = (ke - ks).unsqueeze(1)
    filler = torch.where(filler < ks.unsqueeze(1), filler, filler + size)
    if bool(((width - n_valid) > keys - size).any()):
        raise RuntimeError("hisa: a row returned fewer keys than the block budget guarantees "
                           "(an internal invariant); please report it")
    return torch.where(valid, sel + ks.unsqueeze(1), filler).to(torch.int32)


@torch.no_grad()
def _hisa_forward(module, hidden_states: torch.Tensor, q_resid: torch.Tensor,
                  position_embeddings: tuple[torch.Tensor, torch.Tensor],
                  attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                  cache=None, *, past_key_values=None) -> torch.Tensor:
    """The replacement indexer forward (same arguments as the stock one; ``position_ids`` is
    unused there too). Returns int32 [B, S, min(index_topk, T)] like the stock forward."""
    state: _IndexerState = module.__dict__[_STATE]
    if past_key_values is not None:
        if cache is not None:
            raise ValueError("cache/past_key_values: expected one of them, got both")
        cache = past_key_values
    q, k_new, w = indexer_operands(module, state.spec, hidden_states, q_resid,
                                   position_embeddings)
    B, S = hidden_states.shape[:2]
    if cache is not None:
        layers = getattr(cache, "layers", ())
        layer = layers[module.layer_idx] if module.layer_idx < len(layers) else None
        keys_before, length_before = layer_keys_before_append(layer)
        keys = cache.update_indexer(k_new, module.layer_idx)                  # [B, T, D]
        filled = length_before + S
    else:
        layer, keys, filled = None, k_new, S
    T = keys.shape[1]
    ks, ke = visible_windows(attention_mask, B, S, T)                         # [B, S] each
    if bool((ke > filled).any()):
        raise ValueError(f"attention_mask: a query sees positions up to {int(ke.max())} but "
                         f"the cache holds {filled} indexer keys")
    bases = row_bases(ks, ke)
    table = None
    if layer is not None:
        table = pooled_blocks_for(layer, keys_before, length_before, keys, filled, bases,
                                  block_size=state.block_size, fp8=state.fp8)
    width = min(module.index_topk, T)
    out = torch.empty(B, S, width, dtype=torch.int32, device=hidden_states.device)
    for b, base in enumerate(bases):
        k_row = keys[b, base:filled]                                          # [N, D]
        seen = ke[b] > ks[b]
        ks_row = torch.where(seen, ks[b] - base, 0).to(torch.int32)           # [S]
        ke_row = torch.where(seen, ke[b] - base, 0).to(torch.int32)
        q_row, w_row, k_scale = q[b], w[b], None
        if state.fp8:
            q_row, q_scale = quantize_fp8(q_row, group_size=q_row.shape[-1])   # scale [S, H]
            w_row = w_row * q_scale
            k_row, k_scale = quantize_fp8(k_row, group_size=k_row.shape[-1])   # scale [N]
        pooled = None if table is None else table.pooled(b, filled - base)
        rel = hisa_index(q_row, k_row, w_row, ks_row, ke_row, k_scale=k_scale,
                         topk=module.index_topk, block_size=state.block_size,
                         block_topk=state.block_topk, pooled=pooled, backend=state.backend)
        out[b] = model_indices(rel, ks_row.long() + base, ke_row.long() + base, T, width)
    return out


def hisa_indexers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every indexer of ``model`` that :func:`enable_hisa` has switched."""
    return [(n, m) for n, m in model.named_modules() if _STATE in m.__dict__]


def _patch_slot(module: torch.nn.Module) -> str:
    # accelerate's hooks replace module.forward on the instance with a wrapper that calls
    # module._old_forward: patch the wrapped callable so device alignment keeps working.
    if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__:
        return "_old_forward"
    return "forward"


def _restore(module: torch.nn.Module, name: str) -> None:
    state: _IndexerState = module.__dict__[_STATE]
    if module.__dict__.get(state.slot) is not state.patched:
        raise RuntimeError(f"{name}: its {state.slot} was replaced after enable_hisa (another "
                           f"wrapper?), so disabling HISA cannot restore the stock forward "
                           f"exactly; remove that wrapper first")
    if state.previous is _MISSING:
        del module.__dict__[state.slot]
    else:
        module.__dict__[state.slot] = state.previous
    del module.__dict__[_STATE]


class HisaHandle:
    """The indexers one :func:`enable_hisa` call switched. ``disable()`` or leaving a ``with``
    block switches exactly those back."""

    def __init__(self, modules: list[tuple[str, torch.nn.Module]]) -> None:
        self._modules = modules

    @property
    def indexers(self) -> list[tuple[str, torch.nn.Module]]:
        return list(self._modules)

    def disable(self) -> int:
        """Restore the stock forward of every indexer still switched; returns how many."""
        restored = 0
        for name, module in self._modules:
            if _STATE in module.__dict__:
                _restore(module, name)
                restored += 1
        return restored

    def __enter__(self) -> "HisaHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.disable()

    def __repr__(self) -> str:
        return f"HisaHandle({len(self._modules)} indexers)"


def enable_hisa(model: torch.nn.Module, *, block_size: int = 128, block_topk: int = 64,
                backend: str = "auto", fp8: bool = False) -> HisaHandle:
    """Switch every DSA indexer of a transformers model to HISA selection.

    Args:
        model: a loaded model (``DeepseekV32ForCausalLM``, ``GlmMoeDsaForCausalLM``, or any
            module containing their indexers).
        block_size: B, keys per block. block_topk: m, blocks kept per query (2 of them the
            forced first and last); ``(m - 2) * B + 2 >= index_topk`` is required so that
            every query gets as many keys as the stock indexer gives it.
        backend: "auto" (Triton kernels on CUDA when the shapes suit them, else the PyTorch
            reference), "triton" or "torch"; passed to :func:`hisa.hisa_index`.
        fp8: score with FP8 e4m3 q and k (per-token / per-head scales, DeepSeek's recipe via
            :func:`hisa.quantize_fp8`) instead of the model's bf16/fp32 values.

    Returns:
        A :class:`HisaHandle`; ``with enable_hisa(model): ...`` switches back on exit.

    Raises:
        ValueError / TypeError: bad settings, no supported indexer in ``model``, HISA already
            enabled on one of them.
        UnsupportedTransformersError: the installed transformers' indexer code differs from
            the version the adapter was tested against (see ``PINNED_TRANSFORMERS``).

    Example:
        >>> with enable_hisa(model, block_size=128, block_topk=64):
        ...     ids = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    check_positive_int("block_size", block_size)
    check_positive_int("block_topk", block_topk, minimum=2)
    check_backend(backend)
    if not isinstance(fp8, bool):
        raise TypeError(f"fp8: expected a bool, got {type(fp8).__name__}")
    installed_transformers()
    found, checked = [], set()
    for name, module in model.named_modules():
        spec = find_model(module)
        if spec is None:
            continue
        if _STATE in module.__dict__:
            raise ValueError(f"model: HISA is already enabled on {name}; call disable_hisa "
                             f"first")
        if spec.model_type not in checked:
            check_model_code(spec)
            checked.add(spec.model_type)
        check_indexer_module(module, name)
        _check_counts(block_size, block_topk, module.index_topk, name)
        found.append((name, module, spec))
    if not found:
        names = sorted({type(m).__name__ for m in model.modules()
                        if type(m).__name__.endswith("Indexer")})
        extra = (f" (it has {', '.join(names)}, which the adapter does not support; a model "
                 f"loaded with trust_remote_code runs the checkpoint's own modeling code: load "
                 f"it without, to get transformers' implementation)") if names else ""
        supported = ", ".join(spec.model_type for spec in MODELS)
        raise ValueError(f"model: expected a transformers DSA model with a supported lightning "
                         f"indexer ({supported}), found none{extra}")
    for name, module, spec in found:
        slot = _patch_slot(module)
        state = _IndexerState(spec, block_size=block_size, block_topk=block_topk,
                              backend=backend, fp8=fp8, slot=slot,
                              previous=module.__dict__.get(slot, _MISSING))
        state.patched = types.MethodType(_hisa_forward, module)
        module.__dict__[_STATE] = state
        module.__dict__[slot] = state.patched
    return HisaHandle([(name, module) for name, module, _ in found])


def disable_hisa(model: torch.nn.Module) -> int:
    """Switch every HISA indexer of ``model`` back to the stock forward; returns how many."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    switched = hisa_indexers(model)
    for name, module in switched:
        _restore(module, name)
    return len(switched)
