"""Fails when the built wheel lacks a file the package tracks under hisa/ (a data file left
out of package-data, a module outside a package) or holds a cache file.

Usage: python .ci/check_wheel.py dist/hisa_indexer-<version>-py3-none-any.whl
"""
import subprocess
import sys
import zipfile
from pathlib import Path


def main(wheel: str) -> int:
    root = Path(__file__).resolve().parents[1]
    tracked = subprocess.run(["git", "ls-files", "hisa"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.split()
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    missing = sorted(set(tracked) - shipped)
    stray = sorted(n for n in shipped if "__pycache__" in n or n.endswith(".pyc"))
    for name in missing:
        print(f"missing from {Path(wheel).name}: {name}")
    for name in stray:
        print(f"not to ship in {Path(wheel).name}: {name}")
    if missing or stray:
        return 1
    print(f"{Path(wheel).name}: all {len(tracked)} tracked files under hisa/ are in the wheel")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
