"""The ``mfac-train`` command.

The library installs with torch, lightning and numba; the app needs its extra
(``pip install "lightning-mfac[app]"``: Hydra, W&B, torchvision, scikit-learn, matplotlib). This
module imports none of them, so a missing one is named in one line instead of an ImportError.
"""

from __future__ import annotations

import importlib.util
import os
import sys

#: What the app imports that the library does not: (module, distribution).
APP_PACKAGES = (
    ("hydra", "hydra-core"),
    ("omegaconf", "omegaconf"),
    ("wandb", "wandb"),
    ("torchvision", "torchvision"),
    ("sklearn", "scikit-learn"),
    ("matplotlib", "matplotlib"),
)


def missing_app_packages() -> list[str]:
    """Distributions of the ``app`` extra that are not installed."""
    return [dist for module, dist in APP_PACKAGES if importlib.util.find_spec(module) is None]


def main() -> None:
    missing = missing_app_packages()
    if missing:
        print(f"mfac-train: error: the app needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
              'not installed: pip install "lightning-mfac[app]".', file=sys.stderr, flush=True)
        raise SystemExit(2)
    from lightning_mfac.app.run import hydra_main

    try:
        hydra_main()
    except BrokenPipeError:  # `mfac-train --help | head`: the reader left; no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None  # 128 + SIGPIPE, as a shell reports it


if __name__ == "__main__":
    main()
