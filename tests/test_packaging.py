"""Layout: the library apart from the app, and a wheel that carries the configs."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from setuptools import find_packages

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("fisher", "optim", "callbacks", "pruning")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_is_in_the_wheel_list():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = set(find_packages(str(ROOT), include=["lightning_mfac*"]))
    # conf/ is mapped into the package; everything else must be listed, or the wheel lacks it.
    assert listed - found == {"lightning_mfac.app.conf"}
    assert found - listed == set(), f"add these to [tool.setuptools] packages: {sorted(found - listed)}"
    assert _pyproject()["tool"]["setuptools"]["package-dir"] == {"lightning_mfac.app.conf": "conf"}
    assert _pyproject()["project"]["scripts"]["mfac-train"] == "lightning_mfac.app.main:main"


#: Third-party modules the package may import without them being core dependencies, and why.
OPTIONAL_IMPORTS = {
    "datasets": "extra nlp (Hugging Face data; imported when a config asks for it)",
    "transformers": "extra nlp",
    "singd": "extra baselines",
    "pytorch_optimizer": "extra baselines",
    "triton": "ships with torch's CUDA builds; kernels='auto' falls back without it",
    "llvmlite": "numba's own compiler, installed with numba",
}


def _declared(deps: list[str]) -> set[str]:
    import re

    return {re.split(r"[<>=!~ ;\[]", dep, maxsplit=1)[0].lower().replace("_", "-") for dep in deps}


def _undeclared(paths: list[Path], declared: set[str]) -> list[str]:
    import importlib.metadata as md

    dists = md.packages_distributions()
    imported = set()
    for path in paths:
        imported |= {name.split(".")[0] for name in _imports(path)}
    third_party = sorted(m for m in imported - set(sys.stdlib_module_names) if m != "lightning_mfac")
    missing = []
    for module in third_party:
        if module in OPTIONAL_IMPORTS:
            continue
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not names & declared:
            missing.append(f"{module} (from {sorted(names)})")
    return missing


def test_the_library_needs_only_the_core_dependencies():
    """`pip install lightning-mfac` is enough for the plugin: every third-party import outside the
    app is a core dependency (or an optional one imported lazily)."""
    core = _declared(_pyproject()["project"]["dependencies"])
    paths = [p for p in (ROOT / "lightning_mfac").rglob("*.py") if "app" not in p.relative_to(ROOT / "lightning_mfac").parts]
    missing = _undeclared(paths, core)
    assert not missing, f"imported by the library but not in [project] dependencies: {missing}"


def test_the_app_needs_the_core_dependencies_and_its_extra():
    """`pip install "lightning-mfac[app]"` is enough for `mfac-train` (the README's main command);
    the main module names exactly the extra's packages it checks for."""
    from lightning_mfac.app.main import APP_PACKAGES

    project = _pyproject()["project"]
    app = _declared(project["optional-dependencies"]["app"])
    missing = _undeclared(list((ROOT / "lightning_mfac" / "app").rglob("*.py")), _declared(project["dependencies"]) | app)
    assert not missing, f"imported by the app but in neither [project] dependencies nor the app extra: {missing}"
    assert {dist for _, dist in APP_PACKAGES} == app - {"tensorboardx"}  # tensorboardX: only logger=tensorboard


def _hiding(*names: str) -> str:
    """Code that makes ``names`` look uninstalled to the interpreter it runs in: with None in
    ``sys.modules``, ``import`` fails and ``find_spec`` answers None."""
    return f"import sys\nfor name in {names!r}:\n    sys.modules[name] = None\n"


#: Packages only the app imports. torchvision and matplotlib are left out here: lightning and torchmetrics
#: probe them by their installed metadata and then import them, which hiding cannot emulate (the
#: static test above covers them).
APP_ONLY = ("hydra", "omegaconf", "wandb", "sklearn")


def test_the_plugin_works_without_the_app_extra():
    code = _hiding(*APP_ONLY) + (
        "import torch\n"
        "from lightning_mfac import MFAC, MFACPreconditioner, OBSPruning, oneshot_prune\n"
        "p = torch.nn.Parameter(torch.ones(3))\n"
        "opt = MFAC([p], lr=0.1, ngrads=2, damp=0.1)\n"
        "p.grad = torch.ones(3); opt.step()\n"
        "print(p.detach().tolist())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(v < 1.0 for v in eval(proc.stdout))  # the step moved against the gradient


def test_mfac_train_without_the_app_extra_names_it_in_one_line(tmp_path):
    code = _hiding(*APP_ONLY, "torchvision", "matplotlib") + "from lightning_mfac.app.main import main\nmain()\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == ['mfac-train: error: the app needs hydra-core, omegaconf, wandb, torchvision, scikit-learn, '
                     'matplotlib, which are not installed: pip install "lightning-mfac[app]".'], proc.stderr
    assert not list(tmp_path.iterdir())


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("sub", LIBRARY)
def test_library_imports_nothing_of_the_app(sub):
    for path in sorted((ROOT / "lightning_mfac" / sub).rglob("*.py")):
        bad = {n for n in _imports(path) if n.startswith("lightning_mfac.app") or n in ("hydra", "wandb")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_importing_the_library_pulls_in_no_app_baselines_data_or_hydra():
    code = (
        "import sys, lightning_mfac as m\n"
        "m.MFAC, m.MFACPreconditioner, m.OBSPruning, m.oneshot_prune\n"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('hydra', 'singd', 'pytorch_optimizer', 'sklearn', 'wandb')"
        " or k.startswith('lightning_mfac.app')]\n"
        "print(sorted(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


def test_wheel_carries_the_configs_and_runs_from_any_directory(tmp_path):
    """Build the real (non-editable) wheel, unpack it as site-packages, and compose the config from elsewhere."""
    pytest.importorskip("setuptools", minversion="77")
    # From a copy: setuptools reuses a build/ folder, which may hold files deleted since.
    src = tmp_path / "src"
    junk = shutil.ignore_patterns(".git", "build", "*.egg-info", ".venv", "outputs", "multirun", "__pycache__", "wandb")
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("lightning_mfac", "conf"):
        shutil.copytree(ROOT / name, src / name, ignore=junk)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = wheels.glob("lightning_mfac-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    shipped = {n.removeprefix("lightning_mfac/app/conf/") for n in names if n.startswith("lightning_mfac/app/conf/")}
    in_tree = {str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml")}
    assert shipped == in_tree
    assert "lightning_mfac/py.typed" in names
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    code = "import sys; sys.argv = ['mfac-train', '--cfg', 'job']; from lightning_mfac.app.main import main; main()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lightning_mfac.app.models.quickstart_cnn" in proc.stdout
    assert not list(elsewhere.iterdir())  # --cfg job writes nothing
