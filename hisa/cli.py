"""The `hisa` command: env, selftest, bench, eval (distribution ``hisa-indexer``)."""
from __future__ import annotations

import argparse
import importlib
import sys

from ._version import __version__
from .utils.cli_format import DefaultsHelpFormatter


def _env(_: argparse.Namespace) -> int:
    import platform

    import torch

    from .utils.backend import triton_installed
    print(f"hisa {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    if triton_installed():
        import triton
        print(f"triton {triton.__version__}")
    else:
        print("triton: not installed (torch backend only)")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"cuda: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
              f"capability {p.major}.{p.minor}")
    else:
        print("cuda: none (ops run the torch reference backend on CPU)")
    return 0


def _selftest(_: argparse.Namespace) -> int:
    from .selftest import run_selftest
    return run_selftest()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hisa", description="hisa: the hierarchical "
                                     "sparse-attention indexer (distribution hisa-indexer). "
                                     "`hisa <command> --help` describes each command.",
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"hisa {__version__} (distribution hisa-indexer)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="show versions and the device").set_defaults(func=_env)
    sub.add_parser("selftest", help="check the library on this machine").set_defaults(func=_selftest)
    from .bench import cli as bench_cli
    b = sub.add_parser("bench", help="check, then time flat DSA vs HISA (needs a GPU)",
                       description="Check the Triton kernels against the references, then time "
                                   "flat DSA vs HISA; print a table, append JSON rows, write "
                                   "a plot.", formatter_class=DefaultsHelpFormatter)
    bench_cli.add_arguments(b)
    b.set_defaults(func=bench_cli.run)
    _add_optional(sub, "distill", "train DSA lightning indexers for a frozen model")
    _add_optional(sub, "eval", "fidelity of HISA vs flat top-k on real models")
    return parser


def _add_optional(sub, name: str, help_text: str) -> None:
    """Register ``hisa <name>`` from ``hisa.<name>.cli``. Its imports need the optional
    ``eval`` extra (transformers, ...): without it a core install still gets the command, which
    then says which package to install instead of a traceback."""
    try:
        cli = importlib.import_module(f"{__package__}.{name}.cli")
    except ImportError as err:
        _needs_eval_extra(sub, name, f"{help_text} (needs hisa[eval])", err)
        return
    p = sub.add_parser(name, help=help_text, description=cli.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_arguments(p)
    p.set_defaults(func=cli.run)


def _needs_eval_extra(sub, name: str, help_text: str, err: ImportError) -> None:
    """Register ``name`` as a command that only explains how to install what it is missing."""
    def missing(_args) -> int:
        print(f"hisa {name} needs the optional dependencies: "
              f"pip install 'hisa-indexer[eval]' ({err})", file=sys.stderr)
        return 2
    # Any options the real command takes still reach the message, not an argparse error
    # (main lets such a command ignore arguments it does not know).
    sub.add_parser(name, help=help_text, description=f"{help_text}: {err}").set_defaults(
        func=missing, ignores_arguments=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "ignores_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
