"""Training tokens/s of a preset's dense, MoE and SaMoE variants, for comparing two checkouts.

    for i in 1 2 3; do
      for tree in ../old ../new; do PYTHONPATH=$tree/src python scripts/ab_training.py default; done
    done

One line of JSON per call: each variant's tokens/s (the benchmark's training step on random
tokens, 3 warm-ups, median of 7 steps, the variants interleaved). With --profile, also the
self CPU time per step of the MoE variant's top operators (torch.profiler over 5 steps).
Checkouts that have samoe.malloc get the allocator setting every `samoe` verb applies.
"""

import json
import statistics
import sys
import time

from samoe.bench.training import VARIANTS, train_step
from samoe.config import load_config

try:
    from samoe.malloc import keep_freed_memory
    keep_freed_memory()
except ImportError:  # a checkout from before samoe.malloc
    pass

preset = sys.argv[1]
cfg = load_config(preset=preset)
steps = {name: train_step(load_config(preset=preset, overrides=VARIANTS[name])) for name in ("dense", "moe", "samoe")}
for step in steps.values():
    for _ in range(3):
        step()
times = {name: [] for name in steps}
for _ in range(7):
    for name, step in steps.items():
        t0 = time.perf_counter()
        step()
        times[name].append(time.perf_counter() - t0)
tokens = cfg.train.batch_size * cfg.model.block_size
print(json.dumps({name: round(tokens / statistics.median(ts)) for name, ts in times.items()}))
if "--profile" in sys.argv:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            steps["moe"]()
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    print(json.dumps({e.key: round(e.self_cpu_time_total / 5e3, 1) for e in top}))
