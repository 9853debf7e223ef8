"""The grouped expert FFN (sorted fast path, hand-written backward) against plain autograd on
the materialised weights: private stacks and SaMoE pools, both granularities, both
activations, capacity and dropless routing, empty experts, and bf16 autocast; with the loop
over experts (float64, odd widths) and with torch._grouped_mm (fp32, 16-byte rows)."""

import pytest
import torch

import samoe.moe.dispatch as dispatch_mod
import samoe.moe.grouped as grouped_mod
from samoe.config import load_config
from samoe.model.ffn import activate
from samoe.model.gpt import GPT
from samoe.moe import expert_gemm
from samoe.moe.grouped import ExpertSource, bucket_rows, grouped_expert_ffn, grouped_gemm_offsets, row_layout

D, F_, E, K = 6, 5, 4, 3


def reference(x, counts, source, activation):
    """Loop over experts with autograd; pool weights combined with an einsum first."""
    w = source.tensors()
    if source.coef is not None:
        spec = "k" if source.coef.dim() == 1 else "ek"
        w = [torch.einsum(f"{spec},ke...->e...", source.coef, p) for p in w]
    w1, b1, w2, b2 = w
    outs, start = [], 0
    for e, n in enumerate(counts):
        xe = x[start:start + n]
        outs.append(activate(xe @ w1[e] + b1[e], activation) @ w2[e] + b2[e])
        start += n
    return torch.cat(outs)


def make_source(pool: str | None, activation: str, dtype=torch.float64, d: int = D, f: int = F_,
                experts: int = E) -> ExpertSource:
    h = 2 * f if activation == "swiglu" else f
    lead = (K, experts) if pool else (experts,)
    shapes = [(*lead, d, h), (*lead, h), (*lead, f, d), (*lead, d)]
    tensors = [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]
    coef = None
    if pool:
        logits = torch.randn(K if pool == "layer" else (experts, K), dtype=dtype)
        coef = logits.softmax(-1).requires_grad_()
    return ExpertSource(*tensors, coef=coef)


def leaves(source: ExpertSource):
    return [t for t in (*source.tensors(), source.coef) if t is not None]


# how the GEMMs run (row_layout): one per expert; padded groups in expert order; levels over the
# experts sorted by count (weights gathered into that order), one padded level, and exact levels
# (a level per distinct count: an expert's rows in several GEMMs, its weight gradient summed)
LAYOUTS = {"per-expert": dict(pad_tolerance=-1.0), "groups": dict(pad_tolerance=float("inf"), permute=False),
           "one-level": dict(pad_tolerance=float("inf"), permute=True, level_tolerance=float("inf")),
           "levels": dict(pad_tolerance=0.0, permute=True, level_rows=0, level_tolerance=0.0)}


@pytest.mark.parametrize("pool", [None, "layer", "expert"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("counts", [[3, 0, 4, 2], [0, 0, 5, 0], [1, 1, 1, 1]])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_outputs_and_gradients_equal_autograd_on_the_materialised_weights(pool, activation, counts, layout,
                                                                          monkeypatch):
    monkeypatch.setattr(grouped_mod, "PAD_ENABLED", True)
    monkeypatch.setattr(grouped_mod, "PAD_MIN_EXPERTS", 1)  # these 4 experts may be padded,
    monkeypatch.setattr(grouped_mod, "PAD_MIN_THREADS", 1)  # on any number of threads,
    monkeypatch.setattr(grouped_mod, "ROW_BUCKETS", 2)  # and their rows rounded up coarsely (zero rows at the end)
    torch.manual_seed(0)
    source = make_source(pool, activation)
    x = torch.randn(sum(counts), D, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(sum(counts), D, dtype=torch.float64)

    plan = row_layout(x, counts, source.w1.shape[-1], source.w2.shape[-2], **LAYOUTS[layout])
    assert (plan.dest is None) == (layout == "per-expert") and (plan.perm is not None) == ("level" in layout)
    y = plan.unpad(grouped_expert_ffn(plan.pad(x), counts, source, activation, plan))
    grads = torch.autograd.grad(y, [x, *leaves(source)], gy)
    y_ref = reference(x, counts, source, activation)
    grads_ref = torch.autograd.grad(y_ref, [x, *leaves(source)], gy, allow_unused=True)

    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, torch.zeros_like(g) if g_ref is None else g_ref)


@pytest.mark.parametrize("pool", [None, "expert"])
def test_many_experts_add_their_biases_through_gathered_rows(pool):
    """With a GEMM per expert and more than PAD_GROUP experts the biases are added through the
    rows' gathered biases instead of expert by expert: outputs and gradients unchanged."""
    torch.manual_seed(0)
    counts = [3, 0, 4, 2, 1, 0, 5, 2, 2, 1, 3, 1]
    source = make_source(pool, "gelu", experts=len(counts))
    x = torch.randn(sum(counts), D, dtype=torch.float64, requires_grad=True)
    assert len(row_layout(x, counts, F_, F_).groups) > grouped_mod.PAD_GROUP
    y = grouped_expert_ffn(x, counts, source, "gelu")
    y_ref = reference(x, counts, source, "gelu")
    torch.testing.assert_close(y, y_ref)
    gy = torch.randn_like(y)
    for g, g_ref in zip(torch.autograd.grad(y, [x, *leaves(source)], gy),
                        torch.autograd.grad(y_ref, [x, *leaves(source)], gy)):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("pool", [None, "layer", "expert"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("counts", [[3, 0, 4, 2], [0, 0, 5, 0], [5, 7, 1, 3]])
@pytest.mark.parametrize("chunk_bytes", [4 << 20, 0])
@pytest.mark.parametrize("kernel", ["experts over the threads", "torch._grouped_mm"])
def test_the_grouped_gemm_path_equals_autograd_on_the_materialised_weights(pool, activation, counts, chunk_bytes,
                                                                           kernel, monkeypatch):
    """fp32 with 16-byte rows (d = 8, f = 16) takes a single call per GEMM of a pass: the kernel
    that spreads the experts over the threads (moe/expert_gemm.py, where it builds), or
    torch._grouped_mm; there a pool's weight gradients whole, or (chunk_bytes 0, as for stacks
    above CHUNK_BYTES) a quarter of the experts at a time."""
    if kernel == "torch._grouped_mm":
        monkeypatch.setattr(expert_gemm, "_lib", None)
    monkeypatch.setattr(expert_gemm, "MIN_EXPERTS", 1)  # these 4 experts take the kernel too
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # as on two threads, whatever this machine has
    monkeypatch.setattr(grouped_mod, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    source = make_source(pool, activation, torch.float32, d=8, f=16)
    x = torch.randn(sum(counts), 8, requires_grad=True)
    assert grouped_gemm_offsets(x, counts, source.w1.shape[-1], source.w2.shape[-2]) is not None
    gy = torch.randn(sum(counts), 8)
    y = grouped_expert_ffn(x, counts, source, activation)
    grads = torch.autograd.grad(y, [x, *leaves(source)], gy)
    y_ref = reference(x, counts, source, activation)
    grads_ref = torch.autograd.grad(y_ref, [x, *leaves(source)], gy, allow_unused=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    # gradients are fp32 sums of up to 2 x 8 x 16 products taken in another order than the
    # reference's (MKL's kernels differ between CPUs: on an AMD EPYC one coefficient gradient of
    # 7.1 came out 1.35e-5 off), so relative 1e-4; a wrong index or a missing term is off by O(1)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, torch.zeros_like(g) if g_ref is None else g_ref, rtol=1e-4, atol=1e-5)


def test_the_loop_runs_what_the_grouped_gemm_cannot():
    x = torch.randn(4, 8)
    assert grouped_gemm_offsets(x, [4], 16, 16).tolist() == [4]
    assert grouped_gemm_offsets(x.double(), [4], 16, 16) is None  # float64
    assert grouped_gemm_offsets(x, [4], 5, 16) is None  # 20-byte rows
    assert grouped_gemm_offsets(torch.randn(4, 6), [4], 16, 16) is None


@pytest.mark.parametrize("granularity", ["layer", "expert"])
def test_a_pool_of_two_combines_by_lerp_with_the_gradients_of_the_softmax_logits(granularity):
    """K = 2 combines with one torch.lerp, which reads only c[.., 1]: through the softmax that
    makes the coefficients, every gradient (x, the pool, the logits) equals autograd's on the
    einsum-combined weights."""
    torch.manual_seed(0)
    counts = [3, 0, 4, 2]
    pool = make_source(None, "gelu", experts=E)
    tensors = [t.detach().unsqueeze(0).repeat(2, *[1] * t.dim()).add_(torch.randn(2, *t.shape, dtype=t.dtype))
               .requires_grad_() for t in pool.tensors()]
    logits = torch.randn(2 if granularity == "layer" else (E, 2), dtype=torch.float64, requires_grad=True)
    x = torch.randn(sum(counts), D, dtype=torch.float64, requires_grad=True)

    def run(ffn):
        source = ExpertSource(*tensors, coef=logits.softmax(-1))
        y = ffn(x, counts, source, "gelu")
        return y, torch.autograd.grad(y, [x, *tensors, logits], gy)

    gy = torch.randn(sum(counts), D, dtype=torch.float64)
    y, grads = run(grouped_expert_ffn)
    y_ref, grads_ref = run(reference)
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("pool", [None, "expert"])
def test_gradcheck(pool):
    torch.manual_seed(1)
    source = make_source(pool, "swiglu")
    x = torch.randn(6, D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, *w: grouped_expert_ffn(x, [2, 0, 3, 1], ExpertSource(*w[:4], coef=w[4] if pool else None), "swiglu"),
        (x, *leaves(source)))


@pytest.mark.parametrize("sharing", ["private", "pool"])
@pytest.mark.parametrize("dropless", ["true", "false"])
@pytest.mark.parametrize("tolerance", [-1.0, float("inf")])
def test_model_gradients_equal_the_materialised_path(sharing, dropless, tolerance, monkeypatch):
    """Whole model: the fast path against the same model whose MoE layers combine the pool
    with autograd and run the reference loop (capacity drops included); the GEMMs per expert
    (tolerance -1) and padded, where the dispatcher lays out the slots with padding rows that
    read token 0 at gate 0 (tolerance inf)."""
    monkeypatch.setattr(grouped_mod, "PAD_TOLERANCE", tolerance)
    monkeypatch.setattr(grouped_mod, "PAD_ENABLED", True)
    monkeypatch.setattr(grouped_mod, "PAD_MIN_EXPERTS", 1)  # tiny has 4 experts
    monkeypatch.setattr(grouped_mod, "PAD_MIN_THREADS", 1)
    cfg = load_config(preset="tiny", overrides=[f"model.moe.sharing={sharing}", f"model.moe.dropless={dropless}",
                                                "model.moe.pool.granularity=expert", "model.moe.capacity_factor=0.5"])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    idx = torch.randint(0, cfg.model.vocab_size, (4, 32))

    def run():
        model.zero_grad()
        out = model(idx, idx)
        (out.loss + out.aux_loss).backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    padded = []
    monkeypatch.setattr(dispatch_mod, "row_layout", lambda *a: padded.append(grouped_mod.row_layout(*a)) or padded[-1])
    loss, grads = run()
    assert padded and all((p.dest is not None) == (tolerance > 0) for p in padded)
    monkeypatch.setattr(dispatch_mod, "grouped_expert_ffn", lambda x, counts, source, act, layout:
                        layout.pad(reference(layout.unpad(x), counts, source, act)))
    loss_ref, grads_ref = run()
    torch.testing.assert_close(loss, loss_ref)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_runs_the_matmuls_in_bf16_and_returns_fp32_gradients():
    torch.manual_seed(0)
    source = make_source("layer", "gelu", dtype=torch.float32)
    x = torch.randn(9, D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_expert_ffn(x, [3, 2, 4, 0], source, "gelu")
    assert y.dtype == torch.bfloat16
    y_ref = reference(x, [3, 2, 4, 0], source, "gelu")
    torch.testing.assert_close(y.float(), y_ref, rtol=0.05, atol=0.05)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and source.coef.grad.dtype == torch.float32
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves(source))


@pytest.mark.parametrize("pool", [None, "layer", "expert"])
def test_constant_zero_biases_get_no_gradient_and_the_rest_stays_exact(pool):
    """`model.bias: false`: the biases are zero buffers that need no gradient; the fast path
    skips their segment sums, and the other gradients (coefficients included) stay exact."""
    torch.manual_seed(2)
    source = make_source(pool, "gelu")
    source.b1, source.b2 = (torch.zeros_like(b).detach() for b in (source.b1, source.b2))
    x = torch.randn(7, D, dtype=torch.float64, requires_grad=True)
    counts = [3, 0, 2, 2]
    wanted = [x, source.w1, source.w2] + ([source.coef] if pool else [])
    grads = torch.autograd.grad(grouped_expert_ffn(x, counts, source, "gelu").sum(), wanted)
    grads_ref = torch.autograd.grad(reference(x, counts, source, "gelu").sum(), wanted, allow_unused=True)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, torch.zeros_like(g) if g_ref is None else g_ref)


def test_the_padded_layouts_arithmetic(monkeypatch):
    """Twelve experts. In expert order (groups) any padding allowed gives groups of PAD_GROUP = 8,
    experts 0-7 and 8-11, each padded to its largest count. Sorted by count (levels, 30%
    tolerance, levels at least 2 rows high) the bands are {7, 5}, {4, 3, 3} and {2, 2, 1, 1, 1}
    padded to their tops 7, 4 and 2: level 1 holds rows 0-1 of the ten experts with rows, level 2
    rows 2-3 of the five above 2, level 3 rows 4-6 of the two above 4. Every sorted row lands on
    its own padded row, padding rows are zero, and the rows are rounded up to the buckets."""
    monkeypatch.setattr(grouped_mod, "PAD_ENABLED", True)
    monkeypatch.setattr(grouped_mod, "PAD_MIN_THREADS", 1)
    counts = [5, 1, 0, 2, 2, 7, 1, 1, 3, 3, 0, 4]
    x = torch.arange(1, sum(counts) + 1, dtype=torch.float64).unsqueeze(1).repeat(1, 4)
    plain = row_layout(x, counts, 4, 4, pad_tolerance=float("inf"), permute=False)
    assert plain.groups == [(0, 8, 7, 0), (8, 12, 4, 56)] and plain.rows == 72
    levels = row_layout(x, counts, 4, 4, permute=True, level_rows=2, level_tolerance=0.3)
    assert levels.perm.tolist() == [5, 0, 11, 8, 9, 3, 4, 1, 6, 7, 2, 10]
    assert levels.groups == [(0, 10, 2, 0), (0, 5, 2, 20), (0, 2, 3, 30)] and levels.rows == levels.used == 36
    assert levels.dest[sum(counts[:5]) + 6] == 30 + 0 * 3 + 2  # expert 5's 7th row: level 3, position 0, its 3rd row
    monkeypatch.setattr(grouped_mod, "ROW_BUCKETS", 4)  # 36 rows rounded up to a multiple of 32 / 4
    bucketed = row_layout(x, counts, 4, 4, permute=True, level_rows=2, level_tolerance=0.3)
    assert bucketed.rows == 40 and bucketed.used == 36 and torch.equal(bucketed.dest, levels.dest)
    for plan in (plain, levels, bucketed):
        xp = plan.pad(x)
        assert torch.equal(plan.unpad(xp), x) and xp.sum() == x.sum()  # padding rows hold zeros
        assert plan.row_expert.shape == (plan.rows,)
        assert torch.equal(plan.row_expert[plan.dest], torch.repeat_interleave(torch.arange(12), torch.tensor(counts)))
    # with the default tolerance these counts are too uneven to group in expert order: more than
    # E / 2 groups, so the GEMMs run per expert
    assert row_layout(x, counts, 4, 4, permute=False).dest is None


def test_padded_sizes_come_in_a_few_buckets():
    """The heap sees at most ROW_BUCKETS sizes per power of two, each at most 1/ROW_BUCKETS above
    the rows asked for."""
    sizes = [bucket_rows(n) for n in range(8193, 16385)]
    assert all(n <= b <= n * (1 + 1 / grouped_mod.ROW_BUCKETS) for n, b in zip(range(8193, 16385), sizes))
    assert len(set(sizes)) == grouped_mod.ROW_BUCKETS
    assert [bucket_rows(n) for n in (1, 2, 3, 17)] == [1, 2, 3, 17]


def test_near_balanced_counts_run_each_gemm_as_one_batched_gemm(monkeypatch):
    """The default preset's shape (64 experts of width 64, d = 128, near-balanced counts 120-136)
    takes the levels: one level of 136 rows, so one bmm per GEMM instead of 64 GEMMs."""
    monkeypatch.setattr(grouped_mod, "PAD_ENABLED", True)
    monkeypatch.setattr(grouped_mod, "PAD_MIN_THREADS", 1)
    counts = [120 + (e * 7) % 17 for e in range(64)]
    x = torch.randn(sum(counts), 128)
    plan = row_layout(x, counts, 64, 64)
    assert plan.perm is not None and plan.groups == [(0, 64, 136, 0)] and plan.rows <= 1.07 * sum(counts)
    calls = []
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.append(1) or torch.ops.aten.bmm.out(*a, **k))
    source = make_source(None, "gelu", torch.float32, d=128, f=64)
    source = ExpertSource(*(t.detach()[:1].expand(64, *t.shape[1:]).contiguous() for t in source.tensors()))
    grouped_expert_ffn(plan.pad(x), counts, source, "gelu", plan)
    assert len(calls) == 2


def test_few_experts_or_one_thread_keep_a_gemm_per_expert(monkeypatch):
    x = torch.randn(512, 64)
    assert row_layout(x, [64] * 8, 256, 256).dest is None  # off unless switched on (PAD_ENABLED)
    monkeypatch.setattr(grouped_mod, "PAD_ENABLED", True)
    monkeypatch.setattr(grouped_mod, "PAD_MIN_THREADS", 1)
    assert row_layout(x, [128] * 4, 256, 256, pad_tolerance=float("inf")).dest is None  # tiny: 4 experts
    assert row_layout(x, [64] * 8, 256, 256).dest is not None
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        monkeypatch.setattr(grouped_mod, "PAD_MIN_THREADS", 2)
        assert row_layout(x, [64] * 8, 256, 256).dest is None
    finally:
        torch.set_num_threads(threads)


def test_under_bf16_autocast_the_layout_is_chosen_for_bf16_rows():
    """Rows of 12 fp32 values are 16-byte multiples, of 12 bf16 values not: under bf16 autocast
    the layout keeps the loop (torch._grouped_mm would refuse the rows), and the layer runs."""
    x = torch.randn(10, 12)
    assert row_layout(x, [4, 6], 16, 12).offs is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert row_layout(x, [4, 6], 16, 12).offs is None
        source = make_source(None, "gelu", torch.float32, d=12, f=16)
        y = grouped_expert_ffn(x.requires_grad_(), [4, 6, 0, 0], source, "gelu")
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all()
