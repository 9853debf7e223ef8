"""The experts' GEMMs three ways, for the padded layout's table in docs/notes/fast-moe-history.md
(the layout itself was removed on 2026-12-07; this script times the GEMMs alone):

    python scripts/gemm_layouts.py            # 2 threads (the machine's default)
    OMP_NUM_THREADS=1 python scripts/gemm_layouts.py

For each shape (E experts of `rows` rows each, d x h weights): the three GEMMs of one FFN matrix
(forward x·W, input gradient g·Wᵀ, weight gradient xᵀ·g) over all experts' rows as one dense
GEMM (the floor), one GEMM per expert (torch._grouped_mm, which loops over the experts on the
CPU) and one batched GEMM (torch.bmm); then, at the default preset's shape, bmm over G experts
at a time. Median of 15 interleaved repeats (samoe.bench.timing), in ms.
"""

import torch

from samoe.malloc import keep_freed_memory
from samoe.timing import interleaved_medians

SHAPES = ((64, 128, 128, 64), (16, 128, 256, 1024), (64, 32, 256, 1024), (32, 256, 128, 128))


def three_ways(E: int, rows: int, d: int, h: int) -> dict:
    """The three GEMMs of one FFN matrix as one dense GEMM, one per expert and one batched."""
    N = E * rows
    w, x, g = torch.randn(E, d, h), torch.randn(N, d), torch.randn(N, h)
    offs = torch.arange(1, E + 1, dtype=torch.int32) * rows
    xs, gs, w0, wt = x.view(E, rows, d), g.view(E, rows, h), w[0], w.transpose(1, 2)
    return {
        "dense": lambda: (x @ w0, g @ w0.t(), x.t() @ g),
        "per_expert": lambda: (torch._grouped_mm(x, w, offs=offs), torch._grouped_mm(g, wt, offs=offs),
                               torch._grouped_mm(x.t(), g, offs=offs)),
        "bmm": lambda: (torch.bmm(xs, w), torch.bmm(gs, wt), torch.bmm(xs.transpose(1, 2), gs)),
    }


def in_groups(G: int, E: int, rows: int, d: int, h: int):
    """The batched GEMMs G experts a call."""
    w, xs, gs = torch.randn(E, d, h), torch.randn(E, rows, d), torch.randn(E, rows, h)

    def run():
        for lo in range(0, E, G):
            sl = slice(lo, lo + G)
            torch.bmm(xs[sl], w[sl]), torch.bmm(gs[sl], w[sl].transpose(1, 2))
            torch.bmm(xs[sl].transpose(1, 2), gs[sl])
    return run


def main() -> None:
    keep_freed_memory()
    torch.manual_seed(0)
    print(f"threads: {torch.get_num_threads()}")
    for E, rows, d, h in SHAPES:
        t = interleaved_medians(three_ways(E, rows, d, h), 15)
        print(f"E {E}, {rows} rows, {d} x {h}: dense {1e3 * t['dense']:.2f}  per expert {1e3 * t['per_expert']:.2f}  "
              f"bmm {1e3 * t['bmm']:.2f} ms")
    t = interleaved_medians({G: in_groups(G, *SHAPES[0]) for G in (1, 2, 4, 8, 16, 64)}, 15)
    print("bmm of G experts a call, default shape: " + ", ".join(f"G {G}: {1e3 * s:.2f}" for G, s in t.items()) + " ms")


if __name__ == "__main__":
    main()
