"""Jane Austen's six novels as long natural text, from Debian's ``r-cran-janeaustenr``.

The package is fetched with ``apt-get download`` and unpacked with ``dpkg -x`` (no R needed);
its ``data/Rdata.rdb`` lazy-load database holds one character vector (one line of text per
element) per novel, read by :mod:`hisa.eval.rdata`. The text is cached as plain UTF-8 files
under ``<cache_dir>/austen/`` so later runs need neither apt nor the parser.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

from .fetch import FetchError, format_size, last_lines
from .rdata import read_lazyload_db

DEFAULT_CACHE = Path.home() / ".cache" / "hisa"
BOOKS = ("emma", "prideprejudice", "sensesensibility", "mansfieldpark", "persuasion",
         "northangerabbey")
PACKAGE = "r-cran-janeaustenr"
_SYSTEM_DATA = Path("/usr/lib/R/site-library/janeaustenr/data/Rdata")


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def _deb_size() -> str:
    """The package's download size from apt's lists, for the progress line."""
    try:
        proc = _run(["apt-cache", "show", "--no-all-versions", PACKAGE])
    except OSError:
        return "size unknown"
    for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
        if line.startswith("Size:") and line[5:].strip().isdigit():
            return format_size(int(line[5:].strip()))
    return "size unknown"


def _apt_download(dest: Path, log: Callable[[str], None]) -> Path:
    """``apt-get download`` the .deb into ``dest``; returns its path.

    A fresh machine (a container image) often has empty package lists, where the download
    fails: as root, the lists are refreshed once with ``apt-get update`` and the download
    retried; otherwise the error says to run it.
    """
    log(f"fetching Jane Austen's novels: apt-get download {PACKAGE} ({_deb_size()}) "
        f"(first use only)")
    cmd = ["apt-get", "download", PACKAGE]
    proc = _run(cmd, cwd=dest)
    root = os.geteuid() == 0
    if proc.returncode != 0 and root:
        log(f"apt-get download {PACKAGE} failed (the package lists are probably empty on a "
            f"fresh machine); running `apt-get update` once and retrying")
        update = _run(["apt-get", "update"])
        if update.returncode != 0:
            raise FetchError(f"cannot fetch {PACKAGE}: `apt-get update` exited "
                             f"{update.returncode} ({last_lines(update.stderr)}); "
                             f"install {PACKAGE} with apt-get, then run again")
        proc = _run(cmd, cwd=dest)
    if proc.returncode != 0:
        hint = (f"install it with `apt-get install {PACKAGE}`" if root else
                f"refresh the package lists with `sudo apt-get update` and run again, or "
                f"install it with `sudo apt-get install {PACKAGE}`")
        raise FetchError(f"cannot fetch {PACKAGE}: `{' '.join(cmd)}` exited {proc.returncode} "
                         f"({last_lines(proc.stderr)}); {hint}")
    debs = sorted(dest.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        raise FetchError(f"`{' '.join(cmd)}` succeeded but left no {PACKAGE}_*.deb in {dest}")
    return debs[0]


def _unpack_package(dest: Path, log: Callable[[str], None] = print) -> Path:
    """apt-get download + dpkg -x the package into ``dest``; returns the lazy-load base path."""
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise FetchError(f"`{tool}` is needed to fetch {PACKAGE} (Jane Austen's novels, "
                             f"the evaluation's text), and this machine has no `{tool}`: the "
                             f"evaluation runs on Debian or Ubuntu")
    with tempfile.TemporaryDirectory() as tmp:
        deb = _apt_download(Path(tmp), log)
        proc = _run(["dpkg", "-x", str(deb), str(dest)])
        if proc.returncode != 0:
            raise FetchError(f"cannot unpack {deb.name}: `dpkg -x` exited {proc.returncode} "
                             f"({last_lines(proc.stderr)})")
    return dest / "usr/lib/R/site-library/janeaustenr/data/Rdata"


def austen_books(cache_dir: str | Path | None = None, *,
                 log: Callable[[str], None] = print) -> dict[str, str]:
    """The six novels, ``{name: text}``, lines joined with newlines (cached after first use).

    Raises:
        FetchError: the Debian package could not be fetched; the message says what to run.
    """
    root = Path(cache_dir or DEFAULT_CACHE) / "austen"
    files = {b: root / f"{b}.txt" for b in BOOKS}
    if not all(f.exists() for f in files.values()):
        root.mkdir(parents=True, exist_ok=True)
        base = _SYSTEM_DATA
        if not base.with_suffix(".rdb").exists():
            base = _unpack_package(root / "deb", log)
        db = read_lazyload_db(base)
        for name in BOOKS:
            lines = [ln or "" for ln in db[name].value]
            files[name].write_text("\n".join(lines), encoding="utf-8")
    return {b: f.read_text(encoding="utf-8") for b, f in files.items()}


def austen_text(cache_dir: str | Path | None = None) -> str:
    """All six novels in one string, with paragraph-level whitespace normalised."""
    books = austen_books(cache_dir)
    paras = []
    for name in BOOKS:
        for para in books[name].split("\n\n"):
            para = " ".join(para.split())
            if para:
                paras.append(para)
    return "\n\n".join(paras)
