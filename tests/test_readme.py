"""The README runs as written: its python examples execute (and do what their text says), its
Set up section holds the two commands CI runs, and the help texts point to no missing file."""
import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hisa

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PYTHON_BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.M | re.S)


def check_prefill_example(ns: dict) -> None:
    idx, flat, same = ns["idx"], ns["flat"], ns["same"]
    assert idx.shape == flat.shape == (ns["T"], 64) and idx.dtype == torch.int32
    # first sequence: 256 keys at most, m*B = 256, so exactly flat's set (the README says so)
    assert bool(same[:256].all())
    # second sequence: windows up to 768 keys > m*B, so HISA prunes: some sets differ
    assert not bool(same[256:].all())


def check_decode_example(ns: dict) -> None:
    idx = ns["idx"]
    assert idx.shape == (2, 256) and idx.dtype == torch.int32
    flat = hisa.dsa_index_paged(ns["q8"], ns["cache"].kv_cache, ns["weights"], ns["seq_lens"],
                                ns["block_table"], topk=256)
    sets_equal = (idx.sort(dim=1).values == flat.sort(dim=1).values).all(dim=1)
    assert bool(sets_equal[1])            # 301 keys: 3 blocks <= m = 4, exact
    assert not bool(sets_equal[0])        # 1,001 keys: 8 blocks > m = 4, pruned


def check_three_level_example(ns) -> None:
    """Queries with at most super_topk super-blocks select exactly the two-level set."""
    two, three = ns["two"], ns["three"]
    same = (two.sort(dim=1).values == three.sort(dim=1).values).all(dim=1)
    assert bool(same[:512].all()), "three levels differ from two where every super-block fits"


def example_check(code: str):
    """The extra check of a known example (found by what it calls), else None."""
    if "super_size" in code:
        return check_three_level_example
    if "hisa.hisa_index(" in code:
        return check_prefill_example
    if "hisa.hisa_index_paged(" in code:
        return check_decode_example
    return None


def test_readme_has_the_prefill_and_decode_examples():
    checks = [example_check(code) for code in PYTHON_BLOCKS]
    assert check_prefill_example in checks and check_decode_example in checks


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_block_runs_as_written(index):
    code = PYTHON_BLOCKS[index]
    namespace = {"__name__": "__readme__"}
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)
    check = example_check(code)
    if check is not None:
        check(namespace)


def test_readme_setup_section_holds_the_two_commands_ci_runs():
    script = ROOT / ".ci" / "readme_commands.sh"
    if not script.exists():
        pytest.skip("not a checkout (no .ci/)")
    out = subprocess.run(["bash", str(script), str(ROOT / "README.md")], capture_output=True,
                         text=True, check=True).stdout
    cmds = out.splitlines()
    assert len(cmds) == 2, cmds
    assert cmds[0].startswith("pip install ") and cmds[0].endswith("&& hisa eval")
    assert '-e ".[dev]"' in cmds[1] and cmds[1].endswith("python -m pytest -q -n auto")


def _all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def test_help_texts_name_only_files_the_repository_has():
    from hisa.cli import build_parser
    for parser in _all_parsers(build_parser()):
        text = parser.format_help()
        for name in re.findall(r"[\w./-]+\.md\b", text):
            assert (ROOT / name).exists(), f"`{parser.prog} --help` names {name}"


def test_every_commands_help_states_every_default():
    """``hisa bench --help``, ``hisa eval --help`` and the others: every option says its
    default (the eval help once gave none)."""
    from hisa.cli import build_parser
    parsers = _all_parsers(build_parser())
    assert {"hisa bench", "hisa eval", "hisa distill"} <= {p.prog for p in parsers}
    skip = (argparse._HelpAction, argparse._SubParsersAction, argparse._VersionAction)
    for parser in parsers:
        for action in parser._actions:
            if isinstance(action, skip):
                continue
            text = parser._get_formatter()._get_help_string(action)
            assert "default" in (text or ""), f"{parser.prog} {action.option_strings}: {text!r}"


def test_eval_results_go_to_the_git_ignored_folder_the_readme_names():
    from hisa.eval.cli import DEFAULT_OUT
    ignored = (ROOT / ".gitignore").read_text().split()
    assert f"/{DEFAULT_OUT}/" in ignored
    assert f"`{DEFAULT_OUT}/` (git-ignored)" in (ROOT / "README.md").read_text()


def test_version_is_single_sourced():
    from importlib import metadata

    import hisa._version
    assert hisa.__version__ == hisa._version.__version__
    out = subprocess.run([sys.executable, "-m", "hisa.cli", "--version"], capture_output=True,
                         text=True, cwd=ROOT, check=True).stdout
    assert out.split()[:2] == ["hisa", hisa.__version__]
    try:
        installed = metadata.version("hisa-indexer")
    except metadata.PackageNotFoundError:
        pytest.skip("the hisa-indexer distribution is not installed here")
    assert installed == hisa.__version__


# A core install (`pip install hisa-indexer`, no `eval` extra) has no transformers, accelerate or
# gguf. Blocking them in a child interpreter is that install as far as imports go: `hisa --version`
# and `hisa selftest` must still start, and the optional commands must say what to install.
_CORE_ONLY = ("import sys\n"
              "for name in ('transformers', 'accelerate', 'gguf', 'safetensors', 'matplotlib'):\n"
              "    sys.modules[name] = None  # import fails as if the package were absent\n"
              "from hisa.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")


@pytest.mark.parametrize("command", ["distill", "eval"])
def test_core_install_cli_starts_and_names_the_missing_extra(command):
    def hisa_without_extras(*argv):
        return subprocess.run([sys.executable, "-c", _CORE_ONLY, *argv], capture_output=True,
                              text=True, cwd=ROOT)
    version = hisa_without_extras("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("hisa ")
    for argv in ([command], [command, "--model", "gemma3"]):
        out = hisa_without_extras(*argv)
        assert out.returncode == 2, (argv, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr
        assert "pip install 'hisa-indexer[eval]'" in out.stderr, (argv, out.stderr)
