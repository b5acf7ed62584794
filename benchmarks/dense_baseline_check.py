"""Cross-check of the evaluation's dense baseline: the perplexity of the last TAIL tokens of the
Austen window that `hisa eval` uses at context L, from one plain transformers forward (SDPA
attention, no chunking, no hisa code in the attention path), to compare with the dense row of
an eval run at the same L (`ppl` of method "dense" in its fidelity_*.jsonl).

    python benchmarks/dense_baseline_check.py --context 4096 [--rows ROWS.jsonl]

Needs a converted Gemma-3 model in the cache (any earlier `hisa eval` run makes one). At 4K it
printed 15.92 where the default run's dense row has 15.99 (CPU, fp32); at 8K 60.90 where the
8K run's dense row has 61.54, so the eval's dense baseline is the model's own. ``--keep-last N``
scores the same tail with a shorter context.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    from hisa.eval.austen import DEFAULT_CACHE
    from hisa.eval.documents import document_ids
    from hisa.eval.models import _load_converted

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=4096, help="L (default: %(default)s)")
    p.add_argument("--tail", type=int, default=256, help="scored tokens (default: %(default)s)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--keep-last", type=int, default=None,
                   help="score the same tail tokens with only the window's last N tokens as "
                        "context: separates a hard passage from a long-context effect")
    p.add_argument("--rows", type=Path, default=None,
                   help="an eval run's fidelity_*.jsonl: print its dense ppl at --context too")
    args = p.parse_args()
    if args.keep_last is not None and not args.tail <= args.keep_last < args.context:
        p.error(f"--keep-last: expected --tail ({args.tail}) <= N < --context ({args.context}), "
                f"got {args.keep_last}")
    tok, model = _load_converted(args.cache_dir / "gemma3" / "transformers")
    model.set_attn_implementation("sdpa")      # the stock attention, not the eval's router
    model.eval()
    ids = document_ids("austen", tok, args.context, cache_dir=args.cache_dir)[None]
    if args.keep_last is not None:
        # The model's first token stays (Gemma expects <bos> at position 0).
        ids = torch.cat([ids[:, :1], ids[:, -args.keep_last:]], dim=1)
    t0 = time.time()
    with torch.no_grad():
        logits = model(ids).logits[0, -args.tail - 1:-1]
    nll = torch.nn.functional.cross_entropy(logits.float(), ids[0, -args.tail:])
    kept = "" if args.keep_last is None else f", context cut to <bos> + last {args.keep_last}"
    print(f"L={args.context}{kept}: SDPA tail perplexity {float(nll.exp()):.3f} "
          f"({time.time() - t0:.0f} s)")
    if args.rows:
        for line in args.rows.open():
            r = json.loads(line)
            if r["method"] == "dense" and r["context"] == args.context:
                print(f"  eval dense row ({r.get('document')}, {r.get('budget')}): "
                      f"{r['ppl']:.3f}")
                break


if __name__ == "__main__":
    main()
