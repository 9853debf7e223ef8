"""Text corpora as lists of documents (str): the built-in corpora or user files.

Built-in corpora (`data.corpus`, used when `data.path` is null), both read from the installed
Python standard library with no download:

    stdlib       every .py file of the standard library, tests included, one document per
                 file (about 31 MB and 9M BPE-2048 tokens for Python 3.11): big enough that a
                 default run reads each token less than once
    stdlib-docs  the docstrings of its non-test modules, one document per module (2.1 MB)

A document is the unit that split_documents assigns to train or validation and that
encode_documents terminates with the end-of-text token.
"""

import ast
import hashlib
import json
import os
import sys
import sysconfig
import warnings
from pathlib import Path

from samoe.errors import DataError
from samoe.fileio import cache_dir, write_text_atomic

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
SOURCE_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


# ---------------------------------------------------------------------------------------------
# built-in corpus: docstrings of the installed Python standard library


def _docstring_blocks(body, prefix: str = ""):
    """Yield 'header\\ndocstring' for every documented class/function in body, recursively."""
    for node in body:
        if isinstance(node, ast.ClassDef):
            header = f"class {prefix}{node.name}:"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            kw = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
            header = f"{kw} {prefix}{node.name}({ast.unparse(node.args)}):"
        else:
            continue
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield f"{header}\n{doc}"
        yield from _docstring_blocks(node.body, f"{prefix}{node.name}.")


def module_document(source: bytes) -> str | None:
    """The document for one module's source (parsed, never imported), or None if it has no docstrings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. SyntaxWarning for invalid escapes in old code
        tree = ast.parse(source)
    blocks = [ast.get_docstring(tree, clean=True) or "", *_docstring_blocks(tree.body)]
    blocks = [b for b in blocks if b]
    return "\n\n".join(blocks) if blocks else None


def _python_files(root: Path, skip: set[str]):
    """Every .py file under root, in sorted order, skipping the directories in skip and hidden ones."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        yield from (Path(dirpath, name) for name in sorted(filenames) if name.endswith(".py"))


def _extract_stdlib(root: Path) -> list[str]:
    docs = []
    for path in _python_files(root, SKIP_DIRS):
        try:
            doc = module_document(path.read_bytes())
        except (SyntaxError, ValueError, OSError):  # ValueError: NUL bytes / bad encoding
            continue
        if doc:
            docs.append(doc)
    return docs


def _extract_sources(root: Path) -> list[str]:
    docs = []
    for path in _python_files(root, SOURCE_SKIP_DIRS):
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):  # a few test files are deliberately not UTF-8
            continue
        if text.strip() and "\0" not in text:
            docs.append(text.removeprefix("\ufeff"))
    return docs


def _cached(name: str, what: str, extract, root, cache) -> list[str]:
    """extract(root) as a list of documents, cached as JSONL ({"text": ...} per line) at
    `cache/{name}-py{X.Y.Z}.jsonl`; root defaults to the running interpreter's stdlib."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    v = sys.version_info
    path = Path(cache or cache_dir()) / f"{name}-py{v.major}.{v.minor}.{v.micro}.jsonl"
    if path.is_file():
        return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    docs = extract(root)
    if not docs:
        raise DataError(f"no {what} found in the Python standard library at '{root}'; pass a data path")
    try:
        write_text_atomic(path, "".join(json.dumps({"text": d}) + "\n" for d in docs))
    except OSError as e:  # an unwritable cache only costs a re-extraction next time
        warnings.warn(f"could not cache the {name} corpus at '{path}': {e}", stacklevel=2)
    return docs


def stdlib_sources(root=None, cache=None) -> list[str]:
    """One document per .py file of the Python standard library, tests included (the default
    corpus, `data.corpus = "stdlib"`): the file's text as it is, read in sorted path order and
    never imported; files that are not UTF-8 or hold NUL bytes are skipped, as is site-packages.
    Cached like stdlib_documents, as `stdlib-src-py{X.Y.Z}.jsonl`."""
    return _cached("stdlib-src", "UTF-8 .py files", _extract_sources, root, cache)


def stdlib_documents(root=None, cache=None) -> list[str]:
    """One document per documented module of the Python standard library (the default corpus).

    Each document is the module docstring followed by every class/function/method docstring,
    each under a header line such as `class Foo:` or `def Foo.bar(self, x):`. Files are parsed
    with ast in sorted order, never imported; test directories and site-packages are skipped.
    The result is cached as JSONL ({"text": ...} per line) at
    `cache/stdlib-docs-py{X.Y.Z}.jsonl` (cache defaults to cache_dir()); root defaults to the
    running interpreter's stdlib. Both arguments exist for tests. `data.corpus = "stdlib-docs"`.
    """
    return _cached("stdlib-docs", "docstrings", _extract_stdlib, root, cache)


BUILTIN_CORPORA = {"stdlib": stdlib_sources, "stdlib-docs": stdlib_documents}


# ---------------------------------------------------------------------------------------------
# user data


def _read_text(path: Path) -> str:
    """Strictly decoded UTF-8 text of a file (BOM dropped); DataError if unreadable, binary or not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read '{path}': {e.strerror or e}") from None
    if b"\0" in data[:8192]:
        raise DataError(f"'{path}' looks binary (NUL bytes); expected UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"byte 0x{data[e.start]:02x} at offset {e.start}"
        raise DataError(f"'{path}' is not valid UTF-8 ({where})") from None
    return text.removeprefix("\ufeff")


def _jsonl_documents(path: Path, text_field: str = "text", bad_lines: list | None = None) -> list[str]:
    """The text_field strings of a JSONL file. A malformed line, or one without a string
    text_field, raises DataError naming the line, unless bad_lines is a list: then
    (path, line number) is appended to it and the line skipped."""
    docs = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problem = None
        except json.JSONDecodeError as e:
            problem = f"invalid JSON ({e.msg})"
        if problem is None and (not isinstance(record, dict) or not isinstance(record.get(text_field), str)):
            problem = f"expected a JSON object with a string \"{text_field}\" field"
        if problem is not None:
            if bad_lines is None:
                raise DataError(f"'{path}' line {n}: {problem}")
            bad_lines.append((str(path), n))
            continue
        if record[text_field].strip():
            docs.append(record[text_field])
    return docs


def split_text(text: str, max_doc_chars: int = 4000) -> list[str]:
    """Documents of a plain text: blocks of non-blank lines separated by blank lines.

    A block longer than max_doc_chars is cut at line boundaries into pieces of at most
    max_doc_chars characters (a single longer line stays whole), so a file without blank lines
    still yields many documents.
    """
    docs, lines, size = [], [], 0
    for line in [*text.splitlines(), ""]:  # the trailing "" flushes the last block
        if not line.strip() or (lines and size + len(line) + 1 > max_doc_chars):
            if lines:
                docs.append("\n".join(lines))
            lines, size = [], 0
        if line.strip():
            lines.append(line)
            size += len(line) + 1
    return docs


def _file_documents(path: Path, max_doc_chars: int, text_field: str, bad_lines: list | None) -> list[str]:
    if path.suffix == ".jsonl":
        return _jsonl_documents(path, text_field, bad_lines)
    return split_text(_read_text(path), max_doc_chars)


def read_documents(path, max_doc_chars: int = 4000, text_field: str = "text",
                   bad_lines: list | None = None) -> list[str]:
    """Documents of a user data path: a .jsonl file (one {text_field: ...} per line), a plain text
    file (see split_text), or a directory of such files (recursive, sorted, hidden entries
    skipped; empty files ignored). Raises DataError for anything unusable; malformed JSONL lines
    are skipped and recorded in bad_lines when it is a list (see _jsonl_documents)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path '{path}' does not exist")
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        docs = [d for p in files for d in _file_documents(p, max_doc_chars, text_field, bad_lines)]
        if not docs:
            raise DataError(f"data directory '{path}' contains no text files with any text")
        return docs
    docs = _file_documents(path, max_doc_chars, text_field, bad_lines)
    if not docs:
        raise DataError(f"'{path}' contains no text")
    return docs


def split_documents(docs: list[str], val_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split by document content.

    A document goes to validation iff h(text) < val_fraction, where
    h(text) = int(sha256(text.encode()).hexdigest()[:8], 16) / 2**32, so exact duplicates
    always land on the same side. Both sides are made non-empty: if validation is empty, the
    document(s) with the smallest h move to it; if train is empty, those with the largest h
    move to train. Needs at least 2 distinct documents. Order within each side is kept.
    """
    distinct = len(set(docs))
    if distinct < 2:
        raise DataError(f"need at least 2 distinct documents for a train/validation split, got {distinct}")
    h = [int(hashlib.sha256(d.encode()).hexdigest()[:8], 16) / 2**32 for d in docs]
    in_val = [x < val_fraction for x in h]
    lo, hi = min(h), max(h)
    if not any(in_val):
        in_val = [x == lo for x in h]
    elif all(in_val):
        in_val = [x != hi for x in h]
    train = [d for d, v in zip(docs, in_val) if not v]
    val = [d for d, v in zip(docs, in_val) if v]
    return train, val


def builtin_documents(name: str) -> list[str]:
    """The documents of a built-in corpus by name (see BUILTIN_CORPORA)."""
    if name not in BUILTIN_CORPORA:
        raise DataError(f"unknown built-in corpus {name!r}; expected one of: {', '.join(BUILTIN_CORPORA)}")
    return BUILTIN_CORPORA[name]()


def load_corpus(path=None, corpus: str = "stdlib") -> list[str]:
    """The documents of a data path, or of the built-in corpus `corpus` when path is None."""
    return builtin_documents(corpus) if path is None else read_documents(path)
