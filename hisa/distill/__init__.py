"""Lightning indexers for frozen models: DeepSeek-V3.2's dense warm-up stage, and the trained
indexers the package ships.

``hisa distill`` (:mod:`hisa.distill.cli`) or :func:`distill` trains them; :func:`load_trained`
loads a shipped set by model name; the evaluation selects with them (``hisa eval --indexer
trained``, the default).
"""
from __future__ import annotations

from pathlib import Path

from .indexer import IndexerConfig, IndexerSet, LightningIndexer, load_indexers, save_indexers

WEIGHTS_DIR = Path(__file__).parent / "weights"
#: model name (as in ``hisa eval --model``) -> file stem of its committed indexers
TRAINED = {"gemma3": "gemma3-270m"}

__all__ = ["IndexerConfig", "IndexerSet", "LightningIndexer", "TRAINED", "WEIGHTS_DIR",
           "distill", "load_indexers", "load_trained", "resolve_indexer", "save_indexers",
           "trained_path"]


def trained_path(model: str) -> Path:
    """Path of the committed weights for ``model`` (ValueError if none ship)."""
    if model not in TRAINED:
        raise ValueError(f"model: trained indexers ship for {sorted(TRAINED)}, got {model!r}")
    return WEIGHTS_DIR / f"{TRAINED[model]}.safetensors"


def load_trained(model: str, *, device="cpu") -> IndexerSet:
    """The shipped indexers of ``model``, fp32, in eval mode."""
    return load_indexers(trained_path(model), device=device)


def resolve_indexer(spec: str, *, model: str, device="cpu") -> IndexerSet | None:
    """``"trained"``: the shipped set of ``model``; ``"proxy"``: None (raw attention q.k);
    anything else: a path to a weights file written by :func:`save_indexers`."""
    if spec == "proxy":
        return None
    if spec == "trained":
        return load_trained(model, device=device)
    return load_indexers(spec, device=device)


def distill(*args, **kwargs):
    """See :func:`hisa.distill.api.distill` (imported lazily: it needs transformers)."""
    from .api import distill as _distill
    return _distill(*args, **kwargs)
