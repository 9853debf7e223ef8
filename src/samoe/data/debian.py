"""`debian:NAME` sources: real corpora of different diversity that come from Debian packages.

    debian:bible-kjv-text  the King James Bible, one document per chapter (1,189), read with the
                           `bible` command of package bible-kjv (its data is bible-kjv-text)
    debian:python3-doc     the Python documentation, one document per HTML page, converted to
                           text with the stdlib html.parser (index and search pages skipped)
    debian:dict-gcide      the GNU Collaborative International Dictionary of English, one
                           document per dictionary entry of its dictd database

A missing package raises DataError with the `apt-get install` line that provides it.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

from tqdm import tqdm

from samoe.errors import DataError

BIBLE_DATA = Path("/usr/lib/bible.data")
PYDOC_GLOB = "python3*/html"
DOC_ROOT = Path("/usr/share/doc")
GCIDE = Path("/usr/share/dictd/gcide")
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")
_SOURCE_TAG = re.compile(r"^\s*\[[^\]]*(Webster|WordNet|PJC|Century|Chambers)[^\]]*\]\s*$")
_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _missing(recipe: str, package: str, what: str) -> DataError:
    return DataError(f"debian:{recipe} needs {what} from the Debian package {package}: apt-get install {package}")


# --------------------------------------------------------------------------- bible-kjv-text


def bible_documents(progress: bool = False) -> list[str]:
    """One document per chapter: its verses, one per line, without book/chapter/verse numbers.

    `bible -f gen1:1-rev22:21` prints one verse per line as `Ge1:1 In the beginning ...`;
    verses are grouped by (book, chapter).
    """
    exe = shutil.which("bible")
    if exe is None:
        raise _missing("bible-kjv-text", "bible-kjv", "the `bible` command")
    if not BIBLE_DATA.is_file():
        raise _missing("bible-kjv-text", "bible-kjv-text", f"'{BIBLE_DATA}'")
    out = subprocess.run([exe, "-f", "gen1:1-rev22:21"], capture_output=True, text=True, check=False,
                         stdin=subprocess.DEVNULL)
    chapters: dict[tuple[str, str], list[str]] = {}
    for line in out.stdout.splitlines():
        m = _VERSE.match(line)
        if m:
            chapters.setdefault((m[1], m[2]), []).append(m[4].strip())
    if not chapters:
        raise DataError(f"debian:bible-kjv-text: `bible` printed no verses (exit {out.returncode}: "
                        f"{out.stderr.strip()[:200]})")
    return ["\n".join(verses) for verses in chapters.values()]


# --------------------------------------------------------------------------- python3-doc


class _SphinxText(HTMLParser):
    """Text of the main content of a Sphinx page (`<div role="main">`), or of its <body> when
    there is none: block elements start new lines, <pre> keeps its layout, scripts are dropped."""

    BLOCKS = {"p", "div", "section", "pre", "li", "dt", "dd", "tr", "br", "h1", "h2", "h3", "h4", "h5", "h6",
              "table", "ul", "ol", "dl", "blockquote"}
    SKIP = {"script", "style", "head", "title"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.main, self.body, self.depth, self.skip, self.pre = [], [], 0, 0, 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        if tag == "div" and (self.depth or dict(attrs).get("role") == "main"):
            self.depth += 1
        if tag == "pre":
            self.pre += 1
        if tag in self.BLOCKS:
            self._emit("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        if tag == "div" and self.depth:
            self.depth -= 1
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in self.BLOCKS:
            self._emit("\n")

    def handle_data(self, data):
        if not self.skip:
            self._emit(data if self.pre else re.sub(r"\s+", " ", data))

    def _emit(self, text):
        (self.main if self.depth else self.body).append(text)

    def text(self) -> str:
        raw = "".join(self.main or self.body).replace("¶", "")
        lines = [line.rstrip() for line in raw.splitlines()]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(line if line.strip() else "" for line in lines)).strip()


def html_to_text(html: str) -> str:
    """Readable text of one HTML page (see _SphinxText)."""
    parser = _SphinxText()
    parser.feed(html)
    parser.close()
    return parser.text()


def python_doc_root() -> Path:
    """The installed Python HTML documentation (the first of /usr/share/doc/python3*/html with a
    library/index.html; they are symlinks to one tree)."""
    for root in sorted(DOC_ROOT.glob(PYDOC_GLOB)):
        if (root / "library" / "index.html").is_file():
            return root.resolve()
    raise _missing("python3-doc", "python3-doc", f"HTML documentation under {DOC_ROOT}/{PYDOC_GLOB}")


def python_doc_documents(progress: bool = False) -> list[str]:
    """One document per HTML page (sorted by path), skipping _static/_sources/_images and the
    generated genindex, modindex and search pages."""
    root = python_doc_root()
    docs = []
    for path in tqdm(sorted(root.rglob("*.html")), desc="read debian:python3-doc", unit="page",
                     disable=not progress, leave=False):
        rel = path.relative_to(root)
        if rel.parts[0].startswith("_") or rel.name.startswith(("genindex", "py-modindex", "search")):
            continue
        text = html_to_text(path.read_text(encoding="utf-8", errors="replace"))
        if text:
            docs.append(text)
    return docs


# --------------------------------------------------------------------------- dict-gcide


def _b64(s: str) -> int:
    """dictd index numbers: base 64, most significant digit first, alphabet A-Za-z0-9+/."""
    n = 0
    for c in s:
        n = n * 64 + _B64[c]
    return n


def gcide_documents(progress: bool = False) -> list[str]:
    """One document per dictionary entry: each distinct (offset, length) of gcide.index (several
    headwords may share an entry) in file order, with the bibliographic source tags such as
    `[1913 Webster]` removed. The 00-database-* metadata entries are skipped. The .dict.dz file is
    dictzip, which gzip reads."""
    index, data = GCIDE.with_suffix(".index"), GCIDE.with_suffix(".dict.dz")
    if not (index.is_file() and data.is_file()):
        raise _missing("dict-gcide", "dict-gcide", f"'{index}' and '{data}'")
    blob = gzip.decompress(data.read_bytes())
    spans = set()
    for line in index.read_text(encoding="utf-8").splitlines():
        word, offset, length = line.split("\t")[:3]
        if not word.startswith("00-"):
            spans.add((_b64(offset), _b64(length)))
    docs = []
    for offset, length in sorted(spans):
        entry = blob[offset : offset + length].decode("utf-8", errors="replace")
        text = "\n".join(line for line in entry.splitlines() if not _SOURCE_TAG.match(line)).strip()
        if text:
            docs.append(text)
    return docs


RECIPES = {
    "bible-kjv-text": bible_documents,
    "python3-doc": python_doc_documents,
    "dict-gcide": gcide_documents,
}


def debian_documents(name: str, progress: bool = False) -> list[str]:
    """The documents of recipe `name` (see the module docstring)."""
    if name not in RECIPES:
        raise DataError(f"unknown source 'debian:{name}'; known recipes: {', '.join(sorted(RECIPES))}")
    return RECIPES[name](progress)
