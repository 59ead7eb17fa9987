"""The README's two commands stay true: CI runs exactly the test command."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)[:2]


def test_ci_runs_exactly_the_readme_test_command():
    demo, tests = _commands()
    assert "flwr run . --stream" in demo
    assert tests.strip().splitlines()[-1] in (REPO / ".ci" / "run").read_text()


def test_pyproject_declares_the_flower_app():
    import tomllib

    conf = tomllib.loads((REPO / "pyproject.toml").read_text())
    comps = conf["tool"]["flwr"]["app"]["components"]
    assert comps == {"serverapp": "fedllm_app.server_app:app", "clientapp": "fedllm_app.client_app:app"}
    assert "overrides" in conf["tool"]["flwr"]["app"]["config"]
