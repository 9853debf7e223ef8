import json
import math

import numpy as np
import pytest
import torch

from samoe.config import CORPORA
from samoe.config_load import load_config
from samoe.data.corpus import (
    BUILTIN_CORPORA,
    load_corpus,
    read_documents,
    split_documents,
    split_text,
    stdlib_documents,
    stdlib_sources,
)
from samoe.data.dataset import TokenStream, bits_per_byte, encode_documents, unigram_perplexity
from samoe.data.sources import read_source
from samoe.data.tokenizer import BPETokenizer, ByteTokenizer, build_tokenizer, load_tokenizer
from samoe.errors import ConfigError, DataError

SAMPLE = "def f(x):\n    return x + 1  # naïve café ☕ 日本語\n\nThe quick brown fox.\n"


def _docs(n=200):
    return [f"Document {i}: f_{i}(x) returns x * {i} + {i % 7}.\nSee also g_{i}." for i in range(n)]


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(_docs() + [SAMPLE] * 5, 400)


# ---------------------------------------------------------------- corpus: stdlib docstrings


def _fake_stdlib(root):
    (root / "pkg").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "site-packages").mkdir()
    (root / "alpha.py").write_text(
        '"""Alpha module."""\n'
        'raise RuntimeError("must never be imported")\n'
        "class Foo:\n"
        '    """A foo."""\n'
        "    def bar(self, x, y=2):\n"
        '        """Bar things."""\n'
        "def plain(a, *args, **kw):\n"
        '    """Plain function."""\n'
    )
    (root / "pkg" / "beta.py").write_text("async def go():\n    '''Go async.'''\n")
    (root / "nodocs.py").write_text("x = 1\n")
    (root / "broken.py").write_text("def (:\n")
    (root / "test" / "test_x.py").write_text('"""Test module."""\n')
    (root / "site-packages" / "lib.py").write_text('"""Third party."""\n')


def test_stdlib_extraction_and_cache(tmp_path):
    root, cache = tmp_path / "lib", tmp_path / "cache"
    _fake_stdlib(root)
    docs = stdlib_documents(root, cache)
    assert docs == [
        "Alpha module.\n\nclass Foo:\nA foo.\n\ndef Foo.bar(self, x, y=2):\nBar things.\n\n"
        "def plain(a, *args, **kw):\nPlain function.",
        "async def go():\nGo async.",
    ]
    [cache_file] = cache.iterdir()
    assert cache_file.name.startswith("stdlib-docs-py") and cache_file.suffix == ".jsonl"
    assert [json.loads(line)["text"] for line in cache_file.read_text().splitlines()] == docs
    (root / "alpha.py").unlink()  # the second call must read the cache, not the sources
    assert stdlib_documents(root, cache) == docs


def test_stdlib_source_corpus_is_every_python_file_tests_included(tmp_path):
    """One document per .py file, as written; tests kept, site-packages, NUL bytes and
    non-UTF-8 files skipped; cached like the docstring corpus."""
    root, cache = tmp_path / "lib", tmp_path / "cache"
    _fake_stdlib(root)
    (root / "latin1.py").write_bytes(b"# caf\xe9\nx = 1\n")
    (root / "nul.py").write_bytes(b"x = 1\0\n")
    (root / "empty.py").write_text("\n")
    (root / "bom.py").write_text("\ufeffy = 2\n", encoding="utf-8")
    docs = stdlib_sources(root, cache)
    expected = [root / "alpha.py", root / "bom.py", root / "broken.py", root / "nodocs.py",
                root / "pkg" / "beta.py", root / "test" / "test_x.py"]
    assert docs == [p.read_text(encoding="utf-8").removeprefix("\ufeff") for p in expected]
    [cache_file] = cache.iterdir()
    assert cache_file.name.startswith("stdlib-src-py")
    (root / "alpha.py").unlink()
    assert stdlib_sources(root, cache) == docs


def test_builtin_corpora_by_name(tmp_path, monkeypatch):
    assert CORPORA == tuple(BUILTIN_CORPORA)  # the config's choices are the corpora that exist
    assert load_config(overrides=[]).data.corpus == "stdlib"
    with pytest.raises(ConfigError, match="data.corpus"):
        load_config(overrides=["data.corpus=wikipedia"])
    monkeypatch.setitem(BUILTIN_CORPORA, "stdlib-docs", lambda: ["docs"])
    monkeypatch.setitem(BUILTIN_CORPORA, "stdlib", lambda: ["source"])
    assert load_corpus(None, "stdlib-docs") == ["docs"] and load_corpus(None) == ["source"]
    assert read_source("builtin:stdlib-docs") == ["docs"] and read_source("builtin:stdlib") == ["source"]
    with pytest.raises(DataError, match="builtin:stdlib-docs"):
        read_source("builtin:nope")


def test_stdlib_without_docstrings_is_an_error(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "a.py").write_text("x = 1\n")
    with pytest.raises(DataError, match="no docstrings"):
        stdlib_documents(tmp_path / "lib", tmp_path / "cache")


# ---------------------------------------------------------------- corpus: user data


def test_read_text_file_splits_blocks(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("\ufeffone\ntwo\n\n  \nthree\r\n\n\n")
    assert read_documents(p) == ["one\ntwo", "three"]


def test_long_block_is_cut_at_lines():
    text = "\n".join(f"verse {i:04d} " + "x" * 40 for i in range(1000))  # no blank lines
    docs = split_text(text, max_doc_chars=500)
    assert len(docs) > 50 and all(len(d) <= 500 for d in docs)
    assert "\n".join(docs) == text


def test_read_jsonl_and_directory(tmp_path):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / "b.jsonl").write_text('{"text": "j1"}\n\n{"text": "j2", "id": 3}\n{"text": "  "}\n')
    (d / "sub" / "a.txt").write_text("t1\n\nt2\n")
    (d / "empty.txt").write_text("")
    (d / ".hidden.txt").write_text("secret\n")
    (d / ".git").mkdir()
    (d / ".git" / "config").write_text("nope\n")
    assert read_documents(d / "b.jsonl") == ["j1", "j2"]
    assert read_documents(d) == ["j1", "j2", "t1", "t2"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"", "'.*empty.txt' contains no text"),
        ("blank.txt", b"  \n\n\t\n", "contains no text"),
        ("a.bin", b"abc\x00def", "'.*a.bin' looks binary \\(NUL bytes\\); expected UTF-8 text"),
        ("f.txt", b"hello world!\xff", "'.*f.txt' is not valid UTF-8 \\(byte 0xff at offset 12\\)"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', "'.*bad.jsonl' line 2: invalid JSON"),
        ("nofield.jsonl", b'{"body": "x"}\n', "line 1: expected a JSON object with a string \"text\" field"),
        ("nonstr.jsonl", b'{"text": 5}\n', "line 1: expected a JSON object"),
    ],
)
def test_read_errors(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_documents(tmp_path / name)


def test_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(DataError, match="data path '.*nope.txt' does not exist"):
        read_documents(tmp_path / "nope.txt")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "e.txt").write_text("\n")
    with pytest.raises(DataError, match="data directory '.*d' contains no text"):
        read_documents(tmp_path / "d")


def test_split_deterministic_disjoint_duplicates_same_side():
    docs = _docs(400) + ["dup A", "dup B"] * 20
    train, val = split_documents(docs, 0.1)
    assert (train, val) == split_documents(list(docs), 0.1)
    assert len(train) + len(val) == len(docs) and 10 < len(val) < 100
    assert not set(train) & set(val)
    for dup in ("dup A", "dup B"):
        assert train.count(dup) in (0, 20) and val.count(dup) in (0, 20)


def test_split_both_sides_nonempty():
    docs = ["a", "b", "c"]
    for fraction in (0.0, 1.0):
        train, val = split_documents(docs, fraction)
        assert train and val and sorted(train + val) == docs
    with pytest.raises(DataError, match="at least 2 distinct documents"):
        split_documents(["same", "same"])


# ---------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_round_trip_token_bytes_and_save_load(tmp_path, bpe, kind):
    tok = bpe if kind == "bpe" else build_tokenizer("byte", [], 0)
    ids = tok.encode(SAMPLE)
    assert tok.decode(ids) == SAMPLE
    assert tok.token_bytes().shape == (tok.vocab_size,)
    assert tok.token_bytes()[ids].sum() == len(SAMPLE.encode())
    assert tok.token_bytes()[tok.eot_id] == 0
    tok.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert type(loaded) is type(tok) and loaded.vocab_size == tok.vocab_size
    assert loaded.encode(SAMPLE) == ids and loaded.eot_id == tok.eot_id


def test_bpe_compresses_and_treats_eot_text_as_text(bpe):
    assert len(bpe.encode(SAMPLE)) < len(SAMPLE.encode())
    assert bpe.eot_id not in bpe.encode("a <|endoftext|> b")
    assert BPETokenizer.train(_docs(), 300).tk.to_str() == BPETokenizer.train(_docs(), 300).tk.to_str()


def test_byte_decode_eot_and_invalid_bytes():
    tok = ByteTokenizer()
    assert tok.decode([104, 105, tok.eot_id, 0xFF]) == "hi<|endoftext|>\ufffd"


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="'.*bad.json' is not a samoe tokenizer file"):
        load_tokenizer(tmp_path / "bad.json")


# ---------------------------------------------------------------- dataset


def test_encode_documents(bpe):
    arr = encode_documents(bpe, ["ab", "c"])
    assert arr.dtype == np.uint16
    assert arr.tolist() == bpe.encode("ab") + [bpe.eot_id] + bpe.encode("c") + [bpe.eot_id]
    assert encode_documents(ByteTokenizer(), ["hé"]).tolist() == [104, 0xC3, 0xA9, 256]


def test_sample_batch_reproducible_and_shifted():
    stream = TokenStream(np.arange(1000, dtype=np.uint16))
    g = torch.Generator().manual_seed(0)
    stream.sample_batch(4, 16, g)
    state = g.get_state()
    x1, y1 = stream.sample_batch(8, 16, g)
    g2 = torch.Generator()
    g2.set_state(state)
    x2, y2 = stream.sample_batch(8, 16, g2)
    assert x1.shape == y1.shape == (8, 16) and x1.dtype == torch.long
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(y1[:, :-1], x1[:, 1:]) and torch.equal(y1[:, -1], x1[:, -1] + 1)


def test_eval_batches_cover_without_overlap():
    tokens = np.arange(103, dtype=np.uint16)
    stream = TokenStream(tokens)
    batches = list(stream.eval_batches(batch_size=3, seq_len=10))
    assert [x.shape[0] for x, _ in batches] == [3, 3, 3, 1]
    x = torch.cat([b[0] for b in batches]).flatten()
    y = torch.cat([b[1] for b in batches]).flatten()
    assert x.tolist() == list(range(100)) and y.tolist() == list(range(1, 101))
    assert stream.num_eval_windows(10, max_tokens=35) == 3
    assert sum(y.numel() for _, y in stream.eval_batches(2, 10, max_tokens=35)) == 30


def test_spread_eval_windows_are_spaced_evenly_over_the_whole_split():
    stream = TokenStream(np.arange(103, dtype=np.uint16))  # 10 windows of 10
    x = torch.cat([b[0] for b in stream.eval_batches(2, 10, max_tokens=35, spread=True)])
    assert x[:, 0].tolist() == [0, 30, 60]  # windows 0, 3, 6 of 10: i * 10 // 3
    first = torch.cat([b[0] for b in stream.eval_batches(2, 10, max_tokens=35)])
    assert first[:, 0].tolist() == [0, 10, 20]
    every = [torch.cat([b[0] for b in stream.eval_batches(4, 10, spread=s)]) for s in (False, True)]
    assert torch.equal(*every)  # the whole split: both are every window, in order


def test_epoch_sampling_reads_every_window_once_per_epoch_in_a_new_order():
    stream = TokenStream(np.arange(1003, dtype=np.int64).astype(np.uint16))
    m = (1003 - 10) // 10  # 99 windows per epoch
    starts = [int(x[j, 0]) for step in range(2 * m // 3) for x, _ in [stream.epoch_batch(step, 3, 10, seed=7)]
              for j in range(3)]
    for epoch in (starts[:m], starts[m:2 * m]):
        assert len({s % 10 for s in epoch}) == 1  # one phase per epoch: the windows tile the stream
        assert sorted(epoch) == [epoch_start + 10 * i for i, epoch_start in enumerate([min(epoch)] * m)]
        assert max(epoch) + 10 + 1 <= 1003  # the last target is in range
    assert starts[:m] != starts[m:2 * m]
    x, y = stream.epoch_batch(5, 3, 10, seed=7)
    assert torch.equal(y[:, :-1], x[:, 1:])
    # a function of (seed, step) alone: a fresh stream asked for step 40 first gives the same batch
    again = TokenStream(stream.tokens).epoch_batch(40, 3, 10, seed=7)[0]
    assert torch.equal(again, stream.epoch_batch(40, 3, 10, seed=7)[0])
    assert not torch.equal(again, stream.epoch_batch(40, 3, 10, seed=8)[0])


def test_short_stream_error():
    with pytest.raises(DataError, match="validation split has 5 tokens; seq_len 8 needs at least 9"):
        stream = TokenStream(np.zeros(5, dtype=np.uint16), name="validation split")
        stream.sample_batch(1, 8, torch.Generator())


def test_unigram_perplexity_and_bits_per_byte():
    assert unigram_perplexity(np.tile(np.arange(50), 7), 64) == pytest.approx(50)
    assert unigram_perplexity(np.zeros(10, dtype=np.int64), 8) == pytest.approx(1)
    assert bits_per_byte(100 * math.log(2), 50) == pytest.approx(2.0)
