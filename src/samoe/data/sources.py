"""Sources for `samoe data`: specs, reading, cleaning and weighted mixtures.

A source spec is one of

    PATH            a text file, a .jsonl file or a directory of them (see corpus.read_documents)
    builtin:NAME    a built-in corpus: stdlib (the standard library's source files) or
                    stdlib-docs (its docstrings); see data/corpus.py
    debian:NAME     a corpus from a Debian package (see data/debian.py)

optionally followed by `@WEIGHT`, a positive number. Without weights every document of every
source is used. With weights (a source without one gets 1), source i is given the character
share p_i = w_i / sum_j w_j: sources are only ever down-sampled, never repeated, to the
largest total T = min_i c_i / p_i their sizes c_i (characters) allow, so source i keeps about
p_i * T characters. Which documents a down-sampled source keeps is fixed by the order of
sha256("mix:" + text), independent of the train/validation split's hash.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from samoe.data.corpus import BUILTIN_CORPORA, builtin_documents, read_documents
from samoe.data.debian import debian_documents
from samoe.errors import DataError

BUILTIN = "builtin:"


@dataclass
class Source:
    spec: str  # the spec without its weight
    weight: float | None = None


def parse_source(text: str) -> Source:
    """`SPEC` or `SPEC@WEIGHT`; an existing path containing '@' is taken whole."""
    spec, at, weight = text.rpartition("@")
    if not at or Path(text).exists():
        return Source(text)
    try:
        w = float(weight)
    except ValueError:
        raise DataError(f"source '{text}': the weight after '@' must be a positive number, got '{weight}'") from None
    if not w > 0:
        raise DataError(f"source '{text}': the weight after '@' must be a positive number, got '{weight}'")
    return Source(spec, w)


def read_source(spec: str, text_field: str = "text", bad_lines: list | None = None,
                progress: bool = False) -> list[str]:
    """The raw documents of one source spec (no weight). See corpus.read_documents for
    text_field and bad_lines."""
    if spec.startswith(BUILTIN) and spec.removeprefix(BUILTIN) in BUILTIN_CORPORA:
        return builtin_documents(spec.removeprefix(BUILTIN))
    if spec.startswith("debian:"):
        return debian_documents(spec.removeprefix("debian:"), progress)
    if ":" in spec and not Path(spec).exists() and re.match(r"^[a-z]+:", spec):
        builtins = ", ".join(BUILTIN + n for n in BUILTIN_CORPORA)
        raise DataError(f"unknown source '{spec}'; expected a path, {builtins} or debian:NAME")
    return read_documents(spec, text_field=text_field, bad_lines=bad_lines)


def clean_document(text: str) -> str:
    """NFC-normalised text with trailing spaces removed from every line, runs of blank lines
    collapsed to one and leading/trailing blank space stripped."""
    lines = [line.rstrip() for line in unicodedata.normalize("NFC", text).splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _mix_key(text: str) -> bytes:
    return hashlib.sha256(b"mix:" + text.encode()).digest()


def mix(groups: list[list[str]], weights: list[float | None]) -> list[list[str]]:
    """Each source's documents down-sampled to its weighted character share (module docstring).
    All weights None: groups unchanged. Kept documents stay in their original order."""
    if all(w is None for w in weights):
        return groups
    share = [w or 1.0 for w in weights]
    share = [w / sum(share) for w in share]
    chars = [sum(map(len, g)) for g in groups]
    total = min(c / p for c, p in zip(chars, share))
    out = []
    for docs, p in zip(groups, share):
        budget, keep, used = p * total, set(), 0
        for i in sorted(range(len(docs)), key=lambda i: _mix_key(docs[i])):
            if keep and used + len(docs[i]) > budget + 0.5:
                continue
            keep.add(i)
            used += len(docs[i])
        out.append([d for i, d in enumerate(docs) if i in keep])
    return out
