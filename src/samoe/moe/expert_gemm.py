"""The experts' GEMMs on the CPU with the experts spread over the threads.

torch._grouped_mm on the CPU loops over the experts and hands each product to the BLAS, which
splits that one product over the threads. An expert's product is small (the default preset: 128
rows of d = 128 into 64), and two threads share it poorly: 64 such products took 1.4-1.6x the
time of one product over all their rows on two threads, 1.2x on one. Here the experts themselves
are shared out instead, largest first: each thread takes the next expert and runs it whole with
the BLAS single-threaded (the BLAS sees it is inside a parallel region). On the default preset's
shape the six GEMMs of a layer then run at about the dense FFN's rate (docs/fast-moe.md).

Two products, row-major fp32, experts e = 0..E-1 with n_e rows each, rows of an expert contiguous:

    rows_times_experts:  y[rows of e] = x[rows of e] · W[e] (+ b[e])   W [E, k, n] (or a transposed view)
    weight_grads:        G[e] = x[rows of e]ᵀ · g[rows of e]           G [E, d, h]
                         (and gb[e] = Σ g[rows of e], the bias's gradient, when asked)

The bias and its gradient are done by the thread that runs the expert, on rows it has in cache,
instead of separate passes over all the rows (moe/grouped.py says what that saved). The experts'
order and first rows are worked out in C, not in numpy around the call: a call on 64 experts of
one row took 15-34 us against 48-51 (`python scripts/ab_expert_gemm.py call`), six calls a layer.

The kernel is a few lines of C (SOURCE) built once per PyTorch install with the system's C
compiler and linked to the BLAS (MKL's sgemm_) and the OpenMP runtime (libgomp) that PyTorch's
own wheel ships, so that there is one thread pool. Where any of that is missing (no compiler,
another OpenMP or BLAS, not Linux), or SAMOE_EXPERT_GEMM=0, `available()` is False and callers
keep torch._grouped_mm.
"""

from __future__ import annotations

import array
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

SOURCE = r"""
#include <stdint.h>
#include <string.h>
void sgemm_(const char *ta, const char *tb, const int *m, const int *n, const int *k, const float *alpha,
            const float *a, const int *lda, const float *b, const int *ldb, const float *beta, float *c,
            const int *ldc);

static const float one = 1.0f, zero = 0.0f;  /* sgemm_ takes every argument by address */
static const char N = 'N', T = 'T';

/* Expert e has counts[e] rows from row start[e] = counts[0] + ... + counts[e-1]. The threads take the experts one at
   a time, largest first (order), so that they finish together. */
static void plan(int E, const int64_t *counts, int *order, int64_t *start) {
    int64_t s = 0;
    for (int e = 0; e < E; e++) { start[e] = s; s += counts[e]; order[e] = e; }
    for (int i = 1; i < E; i++) {  /* insertion sort, stable: E is small */
        int e = order[i], j = i;
        for (; j > 0 && counts[order[j - 1]] < counts[e]; j--) order[j] = order[j - 1];
        order[j] = e;
    }
}

/* y[rows of e] [n_e, n] = x[rows of e] [n_e, k] W_e [k, n], plus bias[e] [n] on every row when bias is not NULL
   (the rows start as the bias and the product is added: beta = 1). x is row-major (ldx), y contiguous; W_e = w +
   e * w_stride, row-major with ldw, or the transpose of such when tw. Row-major Y = X W is column-major
   Y^T = W^T X^T: hence W before X in the call. */
void expert_rows(int E, const int64_t *counts, const float *x, int ldx, const float *w, int64_t w_stride, int ldw,
                 int tw, int k, int n, const float *bias, float *y, int threads) {
    int order[E];
    int64_t start[E];
    plan(E, counts, order, start);
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int i = 0; i < E; i++) {
        const int e = order[i], m = (int)counts[e];
        if (m == 0) continue;
        float *ye = y + start[e] * n;
        if (bias)
            for (int r = 0; r < m; r++) memcpy(ye + (int64_t)r * n, bias + (int64_t)e * n, sizeof(float) * n);
        sgemm_(tw ? &T : &N, &N, &n, &m, &k, &one, w + e * w_stride, &ldw, x + start[e] * ldx, &ldx,
               bias ? &one : &zero, ye, &n);
    }
}

/* out[e] [d, h] = x[rows of e]^T g[rows of e] (zero for an expert without rows), x [N, d] and g [N, h] row-major
   (ldx, ldg), out contiguous. With colsum not NULL, colsum[e] [h] = the sum of g's rows of e too: the gradient of a
   bias added to those rows, summed by the same thread while the rows are in cache. */
void expert_grads(int E, const int64_t *counts, const float *x, int ldx, const float *g, int ldg, int d, int h,
                  float *out, float *colsum, int threads) {
    int order[E];
    int64_t start[E];
    plan(E, counts, order, start);
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int i = 0; i < E; i++) {
        const int e = order[i], k = (int)counts[e];
        const float *ge = g + start[e] * ldg;
        float *oe = out + (int64_t)e * d * h;
        if (colsum) {
            float *restrict s = colsum + (int64_t)e * h;
            const float *restrict gr = ge;
            memset(s, 0, sizeof(float) * h);
            for (int r = 0; r < k; r++)
                for (int j = 0; j < h; j++) s[j] += gr[(int64_t)r * ldg + j];
        }
        if (k == 0) {
            memset(oe, 0, sizeof(float) * d * h);
            continue;
        }
        sgemm_(&N, &T, &h, &d, &k, &one, ge, &ldg, x + start[e] * ldx, &ldx, &zero, oe, &h);  /* out^T = g^T x */
    }
}
"""

# When the kernel takes the experts (runs_on). From MIN_EXPERTS experts always: however uneven the
# counts, the kernel won (64 experts, one of 400 rows and 63 of 5: 0.35-0.93 of torch._grouped_mm's
# time). Below, only while the largest expert is at most a thread's share of the rows: a thread runs
# an expert whole, so a larger one leaves the other thread idle. Four experts against
# torch._grouped_mm, two runs of `python scripts/ab_expert_gemm.py shares` (d x h = 64 x 256,
# 128 x 64, 256 x 1024): 128 rows each 0.82-0.94 of its time, 256 + 256 + 0 + 0 rows 0.86-0.98, but
# 320 + 3 x 64 0.94-1.04, 448 + 32 + 16 + 16 1.19-1.40 and 512 + 0 + 0 + 0 1.66-1.86. (Until a call's
# index arithmetic moved into C, its cost kept the `tiny` preset's four experts off the kernel
# altogether: it made training 8-15% slower.)
#
# On one thread there is nothing to share out: the kernel took 2.04 ms against 1.88 at 64 experts
# of 128 rows (d = 128 -> 64), and with the bias folded in and the lighter call, 2.61 against 2.58,
# the default preset's training within its noise either way (MoE / dense 0.81 against 0.79 over
# five interleaved calls). One thread keeps torch._grouped_mm.
MIN_EXPERTS = 8
MIN_THREADS = 2

_lib: ctypes.CDLL | None | bool = False  # False: not tried yet


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "samoe"


def _build() -> ctypes.CDLL | None:
    """The kernel, compiled on first use (about 0.2 s) into the cache and loaded; None where it
    cannot be built or would not share PyTorch's BLAS and OpenMP runtime."""
    torch_lib = Path(torch.__file__).parent / "lib"
    cc = shutil.which(os.environ.get("CC", "cc"))
    if (os.environ.get("SAMOE_EXPERT_GEMM", "1") == "0" or platform.system() != "Linux" or cc is None
            or not torch.backends.mkl.is_available() or not (torch_lib / "libgomp.so.1").exists()
            or not (torch_lib / "libtorch_cpu.so").exists()):
        return None
    key = hashlib.sha256(f"{SOURCE}{torch.__version__}{torch_lib}{cc}".encode()).hexdigest()[:16]
    so = _cache_dir() / f"expert_gemm-{key}.so"
    try:
        if not so.exists():
            so.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
                src, out = Path(tmp) / "expert_gemm.c", Path(tmp) / so.name
                src.write_text(SOURCE)
                subprocess.run([cc, "-O3", "-fopenmp", "-shared", "-fPIC", str(src), "-o", str(out),
                                "-Wl,--no-as-needed", f"-L{torch_lib}", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"],
                               check=True, capture_output=True, timeout=120)
                os.replace(out, so)  # atomic: a concurrent process sees the whole file or none
        lib = ctypes.CDLL(str(so))
        P, I = ctypes.c_void_p, ctypes.c_int
        lib.expert_rows.argtypes = [I, P, P, I, P, ctypes.c_int64, I, I, I, I, P, P, I]
        lib.expert_grads.argtypes = [I, P, P, I, P, I, I, I, P, P, I]
        lib.expert_rows.restype = lib.expert_grads.restype = None
        return lib
    except (OSError, subprocess.SubprocessError):
        return None


def available() -> bool:
    """Whether the kernel runs here (built and loaded once per process)."""
    global _lib
    if _lib is False:
        _lib = _build()
    return _lib is not None


def _row_major(t: Tensor) -> tuple[int, int] | None:
    """(transposed, leading dimension) of a 2-D matrix or a stack of them as the BLAS reads it, or
    None when neither its rows nor its columns are contiguous."""
    if t.stride(-1) == 1:
        return 0, t.stride(-2)
    if t.stride(-2) == 1:
        return 1, t.stride(-1)
    return None


def runs_on(counts: list[int], *tensors: Tensor) -> bool:
    """Whether the kernel takes these experts and tensors: fp32 on the CPU, where it builds, from
    MIN_THREADS threads, and MIN_EXPERTS experts or else none above a thread's share of the rows
    (see MIN_EXPERTS). The products below also need their layouts."""
    threads = torch.get_num_threads()
    return (threads >= MIN_THREADS and len(counts) > 0
            and (len(counts) >= MIN_EXPERTS or max(counts) * threads <= sum(counts))
            and available()
            and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
            and max(t.numel() for t in tensors) < 2**31)


def rows_times_experts(x: Tensor, w: Tensor, counts: list[int], bias: Tensor | None = None) -> Tensor | None:
    """[N, n]: each expert's rows of x [N, k] times its w[e] ([E, k, n], any view with contiguous rows
    or columns), plus its bias[e] ([E, n], contiguous) on every row when given; None when the
    kernel does not take these experts or tensors (runs_on)."""
    layout_a, layout_b = _row_major(x), _row_major(w)
    if not runs_on(counts, x, w) or layout_a != (0, x.stride(0)) or layout_b is None or w.shape[0] != len(counts):
        return None
    if bias is not None and (bias.shape != (w.shape[0], w.shape[2]) or not bias.is_contiguous()
                             or not runs_on(counts, bias)):
        return None
    E, K, N = w.shape
    y = x.new_empty(x.shape[0], N)
    c = array.array("q", counts)  # kept alive through the call
    tw, ldw = layout_b
    _lib.expert_rows(E, c.buffer_info()[0], x.data_ptr(), x.stride(0), w.data_ptr(), w.stride(0), ldw, tw, K, N,
                     None if bias is None else bias.data_ptr(), y.data_ptr(), torch.get_num_threads())
    return y


def weight_grads(x: Tensor, g: Tensor, counts: list[int], out: Tensor | None = None,
                 bias_grad: Tensor | None = None) -> Tensor | None:
    """[E, d, h]: for each expert, its rows of x [N, d] transposed times its rows of g [N, h] (zero
    for an expert without rows), written into `out` (contiguous) when given; with `bias_grad`
    ([E, h], contiguous), each expert's rows of g summed into it too (the gradient of a bias added
    to those rows). None when the kernel does not take these experts or tensors (runs_on)."""
    if not runs_on(counts, x, g) or x.stride(1) != 1 or g.stride(1) != 1:
        return None
    E, (d, h) = len(counts), (x.shape[1], g.shape[1])
    out = x.new_empty(E, d, h) if out is None else out
    if not (out.is_contiguous() and out.shape == (E, d, h) and runs_on(counts, out)):
        return None
    if bias_grad is not None and not (bias_grad.is_contiguous() and bias_grad.shape == (E, h)
                                      and runs_on(counts, bias_grad)):
        return None
    c = array.array("q", counts)
    _lib.expert_grads(E, c.buffer_info()[0], x.data_ptr(), x.stride(0), g.data_ptr(), g.stride(0), d, h,
                      out.data_ptr(), None if bias_grad is None else bias_grad.data_ptr(), torch.get_num_threads())
    return out
