"""Where one MoE layer's time goes: torch.profiler over forward + backward of a preset's first MoE
layer at its training step, operators by self CPU time, per layer call.

    python scripts/profile_layer.py [--preset default] [--sharing private] [--calls 20]

Prints one line of JSON: the layer's self CPU time per call in ms (profiled, so above its plain
time), its operator calls (aten::) per call, and the top operators' ms per layer call, each with its
input shapes and its calls per layer call. Run it against another
checkout with PYTHONPATH=<that checkout>/src to see what a change moved.
"""

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

from samoe.config_load import load_config
from samoe.malloc import keep_freed_memory
from samoe.model.gpt import GPT


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="default")
    parser.add_argument("--sharing", default="private", help="model.moe.sharing: private (MoE) or pool (SaMoE)")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    cfg = load_config(preset=args.preset, overrides=[f"model.moe.sharing={args.sharing}"])
    model = GPT(cfg.model)
    layer = model.moe_layers()[0]
    B, S = cfg.train.batch_size, cfg.model.block_size
    x = torch.randn(B, S, cfg.model.d_model, requires_grad=True)
    ids = torch.zeros(B, S, dtype=torch.long)
    params = [x, *model.parameters()]

    def call():
        y, aux = layer(x, ids)
        (y.sum() + sum(aux.values())).backward()
        for p in params:  # as zero_grad(set_to_none=True) leaves them
            p.grad = None

    for _ in range(5):
        call()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.calls):
            call()
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]
    print(json.dumps({"layer_ms": round(total / args.calls / 1e3, 2),
                      "aten_calls": round(sum(e.count for e in events if e.key.startswith("aten::")) / args.calls),
                      "top_ms": [[e.key, str(e.input_shapes), round(e.self_cpu_time_total / args.calls / 1e3, 3),
                                  round(e.count / args.calls, 2)] for e in top]}))


if __name__ == "__main__":
    main()
