"""Capture of the steady-state dynamic step as a CUDA graph (docs/design.md, "Capture").

The step (``DynamicFisherInverse._step``) reads no device value on the host and updates every state
tensor in place, so one recording of its kernels replays correctly on later gradients: the input is
copied into a static buffer, the graph replays, the direction is copied out. What the host decides
stays outside the graph: the refactorizations (every ``refactor_every`` steps, eager, in place on the
same tensors), and guarded periods (a host read per step), which run eagerly.

The first step of a shape runs eagerly (it warms the kernels and libraries up), and the recording
happens right after it; recording executes nothing. On the CPU there is nothing to capture: the
same Python function runs eagerly, and :class:`ReplayRunner` lets a test drive the capture logic
there with a runner that re-executes the recorded function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class CudaGraphRunner:
    """Records ``fn(static_input)`` into a ``torch.cuda.CUDAGraph``; ``replay`` re-runs its kernels."""

    def __init__(self) -> None:
        self.graph: Any = None
        self.outputs: Any = None

    def record(self, fn: Callable[[torch.Tensor], Any], static_input: torch.Tensor) -> None:
        torch.cuda.synchronize(static_input.device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(static_input)

    def replay(self) -> None:
        self.graph.replay()


class ReplayRunner:
    """Stand-in for :class:`CudaGraphRunner` on the CPU: ``replay`` calls the recorded function again
    on the static input, which is what a graph replay computes. Used by tests of the capture logic."""

    def __init__(self) -> None:
        self.fn: Any = None
        self.static_input: Any = None
        self.outputs: Any = None
        self.replays = 0

    def record(self, fn: Callable[[torch.Tensor], Any], static_input: torch.Tensor) -> None:
        # Like a graph capture, recording executes nothing.
        self.fn, self.static_input = fn, static_input

    def replay(self) -> None:
        self.replays += 1
        outputs = self.fn(self.static_input)
        if self.outputs is None:
            self.outputs = outputs
        else:  # a graph writes its outputs into the memory it recorded them in: mimic that
            for old, new in zip(self.outputs, outputs, strict=True):
                old.copy_(new)


class CapturedStep:
    """``step(g) -> (direction, ok)`` through a recorded graph, re-recorded when ``g``'s dtype changes."""

    def __init__(
        self, step: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], runner_factory
    ) -> None:
        self.step, self.runner_factory = step, runner_factory
        self.runner: Any = None
        self.key: Any = None
        self.static_input: torch.Tensor | None = None

    def invalidate(self) -> None:
        self.runner, self.key, self.static_input = None, None, None

    def __call__(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (g.dtype, g.device, tuple(g.shape))
        if self.runner is None or key != self.key:
            out = self.step(g)  # eager: this is the step (and the warm-up)
            self.static_input = torch.empty_like(g)
            self.runner = self.runner_factory()
            self.runner.record(self.step, self.static_input)
            self.key = key
            return out
        self.static_input.copy_(g)
        self.runner.replay()
        direction, ok = self.runner.outputs
        return direction.clone(), ok.clone()
