"""A small reader for R's XDR serialization format (enough for character vectors and lists).

R writes ``.rds`` files and the entries of lazy-load databases (``.rdb`` + ``.rdx``) with
``serialize()``: a header (``X\\n``, format version 2 or 3, R versions, and for version 3 the
native encoding), then one object, recursively. Each object starts with a 32-bit big-endian
flags word: the low byte is the SEXP type, bit 8 "is object", bit 9 "has attributes", bit 10
"has tag", bits 12+ the "levels" (for strings: the encoding). Strings (CHARSXP) are a length
(-1 for NA) followed by bytes. Symbols and environments enter a reference table that later
REFSXP items point into.

Supported: NULL, symbols, pairlists (attributes), logical/integer/double/character vectors,
generic vectors (lists, data frames) and references. Anything else raises ValueError naming
the type, so an unsupported file fails loudly instead of parsing wrongly.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

NILSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = (
    0, 1, 2, 9, 10, 13, 14, 16, 19)
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP = 255, 254, 253, 242, 241
NA_INTEGER = -2**31


@dataclass
class RObject:
    """A decoded R object: ``value`` (list / str / None ...) plus its attributes."""
    value: object
    attributes: dict = field(default_factory=dict)


@dataclass
class RSymbol:
    name: str


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"truncated R serialization at byte {self.pos} (wanted {n})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two 32-bit halves
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def header(self) -> None:
        fmt = self.take(2)
        if fmt != b"X\n":
            raise ValueError(f"only XDR ('X\\n') R serializations are supported, got {fmt!r}")
        version = self.int()
        self.int(), self.int()  # writer R version, minimal reader R version
        if version == 3:
            self.take(self.int())  # native encoding name
        elif version != 2:
            raise ValueError(f"R serialization version must be 2 or 3, got {version}")

    def charsxp(self, flags: int) -> str | None:
        n = self.int()
        if n == -1:
            return None
        raw = self.take(n)
        latin1 = (flags >> 12) & 4
        return raw.decode("latin-1" if latin1 else "utf-8", errors="replace")

    def attributes(self, has_attr: bool) -> dict:
        if not has_attr:
            return {}
        pairs = self.item()
        return dict(pairs.value) if isinstance(pairs, RObject) else {}

    def item(self):
        flags = self.int()
        typ = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if typ == NILVALUE_SXP or typ == NILSXP:
            return None
        if typ in (GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP):
            return RSymbol(f"<env {typ}>")
        if typ == REFSXP:
            idx = flags >> 8
            if idx == 0:
                idx = self.int()
            return self.refs[idx - 1]
        if typ == SYMSXP:
            name = self.item()
            sym = RSymbol(name if isinstance(name, str) else str(name))
            self.refs.append(sym)
            return sym
        if typ == CHARSXP:
            return self.charsxp(flags)
        if typ == LISTSXP:  # pairlist: returned as [(tag, value), ...]
            items = []
            while True:
                attrs = self.attributes(has_attr)
                del attrs
                tag = self.item() if has_tag else None
                items.append((tag.name if isinstance(tag, RSymbol) else tag, self.item()))
                flags = self.int()
                typ = flags & 0xFF
                if typ in (NILVALUE_SXP, NILSXP):
                    return RObject(items)
                if typ != LISTSXP:
                    raise ValueError(f"pairlist tail of type {typ} is not supported")
                has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if typ == STRSXP:
            n = self.length()
            vals = []
            for _ in range(n):
                f = self.int()
                if f & 0xFF != CHARSXP:
                    raise ValueError(f"STRSXP element of type {f & 0xFF}, expected CHARSXP")
                vals.append(self.charsxp(f))
            return RObject(vals, self.attributes(has_attr))
        if typ == VECSXP:
            n = self.length()
            vals = [self.item() for _ in range(n)]
            return RObject(vals, self.attributes(has_attr))
        if typ in (LGLSXP, INTSXP):
            n = self.length()
            vals = list(struct.unpack(f">{n}i", self.take(4 * n)))
            vals = [None if v == NA_INTEGER else v for v in vals]
            if typ == LGLSXP:
                vals = [None if v is None else bool(v) for v in vals]
            return RObject(vals, self.attributes(has_attr))
        if typ == REALSXP:
            n = self.length()
            return RObject(list(struct.unpack(f">{n}d", self.take(8 * n))),
                           self.attributes(has_attr))
        raise ValueError(f"R SEXP type {typ} is not supported by this reader")


def unserialize(data: bytes):
    """Decode one uncompressed XDR serialization (header included) into Python objects."""
    reader = _Reader(data)
    reader.header()
    return reader.item()


def _decompress(blob: bytes) -> bytes:
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    return blob


def read_rds(path: str | Path):
    """Read an ``.rds`` file (gzip-compressed or plain XDR serialization)."""
    return unserialize(_decompress(Path(path).read_bytes()))


def read_lazyload_entry(rdb: bytes, offset: int, length: int):
    """Decode one entry of a lazy-load database: 4-byte big-endian size, then a zlib stream."""
    chunk = rdb[offset:offset + length]
    size = struct.unpack(">I", chunk[:4])[0]
    raw = zlib.decompress(chunk[4:])
    if len(raw) != size:
        raise ValueError(f"lazy-load entry at {offset}: {len(raw)} bytes, header says {size}")
    return unserialize(raw)


def read_lazyload_db(base: str | Path) -> dict:
    """All variables of an R lazy-load database ``base.rdb`` / ``base.rdx``, by name."""
    base = Path(base)
    index = read_rds(base.with_suffix(".rdx"))
    parts = {tag: val for tag, val in _named(index).items()}
    rdb = base.with_suffix(".rdb").read_bytes()
    out = {}
    for name, loc in _named(parts["variables"]).items():
        offset, length = loc.value
        out[name] = read_lazyload_entry(rdb, offset, length)
    return out


def _named(obj) -> dict:
    """A named R list (VECSXP with a ``names`` attribute) as a Python dict."""
    names = obj.attributes.get("names")
    if names is None:
        raise ValueError("expected a named R list")
    return dict(zip(names.value, obj.value))
