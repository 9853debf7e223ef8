"""The expert kernel (moe/expert_gemm.py) against torch._grouped_mm, both in one process, interleaved.

    python scripts/ab_expert_gemm.py gemm       # one forward GEMM at four shapes, and a dense GEMM of all rows
    python scripts/ab_expert_gemm.py shares     # one forward GEMM on even and uneven counts: kernel / _grouped_mm
    python scripts/ab_expert_gemm.py call       # what a call costs: 64 experts of one row, 8 x 8 weights
    python scripts/ab_expert_gemm.py layer      # the bench's layers (T = 2048, d = 256, f = 1024): ratios
    python scripts/ab_expert_gemm.py default    # a preset's training tokens/s relative to dense (also: tiny)

Each prints one line of JSON. "_grouped_mm" entries ran with the kernel switched off for that call
(the module's loaded library set aside), so both share the process, its allocator and its warm-up.
"""

import json
import sys

import torch

from samoe.bench.layers import Shape, fwd_bwd, moe_model, route_alike
from samoe.bench.training import VARIANTS
from samoe.config_load import load_config
from samoe.ffn import FeedForward
from samoe.malloc import keep_freed_memory
from samoe.moe import expert_gemm
from samoe.timing import interleaved_medians
from samoe.train.synthetic import synthetic_step

keep_freed_memory()
if not expert_gemm.available():
    sys.exit("the expert kernel does not build here (moe/expert_gemm.py says what it needs)")
LIB = expert_gemm._lib


def both(fn):
    """{"": fn with the kernel, "_grouped_mm": fn without}."""
    def run(kernel):
        expert_gemm._lib = LIB if kernel else None
        try:
            fn()
        finally:
            expert_gemm._lib = LIB
    return {"": lambda: run(True), "_grouped_mm": lambda: run(False)}


what = sys.argv[1]
torch.manual_seed(0)
if what == "gemm":  # random counts of 0.25-1.75x the mean
    out = {}
    for E, d, h, n in ((64, 128, 64, 128), (16, 256, 1024, 128), (64, 256, 1024, 32), (4, 64, 256, 128)):
        counts = torch.randint(max(1, n // 4), n * 7 // 4, (E,)).tolist()
        x, w = torch.randn(sum(counts), d), torch.randn(E, d, h)
        offs = torch.tensor(counts).cumsum(0).to(torch.int32)
        old = expert_gemm.MIN_EXPERTS
        expert_gemm.MIN_EXPERTS = 1  # time the kernel at 4 experts too
        t = interleaved_medians({"kernel": lambda x=x, w=w, c=counts: expert_gemm.rows_times_experts(x, w, c),
                                 "_grouped_mm": lambda x=x, w=w, o=offs: torch._grouped_mm(x, w, offs=o),
                                 "dense": lambda x=x, w=w: torch.mm(x, w[0])}, 31)
        expert_gemm.MIN_EXPERTS = old
        out[f"E{E}_{d}x{h}_ms"] = {k: round(v * 1e3, 3) for k, v in t.items()}
    print(json.dumps(out))
elif what == "shares":  # the kernel's time over torch._grouped_mm's, whatever MIN_EXPERTS would take
    out = {}
    expert_gemm.MIN_EXPERTS = 1
    for d, h in ((64, 256), (128, 64), (256, 1024)):
        for counts in ([128] * 4, [320, 64, 64, 64], [448, 32, 16, 16], [256, 256, 0, 0], [512, 0, 0, 0], [40] * 64,
                       [400] + [5] * 63):
            x, w = torch.randn(sum(counts), d), torch.randn(len(counts), d, h)
            offs = torch.tensor(counts).cumsum(0).to(torch.int32)
            t = interleaved_medians({"kernel": lambda x=x, w=w, c=counts: expert_gemm.rows_times_experts(x, w, c),
                                     "_grouped_mm": lambda x=x, w=w, o=offs: torch._grouped_mm(x, w, offs=o)}, 31)
            name = "+".join(map(str, counts)) if len(counts) == 4 else f"{counts[0]}+{len(counts) - 1}x{counts[-1]}"
            out[f"{d}x{h}_{name}"] = round(t["kernel"] / t["_grouped_mm"], 2)
    print(json.dumps(out))
elif what == "call":  # next to nothing to compute: the Python around the kernel, and the kernel's own loop
    counts, x, w = [1] * 64, torch.randn(64, 8), torch.randn(64, 8, 8)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    def times200(fn):
        return lambda: [fn() for _ in range(200)]
    t = interleaved_medians({"kernel": times200(lambda: expert_gemm.rows_times_experts(x, w, counts)),
                             "_grouped_mm": times200(lambda: torch._grouped_mm(x, w, offs=offs))}, 31)
    print(json.dumps({f"{k}_us": round(v / 200 * 1e6, 1) for k, v in t.items()}))
elif what == "layer":
    shape = Shape(2048)
    x = torch.randn(1, shape.tokens, shape.d_model, requires_grad=True)
    ids = torch.zeros(1, shape.tokens, dtype=torch.long)
    models = {E: moe_model(shape, E) for E in (16, 64)}
    models["samoe"] = route_alike(moe_model(shape, 16, "pool", 2), models[16])
    fns = {"dense": fwd_bwd(FeedForward(shape.d_model, shape.hidden, shape.activation, 1), x, None)}
    for name, m in models.items():
        fns.update({f"{name}{k}": f for k, f in both(fwd_bwd(m.moe_layers()[0], x, ids, m)).items()})
    t = interleaved_medians(fns, 9)
    print(json.dumps({f"{r}{k}": round(t[f"{num}{k}"] / t[den if k == "" or den == "dense" else den + k], 3)
                      for r, num, den in (("moe_vs_dense_e16", 16, "dense"), ("moe_vs_dense_e64", 64, "dense"),
                                          ("samoe_vs_moe", "samoe", "16"))
                      for k in ("", "_grouped_mm")}))
else:
    fns = {}
    for name, overrides in VARIANTS.items():
        step = synthetic_step(load_config(preset=what, overrides=overrides))
        fns.update({f"{name}{k}": f for k, f in both(step).items()} if name != "dense" else {"dense": step})
    t = interleaved_medians(fns, 7)
    print(json.dumps({k: round(t["dense"] / v, 3) for k, v in t.items() if k != "dense"}))
