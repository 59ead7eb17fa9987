"""The layers of pyproject.toml's import-linter contracts hold, and the contracts do catch an upward import."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("fedllm_app", "evaluation", "strategies")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """Run import-linter on the packages under ``root`` (they come first on the import path)."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    env = {"PYTHONPATH": str(root), "PATH": str(Path(sys.executable).parent)}
    return subprocess.run(
        [exe, "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )


def copy_tree(tmp_path: Path) -> Path:
    for name in PACKAGES:
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_import_contracts_hold():
    out = lint_imports(REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_a_strategy_importing_the_app_breaks_the_layers(tmp_path):
    root = copy_tree(tmp_path)
    target = root / "strategies" / "fedavg.py"
    target.write_text(target.read_text() + "\nfrom fedllm_app.config import ConfigError  # noqa\n")
    out = lint_imports(root)
    assert out.returncode != 0
    assert "strategies.fedavg -> fedllm_app.config" in out.stdout


def test_the_data_pipeline_importing_a_later_step_breaks_the_flow(tmp_path):
    root = copy_tree(tmp_path)
    target = root / "fedllm_app" / "data" / "catalogue.py"
    target.write_text(target.read_text() + "\nfrom fedllm_app.data import pipeline  # noqa\n")
    out = lint_imports(root)
    assert out.returncode != 0
    assert "fedllm_app.data.catalogue -> fedllm_app.data.pipeline" in out.stdout
