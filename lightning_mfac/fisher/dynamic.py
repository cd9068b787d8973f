"""Dynamic M-FAC: the inverse empirical Fisher of a sliding window of the last ``m`` gradients.

Frantar, Kurtic & Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
Information", NeurIPS 2021, Section 4 (the dynamic algorithm), in the Gram form of
docs/design.md ("Dynamic M-FAC"):

    F = λ·I + (1/m)·GᵀG,        C = λ·I + G Gᵀ/m   (m × m, "the core"),
    F⁻¹x = (x − Gᵀ C⁻¹ (G x)/m) / λ,        F⁻¹gⱼ = Gᵀ C⁻¹ eⱼ   for a row gⱼ of G.

``G`` is a ring buffer; empty slots are zero rows and ``m`` is always the capacity. Replacing row
``j`` changes row and column ``j`` of ``C`` only: ``C⁻¹`` is updated in ``O(m²)`` (Schur downdate of
row/column ``j``, bordered insertion of the new one) and rebuilt from ``C`` every ``refactor_every``
steps. A step reads the window twice (``G g`` and one combination) and does ``O(m²)`` float64 work.

The step never reads a device value on the host (docs/design.md, "Host reads"): the slot is
``count mod m`` with ``count`` a device tensor, the new gradient is staged beside the window and
enters it through an index copy whose target (slot or "drop") is chosen on the device, and the
update of ``C⁻¹`` is checked on the device (the residual of the column the direction uses, after one
refinement step, and the finiteness of ``g``, read off ``‖g‖²``). A step that fails either check
changes nothing and returns a zero direction with its flag False -- the same contract as an AMP
overflow, so the caller's skip handles both, and no wrong direction can reach a step between two
host reads. The host reads one number per refactorization: the new ``λ``, whether the
factorization needed the eigendecomposition fallback, and whether updates were rejected. After a
period with rejections (and during the first period, while the window's conditioning is unknown)
the engine is *guarded*: it reads each step's flag and puts a rejected gradient in through a fresh
factorization, as exact as before, at one host read per step.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_mfac import _validation as check
from lightning_mfac.fisher._numerics import check_finite as check_input_finite
from lightning_mfac.fisher._numerics import compute_dtype, eig_inverse, warn_once
from lightning_mfac.fisher.capture import CapturedStep, CudaGraphRunner
from lightning_mfac.fisher.config import DAMP_MODES, DynamicConfig, WindowConfig, reject_legacy_arguments
from lightning_mfac.fisher.storage import ShardLayout, WindowStorage, make_window

__all__ = ["DAMP_MODES", "DynamicFisherInverse", "bordered_update"]
#: Largest entry of the residual ``C'x − eⱼ`` of the (refined) updated column for which the
#: ``O(m²)`` update is accepted. The residual is dimensionless and bounds the relative error of the
#: direction (times the number of rows it spreads over); beyond it the update has drifted
#: (measured before refinement: 34% error in F⁻¹g on a nearly rank-deficient window).
DRIFT_TOL = 1e-9
#: The rounding level of that residual on an ill-conditioned core, in units of ε·max|C|·max|C⁻¹|.
RESIDUAL_ROUNDING = 4.0


class DynamicFisherInverse:
    """Sliding-window inverse empirical Fisher with ``update``/``mul``/``update_mul``.

    Args:
        dim: number of coordinates ``d``.
        ngrads: window size ``m`` (the capacity; the Fisher always divides by it).
        damp: dampening: ``λ`` itself (``damp_mode="absolute"``), or the factor ``δ`` of
            ``λ = δ·mean(diag GGᵀ)/m`` (``damp_mode="relative"``), which follows the scale of the
            gradients; it is recomputed on the device at every refactorization (and at calls
            1, 2, 4, … while the window fills), and is ``δ`` while the window is empty.
            Default ``1e-5``.
        device: compute device (default CPU). Inputs must live there.
        window: how the window is stored and multiplied (:class:`~lightning_mfac.fisher.config.WindowConfig`
            or a mapping of its fields): dtype (default float32), storage, page geometry,
            ``refactor_every`` (default ``m``), kernels, ``capture`` (CUDA graph of the steady-state
            step; docs/design.md, "Capture") and process group.
        damp_mode: ``"absolute"`` (default) or ``"relative"``.
        config: all of ``ngrads``, ``damp``, ``damp_mode`` and ``window`` as one
            :class:`~lightning_mfac.fisher.config.DynamicConfig` (or a mapping of its fields), in
            place of those four arguments.
        layout: for parameters sharded by FSDP2: which coordinates of the whole ``parameters_to_vector``
            each rank holds (:class:`~lightning_mfac.fisher.storage.ShardLayout`); ``dim`` is then
            this rank's share, every vector in and out is this rank's local vector, and the window
            is a :class:`~lightning_mfac.fisher.storage.LocalShardWindow` (one all-reduce of the
            dots and of the Gram per step).
    """

    def __init__(
        self,
        dim: int,
        ngrads: int | None = None,
        damp: float | None = None,
        device: torch.device | str | None = None,
        *,
        window: WindowConfig | dict[str, Any] | None = None,
        damp_mode: str | None = None,
        config: DynamicConfig | dict[str, Any] | None = None,
        layout: ShardLayout | None = None,
        **legacy: Any,
    ) -> None:
        reject_legacy_arguments("DynamicFisherInverse", legacy)
        loose = {"ngrads": ngrads, "damp": damp, "damp_mode": damp_mode, "window": window}
        given = {k: v for k, v in loose.items() if v is not None}
        if config is not None and given:
            raise TypeError(f"DynamicFisherInverse() takes config= or {sorted(given)}, not both.")
        if config is None and ngrads is None:
            raise TypeError("DynamicFisherInverse() missing the window size: pass ngrads= or config=DynamicConfig(...).")
        cfg = DynamicConfig.coerce(config) if config is not None else DynamicConfig(**given)
        self.dim = check.positive_int("dim", dim)
        if cfg.window.dtype is None:  # settled here, once: the engine's config says what its window holds
            cfg = cfg.replace(window=cfg.window.replace(dtype=torch.float32))
        self.config = cfg
        self.dtype = self.config.window.dtype
        self.refactor_every = self.config.window.refactor_every or self.ngrads
        self.device = torch.device("cpu" if device is None else device)
        self.window: WindowStorage = make_window(self.config.window, self.ngrads, self.dim, self.device, layout)
        self.storage = type(self.window).__name__
        self.cdtype = compute_dtype(self.dtype)
        m, dev, f64 = self.ngrads, self.device, torch.float64
        # Persistent device state, updated in place (so a captured step replays on it). The core
        # and its inverse carry a zero row/column m for the staged gradient: every vector of the
        # step has m + 1 entries and the staged row's coefficient comes out of the same algebra.
        self.core = torch.zeros(m + 1, m + 1, dtype=f64, device=dev)
        self.core_inverse = torch.zeros(m + 1, m + 1, dtype=f64, device=dev)
        self._count = torch.zeros(1, dtype=torch.long, device=dev)
        # Finite gradients seen, and how many of them were not stored at the last refactor.
        self._finite_count = torch.zeros(1, dtype=torch.long, device=dev)
        self._reported = torch.zeros(1, dtype=torch.long, device=dev)
        self._lam_t = torch.zeros((), dtype=f64, device=dev)
        self._drift_tol = torch.full((), DRIFT_TOL, dtype=f64, device=dev)
        # Constants and work buffers of the step.
        self._arange = torch.arange(m + 1, device=dev)
        self._scale = torch.full((m + 1,), 1.0 / m, dtype=f64, device=dev)
        self._scale[m] = 0.0
        self._drop = torch.tensor(m, device=dev)
        self._zero_coeffs = torch.zeros((), dtype=f64, device=dev)
        self._onehot = torch.zeros(m + 1, dtype=f64, device=dev)
        self._column = torch.zeros(m + 1, dtype=f64, device=dev)
        self._column_row, self._column_col = self._column.view(1, m + 1), self._column.view(m + 1, 1)
        self._dots = torch.zeros(m + 1, dtype=f64, device=dev)
        self._staged_norm = self._dots[m]
        self.finite = torch.ones((), dtype=torch.bool, device=dev)
        self.captured = self._capture_mode() == "cuda_graph"
        self._captured_step = CapturedStep(self._flagged_step, CudaGraphRunner)
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Empty the window: F = λ·I again (λ = δ in relative mode until the window has gradients)."""
        m = self.ngrads
        self.window.zero_()
        self._set_lambda(self.damp)
        self.core.zero_()
        self.core[:m, :m].diagonal().fill_(self.lam)
        self.core_inverse.zero_()
        self.core_inverse[:m, :m].diagonal().fill_(1.0 / self.lam)
        self._count.zero_()
        self._finite_count.zero_()
        self._reported.zero_()
        self._drift_tol.fill_(DRIFT_TOL)
        self.finite.fill_(True)
        # The first refactor period is guarded: a window's conditioning is unknown until then.
        self._guarded = True
        self._rejections = 0
        self.calls = 0
        self._since_refactor = 0

    def _capture_mode(self) -> str:
        mode = self.config.window.capture
        if mode == "auto":
            resident = self.storage == "DeviceWindow"
            mode = "cuda_graph" if self.device.type == "cuda" and resident else "off"
        elif mode == "cuda_graph" and self.storage != "DeviceWindow":
            raise ValueError(
                f"capture='cuda_graph' needs a window on the device, got storage {self.storage}: "
                "paged and sharded steps read pages or talk to other ranks; use capture='auto' or 'off'."
            )
        return mode

    def _flagged_step(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The steady-state step as a function of ``g`` alone: what a capture records."""
        direction = self._step(g, want_direction=True)
        return direction, self.finite

    @property
    def ngrads(self) -> int:
        """The window size ``m``."""
        return self.config.ngrads

    @property
    def damp(self) -> float:
        """``λ`` (absolute mode) or the factor ``δ`` (relative mode): see :meth:`set_damp`."""
        return self.config.damp

    @property
    def damp_mode(self) -> str:
        return self.config.damp_mode

    def set_damp(self, damp: float, damp_mode: str | None = None) -> None:
        """Use another dampening from now on, keeping the window: ``C = λI + K/m`` is rebuilt from
        the window's Gram ``K`` (which does not depend on ``λ``) and refactorized (in relative mode
        the refactorization derives ``λ`` from ``δ``). Checked like the constructor's ``damp``."""
        self.config = self.config.replace(damp=damp, damp_mode=self.damp_mode if damp_mode is None else damp_mode)
        if self.damp_mode == "absolute":
            self._set_lambda(self.damp)
        self._rebuild_core()

    def _rebuild_core(self) -> None:
        """``C = λI + K/m`` from the window itself, then a fresh factorization."""
        m = self.ngrads
        self.core[:m, :m] = self.window.gram() / m
        self.core[:m, :m].diagonal().add_(self.lam)
        self._refactor(check_drift=False)

    def _set_lambda(self, lam: float) -> None:
        self.lam = float(lam)
        self._lam_t.fill_(self.lam)

    @property
    def count(self) -> torch.Tensor:
        """Gradients stored so far (a device tensor: reading it on the host synchronizes)."""
        return self._count[0]

    @property
    def slot(self) -> torch.Tensor:
        """The slot the next gradient replaces (device tensor)."""
        return self._count[0] % self.ngrads

    @property
    def filled(self) -> torch.Tensor:
        """Number of window slots that hold a gradient (device tensor)."""
        return self._count[0].clamp(max=self.ngrads)

    @property
    def rejected(self) -> torch.Tensor:
        """Finite gradients that were not stored because their O(m²) update failed its check."""
        return self._finite_count[0] - self._count[0]

    @property
    def gram(self) -> torch.Tensor:
        """``K = G Gᵀ`` (float64 ``(m, m)``), from the core ``C = λI + K/m``."""
        m = self.ngrads
        k = self.core[:m, :m] - self.lam * torch.eye(m, dtype=torch.float64, device=self.device)
        return k * m

    @property
    def damped_gram_inverse(self) -> torch.Tensor:
        """``S⁻¹ = (mλI + GGᵀ)⁻¹ = C⁻¹/m`` (float64 ``(m, m)``)."""
        m = self.ngrads
        return self.core_inverse[:m, :m] / m

    def state_dict(self) -> dict[str, Any]:
        return {
            "dim": self.window.dim,  # the whole vector's (this rank's share: the window's state says)
            "ngrads": self.ngrads,
            "damp": self.damp,
            "damp_mode": self.damp_mode,
            "lam": self.lam,
            "dtype": str(self.dtype).replace("torch.", ""),
            "window": self.window.state_dict(),
            "core": self.core.cpu().clone(),
            "core_inverse": self.core_inverse.cpu().clone(),
            "count": int(self._count[0]),
            "finite_count": int(self._finite_count[0]),
            "reported": int(self._reported[0]),
            "drift_tol": float(self._drift_tol),
            "guarded": self._guarded,
            "rejections": self._rejections,
            "calls": self.calls,
            "since_refactor": self._since_refactor,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, have in (("dim", self.window.dim), ("ngrads", self.ngrads)):
            if state[key] != have:
                raise ValueError(
                    f"state_dict[{key!r}]={state[key]} does not match this inverse ({key}={have}): "
                    "the window must be restored into an inverse of the same shape."
                )
        self.config = self.config.replace(damp=float(state["damp"]), damp_mode=state.get("damp_mode", "absolute"))
        if "drift_tol" in state:
            self._drift_tol.fill_(float(state["drift_tol"]))
            self._guarded, self._rejections = bool(state["guarded"]), int(state["rejections"])
        self.window.load_state_dict(state["window"], shard_dir=self.config.window.shard_dir)
        if "core" not in state:
            self._load_legacy(state)
            return
        self._set_lambda(state["lam"])
        self.core.copy_(state["core"])
        self.core_inverse.copy_(state["core_inverse"])
        self._count.fill_(int(state["count"]))
        self._finite_count.fill_(int(state["finite_count"]))
        self._reported.fill_(int(state["reported"]))
        self.calls = int(state["calls"])
        self._since_refactor = int(state["since_refactor"])

    def _load_legacy(self, state: dict[str, Any]) -> None:
        """A checkpoint of the earlier layout (Gram and S⁻¹ of the m slots): rebuild the core."""
        m = self.ngrads
        self._set_lambda(self.damp)
        self.core.zero_()
        self.core[:m, :m] = state["gram"].to(self.device, torch.float64) / m
        self.core[:m, :m].diagonal().add_(self.lam)
        self._count.fill_(int(state["count"]))
        self._finite_count.copy_(self._count)
        self._reported.zero_()
        self.calls = int(state["count"])
        self._refactor(check_drift=False)
        self._since_refactor = int(state.get("since_refactor", 0))

    # ------------------------------------------------------------------ public API
    def update(self, g: torch.Tensor, *, return_finite: bool = False) -> torch.Tensor | None:
        """Put ``g`` into the window, replacing the oldest gradient.

        A non-finite ``g`` raises ``ValueError`` (one host read, to check); with
        ``return_finite=True`` there is no host read: it is skipped and the returned 0-d device bool
        says whether ``g`` was stored (as for :meth:`update_mul`)."""
        g = self._as_vector(g, "g", finite=not return_finite)
        self._step(g, want_direction=False)
        self._after_step()
        return self.finite if return_finite else None

    def mul(self, x: torch.Tensor, *, check_finite: bool = True) -> torch.Tensor:
        """``F⁻¹ x`` for ``x`` of shape ``(d,)`` or ``(d, k)``. ``check_finite=False`` skips the
        inf/NaN check of ``x`` (its one host read); a non-finite ``x`` then gives a non-finite result."""
        check.float_tensor("x", x, (1, 2))
        self._check_shape_device(x, "x")
        if check_finite:
            check_input_finite("x", x)
        m = self.ngrads
        x64 = x.detach().to(torch.float64)
        u = self.window.dots(x64)
        # F⁻¹x = x/λ − Gᵀ C⁻¹ (G x)/(mλ): the combination accumulates in float64 and the sum
        # with x/λ is taken in float64 before the one rounding.
        coeffs = (self.core_inverse[:m, :m] @ u) * (-1.0 / (m * self.lam))
        out = self.window.combine(coeffs, out_dtype=torch.float64).add_(x64, alpha=1.0 / self.lam)
        return out.to(self._out_dtype(x))

    def update_mul(
        self,
        g: torch.Tensor,
        *,
        skip_nonfinite: bool = False,
        return_finite: bool = False,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor | None | tuple[torch.Tensor, torch.Tensor]:
        """``update(g)``, then ``F⁻¹ĝ`` for ``ĝ``, ``g`` as stored in the window: two reads of the window.

        For float32 and float64 windows ``ĝ = g``. A bfloat16 window stores ``ĝ = bf16(g)`` and the
        result is ``F⁻¹ĝ``: ``g − ĝ`` lies almost entirely outside the window's span, where ``F⁻¹`` is
        ``1/λ``, so ``F⁻¹g`` would be dominated by the quantization noise amplified by ``1/λ``.

        A non-finite ``g`` is never stored:

        * default: ``ValueError`` (one host read, to check);
        * ``return_finite=True``: returns ``(direction, ok)`` with no host read. ``ok`` is a 0-d device
          bool, False when ``g`` was not finite or its O(m²) update failed its check (rare; see the
          module docstring); then nothing was stored and the direction is zero: hand ``ok`` to an
          AMP scaler or an optimizer's skip. The flag is also kept as ``self.finite``.
        * ``skip_nonfinite=True``: returns ``None`` instead of a direction when ``ok`` is False (one
          host read per step).

        ``out``: a contiguous ``(d,)`` float32 or float64 tensor to write the direction into
        (rounded once to its dtype) instead of a new one.
        """
        g = self._as_vector(g, "g", finite=not (skip_nonfinite or return_finite))
        if out is not None and (out.shape != (self.dim,) or out.device != self.device
                                or out.dtype not in (torch.float32, torch.float64) or not out.is_contiguous()):
            raise ValueError(
                f"out has shape {tuple(out.shape)}, dtype {out.dtype}, device {out.device}: expected a contiguous "
                f"float32 or float64 tensor of shape ({self.dim},) on {self.device}."
            )
        if self.captured and not self._guarded:
            direction, self.finite = self._captured_step(g)
            if out is not None:
                direction = out.copy_(direction)
        else:
            direction = self._step(g, want_direction=True, out=out)
        self._after_step()
        if return_finite:
            return direction, self.finite
        if skip_nonfinite and not bool(self.finite):
            return None
        return direction

    def mask_coordinates(self, keep: torch.Tensor) -> None:
        """Zero the coordinates where ``keep`` is False in every stored gradient (after pruning) and
        refactor, so the window no longer carries them."""
        if keep.shape != (self.dim,):
            raise ValueError(f"keep has shape {tuple(keep.shape)}: expected ({self.dim},).")
        self.window.mask_columns(keep.to(torch.bool))
        self._rebuild_core()

    # ------------------------------------------------------------------ the step
    def _step(
        self, g: torch.Tensor, want_direction: bool, out: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """One window update (and direction) with no host read; every state tensor is updated in
        place. Op by op this is what docs/design.md ("The dynamic step") derives."""
        m = self.ngrads
        window, core, inv = self.window, self.core, self.core_inverse
        window.stage(g)
        self._dots.zero_()
        window.staged_dots(self._dots)  # [G ĝ; ĝ·ĝ]
        u = torch.mul(self._dots, self._scale)  # column j of the new core, without its diagonal
        diag = torch.add(self._lam_t, self._staged_norm, alpha=1.0 / m)  # λ + ‖ĝ‖²/m
        # ‖ĝ‖² ≥ 0 is +inf or NaN exactly when ĝ is not finite: one comparison checks all of g.
        finite = torch.lt(diag, math.inf)
        slot = torch.remainder(self._count, m)
        e = torch.eq(self._arange, slot, out=self._onehot)
        new_inv, new_core, x, ok = bordered_update(
            inv, core, u, diag, e, slot, self._column, self._column_row, self._column_col, self._drift_tol
        )
        accept = torch.logical_and(ok, finite)
        torch.where(accept, new_inv, inv, out=inv)
        torch.where(accept, new_core, core, out=core)
        window.commit(torch.where(accept, slot, self._drop))
        self._count.add_(accept)
        self._finite_count.add_(finite)
        if self._guarded and self._insert_rejected(accept, finite, slot):
            # The gradient went in through a fresh factorization: F⁻¹gⱼ = Gᵀ C⁻¹ eⱼ exactly.
            x = torch.mv(self.core_inverse, e)
            accept = finite
        self.finite = accept
        if not want_direction:
            return None
        # x's staged entry is exactly 0 (the staged row's core row and column are), and the new
        # gradient is in its slot now: the direction is a combine of the m window rows. The window
        # only ever holds finite rows, so zeroing the m + 1 coefficients of a rejected step zeroes
        # the direction exactly, without a pass over d.
        coeffs = torch.where(accept, x, self._zero_coeffs)[:m]
        if out is None:
            return window.combine(coeffs, out_dtype=self.cdtype)
        return window.combine(coeffs, out=out)

    def _insert_rejected(self, accept: torch.Tensor, finite: torch.Tensor, slot: torch.Tensor) -> bool:
        """Guarded mode (the first refactor period, and any period after one in which updates were
        rejected): read the outcome on the host, and put a finite gradient whose O(m²) update was
        rejected into the window anyway, through a fresh factorization. One host read per step."""
        if int(accept.long() + 2 * finite.long()) != 2:
            return False
        self.window.commit(slot)
        self.core.index_copy_(0, slot, self._column_row)
        self.core.index_copy_(1, slot, self._column_col)
        self._count.add_(1)
        self._rejections += 1
        self._refactor(check_drift=False, reset_period=False)
        return True

    def _after_step(self) -> None:
        self.calls += 1
        self._since_refactor += 1
        # While the window fills, refactor at calls 1, 2, 4, …: the relative λ and the residual
        # tolerance follow the first gradients (a few host reads, before the steady state).
        warming = self.calls < self.ngrads and _power_of_two(self.calls)
        if self._since_refactor >= self.refactor_every:
            self._refactor()
        elif warming:
            self._refactor(keep_guard=True)

    def _refactor(
        self, check_drift: bool = True, reset_period: bool = True, keep_guard: bool = False
    ) -> None:
        """Fresh ``C⁻¹`` from ``C`` (and, in relative mode, a fresh ``λ``): Cholesky on the device,
        then one host read that carries the new ``λ``, whether the factorization succeeded and
        whether updates were rejected since the last read (then the next period is guarded)."""
        m = self.ngrads
        c = self.core[:m, :m]
        if self.damp_mode == "relative":
            trace = torch.diagonal(c).sum() - m * self.lam  # trace(K)/m
            lam = torch.where(trace > 0, self.damp * trace / m, torch.full_like(trace, self.damp))
            c.diagonal().add_(lam - self.lam)
        else:
            lam = self._lam_t.clone()
        factor, info = torch.linalg.cholesky_ex(c)
        eye = torch.eye(m, dtype=torch.float64, device=self.device)
        fresh = torch.cholesky_solve(eye, factor)
        # Every pivot of C = λI + K/m is ≥ λ in exact arithmetic: a smaller one is rounding noise
        # (a nearly singular window with λ below its rounding level), as is a failed factorization.
        pivots = torch.diagonal(factor).square().amin()
        ok = (info == 0) & (pivots >= 0.5 * lam) & torch.isfinite(fresh).all()
        # Finite gradients not stored since the last read: their O(m²) update failed the check.
        rejected = self._finite_count - self._count
        trouble = (rejected > self._reported)[0] if check_drift else torch.zeros_like(ok)
        self._reported.copy_(rejected)
        report = torch.where(ok, torch.where(trouble, -lam, lam), torch.full_like(lam, math.nan))
        value = float(report)  # the one host read of a refactor period
        if math.isnan(value):
            warn_once(
                "M-FAC: Cholesky factorization of the damped Gram matrix hit a non-positive pivot "
                "(rounding on a nearly singular window); falling back to an eigendecomposition with "
                "eigenvalues clamped at the dampening bound."
            )
            lam_value = float(lam)
            fresh = eig_inverse(c, lam_value)
        else:
            lam_value = abs(value)
        if reset_period:
            trouble = value < 0 or self._rejections > 0
            if trouble:
                warn_once(
                    "M-FAC: the O(m²) inverse update lost accuracy (nearly singular window); the next "
                    "refactor period checks every step on the host and refactors where an update fails."
                )
            # Warm-up refactors only ever switch the guard on: the first full period stays guarded.
            self._guarded = trouble or (keep_guard and self._guarded)
            self._rejections = 0
        self.core_inverse[:m, :m] = 0.5 * (fresh + fresh.t())
        # Residuals of this core cannot be computed below ~ε·max|C|·max|C⁻¹| (its condition):
        # on a nearly singular window the check accepts down to that level rather than rejecting all.
        floor = RESIDUAL_ROUNDING * torch.finfo(torch.float64).eps
        level = torch.diagonal(c).max() * self.core_inverse[:m, :m].abs().max() * floor
        torch.clamp(level, min=DRIFT_TOL, out=self._drift_tol)
        if lam_value != self.lam:
            self._set_lambda(lam_value)
        self._since_refactor = 0

    # ------------------------------------------------------------------ inputs
    def _out_dtype(self, x: torch.Tensor) -> torch.dtype:
        return torch.promote_types(x.dtype, torch.float32)

    def _check_shape_device(self, x: torch.Tensor, name: str) -> None:
        if x.shape[0] != self.dim:
            raise ValueError(f"{name} has shape {tuple(x.shape)}: expected first dimension d={self.dim}.")
        if x.device != self.device:
            raise ValueError(f"{name} is on {x.device}: expected the inverse's device {self.device}.")

    def _as_vector(self, g: torch.Tensor, name: str, finite: bool) -> torch.Tensor:
        check.float_tensor(name, g, (1,))
        self._check_shape_device(g, name)
        if finite:
            check_input_finite(name, g)
        return g.detach() if g.requires_grad else g


def bordered_update(
    inv: torch.Tensor,
    core: torch.Tensor,
    u: torch.Tensor,
    diag: torch.Tensor,
    e: torch.Tensor,
    slot: torch.Tensor,
    col: torch.Tensor,
    col_row: torch.Tensor,
    col_col: torch.Tensor,
    drift_tol: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace row/column ``slot`` of the core ``C`` by ``u`` (with ``C[j, j] = diag``) and update
    ``C⁻¹`` in O(m²), without host reads or branches (``torch.compile(fullgraph=True)`` captures it).

    Schur downdate of row/column ``j`` (``R = C⁻¹ − p pᵀ/pⱼ``, ``p = C⁻¹eⱼ``), then bordered
    insertion of the new column (``s = diag − uᵀ R u``, ``x = (eⱼ − R u)/s``,
    ``C'⁻¹ = R + s·x xᵀ``). ``x`` is column ``j`` of the new inverse, i.e. the coefficients of
    ``F⁻¹gⱼ = Gᵀx``; it is returned after one step of iterative refinement with ``C'⁻¹`` itself
    (``x ← x − C'⁻¹(C'x − eⱼ)``), which removes the error that the O(m²) update accumulates on an
    ill-conditioned core as long as ``C'⁻¹`` is still a contraction-grade approximate inverse.
    The check: the residual ``C'x − eⱼ`` of the refined ``x`` (dimensionless: ``eⱼ`` has unit
    size, and the relative error of ``F⁻¹gⱼ = Gᵀx`` is of that order) is at most ``drift_tol`` in
    every entry -- False also for any NaN. ``drift_tol`` (a device scalar) is ``DRIFT_TOL`` or the
    rounding level of such a residual on this core, if larger (set at each refactorization).
    ``col`` is a work buffer of ``m + 1`` entries, ``col_row``/``col_col`` its ``(1, m+1)`` and
    ``(m+1, 1)`` views.
    Returns the new inverse, the new core, the refined ``x`` and the check.
    """
    p = torch.mv(inv, e)
    q = torch.div(p, torch.dot(p, e))
    reduced = torch.addr(inv, q, p, alpha=-1)
    ra = torch.mv(reduced, u)
    neg_s = torch.sub(torch.dot(u, ra), diag)
    v = torch.sub(ra, e)
    x = torch.div(v, neg_s)
    new_inv = torch.addr(reduced, v, x, alpha=-1)
    torch.lerp(u, diag, e, out=col)  # u with diag at j (e is a 0/1 one-hot: exact)
    new_core = core.index_copy(0, slot, col_row).index_copy(1, slot, col_col)
    refined = torch.addmv(x, new_inv, torch.addmv(e, new_core, x, beta=-1), alpha=-1)
    residual = torch.addmv(e, new_core, refined, beta=-1)
    ok = torch.le(torch.linalg.vector_norm(residual, math.inf), drift_tol)
    return new_inv, new_core, refined, ok


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
