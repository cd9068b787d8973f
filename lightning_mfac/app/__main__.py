"""``python -m lightning_mfac.app``: the same as ``mfac-train``."""

from lightning_mfac.app.main import main

main()
