"""The device check: one script for a session that is lent a GPU (15 minutes, all tries).

    PYTHONPATH=src python3 scripts/gpu_check.py --out $OUT          # on the GPU machine (~5 min)
    .venv/bin/python scripts/gpu_check.py --device cpu --small      # here: that the script itself runs

It runs from the source tree, without `pip install` (the GPU image has its own PyTorch), and
writes $OUT/gpu_check.json. Parts:

1. correctness of the CUDA path against float64 on the CPU: the grouped expert FFN (stack and
   SaMoE pool, gelu and swiglu; fp32 and bf16 autocast) and a whole tiny model's loss and
   gradients (fp32, TF32 off);
2. training: `samoe train --preset tiny --device cuda` in fp32 and bf16, and the bf16 run's
   checkpoint evaluated on the CPU;
3. timing at larger shapes than the 2-core CPU allows: MoE (E = 16, 64) vs dense FFN and SaMoE
   vs MoE layer fwd+bwd, medians of CUDA-synchronised repeats, fp32 and bf16; in bf16 also the
   MoE layer with torch._grouped_mm for its expert GEMMs (issue 16's comparison), which the
   layer uses on CUDA only once part 1's "grouped_mm" rows have passed;
4. parallel: `samoe train --nproc 2 --ep 2 --fsdp` over nccl against one process (tiny preset,
   20 steps, worst relative loss gap), when there are 2 GPUs (nccl takes one GPU a process;
   with one GPU the part says so and is skipped);
5. bf16 throughput: the default preset's training step (tokens/s) and one paper-scale MoE layer
   (350m-moe128's: d 1024, 128 experts of width 4096, top-1) fwd+bwd on 16,384 tokens.

Exit status 1 if a correctness check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from samoe.bench.layers import Shape, fwd_bwd, moe_model  # noqa: E402
from samoe.config_load import load_config  # noqa: E402
from samoe.ffn import FeedForward  # noqa: E402
from samoe.model.gpt import GPT  # noqa: E402
from samoe.moe import grouped  # noqa: E402
from samoe.moe.grouped import ExpertSource, grouped_expert_ffn  # noqa: E402
from samoe.train.distributed import Layout  # noqa: E402
from samoe.train.loop import new_trainer, train_step  # noqa: E402
from samoe.train.synthetic import synthetic_stream  # noqa: E402
from test_grouped import reference  # noqa: E402


def check_grouped(device: str, small: bool) -> list[dict]:
    """The grouped FFN against the tests' float64 loop on the CPU, as the layer runs it on the
    device (the loop over experts), and with torch._grouped_mm turned on for bf16 (rows
    "grouped_mm": true), which the layer uses on CUDA only once this has passed."""
    rows = []
    for gemm in (False, True):
        saved = dict(grouped.GROUPED_GEMM)
        if gemm:
            grouped.GROUPED_GEMM[device] = (torch.bfloat16,)
        try:
            rows += [{**r, "grouped_mm": gemm} for r in _check_grouped(device, small)
                     if not gemm or r["dtype"] == "bfloat16"]
        except Exception as e:  # noqa: BLE001 -- a device without grouped GEMMs: say so, check the rest
            rows.append({"grouped_mm": gemm, "error": str(e)[:300], "ok": not gemm})
        finally:
            grouped.GROUPED_GEMM.clear()
            grouped.GROUPED_GEMM.update(saved)
    return rows


def _check_grouped(device: str, small: bool) -> list[dict]:
    rows = []
    E, K, d, f = (4, 2, 16, 32) if small else (16, 2, 256, 1024)
    for activation in ("gelu", "swiglu"):
        h = 2 * f if activation == "swiglu" else f
        for pooled in (False, True):
            for dtype in ("float32", "bfloat16"):
                gen = torch.Generator().manual_seed(0)
                lead = (K,) if pooled else ()
                ws = [torch.randn(*lead, E, *s, generator=gen, dtype=torch.float64) * 0.05
                      for s in ((d, h), (h,), (f, d), (d,))]
                coef = torch.softmax(torch.randn(E, K, generator=gen, dtype=torch.float64), -1) if pooled else None
                counts = torch.randint(0, 64 if small else 512, (E,), generator=gen).tolist()
                counts[1] = 0  # an expert without tokens
                x = torch.randn(sum(counts), d, generator=gen, dtype=torch.float64)
                gy = torch.randn(sum(counts), d, generator=gen, dtype=torch.float64)
                ref_in = [t.clone().requires_grad_() for t in (x, *ws)]
                ref_in += [coef.clone().requires_grad_()] if pooled else []
                y_ref = reference(ref_in[0], counts, ExpertSource(*ref_in[1:5], coef=ref_in[5] if pooled else None),
                                  activation)  # the tests' loop over experts, in float64 on the CPU
                ref_grads = torch.autograd.grad((y_ref * gy).sum(), ref_in)
                dev_in = [t.to(device, torch.float32).requires_grad_() for t in ref_in]
                with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                    src = ExpertSource(*dev_in[1:5], coef=dev_in[5] if pooled else None)
                    y = grouped_expert_ffn(dev_in[0], counts, src, activation)
                grads = torch.autograd.grad((y.float() * gy.to(device, torch.float32)).sum(), dev_in)
                errs = [rel_err(y, y_ref)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]
                tol = 3e-2 if dtype == "bfloat16" else 1e-4
                rows.append({"activation": activation, "pool": pooled, "dtype": dtype, "max_rel_err": max(errs),
                             "ok": max(errs) < tol})
    return rows


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_model(device: str) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = load_config(preset="tiny", overrides=["model.moe.dropless=true"])
    torch.manual_seed(0)
    ref = GPT(cfg.model).double()
    model = GPT(cfg.model).to(device)
    model.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    idx = torch.randint(cfg.model.vocab_size, (4, cfg.model.block_size))
    out_ref = ref(idx, idx)
    out = model(idx.to(device), idx.to(device))
    (out_ref.loss + out_ref.aux_loss).backward()
    (out.loss + out.aux_loss).backward()
    grads = {n: rel_err(p.grad, q.grad) for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters())
             if q.grad is not None}
    worst = max(grads, key=grads.get)
    result = {"loss": out.loss.item(), "loss_ref": out_ref.loss.item(), "worst_grad": worst,
              "worst_grad_rel_err": grads[worst]}
    result["ok"] = abs(result["loss"] - result["loss_ref"]) < 1e-4 * abs(result["loss_ref"]) and grads[worst] < 1e-3
    return result


def check_training(device: str, out: Path, steps: int) -> dict:
    result = {}
    for dtype in ("float32", "bfloat16"):
        run = out / f"run-{dtype}"
        cmd = [sys.executable, "-m", "samoe", "train", "--preset", "tiny", "--device", device, "--out", str(run),
               "--quiet", f"--max-steps={steps}", f"train.dtype={dtype}", "train.eval_every=1000"]
        t0 = time.time()
        done = subprocess.run(cmd, capture_output=True, text=True)
        rows = ([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
                if done.returncode == 0 else [])
        result[dtype] = {"rc": done.returncode, "wall_s": round(time.time() - t0, 1),
                         "first_loss": rows[0]["loss"] if rows else None,
                         "last_loss": rows[-1]["loss"] if rows else None,
                         "stderr_tail": done.stderr[-500:] if done.returncode else ""}
    ev = subprocess.run([sys.executable, "-m", "samoe", "eval", str(out / "run-bfloat16"), "--device", "cpu", "--json"],
                        capture_output=True, text=True)
    result["eval_on_cpu"] = (json.loads(ev.stdout) if ev.returncode == 0
                             else {"rc": ev.returncode, "stderr": ev.stderr[-500:]})
    result["ok"] = all(result[d]["rc"] == 0 and result[d]["last_loss"] < result[d]["first_loss"]
                       for d in ("float32", "bfloat16")) and ev.returncode == 0
    return result


def synced_medians(cases: dict, device: str, repeats: int, warmup: int = 3) -> dict[str, float]:
    times = {name: [] for name in cases}
    for i in range(warmup + repeats):
        for name, fn in cases.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def timing(device: str, small: bool, repeats: int) -> list[dict]:
    rows = []
    shapes = [Shape(2048, 64, 256)] if small else [Shape(65536, 1024, 4096), Shape(16384, 1024, 4096)]
    for shape in shapes:
        for dtype in ("float32", "bfloat16"):
            torch.manual_seed(0)
            x = torch.randn(1, shape.tokens, shape.d_model, device=device, requires_grad=True)
            ids = torch.zeros(1, shape.tokens, dtype=torch.long, device=device)
            models = {"moe_e16": moe_model(shape, 16), "moe_e64": moe_model(shape, 64),
                      "samoe_e16": moe_model(shape, 16, "pool", 2)}
            dense = FeedForward(shape.d_model, shape.hidden, shape.activation, 1).to(device)
            cases = {"dense": fwd_bwd(dense, x, None)}
            for name, m in models.items():
                m.to(device)
                cases[name] = fwd_bwd(m.moe_layers()[0], x, ids, m)

            def autocast(fn, gemm=False, dtype=dtype):
                def step():
                    saved = grouped.GROUPED_GEMM.get(device)
                    if gemm:  # the same layer with torch._grouped_mm for its expert GEMMs
                        grouped.GROUPED_GEMM[device] = (torch.bfloat16,)
                    try:
                        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                            fn()
                    finally:
                        grouped.GROUPED_GEMM.pop(device, None)
                        if saved is not None:
                            grouped.GROUPED_GEMM[device] = saved
                return step
            steps = {k: autocast(v) for k, v in cases.items()}
            if dtype == "bfloat16":
                steps.update({f"{k}_grouped_mm": autocast(cases[k], gemm=True) for k in ("moe_e16", "moe_e64")})
            try:
                t = synced_medians(steps, device, repeats)
            except RuntimeError as e:  # the grouped GEMM not available here: time the rest
                t = synced_medians({k: v for k, v in steps.items() if "grouped_mm" not in k}, device, repeats)
                t["grouped_mm_error"] = str(e)[:300]
            row = {"tokens": shape.tokens, "d_model": shape.d_model, "hidden": shape.hidden, "dtype": dtype,
                   "dense_ms": 1000 * t["dense"], "moe_vs_dense_e16": t["moe_e16"] / t["dense"],
                   "moe_vs_dense_e64": t["moe_e64"] / t["dense"], "samoe_vs_moe": t["samoe_e16"] / t["moe_e16"]}
            for e in ("e16", "e64"):
                if f"moe_{e}_grouped_mm" in t:
                    row[f"moe_grouped_mm_vs_dense_{e}"] = t[f"moe_{e}_grouped_mm"] / t["dense"]
                    row[f"moe_grouped_mm_vs_loop_{e}"] = t[f"moe_{e}_grouped_mm"] / t[f"moe_{e}"]
            if "grouped_mm_error" in t:
                row["grouped_mm_error"] = t["grouped_mm_error"]
            rows.append(row)
            del models, cases, x
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def check_parallel(device: str, out: Path) -> dict:
    """Part 4: the tiny preset on 2 processes (ep 2 + FSDP2) against one, 20 steps."""
    gpus = torch.cuda.device_count() if device == "cuda" else 2
    if gpus < 2:
        return {"skipped": f"{gpus} GPU: nccl takes one GPU a process, so ep 2 + FSDP needs 2", "ok": True}
    runs = {}
    for name, flags in (("one", []), ("ep2_fsdp", ["--nproc", "2", "--ep", "2", "--fsdp"])):
        run = out / f"parallel-{name}"
        cmd = [sys.executable, "-m", "samoe", "train", "--preset", "tiny", "--device", device, "--out", str(run),
               "--quiet", "--max-steps=20", "train.log_every=1", "train.batch_size=8", "train.micro_batch_size=2",
               *flags]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            return {name: {"rc": done.returncode, "stderr_tail": done.stderr[-800:]}, "ok": False}
        runs[name] = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    gap = max(abs(a - b) / a for a, b in zip(runs["one"], runs["ep2_fsdp"]))
    return {"worst_rel_loss_gap": gap, "steps": len(runs["one"]), "ok": gap < 1e-3}


def throughput(device: str, small: bool, repeats: int) -> dict:
    """Part 5: bf16 tokens/s of the default preset's train_step and of one 350m-moe128 MoE layer."""
    cfg = load_config(preset="tiny" if small else "default", overrides=["train.dtype=bfloat16"])
    torch.manual_seed(0)
    model = GPT(cfg.model).to(device)
    tr = new_trainer(cfg, model, synthetic_stream(cfg), Layout(device=torch.device(device)))
    step = synced_medians({"step": lambda: train_step(tr)}, device, repeats)["step"]
    result = {"default_tokens_per_s": tr.tokens_per_step / step, "default_step_ms": 1000 * step}
    tr = model = None  # free the default model before the layer's
    shape = Shape(2048, 64, 256) if small else Shape(16384, 1024, 4096)
    layer_model = moe_model(shape, 8 if small else 128, top_k=1).to(device)
    x = torch.randn(1, shape.tokens, shape.d_model, device=device, requires_grad=True)
    ids = torch.zeros(1, shape.tokens, dtype=torch.long, device=device)
    fn = fwd_bwd(layer_model.moe_layers()[0], x, ids, layer_model)

    def bf16():
        with torch.autocast(device, dtype=torch.bfloat16):
            fn()
    t = synced_medians({"layer": bf16}, device, repeats)["layer"]
    result.update({"paper_layer_tokens_per_s": shape.tokens / t, "paper_layer_ms": 1000 * t,
                   "paper_layer": f"d {shape.d_model}, {8 if small else 128} experts of width {shape.hidden}, top-1"})
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    p.add_argument("--small", action="store_true", help="small shapes (to try the script on a CPU)")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    for name, fn in [("grouped", lambda: check_grouped(args.device, args.small)),
                     ("model", lambda: check_model(args.device)),
                     ("training", lambda: check_training(args.device, out, 20 if args.small else 200)),
                     ("timing", lambda: timing(args.device, args.small, 3 if args.small else args.repeats)),
                     ("parallel", lambda: check_parallel(args.device, out)),
                     ("throughput", lambda: throughput(args.device, args.small, 3 if args.small else args.repeats))]:
        t0 = time.time()
        report[name] = fn()
        print(f"{name} ({time.time() - t0:.0f}s): {json.dumps(report[name])}", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    ok = (all(r["ok"] for r in report["grouped"]) and report["model"]["ok"] and report["training"]["ok"]
          and report["parallel"]["ok"])
    print("correctness:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
