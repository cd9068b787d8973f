"""The experiment app around the library: ``mfac-train`` (Hydra), its Lightning tasks, data modules,
models and the baseline-optimizer adapters. Nothing in the library imports this package."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> Path:
    """The Hydra config directory: the wheel's copy inside this package, else the source tree's ``conf/``."""
    installed = Path(__file__).resolve().with_name("conf")
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parents[2] / "conf"
