"""The R XDR reader on hand-built serializations (no R and no download needed)."""
import gzip
import struct
import zlib

import pytest

from hisa.eval.rdata import read_lazyload_db, read_rds, unserialize


def _i(*vals):
    return struct.pack(f">{len(vals)}i", *vals)


def _header(version=3):
    out = b"X\n" + _i(version, 0x040201, 0x030500)
    if version == 3:
        out += _i(5) + b"UTF-8"
    return out


def _charsxp(s, latin1=False):
    if s is None:
        return _i(9, -1)
    raw = s.encode("latin-1" if latin1 else "utf-8")
    return _i(9 | ((4 if latin1 else 8) << 12), len(raw)) + raw


def _strsxp(vals, attrs=b""):
    flags = 16 | ((1 << 9) if attrs else 0)
    return _i(flags, len(vals)) + b"".join(_charsxp(v) for v in vals) + attrs


def _names_attr(names, first_symbol=True):
    # pairlist (LISTSXP with tag): tag = symbol "names" (or a reference to it), value, NILVALUE
    tag = _i(1) + _charsxp("names") if first_symbol else _i(255 | (1 << 8))
    return _i(2 | (1 << 10)) + tag + _strsxp(names) + _i(254)


def test_character_vector_with_na_and_encodings():
    blob = _header() + _i(16, 4) + _charsxp("EMMA") + _charsxp("") + _charsxp(None) \
        + _charsxp("caf\u00e9", latin1=True)
    obj = unserialize(blob)
    assert obj.value == ["EMMA", "", None, "caf\u00e9"]
    assert obj.attributes == {}


def test_version2_header_and_numeric_vectors():
    ints = unserialize(_header(2) + _i(13, 3, 7, -2**31, -1))
    assert ints.value == [7, None, -1]
    reals = unserialize(_header(2) + _i(14, 2) + struct.pack(">2d", 1.5, -0.25))
    assert reals.value == [1.5, -0.25]
    lgl = unserialize(_header(2) + _i(10, 2, 1, 0))
    assert lgl.value == [True, False]


def test_named_list_and_symbol_reference():
    # list(a = c("x"), b = c("y", "z")) whose "names" attribute reuses the symbol via REFSXP
    inner_attr = _names_attr(["p"], first_symbol=True)
    inner = _strsxp(["x"], attrs=inner_attr)
    outer_attr = _names_attr(["a", "b"], first_symbol=False)
    blob = _header() + _i(19 | (1 << 9), 2) + inner + _strsxp(["y", "z"]) + outer_attr
    obj = unserialize(blob)
    assert [v.value for v in obj.value] == [["x"], ["y", "z"]]
    assert obj.value[0].attributes["names"].value == ["p"]
    assert obj.attributes["names"].value == ["a", "b"]


def test_rds_gzip_and_lazyload_db(tmp_path):
    novel = _header() + _strsxp(["It is a truth", "universally acknowledged"])
    other = _header() + _strsxp(["Persuasion"])
    entries, rdb = [], b""
    for raw in (novel, other):
        chunk = struct.pack(">I", len(raw)) + zlib.compress(raw)
        entries.append((len(rdb), len(chunk)))
        rdb += chunk
    # index: list(variables = list(pp = c(off, len), pe = c(off, len)))
    variables = _i(19 | (1 << 9), 2) + b"".join(_i(13, 2, o, n) for o, n in entries) \
        + _names_attr(["pp", "pe"], first_symbol=True)
    index = _header() + _i(19 | (1 << 9), 1) + variables + _names_attr(["variables"], False)
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    db = read_lazyload_db(tmp_path / "Rdata")
    assert db["pp"].value == ["It is a truth", "universally acknowledged"]
    assert db["pe"].value == ["Persuasion"]
    (tmp_path / "x.rds").write_bytes(gzip.compress(novel))
    assert read_rds(tmp_path / "x.rds").value[0] == "It is a truth"


def test_rejects_unsupported_input():
    with pytest.raises(ValueError, match="XDR"):
        unserialize(b"A\n" + _i(3, 0, 0))
    with pytest.raises(ValueError, match="type 3"):
        unserialize(_header() + _i(3))  # a closure
    with pytest.raises(ValueError, match="truncated"):
        unserialize(_header() + _i(16, 2) + _charsxp("only one"))
