"""`samoe data stats`: the diversity metrics and the command."""

import json
import math
import random

import pytest

from samoe.cli import main
from samoe.data.options import PrepareOptions
from samoe.data.pipeline import prepare_dataset
from samoe.data.stats import corpus_stats, distinct_n, mattr, sample, unigram_entropy, words

KEYS = {"unigram_entropy", "distinct_1", "distinct_2", "distinct_3", "distinct_4", "compression_ratio",
        "duplicate_rate", "mattr", "vocab_size", "doc_words_p50"}


def _corpus(vocab_size, n_docs=200, words_per_doc=60, seed=0, prefix="w"):
    rng = random.Random(seed)
    vocab = [f"{prefix}{i}" for i in range(vocab_size)]
    return [" ".join(rng.choices(vocab, k=words_per_doc)) + "." for _ in range(n_docs)]


def test_metric_formulas():
    assert words("Hello, World!  héllo") == ["hello", ",", "world", "!", "héllo"]
    assert unigram_entropy(["a", "b", "c", "d"] * 5) == pytest.approx(2.0)
    assert unigram_entropy(["a"] * 7) == pytest.approx(0.0)
    assert distinct_n([["a", "b", "a", "b"], ["a", "b"]], 1) == pytest.approx(2 / 6)
    assert distinct_n([["a", "b", "a", "b"], ["a", "b"]], 2) == pytest.approx(2 / 4)  # n-grams stay inside documents
    assert mattr(["a", "b"] * 10, window=4) == pytest.approx(0.5)
    assert mattr(list("abcdefgh"), window=4) == pytest.approx(1.0)


def test_sample_has_fixed_size_and_is_deterministic():
    docs = _corpus(50, n_docs=100)
    dw = [words(d) for d in docs]
    s = sample(dw, docs, 1000)
    assert sum(map(len, s)) == 1000
    assert s == sample(dw, list(docs), 1000)
    assert sum(map(len, sample(dw, docs, 10**9))) == sum(map(len, dw))


def test_diversity_ranks_corpora_and_counts_duplicates():
    narrow, wide = _corpus(30, seed=1), _corpus(3000, seed=2)
    a, b = corpus_stats(narrow, 5000), corpus_stats(wide, 5000)
    for k in ("unigram_entropy", "distinct_1", "distinct_2", "distinct_3", "distinct_4", "mattr"):
        assert a[k] < b[k], k
    assert a["compression_ratio"] > b["compression_ratio"]  # repetitive text compresses better
    assert a["duplicate_rate"] == 0 and a["doc_words_p50"] == 61  # 60 words and "."
    mixed = corpus_stats(_corpus(30, seed=3) + _corpus(30, seed=4, prefix="v"), 5000)
    assert mixed["distinct_1"] > a["distinct_1"] and mixed["unigram_entropy"] > a["unigram_entropy"] + 0.5
    dup = wide[:150] + [d.upper() for d in wide[:30]] + [d.replace("w1 ", "w2 ", 1) for d in wide[30:50]]
    assert corpus_stats(dup, 5000)["duplicate_rate"] == pytest.approx(50 / 200)


def test_stats_command_json_table_and_prepared_dir(tmp_path, capsys):
    docs = _corpus(300, n_docs=80, seed=5)
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    assert main(["data", "stats", str(tmp_path / "a.txt"), "--json", "--quiet", "--sample-words", "2000"]) == 0
    text_stats = json.loads(capsys.readouterr().out)
    assert KEYS <= set(text_stats) and text_stats["sample_words"] == 2000
    assert all(math.isfinite(v) for v in text_stats.values())

    prepare_dataset([str(tmp_path / "a.txt")], tmp_path / "prep", PrepareOptions(tokenizer="byte", progress=False))
    assert main(["data", "stats", str(tmp_path / "prep"), "--json", "--quiet", "--sample-words", "2000"]) == 0
    assert json.loads(capsys.readouterr().out) == text_stats  # the shards decode to the same documents

    mixture = f"{tmp_path / 'a.txt'}@1+{tmp_path / 'a.txt'}@1"
    assert main(["data", "stats", str(tmp_path / "a.txt"), mixture, "--quiet", "--sample-words", "2000"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[0] == "metric" and "distinct_4" in out and f"corpus 2 = {mixture}" in out


def test_stats_bad_target_is_one_line(tmp_path, capsys):
    assert main(["data", "stats", str(tmp_path / "missing.txt"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing.txt" in err
