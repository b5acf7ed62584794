"""The King James Bible as long training text, from Debian's ``bible-kjv-text``.

Used only to train indexers (``hisa distill``); the evaluation text stays Austen, so training
and evaluation never share a token of text. The package is fetched with ``apt-get download`` and
unpacked with ``dpkg -x`` (the ``bible`` reader program is not needed). Its ``bible.data`` is a
block file of the Bible Retrieval System: a header, a table of block offsets, then each 64 KiB
text block compressed separately in the format of Unix ``compress`` (LZW, 16-bit codes, block
mode), decoded here by :func:`unlzw`. The text is cached as one UTF-8 file under
``<cache_dir>/kjv/`` so later runs need neither apt nor the decoder.
"""
from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from .austen import DEFAULT_CACHE

PACKAGE = "bible-kjv-text"
_SYSTEM_DATA = Path("/usr/lib/bible.data")
_MAGIC = b"EC02"
_TABLE_AT = 0x50            # big-endian u32: 0, uncompressed block size, block count, offsets
_CLEAR, _FIRST = 256, 257   # compress's block-mode clear code and first free table entry
_INIT_BITS = 9


def unlzw(data: bytes, *, max_bits: int = 16) -> bytes:
    """Decode one LZW stream of Unix ``compress`` (block mode) without its 3-byte header.

    compress writes codes in groups of ``n_bits`` bytes (8 codes); when the code width grows
    or a clear code arrives, the rest of the current group is padding and is skipped.
    """
    out = bytearray()
    table = [bytes([i]) for i in range(256)] + [b""]
    n_bits, free_ent = _INIT_BITS, _FIRST
    max_code = (1 << n_bits) - 1
    prev: bytes | None = None
    base, pos, end = 0, 0, len(data) * 8            # pos: bits since base (the group origin)
    while base * 8 + pos + n_bits <= end:
        if free_ent > max_code and n_bits < max_bits:
            base, pos = _skip_group(base, pos, n_bits)
            n_bits += 1
            max_code = (1 << n_bits) - 1 if n_bits < max_bits else 1 << max_bits
            continue
        byte, shift = base + (pos >> 3), pos & 7
        word = int.from_bytes(data[byte:byte + 3], "little")
        code = (word >> shift) & ((1 << n_bits) - 1)
        pos += n_bits
        if prev is None:
            if code >= 256:
                raise ValueError(f"LZW stream starts with code {code}, expected a literal")
            prev = table[code]
            out += prev
            continue
        if code == _CLEAR:
            del table[_FIRST:]
            free_ent = _FIRST - 1   # compress's quirk: the next entry lands on 256, never read
            base, pos = _skip_group(base, pos, n_bits)
            n_bits = _INIT_BITS
            max_code = (1 << n_bits) - 1
            continue
        if code < len(table) and code != _CLEAR:
            entry = table[code]
        elif code == free_ent:
            entry = prev + prev[:1]                  # the KwKwK case
        else:
            raise ValueError(f"LZW code {code} is past the table ({free_ent} entries)")
        out += entry
        if free_ent < (1 << max_bits):
            new = prev + entry[:1]
            if free_ent < len(table):
                table[free_ent] = new
            else:
                table.append(new)
            free_ent += 1
        prev = entry
    return bytes(out)


def _skip_group(base: int, pos: int, n_bits: int) -> tuple[int, int]:
    """Round ``pos`` up to the next whole group of ``n_bits`` bytes; the new group origin."""
    group = n_bits * 8
    pos = -(-pos // group) * group
    return base + pos // 8, 0


def read_brs_data(raw: bytes) -> bytes:
    """Every text block of a Bible Retrieval System ``.data`` file, decompressed and joined."""
    if raw[:4] != _MAGIC:
        raise ValueError(f"not a BRS data file: magic {raw[:4]!r}, expected {_MAGIC!r}")
    _, block_size, n_blocks = struct.unpack(">3I", raw[_TABLE_AT:_TABLE_AT + 12])
    offsets = struct.unpack(f">{n_blocks + 1}I",
                            raw[_TABLE_AT + 12:_TABLE_AT + 12 + 4 * (n_blocks + 1)])
    if offsets[-1] != len(raw):
        raise ValueError(f"BRS block table ends at {offsets[-1]}, the file has {len(raw)} bytes")
    blocks = [unlzw(raw[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
    for i, blk in enumerate(blocks[:-1]):
        if len(blk) != block_size:
            raise ValueError(f"BRS block {i} decodes to {len(blk)} bytes, expected {block_size}")
    return b"".join(blocks)


def _fetch_data(dest: Path) -> Path:
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"`{tool}` is needed to fetch {PACKAGE} (Debian only)")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, check=True,
                       capture_output=True)
        deb = next(Path(tmp).glob(f"{PACKAGE}_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(dest)], check=True, capture_output=True)
    return dest / "usr/lib/bible.data"


_VERSE = re.compile(r"^([1-3]?[A-Z][a-z]*)(\d+):(\d+) (.*)$")


def verses_to_text(raw_text: str) -> str:
    """Strip the verse references ("Ge1:1 "); verses of a chapter form one paragraph."""
    paras, cur, chapter = [], [], None
    for line in raw_text.splitlines():
        m = _VERSE.match(line.strip())
        if not m:
            continue
        key = (m.group(1), m.group(2))
        if key != chapter and cur:
            paras.append(" ".join(cur))
            cur = []
        chapter = key
        cur.append(m.group(4).strip())
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


def kjv_text(cache_dir: str | Path | None = None) -> str:
    """The whole King James Bible as plain text, one paragraph per chapter (cached)."""
    root = Path(cache_dir or DEFAULT_CACHE) / "kjv"
    cached = root / "kjv.txt"
    if not cached.exists():
        root.mkdir(parents=True, exist_ok=True)
        data = _SYSTEM_DATA if _SYSTEM_DATA.exists() else _fetch_data(root / "deb")
        text = verses_to_text(read_brs_data(data.read_bytes()).decode("latin-1"))
        if len(text) < 1_000_000:
            raise ValueError(f"{data} decoded to only {len(text)} characters of verses")
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(cached)
    return cached.read_text(encoding="utf-8")
