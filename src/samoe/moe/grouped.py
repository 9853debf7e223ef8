"""Grouped expert FFN over expert-sorted tokens, with a hand-written backward.

Tokens arrive sorted by expert: rows [o_e, o_e + n_e) of x [N, d] belong to expert e. Each
expert's matrices run once on its rows, in two passes over the experts:

    pass 1:  h[rows_e] = x[rows_e]·W1[e] + b1[e]          (all experts)
             a = act(h)                                    (one call over all rows)
    pass 2:  y[rows_e] = a[rows_e]·W2[e] + b2[e]           (all experts)

How the GEMMs of a pass run is the layout's choice (RowLayout, chosen by row_layout from the
counts each step):
- per expert, the default: on the CPU in fp32 the experts spread over the threads, each GEMM
  whole on one thread (moe/expert_gemm.py, where its kernel builds); else one grouped GEMM
  (`torch._grouped_mm` with the experts' row offsets) where that runs (the CPU in fp32 and bf16,
  every operand's rows 16-byte multiples; it loops over the experts inside, each GEMM split over
  the threads); else a loop of torch.mm;
- padded (opt-in, PAD_ENABLED): rows padded so that several experts share one torch.bmm on
  [experts, C, ·] views, which hands whole GEMMs to the threads where a lone small GEMM is split
  between them. Levels when the weights are small beside the rows: the experts sorted by count
  (weights gathered into that order), level j holding the next C_j rows of every expert that
  has them, so a level is one bmm over a prefix of the experts and an expert's rows may span
  several levels (its weight gradient summed over them). Groups of neighbouring experts when
  the weights are large, each group padded to its largest count. Padding rows cost FLOPs, so
  either is taken only while they stay within PAD_TOLERANCE of the real rows. The dispatcher
  (moe/dispatch.py) lays the slots out padded already, so the tokens are gathered once. On
  fresh routers' near-even counts a bmm ran 1.4-1.8x faster than a GEMM per expert at the
  default preset's shape (scripts/gemm_layouts.py); on trained routing (6 to 411 rows an
  expert) it gained nothing end to end (docs/fast-moe.md), hence off by default.

Why this shape:
- the activation (and its backward) runs once over [N, h], not once per expert: elementwise
  calls on an expert's few rows cost more in call overhead than in arithmetic;
- a custom autograd Function rather than autograd through the GEMMs: only x and h are saved,
  a = act(h) is recomputed in backward (keeping it was no faster within the noise, and cost
  SaMoE's memory ratio 0.004), and a pool's gradient is formed in place (below);
- biases: with the expert kernel, each expert's bias is the starting value of its output rows and
  its gradient is summed from the rows the weight gradient reads, by the same thread (the gathers
  of [N, ·] bias rows, their adds and the segment sums this replaces took 1.4 ms of a 31 ms layer
  at the default preset's shape, under torch.profiler); otherwise they are added group by group,
  in place, and their gradients are one segment sum each (index_add over the rows' expert ids;
  padding rows have zero gradients);
- SaMoE: the weights may be given as a pool P [K, E, ...] with mixing coefficients c ([K],
  or [E, K] per expert). The layer's experts W = Σ_k c[.., k] · P[k] are combined just before
  use, one matrix at a time (W1 for pass 1, W2 for pass 2), in forward and again in backward:
  none are kept between forward and backward. One combination per matrix and layer is a few
  large memory-bound passes; combining expert by expert was 4E small ones, and at the default
  preset's size (E = 16, 128 x 256 experts) their call overhead made SaMoE's step 12% slower.
  The backward computes the stack's gradient ∂L/∂W as for private experts, then
  ∂L/∂P[k] = c[.., k] · ∂L/∂W and ∂L/∂c[.., k] = <P[k], ∂L/∂W>.
Under autocast the matmuls run in the autocast dtype; gradients return in the inputs' dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import Tensor

from samoe.model.ffn import activate
from samoe.moe.expert_gemm import rows_times_experts, weight_grads


@dataclass
class ExpertSource:
    """Expert weights as the fast path takes them: stacks w1 [E, d, h], b1 [E, h],
    w2 [E, f, d], b2 [E, d] when coef is None; else a pool with a leading K axis and the
    mixing coefficients coef [K] (one mixture per layer) or [E, K] (one per expert), each
    mixture summing to 1 (a softmax, as PoolMixture's). For K = 2 the combination reads only
    c[.., 1] (W = P0 + c1·(P1 - P0)); the gradient returned for coef is that of Σ_k c_k P_k,
    which differs from it only along (1, 1), the direction a softmax's backward discards."""

    w1: Tensor
    b1: Tensor
    w2: Tensor
    b2: Tensor
    coef: Tensor | None = None

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.w1, self.b1, self.w2, self.b2


def activation_backward(grad: Tensor, h: Tensor, activation: str) -> Tensor:
    """∂L/∂h from ∂L/∂a for a = act(h) (gelu, or swiglu on h = [u_gate | u_up])."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        return torch.cat([grad * up * sig * (1 + gate * (1 - sig)), grad * silu], dim=-1)
    return torch.ops.aten.gelu_backward(grad, h)


def _coef_k(coef: Tensor, k: int, w: Tensor) -> Tensor:
    """c[k] (one mixture per layer) or c[:, k] shaped to broadcast over an [E, ...] stack."""
    c = coef.to(w.dtype)
    return c[k] if c.dim() == 1 else c[:, k].view(-1, *[1] * (w.dim() - 2))


def _combine(w: Tensor, coef: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The experts' stack [E, ...] in the compute dtype: w itself, or Σ_k c[.., k] · P[k] for a
    pool w = P [K, E, ...] (elementwise, memory-bound: a mul and K - 1 fused multiply-adds; for
    K = 2, whose coefficients sum to 1, one torch.lerp, which reads the two slices and writes
    the stack once: 1.65 ms against 2.31 for a 16 x 256 x 1024 stack)."""
    if coef is None:
        return w.to(dtype)
    if w.shape[0] == 2:  # c0 = 1 - c1: W = P0 + c1·(P1 - P0) in one pass (mul and addcmul make two)
        return torch.lerp(w[0], w[1], _coef_k(coef, 1, w)).to(dtype)
    out = w[0] * _coef_k(coef, 0, w)
    for k in range(1, w.shape[0]):
        out.addcmul_(w[k], _coef_k(coef, k, w))
    return out.to(dtype)


def _source_grad(w: Tensor, coef: Tensor | None, gcoef: Tensor | None, g: Tensor,
                 out: Tensor | None = None) -> Tensor:
    """∂L/∂w from the stack's gradient g [E, ...]: g itself, or for a pool
    ∂L/∂P[k] = c[.., k] · g, adding ∂L/∂c[.., k] = <P[k], g> (per expert for [E, K]) into gcoef.
    `out`, the pool's gradient buffer, may hold g in its slice 0 (scaled last, in place)."""
    g = g.to(w.dtype)
    if coef is None:
        return g
    if coef.dim() == 1:
        gcoef += (w.reshape(w.shape[0], -1) @ g.reshape(-1)).to(coef.dtype)
    else:
        gcoef += torch.einsum("ke...,e...->ek", w, g).to(coef.dtype)
    gp = torch.empty_like(w) if out is None else out
    for k in reversed(range(w.shape[0])):  # slice 0 last: it may be g itself
        torch.mul(g, _coef_k(coef, k, w), out=gp[k])
    return gp


# Where the FFN's GEMMs go through torch._grouped_mm: device type -> compute dtypes. CUDA (bf16
# only, Hopper and later) is left out until a GPU session has checked it: scripts/gpu_check.py
# adds it for its own checks and times it against the loop.
GROUPED_GEMM = {"cpu": (torch.float32, torch.bfloat16)}

# The padded layouts (module docstring). Levels (experts sorted by count, weights gathered into
# that order; _levels): bands of experts padded to their largest count while that stays within
# LEVEL_TOLERANCE of their rows, and every level at least LEVEL_MIN_ROWS high (on trained counts of
# the default preset, 6-411 rows an expert: 1.12x the rows in 8 levels). Groups (expert order,
# for weights too large to gather): at most PAD_GROUP neighbours, each padded to its largest
# count. Either is taken only while all its padding stays within PAD_TOLERANCE of the real rows.
# Layers with fewer than PAD_MIN_EXPERTS experts keep a GEMM per expert (the `tiny` preset's 4
# experts of 128 rows at d = 64 trained 10-15% slower padded: the layout's own tensor ops outweigh
# 3 saved GEMM calls); and on one thread nothing is padded: the batched GEMM's gain is handing
# whole GEMMs to the threads, and alone it ran the default's shape only 1.1-1.2x faster than a
# GEMM per expert (1.4-1.8x on two), which padding gives back.
#
# The padded rows are rounded up to ROW_BUCKETS steps per power of two (bucket_rows; the rows past
# the layout's are zeros): the padded size changes every step, and with glibc keeping freed memory
# (samoe/malloc.py) unrounded sizes fragmented the heap: `samoe train` (default preset, 250 steps)
# peaked at 3.3 GB of RSS padded against 1.5 GB per expert; rounded, 1.54 GB against 1.52.
#
# PAD_ENABLED is off: in that run (2 threads, levels) the padded layout took 110.5 s against
# 107.6-110.1 s per expert: trained routing is too uneven for it to pay (docs/fast-moe.md).
PAD_ENABLED = False
PAD_GROUP = 8
PAD_TOLERANCE = 0.3
PAD_MIN_EXPERTS = 8
PAD_MIN_THREADS = 2
LEVEL_MIN_ROWS = 32
LEVEL_TOLERANCE = 0.1
ROW_BUCKETS = 16


def bucket_rows(n: int) -> int:
    """n rounded up to a multiple of 2^⌊log2 n⌋ / ROW_BUCKETS (at most 1/ROW_BUCKETS more)."""
    step = max(1, (1 << (max(n, 1).bit_length() - 1)) // ROW_BUCKETS)
    return -(-n // step) * step


@dataclass
class RowLayout:
    """Where each expert's rows sit for the FFN's GEMMs.

    Rows arrive sorted by expert (counts[e] rows for expert e, natural order). A layout either
    keeps them so (`dest` None: one GEMM per expert, by the loop or torch._grouped_mm) or
    scatters them into a padded buffer of `rows` rows (`dest` [N]: the padded row of each sorted
    row; padding rows are zero when padded by `pad`, and may hold any rows whose output gradients
    are zero, as the dispatcher's do). Either way the GEMMs run over `groups`, tuples (e0, e1, C, r0):
    layout positions e0..e1-1 hold C rows each, from row r0, so a group is one bmm on views
    [e1 - e0, C, ·]. Groups may share positions (levels: an expert's rows in several of them),
    so weight gradients accumulate over its groups. Rows from `used` to `rows` belong to no
    group and stay zero (the size rounded up, bucket_rows). Position p holds expert perm[p]
    (natural order when perm is None).
    """

    counts: list[int]
    groups: list[tuple[int, int, int, int]]
    rows: int
    row_expert: Tensor  # [rows] natural expert id of each row (padding rows: any)
    offs: Tensor | None = None  # torch._grouped_mm's offsets, when it runs the GEMMs
    dest: Tensor | None = None
    perm: Tensor | None = None
    used: int | None = None  # rows the groups cover (default all)

    def __post_init__(self):
        self.used = self.rows if self.used is None else self.used

    def pad(self, t: Tensor) -> Tensor:
        """Sorted rows [N, ...] -> layout rows [rows, ...], zeros on padding rows."""
        return t if self.dest is None else t.new_zeros(self.rows, *t.shape[1:]).index_copy_(0, self.dest, t)

    def unpad(self, t: Tensor) -> Tensor:
        """Layout rows [rows, ...] -> sorted rows [N, ...]."""
        return t if self.dest is None else t.index_select(0, self.dest)

    def take(self, w: Tensor) -> Tensor:
        """An expert stack [E, ...] in layout order."""
        return w if self.perm is None else w.index_select(0, self.perm)

    def give_back(self, g: Tensor) -> Tensor:
        """A gradient stack [E, ...] from layout order back to natural order."""
        return g if self.perm is None else torch.empty_like(g).index_copy_(0, self.perm, g)


def _expert_groups(counts: list[int], tol: float) -> list[tuple[int, int, int, int]] | None:
    """Neighbouring experts grouped greedily: a group takes the next expert while it has fewer
    than PAD_GROUP and its padded rows (experts x largest count) stay within 1 + tol of its real
    rows. None where that finds too little to group (more than E / 2 groups)."""
    sizes: list[list[int]] = []  # per group: [experts, largest count, rows]
    for n in counts:
        last = sizes[-1] if sizes else None
        if last and last[0] < PAD_GROUP and (last[0] + 1) * max(last[1], n) <= (1 + tol) * (last[2] + n):
            last[0], last[1], last[2] = last[0] + 1, max(last[1], n), last[2] + n
        else:
            sizes.append([1, n, n])
    if len(sizes) > len(counts) / 2:
        return None
    groups, p0, r0 = [], 0, 0
    for k, C, _ in sizes:
        groups.append((p0, p0 + k, C, r0))
        p0, r0 = p0 + k, r0 + k * C
    return groups


def _levels(ordered: list[int], min_rows: int, tol: float) -> list[tuple[int, int, int, int]]:
    """Counts in descending order -> levels (0, m_j, C_j, r0_j).

    The experts are cut into bands of neighbours (in this order), each padded to its largest
    count: a band takes the next expert while its padded rows stay within 1 + tol of its real
    rows, and always when the next count is within min_rows of the band's top. The band tops,
    ascending, are the level boundaries H_1 < H_2 < ...: level j holds rows [H_{j-1}, H_j) of the
    m_j experts with more than H_{j-1} rows. Those are a prefix of the order, so one bmm with
    C_j = H_j - H_{j-1} rows per expert takes a level, and every level is at least min_rows
    high but the lowest (which all experts share)."""
    bands: list[list[int]] = []  # [top, experts, rows], tops descending
    for n in ordered:
        if n == 0:
            break
        last = bands[-1] if bands else None
        if last and (last[0] - n < min_rows or (last[1] + 1) * last[0] <= (1 + tol) * (last[2] + n)):
            last[1], last[2] = last[1] + 1, last[2] + n
        else:
            bands.append([n, 1, n])
    groups, r0, low, m = [], 0, 0, sum(b[1] for b in bands)
    for top, k, _ in reversed(bands):
        groups.append((0, m, top - low, r0))
        r0, low, m = r0 + m * (top - low), top, m - k
    return groups


def row_layout(x: Tensor, counts: list[int], *widths: int, pad_tolerance: float | None = None,
               permute: bool | None = None, level_rows: int | None = None,
               level_tolerance: float | None = None) -> RowLayout:
    """The layout for N = Σ counts rows of width d (x: their dtype, device and width; it may be the
    tokens before they are gathered) feeding experts of inner widths `widths` (h, f).

    With PAD_ENABLED, at least PAD_MIN_EXPERTS experts and, on the CPU, PAD_MIN_THREADS threads,
    the rows may be padded: into levels over the experts sorted by count (_levels: each at least
    `level_rows` high, bands within `level_tolerance`; defaults LEVEL_MIN_ROWS, LEVEL_TOLERANCE)
    when `permute` (default: when the E x d x h weights are no larger than the N x (d + h) rows,
    so gathering them into that order costs less than the rows), else
    into groups of neighbouring experts (_expert_groups); either only while the padding stays
    within pad_tolerance (default PAD_TOLERANCE) of N. Otherwise the GEMMs run one per expert
    (torch._grouped_mm where grouped_gemm_offsets allows), as groups of one.
    """
    E, N, dev = len(counts), sum(counts), x.device
    tol = PAD_TOLERANCE if pad_tolerance is None else pad_tolerance
    # the GEMMs run in the autocast dtype where autocast is on (GroupedExpertFFN.forward)
    dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else x.dtype
    threads_ok = dev.type != "cpu" or torch.get_num_threads() >= PAD_MIN_THREADS  # (the thread rule is the CPU's)
    groups, order = None, None
    if N and PAD_ENABLED and E >= PAD_MIN_EXPERTS and threads_ok:
        if permute is None:
            permute = E * x.shape[1] * widths[0] <= N * (x.shape[1] + widths[0])
        if permute:
            order = sorted(range(E), key=lambda e: -counts[e])
            groups = _levels([counts[e] for e in order], LEVEL_MIN_ROWS if level_rows is None else level_rows,
                             LEVEL_TOLERANCE if level_tolerance is None else level_tolerance)
        else:
            groups = _expert_groups(counts, tol)
        used = sum((e1 - e0) * C for e0, e1, C, _ in groups) if groups else 0
        if groups and used > (1 + tol) * N:
            groups = None
    c = torch.tensor(counts, device=dev)
    if groups:
        start = torch.cumsum(c, 0) - c
        within = torch.arange(N, device=dev) - torch.repeat_interleave(start, c, output_size=N)
        rows = bucket_rows(used)
        ordered = None if order is None else torch.tensor(order, device=dev)
        if ordered is None:  # sorted row i of expert e (its within-th row) goes to its group's block
            base = [0] * E  # each expert's first padded row
            for p0, p1, C, g0 in groups:
                for p in range(p0, p1):
                    base[p] = g0 + (p - p0) * C
            dest = torch.repeat_interleave(torch.tensor(base, device=dev), c, output_size=N) + within
            rows_at = [C for p0, p1, C, _ in groups for _ in range(p0, p1)]
            row_expert = torch.repeat_interleave(torch.arange(E, device=dev), torch.tensor(rows_at, device=dev),
                                                 output_size=used)
        else:  # the within-th row of the expert at position p: at level j = #{H_i <= within},
            # row r0_j + p·C_j + within - H_{j-1}
            pos = torch.empty(E, dtype=torch.long, device=dev)
            pos[ordered] = torch.arange(E, device=dev)
            C, r0 = (torch.tensor([g[i] for g in groups], device=dev) for i in (2, 3))
            high = torch.cumsum(C, 0)
            j = torch.searchsorted(high, within, right=True)
            dest = r0[j] + torch.repeat_interleave(pos, c, output_size=N) * C[j] + within - (high - C)[j]
            row_expert = torch.cat([ordered[:e1].repeat_interleave(h) for _, e1, h, _ in groups])
        row_expert = torch.cat([row_expert, row_expert.new_zeros(rows - used)])
        return RowLayout(counts, groups, rows, row_expert, dest=dest, used=used, perm=ordered)
    row_expert = torch.repeat_interleave(torch.arange(E, device=dev), c, output_size=N)
    starts = [0, *accumulate(counts)]
    groups = [(e, e + 1, n, starts[e]) for e, n in enumerate(counts)]
    return RowLayout(counts, groups, N, row_expert, offs=grouped_gemm_offsets(x, c, *widths, dtype=dtype))


def grouped_gemm_offsets(x: Tensor, counts: list[int] | Tensor, *widths: int,
                         dtype: torch.dtype | None = None) -> Tensor | None:
    """The experts' row offsets (int32 cumulative counts; `counts` a list, or a tensor on x's
    device) when torch._grouped_mm can run the FFN's GEMMs on x's rows in `dtype` (default x's):
    a device and dtype of GROUPED_GEMM, every width (d, h, and x's own) a 16-byte multiple.
    None: the loop over experts runs them."""
    dtype = dtype or x.dtype
    if dtype not in GROUPED_GEMM.get(x.device.type, ()) or not hasattr(torch, "_grouped_mm"):
        return None
    if any(w * dtype.itemsize % 16 for w in (x.shape[1], *widths)):
        return None
    return torch.as_tensor(counts, device=x.device).cumsum(0).to(torch.int32)


def _views(t: Tensor, group: tuple[int, int, int, int]) -> Tensor:
    """A group's rows of t [rows, ·] as [e1 - e0, C, ·]."""
    e0, e1, C, r0 = group
    return t[r0:r0 + (e1 - e0) * C].view(e1 - e0, C, t.shape[1])


def _row_matmul(a: Tensor, w: Tensor, layout: RowLayout, transpose: bool = False, bias: Tensor | None = None) -> Tensor:
    """[rows, ·]: the rows of each expert times its w[p] (w[p]ᵀ with `transpose`), plus its bias[p]
    when given, for w [E, ·, ·] and bias [E, ·] in layout order; zero on the rows past layout.used."""
    w = w.transpose(1, 2) if transpose else w
    if layout.offs is not None:
        y = rows_times_experts(a, w, layout.counts, bias)  # the experts over the threads, where it runs
        if y is not None:
            return y
        out = torch._grouped_mm(a, w, offs=layout.offs)
    else:
        out = a.new_empty(a.shape[0], w.shape[-1])
        for g in layout.groups:
            e0, e1, C, r0 = g
            if C and e1 - e0 == 1:  # mm, not a bmm of one: bmm parallelises over the batch only
                torch.mm(a[r0:r0 + C], w[e0], out=out[r0:r0 + C])
            elif C:
                torch.bmm(_views(a, g), w[e0:e1], out=_views(out, g))
        out[layout.used:].zero_()
    return out if bias is None else _add_bias(out, bias, layout)


def _add_bias(y: Tensor, b: Tensor, layout: RowLayout) -> Tensor:
    """y [rows, ·] with b[p] added to the rows of layout position p, in place. Group by group for a
    padded layout (few groups, and a gathered [rows, ·] bias would be a temporary as large as y);
    with a GEMM per expert (as many groups as experts, an add of a few rows a call) the rows'
    biases gathered and added in two calls: at the default preset's shape (64 experts) 0.2-0.3
    ms against about 1 ms."""
    if layout.dest is None and len(layout.groups) > PAD_GROUP:
        return y.add_(b.index_select(0, layout.row_expert))
    for g in layout.groups:
        if g[2]:
            _views(y, g).add_(b[g[0]:g[1]].unsqueeze(1))
    return y


# A weight gradient stack above this size is formed a quarter of the experts at a time (_weight_grad).
CHUNK_BYTES = 4 << 20


def _weight_grad(a: Tensor, g: Tensor, layout: RowLayout, out: Tensor | None,
                 bias: bool = False) -> tuple[Tensor, Tensor | None]:
    """([E, ·, ·] in layout order: Σ over the rows of position p of a[rows]ᵀ · g[rows] (zero for an
    expert without rows), and with `bias` the gradient of a bias added to those rows, [E, ·] in
    natural order: Σ over the rows of expert e of g[rows]). The weight gradient is written into
    `out` when given (then with torch._grouped_mm, which has no `out=`, a quarter of the experts at
    a time where the stack exceeds CHUNK_BYTES: a whole stack-sized temporary raised SaMoE's peak
    memory by 2%; below, the three calls a chunk makes cost more than the temporary). A group whose
    positions an earlier group wrote (a level above the first) adds to them."""
    offs, counts = layout.offs, layout.counts
    if offs is not None:  # the experts over the threads, both gradients in one pass (moe/expert_gemm.py)
        gb = g.new_empty(len(counts), g.shape[1]) if bias else None
        if (native := weight_grads(a, g, counts, out, gb)) is not None:
            return native, gb
    # the bias's gradient: one segment sum over the rows' expert ids (padding rows have zero gradients)
    gb = g.new_zeros(len(counts), g.shape[1]).index_add_(0, layout.row_expert, g) if bias else None
    if offs is not None and out is not None and out.numel() * out.element_size() <= CHUNK_BYTES:
        return out.copy_(torch._grouped_mm(a.t(), g, offs=offs)), gb
    if offs is not None and out is None:
        return torch._grouped_mm(a.t(), g, offs=offs), gb
    if offs is not None:
        starts, step = [0, *accumulate(counts)], max(1, len(counts) // 4)
        for s in range(0, len(counts), step):
            r0, r1 = starts[s], starts[min(len(counts), s + step)]
            out[s:s + step].copy_(torch._grouped_mm(a[r0:r1].t(), g[r0:r1], offs=offs[s:s + step] - r0))
        return out, gb
    out = a.new_empty(len(counts), a.shape[1], g.shape[1]) if out is None else out
    done = 0  # positions [0, done) written
    for grp in layout.groups:
        e0, e1, C, r0 = grp
        write = e0 >= done
        if C and e1 - e0 == 1:
            at, gv = a[r0:r0 + C].t(), g[r0:r0 + C]
            if write:
                torch.mm(at, gv, out=out[e0])
            else:
                out[e0].addmm_(at, gv)
        elif C:
            at, gv = _views(a, grp).transpose(1, 2), _views(g, grp)
            if write:
                torch.bmm(at, gv, out=out[e0:e1])
            else:
                out[e0:e1].baddbmm_(at, gv)
        elif write:
            out[e0:e1].zero_()
        done = max(done, e1)
    out[done:].zero_()
    return out, gb


class GroupedExpertFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, activation, layout, coef, w1, b1, w2, b2):
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        with torch.autocast(dev, enabled=False):
            xc = x.to(dtype)
            # given a layout, x and y are in its rows; else x is in sorted rows, padded here if
            # row_layout pads, and y comes back in sorted rows
            ctx.own_layout = layout is None
            if layout is None:
                layout = row_layout(xc, counts, w1.shape[-1], w2.shape[-2])
            xp = layout.pad(xc) if ctx.own_layout else xc
            W1, B1 = (layout.take(_combine(w, coef, dtype)) for w in (w1, b1))
            h = _row_matmul(xp, W1, layout, bias=B1)
            del W1
            a = activate(h, activation)
            W2, B2 = (layout.take(_combine(w, coef, dtype)) for w in (w2, b2))
            y = _row_matmul(a, W2, layout, bias=B2)
            y = layout.unpad(y) if ctx.own_layout else y
        ctx.save_for_backward(xp, h, coef, w1, b1, w2, b2)
        ctx.layout, ctx.activation, ctx.x_dtype = layout, activation, x.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        xp, h, coef, w1, b1, w2, b2 = ctx.saved_tensors
        layout = ctx.layout
        dtype = xp.dtype
        # the grouped GEMM needs real strides (a sum's gradient is expanded). Rows padded here get
        # zero gradients; so must a given layout's padding rows (their gates are zero), as the
        # weight gradients sum over all rows
        gy = gy.to(dtype).contiguous()
        gy = layout.pad(gy) if ctx.own_layout else gy
        gcoef = torch.zeros_like(coef) if coef is not None else None

        def pool_grad(w: Tensor) -> Tensor | None:
            """A pool of the compute dtype in natural order: its gradient buffer, whose slice 0
            takes the experts' gradient ∂L/∂W first, so no other stack-sized buffer is needed
            (_source_grad then scales it in place). Else None: ∂L/∂W gets a buffer of its own."""
            return torch.empty_like(w) if coef is not None and w.dtype == dtype and layout.perm is None else None

        with torch.autocast(xp.device.type, enabled=False):
            # pass 2 backwards: ∂L/∂a and W2's gradients, then the activation over all rows at once
            a = activate(h, ctx.activation)
            W2, out2 = layout.take(_combine(w2, coef, dtype)), pool_grad(w2)
            ga = _row_matmul(gy, W2, layout, transpose=True)
            # the biases' gradients are skipped for the constant zero biases of `bias: false` (which
            # add nothing to ∂L/∂c either)
            gW2, gB2 = _weight_grad(a, gy, layout, None if out2 is None else out2[0], ctx.needs_input_grad[8])
            gW2 = layout.give_back(gW2)
            del W2, a
            gh = activation_backward(ga, h, ctx.activation)
            del ga
            gw2 = _source_grad(w2, coef, gcoef, gW2, out2)
            del gW2, out2
            # pass 1 backwards: ∂L/∂x and W1's gradients
            W1, out1 = layout.take(_combine(w1, coef, dtype)), pool_grad(w1)
            gx = _row_matmul(gh, W1, layout, transpose=True)  # every row belongs to some expert
            gx = layout.unpad(gx) if ctx.own_layout else gx
            gW1, gB1 = _weight_grad(xp, gh, layout, None if out1 is None else out1[0], ctx.needs_input_grad[6])
            gW1 = layout.give_back(gW1)
            del W1
            gw1 = _source_grad(w1, coef, gcoef, gW1, out1)
            del gW1, out1
            gb1, gb2 = (None if g is None else _source_grad(b, coef, gcoef, g) for b, g in ((b1, gB1), (b2, gB2)))
        return gx.to(ctx.x_dtype), None, None, None, gcoef, gw1, gb1, gw2, gb2


def grouped_expert_ffn(x: Tensor, counts: list[int], source: ExpertSource, activation: str,
                       layout: RowLayout | None = None) -> Tensor:
    """y [N, d] for expert-sorted x [N, d] with counts[e] rows for expert e (row_layout chooses
    how the GEMMs run). Given a `layout` (row_layout of these counts), x and y are in its rows
    instead, [layout.rows, d], and padding rows must get zero output gradients."""
    return GroupedExpertFFN.apply(x, counts, activation, layout, source.coef, *source.tensors())


def gated_sum(x: Tensor, token: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """out [T, d] with out[t] = Σ_{rows i of token t} gate[i] · y[i]: expert outputs y [N, d] of
    slots (token [N], gate [N]) added back onto x's [T, d] rows (zero where no slot), in x's dtype."""
    y = y * gate.unsqueeze(1).to(y.dtype)
    return torch.zeros(x.shape[0], x.shape[1], dtype=y.dtype, device=x.device).index_add_(0, token, y).to(x.dtype)
