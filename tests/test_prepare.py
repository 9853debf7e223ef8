"""`samoe data prepare`: sources, dedup, split, shards, training from shards, user errors."""

import gzip
import json
import os
import random

import numpy as np
import pytest
import torch

from samoe.cli import main
from samoe.config import DataConfig
from samoe.data import debian
from samoe.data.dedup import exact_dedup, near_dedup, shingles
from samoe.data.options import PrepareOptions
from samoe.data.pipeline import prepare_dataset
from samoe.data.prepare import load_eval_stream, load_splits
from samoe.data.shards import load_prepared
from samoe.data.sources import mix, parse_source
from samoe.data.tokenizer import ByteTokenizer
from samoe.errors import DataError

VOCAB = [f"{a}{b}{c}" for a in "bcdfghklmnprst" for b in "aeiou" for c in ["", "n", "r", "st", "l", "ck"]]


def _doc(rng, n=300):
    return " ".join(rng.choices(VOCAB, k=n))


def _change_words(rng, doc, k=3):
    words = doc.split()
    for i in rng.sample(range(len(words)), k):
        words[i] = "zzq" + words[i]
    return " ".join(words)


def planted(n_distinct=300, n_exact=30, n_near=60, seed=0):
    """Distinct documents first, then exact copies (case/whitespace changed) and near copies (3 of
    300 words changed), so the first occurrence of every cluster is its original."""
    rng = random.Random(seed)
    originals = [_doc(rng) for _ in range(n_distinct)]
    exact = [originals[i].upper().replace(" ", "  ") for i in rng.sample(range(n_distinct), n_exact)]
    near_of = rng.sample(range(n_distinct), n_near)
    near = [_change_words(rng, originals[i]) for i in near_of]
    return originals, exact, near


def _opts(**kw):
    return PrepareOptions(tokenizer="byte", progress=False, **kw)


def _decoded(stream, tok):
    ends = [-1, *np.flatnonzero(np.asarray(stream.tokens) == tok.eot_id).tolist()]
    return [tok.decode(stream.tokens[a + 1 : b].tolist()) for a, b in zip(ends, ends[1:])]


def _jaccard(a, b):
    return len(a & b) / len(a | b)


# ----------------------------------------------------------------------------- acceptance 1


def test_dedup_removes_planted_duplicates_and_keeps_distinct_documents():
    originals, exact, near = planted()
    docs = originals + exact + near
    kept_exact = exact_dedup(docs)
    assert kept_exact == list(range(len(originals))) + list(range(len(originals) + len(exact), len(docs)))
    kept = [kept_exact[i] for i in near_dedup([docs[i] for i in kept_exact])]
    kept_originals = sum(i < len(originals) for i in kept)
    kept_near = sum(i >= len(originals) + len(exact) for i in kept)
    assert kept_originals >= 0.99 * len(originals)  # < 1% of distinct documents lost
    assert kept_near <= 0.05 * len(near)  # >= 95% of planted near duplicates removed


def test_report_counts_both_kinds(tmp_path):
    originals, exact, near = planted()
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in originals + exact + near))
    report = prepare_dataset([str(src)], tmp_path / "out", _opts())
    assert report["docs_in"] == 390
    assert report["exact_duplicates"] == 30
    assert 57 <= report["near_duplicates"] <= 60
    assert report["docs_out"] == 390 - 30 - report["near_duplicates"]
    assert report["train_docs"] + report["val_docs"] == report["docs_out"]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert report["train_tokens"] == meta["splits"]["train"]["tokens"] > 0
    assert (tmp_path / "out" / "train.bin").stat().st_size == 2 * report["train_tokens"]  # uint16
    assert [r["stage"] for r in report["stages"]] == ["read", "clean", "exact dedup", "near dedup", "mix",
                                                      "split", "tokenizer", "encode"]
    table = (tmp_path / "out" / "report.txt").read_text()
    assert "near dedup" in table and "exact dedup" in table


# ----------------------------------------------------------------------------- acceptance 2


def _straddling_pairs(out):
    tok, train, val = load_prepared(out)
    train_sh = [shingles(d, 5) for d in _decoded(train, tok)]
    return sum(any(_jaccard(shingles(v, 5), t) >= 0.5 for t in train_sh) for v in _decoded(val, tok))


def test_no_validation_document_has_a_near_duplicate_in_training(tmp_path):
    originals, exact, near = planted(n_distinct=150, n_exact=0, n_near=60, seed=1)
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(originals + near))
    prepare_dataset([str(src)], tmp_path / "raw", _opts(near_dedup=False, val_fraction=0.2))
    assert _straddling_pairs(tmp_path / "raw") > 0  # without near dedup the planted pairs straddle
    prepare_dataset([str(src)], tmp_path / "dedup", _opts(val_fraction=0.2))
    assert _straddling_pairs(tmp_path / "dedup") == 0


# ----------------------------------------------------------------------------- training reads shards


def test_load_splits_memmaps_a_prepared_directory(tmp_path):
    originals, _, _ = planted(n_distinct=40, n_exact=0, n_near=0)
    (tmp_path / "a.txt").write_text("\n\n".join(originals))
    prepare_dataset([str(tmp_path / "a.txt")], tmp_path / "out", _opts(val_fraction=0.2))
    splits = load_splits(DataConfig(path=str(tmp_path / "out"), val_fraction=0.5), 4096)
    assert isinstance(splits.tokenizer, ByteTokenizer)  # the prepared tokenizer, not a new 4096 one
    assert isinstance(splits.train.tokens, np.memmap) and isinstance(splits.val.tokens, np.memmap)
    decoded = _decoded(splits.train, splits.tokenizer) + _decoded(splits.val, splits.tokenizer)
    assert sorted(decoded) == sorted(originals)
    x, y = splits.train.sample_batch(4, 16, torch.Generator().manual_seed(0))
    assert x.shape == (4, 16) and (x[:, 1:] == y[:, :-1]).all()

    val = load_eval_stream(str(tmp_path / "out"), ByteTokenizer())  # `samoe eval RUN --data DIR`
    assert isinstance(val.tokens, np.memmap) and len(val) == len(splits.val)

    class Other:  # a resumed run's tokenizer must match the prepared vocabulary
        vocab_size = 300
    with pytest.raises(DataError, match="vocab_size 257"):
        load_splits(DataConfig(path=str(tmp_path / "out")), 4096, Other())


# ----------------------------------------------------------------------------- sources and mixtures


def test_parse_source_weights(tmp_path):
    assert parse_source("debian:dict-gcide@2.5").weight == 2.5
    assert parse_source("a.txt").weight is None
    odd = tmp_path / "x@3"
    odd.write_text("hi")
    assert parse_source(str(odd)).spec == str(odd)  # an existing path is taken whole
    with pytest.raises(DataError, match="positive number"):
        parse_source("a.txt@-1")


def test_mix_gives_weighted_character_shares_without_repeating():
    big = [f"big document {i} " * 10 for i in range(1000)]
    small = [f"small one {i} " * 10 for i in range(100)]
    a, b = mix([big, small], [1, 1])
    assert b == small  # the limiting source is kept whole
    assert set(a) <= set(big) and len(set(a)) == len(a)
    share = sum(map(len, a)) / (sum(map(len, a)) + sum(map(len, b)))
    assert abs(share - 0.5) < 0.01
    a3, _ = mix([big, small], [3, None])  # a source without a weight gets 1
    assert abs(sum(map(len, a3)) / sum(map(len, small)) - 3) < 0.03
    assert mix([big, small], [None, None]) == [big, small]


def test_mixture_prepare_records_sources(tmp_path):
    rng = random.Random(2)
    (tmp_path / "a.txt").write_text("\n\n".join(_doc(rng, 50) for _ in range(200)))
    (tmp_path / "b.txt").write_text("\n\n".join(_doc(rng, 50) for _ in range(50)))
    report = prepare_dataset([f"{tmp_path / 'a.txt'}@1", f"{tmp_path / 'b.txt'}@1"], tmp_path / "o", _opts())
    a, b = report["sources"]
    assert b["docs_out"] == 50 and 45 <= a["docs_out"] <= 55
    assert report["mixture_dropped"] == 200 - a["docs_out"]


def test_html_to_text_keeps_main_content():
    page = ('<html><head><title>T</title><script>var x=1;</script></head><body><div class="nav">Nav</div>'
            '<div role="main"><h1>hashlib<a>¶</a></h1><p>Secure   hashes\nand digests.</p>'
            '<div><pre>h = sha256()\n  h.update(b"x")</pre></div></div><div>Footer</div></body></html>')
    assert debian.html_to_text(page) == 'hashlib\n\nSecure hashes and digests.\n\nh = sha256()\n  h.update(b"x")'


def test_gcide_one_document_per_entry(tmp_path, monkeypatch):
    entries = ["00-database-info\nabout\n", "Apple \\Ap\"ple\\, n.\n   A fruit.\n   [1913 Webster]\n",
               "Bee \\Bee\\, n.\n   An insect.\n"]
    blob, index, off = b"", [], 0

    def b64(n):
        a = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        return a[n] if n < 64 else b64(n // 64) + a[n % 64]
    for word, e in zip(["00-database-info", "apple", "bee"], entries):
        data = e.encode()
        index.append(f"{word}\t{b64(off)}\t{b64(len(data))}")
        blob, off = blob + data, off + len(data)
    index.append(f"Apples\t{b64(len(entries[0]))}\t{b64(len(entries[1].encode()))}")  # same entry again
    (tmp_path / "gcide.index").write_text("\n".join(index) + "\n")
    (tmp_path / "gcide.dict.dz").write_bytes(gzip.compress(blob))
    monkeypatch.setattr(debian, "GCIDE", tmp_path / "gcide")
    assert debian.gcide_documents() == ['Apple \\Ap"ple\\, n.\n   A fruit.', "Bee \\Bee\\, n.\n   An insect."]


FAKE_BIBLE = """#!/bin/sh
printf 'Ge1:1 In the beginning God created the heaven and the earth.\\n'
printf 'Ge1:2 And the earth was without form, and void.\\n'
printf 'Ge2:1 Thus the heavens and the earth were finished.\\n'
printf 'Re22:21 The grace of our Lord Jesus Christ be with you all. Amen.\\n'
"""


def test_bible_recipe_has_one_document_per_chapter(tmp_path, monkeypatch):
    """`bible -f` output (faked on PATH, in the real format) grouped by book and chapter."""
    exe = tmp_path / "bin" / "bible"
    exe.parent.mkdir()
    exe.write_text(FAKE_BIBLE)
    exe.chmod(0o755)
    (tmp_path / "bible.data").write_bytes(b"x")
    monkeypatch.setenv("PATH", f"{exe.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(debian, "BIBLE_DATA", tmp_path / "bible.data")
    assert debian.bible_documents() == [
        "In the beginning God created the heaven and the earth.\nAnd the earth was without form, and void.",
        "Thus the heavens and the earth were finished.",
        "The grace of our Lord Jesus Christ be with you all. Amen."]


# ----------------------------------------------------------------------------- user errors (acceptance 6)


def _run(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


def _bad_input_cases(tmp_path, monkeypatch):
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "empty.txt").write_text("   \n\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (tmp_path / "nofield.jsonl").write_text('{"text": "fine"}\n{"body": "x"}\n')
    (tmp_path / "locked.txt").write_text("text")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    monkeypatch.setattr(debian, "GCIDE", tmp_path / "nowhere" / "gcide")
    real_read = type(tmp_path).read_bytes

    def read_bytes(self):
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied")
        return real_read(self)
    monkeypatch.setattr(type(tmp_path), "read_bytes", read_bytes)
    ok = tmp_path / "ok.txt"
    ok.write_text("one document\n\nanother document\n")
    return [
        (["locked.txt"], "cannot read", "Permission denied"),
        (["bin.txt"], "looks binary", "bin.txt"),
        (["empty.txt"], "contains no text", "empty.txt"),
        (["bad.jsonl"], "line 2", "invalid JSON"),
        (["nofield.jsonl"], "line 2", '"text" field'),
        (["debian:nope"], "unknown source 'debian:nope'", "dict-gcide"),
        (["debian:dict-gcide"], "apt-get install dict-gcide", "debian:dict-gcide"),
        ([str(ok), "--out", str(tmp_path / "full")], "not empty", "--overwrite"),
        ([str(ok), "--out", str(tmp_path / "full"), "--overwrite"], "no meta.json", "another --out"),
    ]


def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    for args, *expected in _bad_input_cases(tmp_path, monkeypatch):
        if "--out" not in args:
            args = [str(tmp_path / args[0]) if not args[0].startswith("debian:") else args[0],
                    "--out", str(tmp_path / "o"), *args[1:]]
        rc, err = _run(["data", "prepare", *args, "--quiet", "--tokenizer", "byte"], capsys)
        assert rc == 2, (args, err)
        assert len(err.splitlines()) == 1 and all(e in err for e in expected), err
        assert not (tmp_path / "o").exists()
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"  # never touched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_skip_bad_lines_skips_and_counts(tmp_path, capsys):
    lines = [json.dumps({"body": f"document number {i} " * 5}) for i in range(20)]
    lines[3], lines[7] = "{not json", json.dumps({"text": "wrong field"})
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["data", "prepare", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o"), "--text-field", "body",
            "--quiet", "--tokenizer", "byte"]
    rc, err = _run(argv, capsys)
    assert rc == 2 and "line 4" in err
    assert main([*argv, "--skip-bad-lines"]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["bad_lines_skipped"] == 2 and report["docs_in"] == 18


def test_overwrite_replaces_a_prepared_dataset(tmp_path, capsys):
    rng = random.Random(3)
    (tmp_path / "a.txt").write_text("\n\n".join(_doc(rng, 30) for _ in range(30)))
    argv = ["data", "prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o"), "--quiet", "--tokenizer", "byte"]
    assert main(argv) == 0
    assert "exact dedup" in capsys.readouterr().out
    assert _run(argv, capsys)[0] == 2
    assert main([*argv, "--overwrite", "--val-fraction", "0.5"]) == 0
    assert json.loads((tmp_path / "o" / "report.json").read_text())["settings"]["val_fraction"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "o"]
