"""Test-session settings."""

from __future__ import annotations

import os

import pytest
import torch
from references import correlated_gradients, dense_fisher_inverse

# The tests use tiny tensors: a second intra-op thread only adds spin-waiting on a 2-core machine.
torch.set_num_threads(1)
# W&B must never try the network from a test.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


# ---------------------------------------------------------------------- float64 references
# One copy of each reference for every test file (use the fixtures, which hand out the functions).


@pytest.fixture
def dense_inverse():
    """``dense_inverse(grads, damp, block_size=None)``: the float64 dense ``F⁻¹``."""
    return dense_fisher_inverse


@pytest.fixture
def correlated_grads():
    """``correlated_grads(n, d, seed=0, dtype=torch.float64)``: training-like gradient rows."""
    return correlated_gradients
