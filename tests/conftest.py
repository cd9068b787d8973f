"""Test-session settings."""

from __future__ import annotations

import os

import torch

# The tests use tiny tensors: a second intra-op thread only adds spin-waiting on a 2-core machine.
torch.set_num_threads(1)
# W&B must never try the network from a test.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
