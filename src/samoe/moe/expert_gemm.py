"""The experts' GEMMs on the CPU with the experts spread over the threads.

torch._grouped_mm on the CPU loops over the experts and hands each product to the BLAS, which
splits that one product over the threads. An expert's product is small (the default preset: 128
rows of d = 128 into 64), and two threads share it poorly: 64 such products took 1.4-1.6x the
time of one product over all their rows on two threads, 1.2x on one. Here the experts themselves
are shared out instead, largest first: each thread takes the next expert and runs it whole with
the BLAS single-threaded (the BLAS sees it is inside a parallel region). On the default preset's
shape the six GEMMs of a layer then run at about the dense FFN's rate (docs/fast-moe.md).

Two products, row-major fp32, experts e = 0..E-1 with n_e rows each, rows of an expert contiguous:

    rows_times_experts:  y[rows of e] = x[rows of e] · W[e]            W [E, k, n] (or a transposed view)
    weight_grads:        G[e] = x[rows of e]ᵀ · g[rows of e]           G [E, d, h]

The kernel is a few lines of C (SOURCE) built once per PyTorch install with the system's C
compiler and linked to the BLAS (MKL's sgemm_) and the OpenMP runtime (libgomp) that PyTorch's
own wheel ships, so that there is one thread pool. Where any of that is missing (no compiler,
another OpenMP or BLAS, not Linux), or SAMOE_EXPERT_GEMM=0, `available()` is False and callers
keep torch._grouped_mm.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SOURCE = r"""
#include <stdint.h>
#include <string.h>
void sgemm_(const char *ta, const char *tb, const int *m, const int *n, const int *k, const float *alpha,
            const float *a, const int *lda, const float *b, const int *ldb, const float *beta, float *c,
            const int *ldc);

/* Item i (in the order given): C_i [m_i, n_i] (row-major, ldc) = op(A_i) [m_i, k_i] op(B_i) [k_i, n_i], where
   A_i = a + a_off[i] (row-major, lda; op transposes when ta) and likewise B_i. Items go to the threads one at a
   time. Row-major C = A B is column-major C^T = B^T A^T: hence B before A in the call. */
void gemm_items(int count, const int *m, const int *n, const int *k,
                const float *a, const int64_t *a_off, int lda, int ta,
                const float *b, const int64_t *b_off, int ldb, int tb,
                float *c, const int64_t *c_off, int ldc, int threads) {
    const float one = 1.0f, zero = 0.0f;
    const char N = 'N', T = 'T';
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int i = 0; i < count; i++) {
        if (m[i] == 0 || n[i] == 0) continue;
        float *ci = c + c_off[i];
        if (k[i] == 0) {  /* an expert without rows: a zero gradient */
            for (int r = 0; r < m[i]; r++) memset(ci + (int64_t)r * ldc, 0, sizeof(float) * n[i]);
            continue;
        }
        sgemm_(tb ? &T : &N, ta ? &T : &N, &n[i], &m[i], &k[i], &one, b + b_off[i], &ldb,
               a + a_off[i], &lda, &zero, ci, &ldc);
    }
}
"""

# Fewer experts than this keep torch._grouped_mm: a few experts share two threads unevenly, and the
# call's own cost shows. On the `tiny` preset (4 experts of 128 rows, d = 64) the kernel made
# training 8% (MoE) and 15% (SaMoE) slower. On one thread there is nothing to share out, and the
# kernel took 2.04 ms against 1.88 at 64 experts of 128 rows (d = 128 -> 64): one thread keeps it too.
MIN_EXPERTS = 8

_P = ctypes.c_void_p
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
                subprocess.run([cc, "-O2", "-fopenmp", "-shared", "-fPIC", str(src), "-o", str(out),
                                "-Wl,--no-as-needed", f"-L{torch_lib}", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"],
                               check=True, capture_output=True, timeout=120)
                os.replace(out, so)  # atomic: a concurrent process sees the whole file or none
        lib = ctypes.CDLL(str(so))
        lib.gemm_items.restype = None
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


def _run(m, n, k, a: Tensor, a_off, ta: int, lda: int, b: Tensor, b_off, tb: int, ldb: int, c: Tensor, c_off,
         ldc: int) -> None:
    order = np.argsort(-(m.astype(np.int64) * k), kind="stable")  # largest first: the threads finish together
    arrays = [np.ascontiguousarray(v[order], dtype=dt) for v, dt in
              ((m, np.int32), (n, np.int32), (k, np.int32), (a_off, np.int64), (b_off, np.int64), (c_off, np.int64))]
    m_, n_, k_, ao, bo, co = (x.ctypes.data_as(_P) for x in arrays)
    _lib.gemm_items(len(order), m_, n_, k_, _P(a.data_ptr()), ao, lda, ta, _P(b.data_ptr()), bo, ldb, tb,
                    _P(c.data_ptr()), co, ldc, torch.get_num_threads())


def runs_on(counts: list[int], *tensors: Tensor) -> bool:
    """Whether the kernel takes these experts and tensors (fp32, CPU, from MIN_EXPERTS experts and
    two threads, where it builds); the products below also need their layouts."""
    return (len(counts) >= MIN_EXPERTS and torch.get_num_threads() > 1 and available()
            and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
            and max(t.numel() for t in tensors) < 2**31)


def rows_times_experts(x: Tensor, w: Tensor, counts: list[int]) -> Tensor | None:
    """[N, n]: each expert's rows of x [N, k] times its w[e] ([E, k, n], any view with contiguous rows
    or columns); None when the kernel cannot take these tensors, there are under MIN_EXPERTS or
    there is one thread."""
    layout_a, layout_b = _row_major(x), _row_major(w)
    if not runs_on(counts, x, w) or layout_a != (0, x.stride(0)) or layout_b is None or w.shape[0] != len(counts):
        return None
    E, K, N = w.shape
    y = x.new_empty(x.shape[0], N)
    rows = np.asarray(counts, dtype=np.int64)
    start = np.cumsum(rows) - rows
    _run(rows, np.full(E, N), np.full(E, K), x, start * x.stride(0), 0, x.stride(0),
         w, np.arange(E, dtype=np.int64) * w.stride(0), *layout_b, y, start * N, N)
    return y


def weight_grads(x: Tensor, g: Tensor, counts: list[int], out: Tensor | None = None) -> Tensor | None:
    """[E, d, h]: for each expert, its rows of x [N, d] transposed times its rows of g [N, h] (zero
    for an expert without rows), written into `out` (contiguous) when given; None when the kernel
    cannot take these tensors, there are under MIN_EXPERTS or there is one thread."""
    if not runs_on(counts, x, g) or x.stride(1) != 1 or g.stride(1) != 1:
        return None
    E, (d, h) = len(counts), (x.shape[1], g.shape[1])
    out = x.new_empty(E, d, h) if out is None else out
    if not (out.is_contiguous() and out.shape == (E, d, h) and runs_on(counts, out)):
        return None
    rows = np.asarray(counts, dtype=np.int64)
    start = np.cumsum(rows) - rows
    _run(np.full(E, d), np.full(E, h), rows, x, start * x.stride(0), 1, x.stride(0),
         g, start * g.stride(0), 0, g.stride(0), out, np.arange(E, dtype=np.int64) * d * h, h)
    return out
