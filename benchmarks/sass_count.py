"""Static instruction counts of a Triton kernel for the H200 (sm_90), on a machine without a GPU.

Triton compiles to PTX in-process and ships ``ptxas`` and ``nvdisasm``, so the SASS of a kernel
can be read anywhere. For the decode selections (one program per row, bound by their own
instruction latency on one SM: ``benchmarks/decode_notes.md``) the executed instruction count
is nearly the static one plus the threshold loop times its passes, so a change's effect on it
can be checked before a GPU is lent:

    python benchmarks/sass_count.py token_select [--warps 8] [--top 12]
    python benchmarks/sass_count.py block_select
    python benchmarks/sass_count.py topk_fast --warps 4 --maxnreg 168
    python benchmarks/sass_count.py topk_general --warps 4
    python benchmarks/sass_count.py token_scores --warps 4 --set STAGES=1 --set SELECT=1

Prints the registers a thread and the bytes spilled (``cuobjdump --dump-resource-usage``),
the SASS instruction total, the instructions of each loop (label to back branch), the
shuffles and barriers, and the PTX instructions per source line (the helper line they are
inlined from), largest first.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402

from hisa.testing.sm90 import SELECT_KERNELS, compile_sm90  # noqa: E402

NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def sass_lines(cubin: bytes, work: str) -> list[str]:
    path = os.path.join(work, "kernel.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    text = subprocess.run([os.path.join(NVIDIA_BIN, "nvdisasm"), "-c", path],
                          capture_output=True, text=True, check=True).stdout
    return [line for line in text.splitlines()
            if re.search(r"/\*[0-9a-f]{4,}\*/", line) or re.match(r"^\.L_x_\d+:", line)]


def resource_usage(cubin: bytes, work: str) -> str:
    """The kernel's ``REG:`` (registers a thread) and ``STACK:`` (spill bytes) line."""
    path = os.path.join(work, "kernel.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    text = subprocess.run([os.path.join(NVIDIA_BIN, "cuobjdump"), "--dump-resource-usage",
                           path], capture_output=True, text=True, check=True).stdout
    return " ".join(line.strip() for line in text.splitlines() if "REG:" in line)


def loops(lines: list[str]) -> list[tuple[str, int]]:
    """(label, instructions) of each backward branch's body."""
    where, out, n = {}, [], 0
    for line in lines:
        label = re.match(r"^(\.L_x_\d+):", line)
        if label:
            where[label.group(1)] = n
            continue
        n += 1
        target = re.search(r"BRA[^`]*`\((\.L_x_\d+)\)", line)
        if target and target.group(1) in where and n - where[target.group(1)] > 1:
            out.append((target.group(1), n - where[target.group(1)]))    # not the exit trap
    return out


def ptx_per_line(ptx: str) -> collections.Counter:
    counts, loc = collections.Counter(), "?"
    for line in ptx.splitlines():
        s = line.strip()
        if s.startswith(".loc"):
            site = line.split("//")[-1].strip() if "//" in line else "?"
            loc = site.split("@[")[0].strip() + (" in " + site.split("@[")[1].split()[0]
                                                  if "@[" in site else "")
        elif s and not s.startswith(("//", ".", "$", "{", "}")) and not s.endswith(":"):
            counts[loc] += 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kernel", choices=sorted(SELECT_KERNELS))
    ap.add_argument("--warps", type=int, default=8)
    ap.add_argument("--maxnreg", type=int, default=None, help="register cap (launch option)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=INT",
                    help="override one of the kernel's integer constexprs (repeatable)")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--work", default="/tmp")
    args = ap.parse_args()
    sets = {name: int(value) for name, value in (kv.split("=", 1) for kv in args.set)}
    compiled = compile_sm90(args.kernel, args.warps, maxnreg=args.maxnreg, **sets)
    print(resource_usage(compiled.asm["cubin"], args.work),
          f"(shared memory at launch: {compiled.metadata.shared} bytes)")
    lines = sass_lines(compiled.asm["cubin"], args.work)
    ins = [line for line in lines if not line.startswith(".L_x")]
    print(f"{args.kernel}, {args.warps} warps, sm_90: {len(ins)} SASS instructions, "
          f"{sum('SHFL' in i for i in ins)} shuffles, {sum('BAR' in i for i in ins)} barriers")
    for label, n in loops(lines):
        print(f"  loop {label}: {n} instructions per iteration")
    print(f"PTX instructions per source line (top {args.top}):")
    for loc, n in ptx_per_line(compiled.asm["ptx"]).most_common(args.top):
        print(f"  {n:6d}  {loc}")


if __name__ == "__main__":
    main()
