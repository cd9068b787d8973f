"""A ``TorchDispatchMode`` that counts what a piece of code costs: aten ops, host reads of device
values, external kernel launches and the largest tensor it allocates.

Shared by the tests that hold the engine, the optimizer and the callbacks to their budgets:

    with DispatchCounter() as c:
        inv.update_mul(g)
    assert c.host_reads == 0 and c.ops + c.launches <= 40

* ``ops``: top-level aten ops (views included: each is a dispatch; ops that a kernel runs inside are
  not seen, as the mode is switched off while an op executes).
* ``host_reads``: ``aten._local_scalar_dense`` (every ``.item()``, ``bool()``, ``float()``, ``int()``
  of a tensor) plus ``aten.is_nonzero`` and ``aten.equal``, which return a host value. ``tolist()``
  and ``numpy()`` bypass the dispatcher and are not seen: the code under test must not use them.
* ``launches``: calls of kernels that bypass aten (fused CPU or Triton window passes), registered
  through :func:`count_launches` or :meth:`DispatchCounter.launch`. While a launch runs, its own
  aten ops (e.g. the reference path's tiles) are not counted as ops, but their allocations still
  count for ``largest_bytes``.
* ``largest_bytes`` / ``largest``: the biggest fresh storage an op returned (outputs that alias an
  input, i.e. views and in-place results, allocate nothing and are skipped).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
HOST_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default}


def _storage_ptr(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # meta, sparse, functional wrappers
        return None


class DispatchCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.op_counts: Counter[str] = Counter()
        self.host_reads = 0
        self.launches = 0
        self.launch_counts: Counter[str] = Counter()
        self.largest_bytes = 0
        self.largest: str = ""
        self._paused = 0

    @property
    def ops(self) -> int:
        return sum(self.op_counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in HOST_READS:
            self.host_reads += 1
        if not self._paused:
            self.op_counts[str(func.overloadpacket.__name__)] += 1
        inputs = {_storage_ptr(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and _storage_ptr(t) not in inputs:
                nbytes = t.untyped_storage().nbytes() if _storage_ptr(t) is not None else 0
                if nbytes > self.largest_bytes:
                    self.largest_bytes = nbytes
                    self.largest = f"{func} -> {tuple(t.shape)} {t.dtype}"
        return out

    @contextlib.contextmanager
    def launch(self, name: str) -> Iterator[None]:
        """Count one external kernel launch named ``name``; aten ops inside are not counted as ops."""
        self.launches += 1
        self.launch_counts[name] += 1
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def summary(self) -> str:
        top = ", ".join(f"{k}×{v}" for k, v in self.op_counts.most_common())
        return (
            f"{self.ops} ops + {self.launches} launches ({dict(self.launch_counts)}), "
            f"{self.host_reads} host reads, largest {self.largest_bytes} B ({self.largest}); ops: {top}"
        )


class _CountingKernels:
    """Proxy of a window-kernels object whose passes each count as one launch."""

    def __init__(self, inner: Any, counter: DispatchCounter) -> None:
        self._inner, self._counter = inner, counter
        self.name = inner.name

    def __getattr__(self, item: str) -> Any:
        attr = getattr(self._inner, item)
        if item not in ("dots", "combine", "gram") or not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            with self._counter.launch(item):
                return attr(*args, **kwargs)

        return counted


def count_launches(kernels: Any, counter: DispatchCounter) -> Any:
    """Wrap a kernels object (``resolve_kernels(...)``) so each ``dots``/``combine``/``gram`` call
    counts as one launch of ``counter``."""
    return _CountingKernels(kernels, counter)
