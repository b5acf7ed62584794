"""``hisa distill``: train DSA lightning indexers for a frozen model (DeepSeek's dense warm-up).

The model stays frozen; one indexer per chosen layer learns to imitate that layer's attention
(KL between the attention probabilities summed over the heads and the softmax of the indexer
score). Training text: the King James Bible (Debian's bible-kjv-text), disjoint from the Austen
text the evaluation uses. Writes ``<out>.safetensors`` and ``<out>.json`` (the card).

The committed Gemma-3 indexers were made with the defaults:
``hisa distill --model gemma3 --out hisa/distill/weights/gemma3-270m``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..eval.austen import DEFAULT_CACHE
from .train import DistillConfig

_D = DistillConfig()
DEFAULT_WINDOWS = "16384x1,8192x1,4096x3"
DEFAULT_HELDOUT = "4096x1"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=("gemma3", "smollm2"), default="gemma3",
                   help="frozen model whose layers get indexers (default: %(default)s)")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="layer indices (default: the model's global-attention layers; "
                        "Gemma-3-270M: 5 11 17)")
    p.add_argument("--windows", default=DEFAULT_WINDOWS,
                   help="training windows as LENGTHxCOUNT,... in tokens, laid end to end from "
                        "the start of the text (default: %(default)s)")
    p.add_argument("--heldout", default=DEFAULT_HELDOUT,
                   help="held-out windows, from the end of the text (default: %(default)s)")
    p.add_argument("--steps", type=int, default=_D.steps, help="optimizer steps (default: "
                   "%(default)s)")
    p.add_argument("--pairs-per-step", type=int, default=_D.pairs_per_step,
                   help="query rows x keys per layer per step; rows = this / window length "
                        "(default: %(default)s, 32 rows of a 16K window)")
    p.add_argument("--lr", type=float, default=_D.lr, help="AdamW peak learning rate, cosine "
                   "decay to a tenth (default: %(default)s)")
    p.add_argument("--block-weight", type=float, default=_D.block_weight,
                   help="weight of the block-level KL term (default: %(default)s, the plain "
                        "DeepSeek recipe)")
    p.add_argument("--block-size", type=int, default=_D.block_size,
                   help="B of the block-level term (default: %(default)s)")
    p.add_argument("--heads", type=int, default=_D.heads, help="index heads H (default: "
                   "%(default)s)")
    p.add_argument("--head-dim", type=int, default=_D.head_dim, help="index head dim D "
                   "(default: %(default)s)")
    p.add_argument("--rope-dim", type=int, default=_D.rope_dim,
                   help="leading dims of D that RoPE rotates (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=_D.eval_every,
                   help="steps between held-out evaluations (default: %(default)s)")
    p.add_argument("--seed", type=int, default=_D.seed, help="default: %(default)s")
    p.add_argument("--chunk", type=int, default=2048,
                   help="prefill chunk of the capture pass in tokens (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when available, else cpu")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                   help="model, text and capture cache, never the repository "
                        "(default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("hisa_distill_out/indexers"),
                   help="output stem: writes OUT.safetensors and OUT.json (default: "
                        "%(default)s)")


def training_ids(tokenizer, cache_dir: Path, model: str) -> torch.Tensor:
    """The KJV text as token ids of ``model``'s tokenizer (cached)."""
    from ..eval.kjv import kjv_text
    path = Path(cache_dir) / "kjv" / f"ids_{model}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    text = kjv_text(cache_dir)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ids, path)
    return ids


def run(args) -> int:
    from ..eval.models import load_model
    from .api import distill, parse_windows

    t0 = time.time()
    print(f"hisa distill: loading {args.model} on {args.device}", flush=True)
    lm = load_model(args.model, device=args.device, cache_dir=args.cache_dir)
    print(f"loaded in {time.time() - t0:.0f} s; tokenizing the KJV text", flush=True)
    ids = training_ids(lm.tokenizer, args.cache_dir, args.model)
    layers = args.layers or sorted(lm.global_layers)
    cfg = DistillConfig(heads=args.heads, head_dim=args.head_dim, rope_dim=args.rope_dim,
                        steps=args.steps, pairs_per_step=args.pairs_per_step, lr=args.lr,
                        block_weight=args.block_weight, block_size=args.block_size,
                        eval_every=args.eval_every, seed=args.seed)
    log = lambda s: print(s, flush=True)
    _, card = distill(lm.model, ids, layers=layers, windows=parse_windows(args.windows),
                      heldout=parse_windows(args.heldout), config=cfg, model_name=args.model,
                      text_name="kjv (Debian bible-kjv-text)", cache_dir=args.cache_dir,
                      chunk=args.chunk, out=args.out, log=log,
                      card_extra={"text_tokens": int(ids.numel())})
    print(f"wrote {args.out}.safetensors and {args.out}.json; held-out KL "
          + " ".join(f"L{ly}={v:.3f}" for ly, v in card["heldout_kl"].items())
          + f"; {time.time() - t0:.0f} s in all", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hisa distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
