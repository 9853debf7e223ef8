"""The CPU kernel that spreads the experts' GEMMs over the threads (moe/expert_gemm.py), against a
loop of torch.mm: each expert's rows times its matrix (plain or a transposed view), each expert's
weight gradient (zero for an expert without rows), and what it declines."""

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from samoe.moe import expert_gemm


def starts(counts):
    return [sum(counts[:e]) for e in range(len(counts))]


@pytest.fixture(autouse=True)
def two_threads():
    """The kernel shares experts out over the threads, so it runs from two up."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


COUNTS = [[5, 0, 17, 3, 2, 2, 0, 11], [0] * 4 + [9] + [0] * 4, [1] * 3 + [40] + [0] * 5 + [7] * 8]


def test_it_builds_wherever_pytorch_ships_mkl_and_libgomp_and_a_compiler_is_there():
    lib = Path(torch.__file__).parent / "lib"
    can = (platform.system() == "Linux" and shutil.which("cc") is not None and torch.backends.mkl.is_available()
           and (lib / "libgomp.so.1").exists() and (lib / "libtorch_cpu.so").exists())
    assert expert_gemm.available() == can  # where it can, every test below runs the kernel


def test_it_is_not_built_when_switched_off(monkeypatch):
    monkeypatch.setenv("SAMOE_EXPERT_GEMM", "0")
    assert expert_gemm._build() is None


@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("transposed", [False, True])
def test_rows_times_experts_equals_a_loop_of_mm(counts, transposed):
    torch.manual_seed(0)
    E, k, n = len(counts), 24, 40
    x = torch.randn(sum(counts), k)
    w = torch.randn(E, n, k).transpose(1, 2) if transposed else torch.randn(E, k, n)  # [E, k, n] either way
    y = expert_gemm.rows_times_experts(x, w, counts)
    if not expert_gemm.available():
        assert y is None
        return
    want = torch.cat([x[s:s + c] @ w[e] for e, (s, c) in enumerate(zip(starts(counts), counts))])
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("transposed", [False, True])
def test_with_a_bias_every_row_of_an_expert_gets_its_bias_added(counts, transposed):
    torch.manual_seed(0)
    E, k, n = len(counts), 24, 40
    x, b = torch.randn(sum(counts), k), torch.randn(E, n)
    w = torch.randn(E, n, k).transpose(1, 2) if transposed else torch.randn(E, k, n)
    y = expert_gemm.rows_times_experts(x, w, counts, b)
    if not expert_gemm.available():
        assert y is None
        return
    want = torch.cat([x[s:s + c] @ w[e] + b[e] for e, (s, c) in enumerate(zip(starts(counts), counts))])
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("counts", COUNTS)
def test_the_bias_gradient_is_each_experts_rows_summed_and_zero_without_rows(counts):
    torch.manual_seed(0)
    E, d, h = len(counts), 24, 40
    x, g = torch.randn(sum(counts), d), torch.randn(sum(counts), h)
    out, gb = torch.full((E, d, h), float("nan")), torch.full((E, h), float("nan"))  # all must be written
    if expert_gemm.weight_grads(x, g, counts, out, gb) is None:
        assert not expert_gemm.available()
        return
    want = torch.stack([g[s:s + c].sum(0) for s, c in zip(starts(counts), counts)])
    torch.testing.assert_close(gb, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, torch.stack([x[s:s + c].t() @ g[s:s + c] for s, c in zip(starts(counts), counts)]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("into_out", [False, True])
def test_weight_grads_equal_a_loop_of_mm_and_are_zero_without_rows(counts, into_out):
    torch.manual_seed(0)
    E, d, h = len(counts), 24, 40
    x, g = torch.randn(sum(counts), d), torch.randn(sum(counts), h)
    out = torch.full((E, d, h), float("nan")) if into_out else None  # every slice must be written
    grads = expert_gemm.weight_grads(x, g, counts, out)
    if not expert_gemm.available():
        assert grads is None
        return
    want = torch.stack([x[s:s + c].t() @ g[s:s + c] for s, c in zip(starts(counts), counts)])
    torch.testing.assert_close(grads, want, rtol=1e-5, atol=1e-5)
    assert all(grads[e].eq(0).all() for e, c in enumerate(counts) if c == 0)
    assert out is None or grads.data_ptr() == out.data_ptr()


def test_under_min_experts_it_takes_the_experts_only_while_none_is_above_a_threads_share():
    w = torch.randn(4, 8, 8)
    assert not expert_gemm.runs_on([], w)  # no experts: nothing to run
    for counts, takes in (([3, 3, 3, 3], True), ([6, 6, 0, 0], True), ([7, 3, 1, 1], False), ([12, 0, 0, 0], False)):
        assert expert_gemm.runs_on(counts, w) == (takes and expert_gemm.available()), counts
        y = expert_gemm.rows_times_experts(torch.randn(12, 8), w, counts)
        assert (y is not None) == (takes and expert_gemm.available())


def test_what_it_declines_is_left_to_the_caller():
    counts = [1] * 8
    x, w, g = torch.randn(8, 8), torch.randn(8, 8, 8), torch.randn(8, 8)
    uneven = [4, 0, 0, 0, 1, 0, 1]  # under MIN_EXPERTS, and one expert above a thread's share (6 / 2 rows)
    assert expert_gemm.rows_times_experts(x[:6], w[:7], uneven) is None
    torch.set_num_threads(1)
    assert expert_gemm.rows_times_experts(x, w, counts) is None  # one thread: nothing to share out
    assert expert_gemm.weight_grads(x, g, counts) is None
    torch.set_num_threads(2)
    assert expert_gemm.rows_times_experts(x.double(), w.double(), counts) is None  # sgemm is fp32
    assert expert_gemm.rows_times_experts(x.t().contiguous().t(), w, counts) is None  # rows not contiguous
    assert expert_gemm.weight_grads(x, g, counts, torch.empty(8, 8, 16)[..., :8]) is None  # out not contiguous
    assert expert_gemm.rows_times_experts(x, w, counts, torch.randn(8, 16)[:, ::2]) is None  # bias not contiguous
    assert expert_gemm.rows_times_experts(x, w, counts, torch.randn(8, 7)) is None  # bias of another width
    assert expert_gemm.weight_grads(x, g, counts, None, torch.empty(8, 7)) is None  # bias gradient of another width


@pytest.mark.slow
def test_samoe_cache_holds_the_compiled_kernel(tmp_path):
    """SAMOE_CACHE=DIR puts the kernel under DIR (a fresh process: the module builds once per process,
    silently where stderr is no terminal); a second process loads it without building again."""
    code = "import torch; torch.set_num_threads(2); from samoe.moe import expert_gemm as g; print(g.available())"
    env = {**os.environ, "SAMOE_CACHE": str(tmp_path / "cache")}
    env.pop("SAMOE_EXPERT_GEMM", None)
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert first.stdout.strip() == str(expert_gemm.available())
    if not expert_gemm.available():  # nothing to build here (the test above says where it builds)
        assert not list((tmp_path / "cache").glob("expert_gemm-*.so"))
        return
    built = list((tmp_path / "cache").glob("expert_gemm-*.so"))
    assert len(built) == 1 and first.stderr == ""
    mtime = built[0].stat().st_mtime_ns
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert again.stdout.strip() == "True" and built[0].stat().st_mtime_ns == mtime
