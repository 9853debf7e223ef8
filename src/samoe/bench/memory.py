"""Worker for the peak-memory benchmark: `python -m samoe.bench.memory samoe|moe BATCH` prints
{"peak_mib": growth of peak RSS over the RSS before the model was built}.

Run it with MALLOC_MMAP_THRESHOLD_ set (peak_memory passes RSS_TRACKS_LIVE) so that freed
tensors go back to the system and the peak RSS follows the peak of live tensors."""

import json
import sys

import torch

from samoe.bench.timing import peak_rss_mib
from samoe.bench.training import MEMORY_SHAPE, VARIANTS
from samoe.config_load import load_config
from samoe.train.synthetic import synthetic_step

if __name__ == "__main__":
    torch.manual_seed(0)
    cfg = load_config(overrides=MEMORY_SHAPE + VARIANTS[sys.argv[1]])
    base = peak_rss_mib()
    step = synthetic_step(cfg, int(sys.argv[2]))
    step()
    step()
    print(json.dumps({"peak_mib": peak_rss_mib() - base}))
