"""Jane Austen's six novels as long natural text, from Debian's ``r-cran-janeaustenr``.

The package is fetched with ``apt-get download`` and unpacked with ``dpkg -x`` (no R needed);
its ``data/Rdata.rdb`` lazy-load database holds one character vector (one line of text per
element) per novel, read by :mod:`hisa.eval.rdata`. The text is cached as plain UTF-8 files
under ``<cache_dir>/austen/`` so later runs need neither apt nor the parser.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from .rdata import read_lazyload_db

DEFAULT_CACHE = Path.home() / ".cache" / "hisa"
BOOKS = ("emma", "prideprejudice", "sensesensibility", "mansfieldpark", "persuasion",
         "northangerabbey")
_SYSTEM_DATA = Path("/usr/lib/R/site-library/janeaustenr/data/Rdata")


def _unpack_package(dest: Path) -> Path:
    """apt-get download + dpkg -x the package into ``dest``; returns the lazy-load base path."""
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"`{tool}` is needed to fetch r-cran-janeaustenr (Debian only)")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=tmp, check=True,
                       capture_output=True)
        deb = next(Path(tmp).glob("r-cran-janeaustenr_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(dest)], check=True, capture_output=True)
    return dest / "usr/lib/R/site-library/janeaustenr/data/Rdata"


def austen_books(cache_dir: str | Path | None = None) -> dict[str, str]:
    """The six novels, ``{name: text}``, lines joined with newlines (cached after first use)."""
    root = Path(cache_dir or DEFAULT_CACHE) / "austen"
    files = {b: root / f"{b}.txt" for b in BOOKS}
    if not all(f.exists() for f in files.values()):
        root.mkdir(parents=True, exist_ok=True)
        base = _SYSTEM_DATA
        if not base.with_suffix(".rdb").exists():
            base = _unpack_package(root / "deb")
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
