"""`samoe analyze experts RUN_DIR`: load histogram, similarity of effective experts, SaMoE
coefficients; and the errors for a directory that is not a finished run."""

import json
import random
import shutil

import numpy as np
import pytest
import torch

from helpers import assert_user_error, run_cli
from samoe.analysis.experts import cosine_matrix

pytestmark = pytest.mark.slow  # the module trains two runs

WORDS = "the expert router sends each token to one layer of a pool shared across depth while gradients flow".split()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished 2-step tiny runs: SaMoE with per-expert coefficients, and private experts."""
    root = tmp_path_factory.mktemp("experts")
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(30)), encoding="utf-8")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAMOE_CACHE", str(root / "cache"))
        for name, extra in (("pool", ["model.moe.pool.granularity=expert"]),
                            ("private", ["model.moe.sharing=private"])):
            code, _, err = run_cli("train", "--preset", "tiny", "--data", corpus, "--out", root / name, "--quiet",
                                "train.max_steps=2", "train.batch_size=2", "train.eval_tokens=128",
                                "data.tokenizer=byte", *extra)
            assert code == 0, err
            out[name] = root / name
    return out


@pytest.mark.parametrize("kind", ["pool", "private"])
def test_experts_report_and_plots(runs, kind, tmp_path):
    out = tmp_path / "analysis"
    code, stdout, err = run_cli("analyze", "experts", runs[kind], "--out", out, "--max-tokens", 256, "--device", "cpu")
    assert code == 0, err
    report = json.loads((out / "experts.json").read_text())
    assert report["sharing"] == kind and len(report["layers"]) == 2  # tiny: every block MoE
    for layer in report["layers"]:
        E = layer["num_experts"]
        assert E == 4 and len(layer["tokens_per_expert"]) == E
        # top-1 routing: every token is kept once or dropped
        assert sum(layer["tokens_per_expert"]) == pytest.approx(report["tokens"] * (1 - layer["dropped_frac"]))
        sim = np.array(layer["cosine_similarity"])
        assert sim.shape == (E, E) and np.allclose(np.diag(sim), 1, atol=1e-4) and np.allclose(sim, sim.T, atol=1e-5)
        if kind == "pool":
            c = np.array(layer["coefficients"])
            assert c.shape == (E, 2) and np.allclose(c.sum(1), 1, atol=1e-4)
        else:
            assert "coefficients" not in layer
    cross = np.array(report["cross_layer_similarity"])
    assert cross.shape == (2, 2) and np.allclose(np.diag(cross), 1, atol=1e-4)
    assert ("pool_entry_similarity" in report) == (kind == "pool")
    assert "same expert slot across layers" in stdout
    assert (out / "experts-load.png").exists() and (out / "experts-similarity.png").exists()
    assert (out / "experts-coefficients.png").exists() == (kind == "pool")


def test_cosine_matrix_of_the_effective_experts():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    b = torch.zeros(3, 1)
    sim = cosine_matrix([a, b])
    assert np.allclose(sim, [[1, 0, 1], [0, 1, 0], [1, 0, 1]], atol=1e-6)


def test_run_directory_without_checkpoints(runs, tmp_path):
    broken = tmp_path / "no-ckpt"
    shutil.copytree(runs["private"], broken)
    shutil.rmtree(broken / "checkpoints")
    assert_user_error(run_cli("analyze", "experts", broken), "no checkpoint", str(broken))
    assert not (broken / "analysis").exists()


def test_not_a_run_directory(tmp_path):
    assert_user_error(run_cli("analyze", "experts", tmp_path), "not a samoe run directory")
    assert_user_error(run_cli("analyze", "experts", tmp_path / "missing"), "does not exist")
