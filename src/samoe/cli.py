"""The `samoe` command: train, eval, generate, export, params, flops, match-dense, analyze, data, bench.

Config values come from defaults <- --preset <- --config FILE <- `key.path=value` overrides
(e.g. `model.moe.num_experts=8 train.max_steps=200`). User errors print one line and exit 2.
"""

# The docstring above is `samoe --help`'s description. VERBS below is the command's table of
# contents: verb, one-line help, argument setup, handler (samoe/verbs.py). A subsystem's verbs
# live next to it, in its own cli.py (train/, eval/, data/, analysis/, study/); the small
# verbs that stand alone (generate, export, bench) are here.

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from samoe.analysis import cli as analysis_cli
from samoe.bench.suite import main as bench_main
from samoe.data import cli as data_cli
from samoe.errors import EXIT_USER_ERROR, UserError
from samoe.eval import cli as eval_cli
from samoe.hf.export import export_run
from samoe.malloc import keep_freed_memory
from samoe.runs import load_trained
from samoe.study import cli as study_cli
from samoe.train import cli as train_cli
from samoe.train.launch import is_main_process
from samoe.verbs import Group, Verb, add_verbs, check_at_least_one


def generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))


def cmd_generate(args: argparse.Namespace) -> int:
    cfg, model, tok = load_trained(args.run_dir, args.device or "auto")
    device = next(model.parameters()).device
    ids = tok.encode(args.prompt) or [tok.eot_id]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(torch.tensor([ids], device=device), args.max_tokens, args.temperature, args.top_k, gen)
    print(tok.decode(out[0].tolist()))
    return 0


def export_args(p: argparse.ArgumentParser) -> None:
    p.description = "Export a run's latest checkpoint for transformers (docs/interop.md)."
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="the directory to write (must not exist, or be empty)")
    p.add_argument("--format", default="samoe-hf", choices=("samoe-hf", "mixtral", "qwen2_moe"),
                   help="samoe-hf (default): samoe's own modelling code, loaded with trust_remote_code=True; "
                        "mixtral, qwen2_moe: stock architectures, for models that fit")
    p.add_argument("--materialize", action="store_true",
                   help="samoe-hf: expand SaMoE's pool (or the shared bank) into per-layer experts")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weight dtype (default float32)")


def cmd_export(args: argparse.Namespace) -> int:
    out = export_run(args.run_dir, args.out, args.format, args.materialize, args.dtype)
    how = "trust_remote_code=True" if args.format == "samoe-hf" else "no remote code"
    print(f"exported {args.run_dir} as {args.format} to {out} (AutoModelForCausalLM.from_pretrained, {how})")
    return 0


def bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a reduced suite (T = 2048), under 2 minutes")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per case (after 2 warm-ups)")
    p.add_argument("--json", metavar="FILE", help="also write the ratios as JSON")
    p.add_argument("--out", metavar="FILE", help="also write the Markdown report to FILE (it is always printed; "
                   "the project's record is docs/benchmarks.md)")


def cmd_bench(args: argparse.Namespace) -> int:
    check_at_least_one(args, "repeats")
    command = ("samoe bench" + (" --quick" if args.quick else "")
               + (f" --repeats {args.repeats}" if args.repeats != 5 else ""))
    results, report = bench_main(args.quick, args.repeats, args.json, args.out, command)
    print(report)
    return 0 if results else 1


VERBS = (
    Verb("train", "train a model (default: small SaMoE on the built-in stdlib corpus)",
         train_cli.train_args, train_cli.cmd_train),
    Verb("eval", "perplexity of a run, or its zero-shot accuracy on tasks (--task)",
         eval_cli.eval_args, eval_cli.cmd_eval),
    Verb("generate", "sample text from a run", generate_args, cmd_generate),
    Verb("params", "parameter counts (total, active per token, by component)",
         analysis_cli.params_args, analysis_cli.cmd_params),
    Verb("flops", "FLOPs per token by component, training FLOPs, PF-days, all-to-all bytes",
         analysis_cli.flops_args, analysis_cli.cmd_flops),
    Verb("plan", "memory a rank needs for each data/expert-parallel and FSDP layout over N GPUs, and the time",
         analysis_cli.plan_args, analysis_cli.cmd_plan),
    Verb("match-dense", "write dense configs matching an MoE's training FLOPs and its parameters",
         analysis_cli.match_dense_args, analysis_cli.cmd_match_dense),
    Group("data", "prepare datasets (dedup, split, token shards) and measure diversity",
          "data_command", data_cli.DATA_VERBS),
    Group("analyze", "gradient flow across routers and expert counts; a run's experts",
          "analysis", analysis_cli.ANALYZE_VERBS),
    Group("study", "a grid of arms x seeds x corpora as ordinary runs (see studies/)",
          "study_command", study_cli.STUDY_VERBS),
    Verb("export", "a run as a Hugging Face model directory (samoe-hf, mixtral, qwen2_moe)", export_args, cmd_export),
    Verb("bench", "MoE speed and memory benchmarks (a Markdown report; --out FILE writes it too)", bench_args,
         cmd_bench),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samoe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_verbs(parser.add_subparsers(dest="command", required=True), VERBS)
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line; `key.path=value` overrides may stand anywhere among a verb's
    flags (argparse gives the positional list only its first run of them, the rest come back
    unrecognised and are appended in order)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and isinstance(getattr(args, "overrides", None), list) and not any(a.startswith("-") for a in rest):
        args.overrides += rest
    elif rest:
        parser.parse_args(argv)  # argparse's own message and exit status for what it does not know
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    keep_freed_memory()  # every verb trains, evaluates or benchmarks: steady state is the peak
    try:
        return args.func(args)
    except UserError as e:
        if is_main_process():  # under torchrun every process hits the same error
            print(f"samoe: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return interrupted()
    except BrokenPipeError:  # `samoe params ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        # On Ctrl-C a torchrun process blocked in a collective may see its stopped peer leave, as
        # a RuntimeError, before its own interrupt arrives, or while it is pending (C++ code ran;
        # Python had no turn to raise it), or after C++ code consumed it. Under torchrun, give
        # the interrupt its turn and a moment to arrive: if it comes, this process was
        # interrupted. If not, and the error only says that a peer left, the peer says why (its
        # own traceback, or the launcher's "interrupted"): exit 1 without a second traceback.
        if "RANK" in os.environ:
            try:
                run_pending_signal_handlers()
                time.sleep(INTERRUPT_GRACE_S)
            except KeyboardInterrupt:
                return interrupted()
            if isinstance(e, RuntimeError) and any(s in str(e) for s in PEER_LEFT):
                return 1
        raise


INTERRUPT_GRACE_S = 2.0  # how long a failed torchrun process waits for a Ctrl-C on its way
PEER_LEFT = ("Connection closed by peer", "Connection reset by peer")  # gloo's words for a peer gone


def interrupted() -> int:
    """Exit status 130. A single process says "interrupted"; under torchrun the launcher says it
    once for all (launch()), as the processes may not all see the Ctrl-C."""
    if "RANK" not in os.environ:
        print("samoe: interrupted", file=sys.stderr)
    return 130


def run_pending_signal_handlers() -> None:
    """Nothing: CPython runs pending signal handlers when a Python function starts, so calling
    one raises the KeyboardInterrupt of a Ctrl-C that arrived while C++ code ran."""


if __name__ == "__main__":
    sys.exit(main())
