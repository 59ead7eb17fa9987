"""What pyproject.toml promises a fresh install: every package and library declared, conf/ inside the wheel."""

import ast
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
OWN = {"fedllm_app", "evaluation", "strategies"}


def _name(requirement: str) -> str:
    for sep in "[<>=!~; ":
        requirement = requirement.split(sep, 1)[0]
    return requirement.lower().replace("_", "-")


def declared() -> set[str]:
    project = PYPROJECT["project"]
    names = {_name(r) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        names |= {_name(r) for r in extra}
    return names


def imported_top_level_modules() -> set[str]:
    found = set()
    for package in OWN:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module.split(".")[0])
    return found - OWN - set(sys.stdlib_module_names) - {"__future__"}


def test_every_package_folder_is_listed():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for name in OWN for p in (REPO / name).rglob("__init__.py")}
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"
    assert listed - on_disk == {"fedllm_app.conf"}


def test_every_imported_library_is_a_declared_dependency():
    distributions = packages_distributions()
    missing = {}
    for module in sorted(imported_top_level_modules()):
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not names & declared():
            missing[module] = sorted(names)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_python_and_the_internals_we_patch_are_bounded():
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    deps = {_name(r): r for r in PYPROJECT["project"]["dependencies"]}
    for lib in ("flwr", "transformers", "peft", "trl"):
        assert "<" in deps[lib], f"{lib} needs an upper bound: {deps[lib]}"


@pytest.mark.slow
def test_the_wheel_ships_conf_and_finds_it_without_the_source_tree(tmp_path):
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)], check=True)
    wheel = next(tmp_path.glob("fedllm-*.whl"))
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    code = (
        "import fedllm_app, fedllm_app.config as c; cfg = c.load_config({}); "
        "print(fedllm_app.__file__); print(c.conf_dir()); "
        "print(cfg.strategy.name, ','.join(c.group_options('strategy')))"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=elsewhere, env={"PYTHONPATH": str(site)}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    package_file, conf, strategies = out.stdout.strip().splitlines()
    assert Path(package_file).is_relative_to(site) and Path(conf) == site / "fedllm_app" / "conf"
    assert strategies.startswith("fedavg ") and "scaffold" in strategies
    assert not (site / "conf").exists(), "conf/ must not be installed as a top-level package"
