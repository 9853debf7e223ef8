"""Training tokens/s of a preset's dense, MoE and SaMoE variants, for comparing two checkouts.

    for i in 1 2 3; do
      for tree in ../old ../new; do PYTHONPATH=$tree/src python scripts/ab_training.py default; done
    done

One line of JSON per call: each variant's tokens/s (`samoe.bench.training.training_throughput`:
the benchmark's training step on random tokens, 2 warm-ups, median of 7 steps, the variants
interleaved). With --profile, also the self CPU time per step of the MoE variant's top
operators (torch.profiler over 5 steps).
Checkouts that have samoe.malloc get the allocator setting every `samoe` verb applies.
"""

import json
import sys

from samoe.bench.training import VARIANTS, training_throughput
from samoe.config_load import load_config
from samoe.train.synthetic import synthetic_step

try:
    from samoe.malloc import keep_freed_memory
    keep_freed_memory()
except ImportError:  # a checkout from before samoe.malloc
    pass

preset = sys.argv[1]
rates = training_throughput(preset, repeats=7)
print(json.dumps({name: round(rates[f"{preset}_{name}_tokens_per_s"]) for name in VARIANTS}))
if "--profile" in sys.argv:
    from torch.profiler import ProfilerActivity, profile
    step = synthetic_step(load_config(preset=preset, overrides=VARIANTS["moe"]))
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    print(json.dumps({e.key: round(e.self_cpu_time_total / 5e3, 1) for e in top}))
