"""The long documents the evaluation reads, as token ids, and the retrieval probes built on them.

* ``austen``: Jane Austen's six novels (prose), :mod:`hisa.eval.austen`.
* ``code``: the Python standard library's own ``.py`` sources, present on every machine that
  runs this package, concatenated module by module in sorted order (test suites, idlelib and
  lib2to3 left out), each file under a ``# module: <dotted.name>`` line. The text depends on
  the interpreter's version, recorded in every row.
* ``rag``: a retrieval-augmented prompt: many short passages ("[12] Harrowby record. The
  harbour master of Harrowby is Ada Brennan. <a sentence of Austen>"), every passage stating the
  same kind of fact about another town or another role, then questions about three of them.

Probes (needles and RAG questions) ask three questions per document, about facts at three
depths: the questions and their answers form the sparse tail; a question counts as answered
when every answer token is the argmax of the model's prediction (what greedy decoding would
write), teacher-forced through the earlier answers. Three needles in one haystack is
RULER's multi-key needle test; it costs one dense pass for three answers.
"""
from __future__ import annotations

import random
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .austen import austen_text

DOCUMENTS = ("austen", "code", "rag")
NEEDLE_COLOURS = ("blue", "red", "green", "silver", "amber", "violet", "golden", "grey")
NEEDLE_THINGS = ("door", "lantern", "carriage", "garden gate", "music box", "writing desk")
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages",
              "dist-packages", "__pycache__"}
_HAYSTACK_OFFSET = 1_000_000     # needle haystacks start here; fidelity text starts at 0
_RAG_OFFSET = 2_000_000


def _encode(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]


def text_ids(tokenizer, text: str, n_tokens: int, *, offset_chars: int = 0,
             what: str = "text") -> torch.Tensor:
    """The first ``n_tokens`` tokens of ``text[offset_chars:]``."""
    chunk = text[offset_chars:offset_chars + 8 * n_tokens]
    ids = _encode(tokenizer, chunk)
    if ids.numel() < n_tokens:
        raise ValueError(f"{what} too short for {n_tokens} tokens from character {offset_chars}")
    return ids[:n_tokens]


def stdlib_text(root: str | Path | None = None) -> str:
    """The standard library's sources, one module after another in sorted dotted-name order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in root.rglob("*.py")
                    if not _SKIP_DIRS & set(p.relative_to(root).parts[:-1])),
                   key=lambda p: p.relative_to(root).with_suffix("").as_posix())
    parts = []
    for p in files:
        name = p.relative_to(root).with_suffix("").as_posix().replace("/", ".")
        try:
            src = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(f"# module: {name}\n{src}")
    return "\n".join(parts)


def document_ids(kind: str, tokenizer, n_tokens: int, *, cache_dir=None) -> torch.Tensor:
    """Token ids of a plain document (``austen`` or ``code``)."""
    if kind == "austen":
        return text_ids(tokenizer, austen_text(cache_dir), n_tokens, what="Austen text")
    if kind == "code":
        return text_ids(tokenizer, stdlib_text(), n_tokens,
                        what=f"Python {sys.version_info.major}.{sys.version_info.minor} stdlib")
    raise ValueError(f"kind: expected 'austen' or 'code' (rag is a probe), got {kind!r}")


@dataclass
class Question:
    depth: float          # where its fact sits in the context, as a fraction
    answer_at: int        # absolute position of the first answer token
    answer_len: int


@dataclass
class Probe:
    """A document whose last ``len(ids) - n_prefix`` tokens (questions and answers) are the
    sparse tail."""
    kind: str
    ids: torch.Tensor
    n_prefix: int
    questions: list = field(default_factory=list)


def _finish(kind: str, prefix: torch.Tensor, facts: list, qa: list) -> Probe:
    """Append the questions and answers ``qa`` [(question ids, answer ids)] to ``prefix``;
    ``facts`` [depth] in the same order."""
    parts, questions, at = [prefix], [], prefix.numel()
    for depth, (q, a) in zip(facts, qa):
        parts += [q, a]
        questions.append(Question(float(depth), at + q.numel(), a.numel()))
        at += q.numel() + a.numel()
    return Probe(kind, torch.cat(parts), prefix.numel(), questions)


def needle_probe(tokenizer, L: int, depths, rng: random.Random, *, cache_dir=None) -> Probe:
    """Austen haystack (disjoint from the fidelity text) with one needle per depth."""
    pairs = rng.sample([(c, t) for c in NEEDLE_COLOURS for t in NEEDLE_THINGS], len(depths))
    needles, qa = [], []
    for colour, thing in pairs:
        code = str(rng.randint(10000, 99999))
        needles.append(_encode(tokenizer, f" The secret code of the {colour} {thing} is {code}. "))
        qa.append((_encode(tokenizer, f"\n\nQuestion: what is the secret code of the {colour} "
                                      f"{thing}?\nAnswer: The secret code of the {colour} "
                                      f"{thing} is"),
                   _encode(tokenizer, f" {code}.")))
    budget = L - sum(n.numel() for n in needles) - sum(q.numel() + a.numel() for q, a in qa)
    if budget <= 0:
        raise ValueError(f"context {L} is too short for {len(depths)} needles")
    offset = _HAYSTACK_OFFSET + rng.randrange(0, 200_000)
    hay = text_ids(tokenizer, austen_text(cache_dir), budget, offset_chars=offset,
                   what="haystack")
    order = sorted(range(len(depths)), key=lambda i: depths[i])
    pieces, at = [], 0
    for i in order:
        cut = int(round(depths[i] * budget))
        pieces += [hay[at:cut], needles[i]]
        at = cut
    pieces.append(hay[at:])
    return _finish("needle", torch.cat(pieces), list(depths), qa)


_TOWN_HEADS = ("Ash", "Brad", "Cald", "Dun", "Elm", "Fen", "Gran", "Hal", "Ick", "Kel", "Lang",
               "Marl", "Nor", "Oak", "Pen", "Rush", "Stan", "Thorn", "Wal", "Yar")
_TOWN_TAILS = ("by", "ford", "wick", "ham", "ley", "mere", "ton", "well", "stead", "combe",
               "borough", "dale")
_ROLES = ("harbour master", "head librarian", "lighthouse keeper", "mayor", "schoolmaster",
          "bell ringer", "postmistress", "town clerk")
_FIRST = ("Ada", "Bernard", "Clara", "Desmond", "Edith", "Frederick", "Grace", "Horace",
          "Iris", "Jasper", "Lydia", "Mortimer", "Nora", "Oswald", "Pearl", "Rupert")
_LAST = ("Brennan", "Calloway", "Dunmore", "Everly", "Fairbanks", "Greaves", "Hartley",
         "Ingram", "Jolliffe", "Kendrick", "Lockwood", "Merriman", "Norcott", "Pemberton")


def rag_probe(tokenizer, L: int, depths, rng: random.Random, *, cache_dir=None) -> Probe:
    """Short passages, each one fact "the <role> of <town> is <name>" (every (town, role)
    stated once) and a sentence of Austen, then questions about the passages at ``depths``."""
    text = austen_text(cache_dir)
    start = _RAG_OFFSET + rng.randrange(0, 200_000)
    sentences = [" ".join(s.split()) + "." for s in text[start:start + 60 * L].split(".")
                 if len(s.split()) >= 8]
    facts = [(h + t, r) for h in _TOWN_HEADS for t in _TOWN_TAILS for r in _ROLES]
    rng.shuffle(facts)
    reserve = 3 * 40 * len(depths)                  # room for the questions and answers
    passages, used = [], 0
    for i, (town, role) in enumerate(facts):
        name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        sent = sentences[i % len(sentences)] if sentences else ""
        ids = _encode(tokenizer, f"[{i + 1}] {town} record. The {role} of {town} is {name}. "
                                 f"{sent}\n")
        if used + ids.numel() > L - reserve:
            break
        passages.append((town, role, name, ids))
        used += ids.numel()
    if len(passages) < 2 * len(depths):
        raise ValueError(f"context {L} is too short for a RAG prompt")
    picks = [min(len(passages) - 1, int(d * len(passages))) for d in depths]
    qa = []
    for i in picks:
        town, role, name, _ = passages[i]
        qa.append((_encode(tokenizer, f"\nQuestion: who is the {role} of {town}?\nAnswer: The "
                                      f"{role} of {town} is"), _encode(tokenizer, f" {name}.")))
    prefix = torch.cat([p[3] for p in passages])
    probe = _finish("rag", prefix, [i / len(passages) for i in picks], qa)
    if probe.ids.numel() > L:
        raise ValueError(f"RAG prompt of {probe.ids.numel()} tokens exceeds context {L}")
    return probe
