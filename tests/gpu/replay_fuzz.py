"""Replay the GPU prefill fuzzer's cases one at a time, on the GPU or on the CPU interpreter.

test_fuzz_prefill_ops_gpu is derandomized (no database, no shrinking), so the cases it draws
are a fixed sequence for one hypothesis version and one set of imported project modules
(hypothesis draws some integers from their constants; tests/fuzz_cases.py imports every module
its checks use, so running checks changes nothing). This script draws that sequence by running
the test function itself with ``fuzz_cases.check_prefill`` replaced by a collector: the test's
source, and with it hypothesis's seed (a digest of that source), stay the same. The device of
the tier's Profile does not enter the strategy. The sequence is the one of a pytest run of
tests/gpu/test_fuzz_gpu.py by itself; other test files collected in the same run import more
modules and change it. ``--list`` prints the hypothesis version and a digest of the sequence,
so the lists of two machines can be compared before a case index is trusted.

    PYTHONPATH=. python3 tests/gpu/replay_fuzz.py --list              # the cases, by index
    PYTHONPATH=. python3 tests/gpu/replay_fuzz.py --device cuda --case 41
    PYTHONPATH=. python3 tests/gpu/replay_fuzz.py --device cuda --all --keep-going \
        --save-inputs $OUT/failing                                    # then --inputs on a CPU
    PYTHONPATH=. nice -n 10 python3 tests/gpu/replay_fuzz.py --device cpu --all --by-cost

On the CPU the Triton kernels run under the interpreter, with the shims of
tests/interpret/conftest.py. bf16 is wrong under the interpreter, so a bf16 case is replayed
there with float32 and with float8_e4m3fn in its place (``--bf16-as``). The CUDA and the CPU
generators draw different tensors for one seed: ``--inputs cpu`` replays a case on the GPU
with the CPU's tensors, ``--save-inputs`` / ``--inputs DIR`` carry a GPU failure's tensors to
the CPU.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)


def _load_interpreter_shims() -> None:
    """Import tests/interpret/conftest.py (it sets TRITON_INTERPRET=1 before importing
    triton and installs the interpreter shims and memcheck)."""
    spec = importlib.util.spec_from_file_location("_interpret_conftest",
                                                  os.path.join(TESTS, "interpret", "conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


def draw_cases(examples: int | None = None) -> list[dict]:
    """The cases test_fuzz_prefill_ops_gpu draws, in order."""
    import fuzz_cases as F
    import test_fuzz_gpu as G
    cases = []
    real = F.check_prefill
    F.check_prefill = lambda case, p: cases.append(case)
    try:
        G.test_fuzz_prefill_ops_gpu(examples)
    finally:
        F.check_prefill = real
    return cases


def case_key(case: dict) -> str:
    """A case as text that is the same in every process (sets sorted)."""
    return repr(sorted((k, str(sorted(v)) if isinstance(v, set) else str(v))
                       for k, v in case.items()))


def cost(case: dict) -> int:
    """Scored (query, key) pairs x heads x dim: the flat reference's work, a proxy of the
    interpreter's time."""
    pairs = sum(q * (2 * L - q + 1) // 2 for L, q in zip(case["lens"], case["qlens"]))
    return pairs * case["heads"] * case["dim"]


def route(case: dict) -> str:
    """Which path hisa_index takes on this case (plan_windows, as the op reads it): "flat"
    when no query prunes (the exact regime), else "pipeline"; "+repair" when some window of
    at most topk keys loses a block and keep_short_windows recomputes it."""
    import torch
    from hisa.ops.indexer.prefill import plan_windows
    from hisa.utils.seqlens import windows_from_cu_seqlens
    cu_q = torch.tensor([0] + case["qlens"]).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + case["lens"]).cumsum(0).to(torch.int32)
    ks, ke = windows_from_cu_seqlens(cu_q, cu_k)
    plan = plan_windows(ks, ke, sum(case["lens"]), topk=case["topk"],
                        block_size=case["block_size"], block_topk=case["block_topk"])
    if ks.numel() == 0:
        return "T=0"
    return (("flat" if plan.nothing_pruned else "pipeline")
            + ("+repair" if plan.short_pruned else "") + f" blocks<={plan.max_blocks}")


def describe(i: int, case: dict) -> str:
    import torch
    dt = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8"}
    nf = case["nonfinite"]
    nf = "-" if nf is None else f"{nf[0]}={nf[1]}"
    return (f"#{i:2d} lens={case['lens']} qlens={case['qlens']} H={case['heads']} "
            f"D={case['dim']} {dt[case['dtype']]} topk={case['topk']} B={case['block_size']} "
            f"m={case['block_topk']} strides={','.join(sorted(case['strides'])) or '-'} "
            f"nonfinite={nf} seed={case['seed']} {route(case)} cost={cost(case):.2e}")


def _input_key(case: dict) -> str:
    """File name of a case's inputs: what make_exact_indexer_inputs reads, but the dtype (the
    values are integers, exact in every dtype: a bf16 case's file serves its stand-ins)."""
    return (f"L{'-'.join(map(str, case['lens']))}_Q{'-'.join(map(str, case['qlens']))}"
            f"_H{case['heads']}_D{case['dim']}_s{case['seed']}.pt")


def _as_dtype(inp, dtype):
    """The same integer-valued inputs in another dtype (FP8 keys get unit scales)."""
    import torch
    if inp.q.dtype == dtype:
        return inp
    fp8 = dtype == torch.float8_e4m3fn
    k_scale = inp.k_scale if fp8 and inp.k_scale is not None else None
    k = inp.k.float() * (inp.k_scale[:, None] if inp.k_scale is not None and not fp8 else 1)
    if fp8 and k_scale is None:
        k_scale = torch.ones(k.shape[0], device=k.device)
    return type(inp)(inp.q.float().to(dtype), k.to(dtype), inp.weights, inp.ks, inp.ke, k_scale)


#: Inputs of the case being replayed, as check_prefill drew them (for --save-inputs).
LAST_INPUTS: dict = {}
INPUT_FIELDS = ("q", "k", "weights", "ks", "ke", "k_scale")


def patch_inputs(source: str | None) -> None:
    """Where check_prefill's inputs come from (it calls fuzz_cases.make_exact_indexer_inputs),
    and a copy of them kept in LAST_INPUTS.

    ``source``: None, drawn on the case's device (as the test does; the CUDA and the CPU
    generators give different tensors for one seed); "cpu", drawn on the CPU and moved, so a
    GPU replay sees the tensors a CPU replay sees; or a folder written by :func:`save_inputs`,
    so a CPU replay sees the tensors a GPU replay drew.
    """
    import torch
    import fuzz_cases as F
    from hisa.testing.inputs import IndexerInputs
    real = F.make_exact_indexer_inputs

    def make(seq_lens, *, heads, head_dim, dtype, query_lens, device, seed):
        key = _input_key(dict(lens=list(seq_lens), qlens=list(query_lens), heads=heads,
                              dim=head_dim, dtype=dtype, seed=seed))
        if source is None or source == "cpu":
            inp = real(seq_lens, heads=heads, head_dim=head_dim, dtype=dtype,
                       query_lens=query_lens, device="cpu" if source else device, seed=seed)
        else:
            saved = torch.load(os.path.join(source, key))
            inp = _as_dtype(IndexerInputs(*(saved[f] for f in INPUT_FIELDS)), dtype)
        tensors = {f: getattr(inp, f) for f in INPUT_FIELDS}
        LAST_INPUTS.clear()
        LAST_INPUTS.update(key=key, tensors={f: None if t is None else t.cpu()
                                             for f, t in tensors.items()})
        return IndexerInputs(*(None if t is None else t.to(device) for t in tensors.values()))

    F.make_exact_indexer_inputs = make


def save_inputs(folder: str) -> str:
    """Write the last replayed case's inputs under ``folder``; returns the file's path."""
    import torch
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LAST_INPUTS["key"])
    torch.save(LAST_INPUTS["tensors"], path)
    return path


def replay(case: dict, profile) -> None:
    import fuzz_cases as F
    F.check_prefill(case, profile)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    ap.add_argument("--case", type=int, nargs="*", default=[], help="case indices to replay")
    ap.add_argument("--all", action="store_true", help="replay every case")
    ap.add_argument("--by-cost", action="store_true", help="cheapest cases first")
    ap.add_argument("--max-cost", type=float, default=None,
                    help="skip cases whose cost (see --list) exceeds this")
    ap.add_argument("--examples", type=int, default=None,
                    help="examples drawn (default: the test's EXAMPLES)")
    ap.add_argument("--bf16-as", default="float32,float8_e4m3fn",
                    help="on the CPU, dtypes that stand in for bf16 (comma-separated)")
    ap.add_argument("--keep-going", action="store_true", help="replay past a failure")
    ap.add_argument("--inputs", default=None,
                    help="'cpu': draw the inputs on the CPU (the tensors of a CPU replay), or a "
                         "folder of --save-inputs files (default: drawn on --device)")
    ap.add_argument("--save-inputs", default=None, metavar="DIR",
                    help="save a failing case's inputs here (replay them with --inputs DIR)")
    args = ap.parse_args(argv)

    if args.device == "cpu":
        _load_interpreter_shims()
    sys.path[:0] = [TESTS, HERE]
    import hypothesis
    import torch
    import test_fuzz_gpu as G
    from dataclasses import replace

    cases = draw_cases(args.examples)
    digest = hashlib.sha1(repr([case_key(c) for c in cases]).encode())
    print(f"hypothesis {hypothesis.__version__}: {len(cases)} cases, sequence "
          f"{digest.hexdigest()[:12]}", flush=True)
    if args.list:
        try:
            for i, c in enumerate(cases):
                print(describe(i, c), flush=True)
        except BrokenPipeError:              # `--list | head -1`: the reader has what it wants
            sys.stdout = open(os.devnull, "w")
        return 0
    picked = list(range(len(cases))) if args.all else args.case
    if args.by_cost:
        picked.sort(key=lambda i: cost(cases[i]))
    profile = replace(G.GPU, device=args.device)
    patch_inputs(args.inputs)
    if args.device == "cuda":
        import triton
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"triton {triton.__version__}", flush=True)
    failed = []
    for i in picked:
        case = cases[i]
        if args.max_cost is not None and cost(case) > args.max_cost:
            print(f"skip (cost) {describe(i, case)}", flush=True)
            continue
        variants = [case]
        if args.device == "cpu" and case["dtype"] == torch.bfloat16:
            variants = [dict(case, dtype=getattr(torch, d)) for d in args.bf16_as.split(",")]
        for v in variants:
            label = describe(i, v) + (" (bf16 stand-in)" if v is not case else "")
            t0 = time.perf_counter()
            try:
                replay(v, profile)
            except Exception:               # a failing check: report it, maybe go on
                print(f"FAIL {time.perf_counter() - t0:7.1f}s {label}", flush=True)
                traceback.print_exc()
                if args.save_inputs and LAST_INPUTS:
                    print(f"inputs saved to {save_inputs(args.save_inputs)}", flush=True)
                failed.append(i)
                if not args.keep_going:
                    return 1
            else:
                print(f"ok   {time.perf_counter() - t0:7.1f}s {label}", flush=True)
    print(f"failed: {sorted(set(failed))}" if failed else "all replayed cases passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
