"""Triton window passes: float64 accumulation from the stored width, one launch per pass.

Each pass is a single kernel launch whatever the window width ``n``: the grid covers the *output*,
and every program loops over the reduced dimension inside the kernel, so each output element is
summed by exactly one program, in a fixed order.

* ``dots`` (``G x``, output ``m × k``): one program per block of rows, looping over all ``n`` columns.
* ``combine`` (``Gᵀ c``, output ``n × k``): one program per column tile, looping over all ``m`` rows.
* ``gram`` (``G Gᵀ``, output ``m × m``): one program per lower-triangular tile pair, looping over all
  ``n`` columns; it writes its tile and the mirrored one (the result is exactly symmetric). Products
  are summed with float64 FMAs, not ``tl.dot``: Triton 3.8's float64 MMA lowering aborts the process
  on these shapes for sm_80/sm_90 (found by compiling for those targets without a GPU, see
  tests/test_kernels.py), and the Gram is recomputed rarely (refactorization), off the step's path.

Why not split the long ``n`` reduction of ``dots``/``gram`` across programs: the partial sums would
need either atomics (a summation order that changes from run to run) or a workspace plus a second
launch (or a counter shared between launches, unsafe on concurrent streams). Summing inside one
program keeps the result deterministic, the pass at one launch and the step capturable. The cost is
parallelism when ``m`` is small: ``dots`` has ``m / BLOCK_M`` programs (256 at ``m = 1024``), enough to
fill a GPU for the window sizes where the pass time matters. ``combine`` has ``n / BLOCK_N`` programs.

Values are loaded at their stored width (float32, bfloat16 or float64), widened to float64 in
registers (a bfloat16 from its bits) and multiplied and summed there; offsets are 64-bit (windows
exceed 2³¹ elements).

On CPU tensors the same kernels run under the Triton interpreter, chosen per call from the tensor's
device: the kernels are wrapped both as :class:`triton.runtime.jit.JITFunction` and as the
interpreter's ``InterpretedFunction``, so neither the caller nor the tests need to set
``TRITON_INTERPRET=1`` before Triton is imported (with it set, every launch is interpreted, as
Triton does for its own ``@triton.jit``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from lightning_mfac.fisher.kernels import _checks
from lightning_mfac.fisher.kernels.reference import two_pass_block_woodbury

#: ``tl.sum`` and ``tl.zeros`` are themselves ``@triton.jit`` functions, which the interpreter can only
#: call when ``TRITON_INTERPRET=1`` was set before Triton was imported. The kernels use the builtins
#: they stand for (``tl.reduce`` with this combine function, which the interpreter sums with numpy,
#: and ``tl.full``), so they interpret in any process.
_sum = tl.standard._sum_combine

#: Per-program float64 elements of the products a pass holds at once: bounds registers on a GPU.
_WORK = 2048
#: The interpreter runs programs and loop iterations one by one in Python, each op on numpy arrays:
#: big blocks make it fast (block sizes change the summation order only within float64).
_INTERPRETED_WORK = 1 << 16


def _dots_kernel(
    G, ld, sg, X, sxn, sxk, OUT, sob, som, sok, m, n, k, cols,
    BF16: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``OUT[b, r, i] (+)= Σ_{j in block b} G[r, j] · X[j, i]`` for the rows of this program and the
    column block ``b = program_id(1)`` of ``cols`` columns, in float64 (``cols = n``: plain ``G X``)."""
    pid = tl.program_id(0)
    blk = tl.program_id(1)
    r = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    i = tl.arange(0, BLOCK_K)
    rmask = r < m
    imask = i < k
    g_rows = G + r.to(tl.int64)[:, None] * ld
    acc = tl.full((BLOCK_M, BLOCK_K), 0.0, tl.float64)
    start = blk.to(tl.int64) * cols
    end = tl.minimum(start + cols, n)
    for c0 in range(start, end, BLOCK_N):
        j = c0 + tl.arange(0, BLOCK_N)
        jmask = j < end
        j64 = j.to(tl.int64)
        g = tl.load(g_rows + j64[None, :] * sg, mask=rmask[:, None] & jmask[None, :], other=0)
        if BF16:  # the raw 16 bits of a bfloat16: the upper half of a float32
            g = ((g.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
        g = g.to(tl.float64)
        x = tl.load(
            X + j64[:, None] * sxn + i[None, :] * sxk, mask=jmask[:, None] & imask[None, :], other=0.0
        )
        acc += tl.reduce(g[:, :, None] * x.to(tl.float64)[None, :, :], 1, _sum)
    out_ptr = OUT + blk.to(tl.int64) * sob + r[:, None] * som + i[None, :] * sok
    omask = rmask[:, None] & imask[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptr, mask=omask, other=0.0)
    tl.store(out_ptr, acc, mask=omask)


def _combine_kernel(
    G, ld, sg, C, scb, scm, sck, OUT, son, sok, m, n, k, cols,
    BF16: tl.constexpr, OUT_F64: tl.constexpr, OUT_BF16: tl.constexpr, BLOCKED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``OUT[j, i] = Σ_r G[r, j] · C[r, i]`` for the columns of this program: float64 sums, rounded
    once to ``OUT``'s dtype. ``BLOCKED`` (then ``k = 1``): column ``j`` takes the coefficients of its
    block of ``cols`` columns, ``C[j // cols, r]`` (``scb`` the block stride)."""
    pid = tl.program_id(0)
    j = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    i = tl.arange(0, BLOCK_K)
    jmask = j < n
    imask = i < k
    g_cols = G + j.to(tl.int64)[None, :] * sg
    acc = tl.full((BLOCK_N, BLOCK_K), 0.0, tl.float64)
    for r0 in range(0, m, BLOCK_M):
        r = r0 + tl.arange(0, BLOCK_M)
        rmask = r < m
        g = tl.load(g_cols + r.to(tl.int64)[:, None] * ld, mask=rmask[:, None] & jmask[None, :], other=0)
        if BF16:  # the raw 16 bits of a bfloat16: the upper half of a float32
            g = ((g.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
        if BLOCKED:
            blk = (j // cols).to(tl.int64)
            c = tl.load(C + blk[None, :] * scb + r[:, None] * scm, mask=rmask[:, None] & jmask[None, :], other=0.0)
            acc += tl.reduce(g.to(tl.float64)[:, :, None] * c.to(tl.float64)[:, :, None], 0, _sum)
        else:
            c = tl.load(C + r[:, None] * scm + i[None, :] * sck, mask=rmask[:, None] & imask[None, :], other=0.0)
            acc += tl.reduce(g.to(tl.float64)[:, :, None] * c.to(tl.float64)[:, None, :], 0, _sum)
    out_ptr = OUT + j.to(tl.int64)[:, None] * son + i[None, :] * sok
    omask = jmask[:, None] & imask[None, :]
    if OUT_F64:
        tl.store(out_ptr, acc, mask=omask)
    elif OUT_BF16:
        # Rounded to nearest even through float32 (as torch does), on the bits: the interpreter's own
        # float32 -> bfloat16 conversion truncates. OUT is the output's int16 view.
        bits = acc.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, (bits >> 16) | 0x40, rounded)  # quiet NaN
        tl.store(out_ptr, rounded.to(tl.int16), mask=omask)
    else:
        tl.store(out_ptr, acc.to(OUT.dtype.element_ty), mask=omask)


def _gram_kernel(
    G, ld, sg, OUT, som, son, m, n,
    BF16: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``OUT[a, b] (+)= Σ_j G[a, j] · G[b, j]`` for one tile pair ``bi ≥ bj`` and its mirror."""
    bi = tl.program_id(0)
    bj = tl.program_id(1)
    if bj <= bi:
        a = bi * BLOCK_M + tl.arange(0, BLOCK_M)
        b = bj * BLOCK_M + tl.arange(0, BLOCK_M)
        amask = a < m
        bmask = b < m
        a_rows = G + a.to(tl.int64)[:, None] * ld
        b_rows = G + b.to(tl.int64)[:, None] * ld
        acc = tl.full((BLOCK_M, BLOCK_M), 0.0, tl.float64)
        for c0 in range(0, n, BLOCK_N):
            j = c0 + tl.arange(0, BLOCK_N)
            jmask = j < n
            j64 = j.to(tl.int64)[None, :] * sg
            ga = tl.load(a_rows + j64, mask=amask[:, None] & jmask[None, :], other=0)
            gb = tl.load(b_rows + j64, mask=bmask[:, None] & jmask[None, :], other=0)
            if BF16:  # as in _dots_kernel
                ga = ((ga.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
                gb = ((gb.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
            ga = ga.to(tl.float64)
            gb = gb.to(tl.float64)
            acc += tl.reduce(ga[:, None, :] * gb[None, :, :], 2, _sum)
        omask = amask[:, None] & bmask[None, :]
        out_ab = OUT + a[:, None] * som + b[None, :] * son
        out_ba = OUT + b[None, :] * som + a[:, None] * son
        if ACCUMULATE:
            tl.store(out_ab, acc + tl.load(out_ab, mask=omask, other=0.0), mask=omask)
            if bj < bi:
                tl.store(out_ba, acc + tl.load(out_ba, mask=omask, other=0.0), mask=omask)
        else:
            tl.store(out_ab, acc, mask=omask)
            if bj < bi:
                tl.store(out_ba, acc, mask=omask)


@functools.cache
def _compiled(fn):
    return JITFunction(fn)


@functools.cache
def _interpreted(fn):
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(fn)


def _is_interpreted(device: torch.device) -> bool:
    return device.type == "cpu" or triton.knobs.runtime.interpret


class Launch(NamedTuple):
    """One kernel launch: the kernel's Python function, its grid, runtime arguments and constexprs."""

    fn: object
    grid: tuple[int, ...]
    args: tuple
    meta: dict

    def __call__(self, device: torch.device) -> None:
        kernel = _interpreted(self.fn) if _is_interpreted(device) else _compiled(self.fn)
        kernel[self.grid](*self.args, **self.meta)


def _stored(t: torch.Tensor) -> torch.Tensor:
    # bfloat16 is handed over as its raw bits, converted in the kernel (exactly, subnormals included,
    # on the GPU and in the interpreter alike).
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _operand(t: torch.Tensor) -> torch.Tensor:
    # x and coeffs are loaded as float32 or float64; anything narrower is widened here (O(n), not O(m·n)).
    return t if t.dtype in (torch.float32, torch.float64) else t.to(torch.float64)


def _pow2(v: int) -> int:
    return triton.next_power_of_2(max(1, v))


def _work(interpreted: bool) -> int:
    return _INTERPRETED_WORK if interpreted else _WORK


def plan_dots(rows, x2, res2, accumulate: bool, interpreted: bool, block: int | None = None) -> Launch:
    """``res2 (+)= rows @ x2`` (``x2``: ``(n, k)``, ``res2``: ``(m, k)`` float64); with ``block``,
    per block of columns: ``res2`` is ``(nblocks, m)`` and ``k = 1``."""
    m, n = rows.shape
    k = x2.shape[1]
    cols = n if block is None else block
    nblocks = 1 if block is None else triton.cdiv(n, block)
    # (block stride, row stride, column stride) of the output
    so = (0, res2.stride(0), res2.stride(1)) if block is None else (res2.stride(0), res2.stride(1), 0)
    bk = _pow2(k)
    if interpreted:
        bm = min(16, _pow2(m))
    else:  # small row blocks keep many programs for the long reduction over n (module docstring)
        bm = 4 if m >= 512 else (2 if m >= 128 else 1)
    bn = max(16, min(_pow2(cols), _work(interpreted) // (bm * bk)))
    args = (_stored(rows), rows.stride(0), rows.stride(1), x2, x2.stride(0), x2.stride(1),
            res2, *so, m, n, k, cols)  # fmt: skip
    meta = dict(BF16=rows.dtype == torch.bfloat16, ACCUMULATE=accumulate, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return Launch(_dots_kernel, (triton.cdiv(m, bm), nblocks), args, meta)


def plan_combine(rows, c2, res2, interpreted: bool, block: int | None = None) -> Launch:
    """``res2 = rowsᵀ @ c2`` (``c2``: ``(m, k)``, ``res2``: ``(n, k)`` of any float dtype); with
    ``block``, ``c2`` is ``(nblocks, m)``, one row of coefficients per block of columns, and ``k = 1``."""
    m, n = rows.shape
    k = 1 if block is not None else c2.shape[1]
    # (block stride, row stride, column stride) of the coefficients
    sc = (0, c2.stride(0), c2.stride(1)) if block is None else (c2.stride(0), c2.stride(1), 0)
    bk = _pow2(k)
    bm = min(64 if interpreted else 8, _pow2(m))
    bn = max(16, min(_pow2(n), _work(interpreted) // (bm * bk)))
    args = (_stored(rows), rows.stride(0), rows.stride(1), c2, *sc,
            _stored(res2), res2.stride(0), res2.stride(1), m, n, k, n if block is None else block)  # fmt: skip
    meta = dict(
        BF16=rows.dtype == torch.bfloat16, OUT_F64=res2.dtype == torch.float64, OUT_BF16=res2.dtype == torch.bfloat16,
        BLOCKED=block is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )  # fmt: skip
    return Launch(_combine_kernel, (triton.cdiv(n, bn),), args, meta)


def plan_gram(rows, res, accumulate: bool, interpreted: bool) -> Launch:
    """``res (+)= rows @ rowsᵀ`` (``res``: ``(m, m)`` float64)."""
    m, n = rows.shape
    if interpreted:  # few, large numpy steps
        bm = min(_pow2(m), 128)
        bn = max(16, min(_pow2(n), (1 << 20) // (bm * bm)))
    else:
        bm = min(_pow2(m), 32)
        bn = max(1, min(_pow2(n), _WORK // (bm * bm)))
    blocks = triton.cdiv(m, bm)
    args = (_stored(rows), rows.stride(0), rows.stride(1), res, res.stride(0), res.stride(1), m, n)
    meta = dict(BF16=rows.dtype == torch.bfloat16, ACCUMULATE=accumulate, BLOCK_M=bm, BLOCK_N=bn)
    return Launch(_gram_kernel, (blocks, blocks), args, meta)


_POINTER_TYPES = {torch.float32: "*fp32", torch.float64: "*fp64", torch.int16: "*i16", torch.float16: "*fp16"}


def compile_for(launch: Launch, capability: int = 90):
    """Compile ``launch``'s kernel for an NVIDIA GPU of compute ``capability`` without needing one
    (Triton ships its own ``ptxas``): what the CUDA path will run is checked on any machine."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = _compiled(launch.fn).arg_names
    signature = {}
    for name, value in zip(names[: len(launch.args)], launch.args, strict=True):
        if isinstance(value, torch.Tensor):
            signature[name] = _POINTER_TYPES[value.dtype]
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
    signature.update({name: "constexpr" for name in launch.meta})
    source = ASTSource(_compiled(launch.fn), signature, constexprs=dict(launch.meta))
    return triton.compile(source, target=GPUTarget("cuda", capability, 32))


class TritonKernels:
    """The Triton passes (see the module docstring); interpreted on CPU tensors."""

    name = "triton"

    def dots(self, rows, x, out=None):
        _checks.dots(rows, x, out)
        m, n = rows.shape
        vec = x.dim() == 1
        x2 = _operand(x.unsqueeze(1) if vec else x)
        k = x2.shape[1]
        res = (
            torch.empty((m,) if vec else (m, k), dtype=torch.float64, device=rows.device)
            if out is None
            else out
        )
        if m == 0 or k == 0:
            return res
        if n == 0:
            return res if out is not None else res.zero_()
        res2 = res.unsqueeze(1) if vec else res
        plan_dots(rows, x2, res2, out is not None, _is_interpreted(rows.device))(rows.device)
        return res

    def combine(self, rows, coeffs, out=None, out_dtype=None):
        _checks.combine(rows, coeffs, out, out_dtype)
        m, n = rows.shape
        vec = coeffs.dim() == 1
        c2 = _operand(coeffs.unsqueeze(1) if vec else coeffs)
        k = c2.shape[1]
        dtype = _checks.combine_dtype(rows, out, out_dtype)
        res = torch.empty((n,) if vec else (n, k), dtype=dtype, device=rows.device) if out is None else out
        if n == 0 or k == 0:
            return res
        if m == 0:
            return res.zero_()
        res2 = res.unsqueeze(1) if vec else res
        plan_combine(rows, c2, res2, _is_interpreted(rows.device))(rows.device)
        return res

    def block_dots(self, rows, x, block):
        nblocks = _checks.block_dots(rows, x, block)
        m, n = rows.shape
        res = torch.zeros(nblocks, m, dtype=torch.float64, device=rows.device)
        if m and n:
            x2 = _operand(x).unsqueeze(1)
            plan_dots(rows, x2, res, False, _is_interpreted(rows.device), block)(rows.device)
        return res

    def block_combine(self, rows, coeffs, block, out_dtype=None):
        _checks.block_combine(rows, coeffs, block, out_dtype)
        m, n = rows.shape
        dtype = out_dtype or _checks.default_out_dtype(rows.dtype)
        res = torch.empty(n, dtype=dtype, device=rows.device)
        if n == 0:
            return res
        if m == 0:
            return res.zero_()
        c2 = _operand(coeffs)
        plan_combine(rows, c2, res.unsqueeze(1), _is_interpreted(rows.device), block)(rows.device)
        return res

    def block_woodbury(self, rows, x, block, factor, damp, out=None):
        return two_pass_block_woodbury(self, rows, x, block, factor, damp, out)

    def gram(self, rows, out=None):
        _checks.gram(rows, out)
        m, n = rows.shape
        res = torch.empty(m, m, dtype=torch.float64, device=rows.device) if out is None else out
        if m == 0:
            return res
        if n == 0:
            return res if out is not None else res.zero_()
        plan_gram(rows, res, out is not None, _is_interpreted(rows.device))(rows.device)
        return res
