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

The kernel is a few lines of C (expert_gemm.c beside this module) built once per PyTorch install
with the system's C compiler into cache_dir() and linked to the BLAS (MKL's sgemm_) and the
OpenMP runtime (libgomp) that PyTorch's own wheel ships, so that there is one thread pool. Where
any of that is missing (no compiler, another OpenMP or BLAS, not Linux), or SAMOE_EXPERT_GEMM=0,
`available()` is False and callers keep torch._grouped_mm; a failed build says so on stderr, a
build on a terminal's.
"""

from __future__ import annotations

import array
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from samoe.fileio import cache_dir

SOURCE = (Path(__file__).parent / "expert_gemm.c").read_text(encoding="utf-8")  # package data

# When the kernel takes the experts (runs_on): from MIN_EXPERTS experts always, below only while no
# expert holds more than a thread's share of the rows (a thread runs an expert whole); on one thread
# torch._grouped_mm was as fast. The measurements are in docs/fast-moe.md.
MIN_EXPERTS = 8
MIN_THREADS = 2

_lib: ctypes.CDLL | None | bool = False  # False: not tried yet


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
    so = cache_dir() / f"expert_gemm-{key}.so"
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
            if sys.stderr.isatty():  # a note for whoever watches; a script's stderr keeps its own lines
                print(f"samoe: built the experts' GEMM kernel into {so}", file=sys.stderr)
        lib = ctypes.CDLL(str(so))
        P, I = ctypes.c_void_p, ctypes.c_int
        lib.expert_rows.argtypes = [I, P, P, I, P, ctypes.c_int64, I, I, I, I, P, P, I]
        lib.expert_grads.argtypes = [I, P, P, I, P, I, I, I, P, P, I]
        lib.expert_rows.restype = lib.expert_grads.restype = None
        return lib
    except (OSError, subprocess.SubprocessError) as e:
        why = e.stderr.decode(errors="replace").strip().splitlines()[-1:] if getattr(e, "stderr", None) else [str(e)]
        print(f"samoe: the experts' GEMM kernel did not build ({why[0] if why else e}); the experts run on "
              "torch's GEMMs", file=sys.stderr)
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
