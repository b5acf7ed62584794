"""The KJV fetcher's decoder: Unix-compress LZW streams and the BRS block file, built here."""
import random
import shutil
import struct
import subprocess

import pytest

from hisa.eval.kjv import read_brs_data, unlzw, verses_to_text

MAX_BITS = 16


def _pad_group(bits: list, start: int, n_bits: int) -> int:
    """compress pads the current group of n_bits bytes with zero bits when the width changes."""
    group = n_bits * 8
    while (len(bits) - start) % group:
        bits.append(0)
    return len(bits)


def lzw_compress(data: bytes, *, clear_when_full: bool) -> bytes:
    """A plain encoder of compress's format (block mode, 16-bit codes), body without header."""
    bits: list[int] = []
    start, n_bits = 0, 9
    table = {bytes([i]): i for i in range(256)}
    free_ent = 257

    def emit(code):
        bits.extend((code >> i) & 1 for i in range(n_bits))

    w = data[:1]
    for c in data[1:]:
        wc = w + bytes([c])
        if wc in table:
            w = wc
            continue
        emit(table[w])
        if free_ent < (1 << MAX_BITS):
            table[wc] = free_ent
            free_ent += 1
            if free_ent > (1 << n_bits) and n_bits < MAX_BITS:
                start = _pad_group(bits, start, n_bits)
                n_bits += 1
        elif clear_when_full:
            emit(256)
            start = _pad_group(bits, start, n_bits)
            n_bits, free_ent = 9, 257
            table = {bytes([i]): i for i in range(256)}
        w = bytes([c])
    emit(table[w])
    while len(bits) % 8:
        bits.append(0)
    return bytes(sum(bits[i + j] << j for j in range(8)) for i in range(0, len(bits), 8))


def _texts():
    rng = random.Random(0)
    words = ["the", "lord", "said", "unto", "moses", "and", "of", "a", "land", "water"]
    prose = " ".join(rng.choice(words) for _ in range(3000)).encode()
    noise = bytes(rng.randrange(256) for _ in range(150_000))   # fills the 16-bit table
    return {"prose": prose, "noise": noise, "one": b"x", "repeat": b"ab" * 5000}


@pytest.mark.parametrize("name", ["prose", "noise", "one", "repeat"])
def test_unlzw_round_trips_through_the_compress_format(name):
    data = _texts()[name]
    body = lzw_compress(data, clear_when_full=True)
    if shutil.which("gzip"):  # gzip reads .Z: proves the encoder (and so the test) is the format
        ref = subprocess.run(["gzip", "-dc"], input=b"\x1f\x9d\x90" + body,
                             capture_output=True, check=True).stdout
        assert ref == data
    assert unlzw(body) == data


def test_unlzw_rejects_a_code_past_the_table():
    body = struct.pack("<I", 300 << 9 | 65)[:3]   # literal 'A' then code 300 (table has 257)
    with pytest.raises(ValueError, match="past the table"):
        unlzw(body)


def _brs(blocks: list[bytes], block_size: int) -> bytes:
    bodies = [lzw_compress(b, clear_when_full=False) for b in blocks]
    table_at, n = 0x50, len(blocks)
    first = table_at + 12 + 4 * (n + 1) + 3
    offsets, pos = [], first
    for body in bodies:
        offsets.append(pos)
        pos += len(body)
    offsets.append(pos)
    head = b"EC02Compressed Data File".ljust(table_at, b"\0")
    return (head + struct.pack(f">3I{n + 1}I", 0, block_size, n, *offsets) + b"\x1f\x9d\x90"
            + b"".join(bodies))


def test_read_brs_data_joins_blocks_and_checks_sizes():
    text = b"Ge1:1 In the beginning.\nGe1:2 And the earth.\nGe2:1 Thus the heavens.\n" * 40
    size = 1024
    blocks = [text[i:i + size] for i in range(0, len(text), size)]
    raw = _brs(blocks, size)
    assert read_brs_data(raw) == text
    with pytest.raises(ValueError, match="magic"):
        read_brs_data(b"XXXX" + raw[4:])
    with pytest.raises(ValueError, match="expected 512"):
        read_brs_data(_brs(blocks, 512))
    paras = verses_to_text(text.decode()).split("\n\n")
    assert paras[0] == "In the beginning. And the earth."
    assert paras[1] == "Thus the heavens."
