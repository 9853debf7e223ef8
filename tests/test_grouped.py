"""The grouped expert FFN (sorted fast path, hand-written backward) against plain autograd on
the materialised weights: private stacks and SaMoE pools, both granularities, both
activations, capacity and dropless routing, empty experts, and bf16 autocast; with the loop
over experts (float64, odd widths) and with torch._grouped_mm (fp32, 16-byte rows)."""

import pytest
import torch

import samoe.moe.dispatch as dispatch_mod
import samoe.moe.grouped as grouped_mod
from samoe.config_load import load_config
from samoe.ffn import activate
from samoe.model.gpt import GPT
from samoe.moe import expert_gemm
from samoe.moe.grouped import ExpertSource, grouped_expert_ffn, grouped_gemm_offsets, row_layout

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


@pytest.mark.parametrize("pool", [None, "layer", "expert"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("counts", [[3, 0, 4, 2], [0, 0, 5, 0], [1, 1, 1, 1]])
def test_outputs_and_gradients_equal_autograd_on_the_materialised_weights(pool, activation, counts):
    torch.manual_seed(0)
    source = make_source(pool, activation)
    x = torch.randn(sum(counts), D, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(sum(counts), D, dtype=torch.float64)

    y = grouped_expert_ffn(x, counts, source, activation)
    grads = torch.autograd.grad(y, [x, *leaves(source)], gy)
    y_ref = reference(x, counts, source, activation)
    grads_ref = torch.autograd.grad(y_ref, [x, *leaves(source)], gy, allow_unused=True)

    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, torch.zeros_like(g) if g_ref is None else g_ref)


@pytest.mark.parametrize("pool", [None, "expert"])
def test_many_experts_add_their_biases_through_gathered_rows(pool):
    """With a GEMM per expert and more than BIAS_GATHER_EXPERTS experts the biases are added through
    the rows' gathered biases instead of expert by expert: outputs and gradients unchanged."""
    torch.manual_seed(0)
    counts = [3, 0, 4, 2, 1, 0, 5, 2, 2, 1, 3, 1]
    source = make_source(pool, "gelu", experts=len(counts))
    x = torch.randn(sum(counts), D, dtype=torch.float64, requires_grad=True)
    assert len(row_layout(x, counts, F_, F_).counts) > grouped_mod.BIAS_GATHER_EXPERTS
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
def test_model_gradients_equal_the_materialised_path(sharing, dropless, monkeypatch):
    """Whole model: the fast path against the same model whose MoE layers combine the pool
    with autograd and run the reference loop (capacity drops included)."""
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

    loss, grads = run()
    monkeypatch.setattr(dispatch_mod, "grouped_expert_ffn", reference)
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
