"""The deployment harness's pure parts: node-config quoting as Flower parses it, argument checks."""

import pytest
from flwr.common.config import parse_config_args

from fedllm_app.ops.deploy import Deployment, node_config_arg


def test_node_config_survives_flowers_parser():
    config = {"partition-id": 1, "num-partitions": 2, "data-path": "/data/my file.jsonl", "lr": 0.5, "dp": True}
    assert parse_config_args([node_config_arg(config)]) == config


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="SuperNode authentication needs TLS"):
        Deployment(tmp_path, auth=True)
    with pytest.raises(ValueError, match="isolation='warm' must be one of subprocess, inline, fork"):
        Deployment(tmp_path, isolation="warm")


def test_tls_deployment_writes_certificates_and_a_connection(tmp_path):
    dep = Deployment(tmp_path, tls=True, auth=True)
    assert (tmp_path / "certs" / "ca.crt").is_file() and (tmp_path / "certs" / "server.pem").is_file()
    toml = (tmp_path / "flwr-home" / "config.toml").read_text()
    assert f'address = "{dep.address}"' in toml and f'root-certificates = "{dep.ca}"' in toml
    assert "insecure" not in toml.split("[superlink.fedllm-deploy]")[1]
    assert "--enable-supernode-auth" in dep.superlink_command()
    node = dep.supernode_command({"partition-id": 0}, key=tmp_path / "k", tls=False)
    assert "--insecure" in node and "--root-certificates" not in node


def test_the_app_folder_is_this_checkout_else_the_current_folder_else_a_clear_error(tmp_path, monkeypatch):
    from fedllm_app.ops import flower_run

    assert flower_run.app_dir() == flower_run.REPO  # the tests run from a checkout
    installed = tmp_path / "site-packages"
    installed.mkdir()
    monkeypatch.setattr(flower_run, "REPO", installed)  # as in a non-editable install
    checkout = tmp_path / "fedllm"
    checkout.mkdir()
    (checkout / "pyproject.toml").write_text('[project]\nname = "fedllm"\n\n[tool.flwr.app]\npublisher = "x"\n')
    assert flower_run.app_dir(cwd=checkout) == checkout
    with pytest.raises(RuntimeError, match="run from the fedllm source folder"):
        flower_run.app_dir(cwd=tmp_path)


def test_a_run_that_timed_out_reports_which_node_processes_are_alive_and_what_each_superexec_last_logged(tmp_path):
    import subprocess
    import sys

    from fedllm_app.ops.deploy import Node

    dep = Deployment(tmp_path)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait()
    try:
        dep.nodes["node0"] = Node("node0", alive, tmp_path / "n0.log", {}, extra=[dead])
        (tmp_path / "n0.log").write_text("INFO: Receiving: query message (ID: 9)\nINFO: Received successfully\n")
        lines = ["[fedllm] task 1 started", "Traceback (most recent call last):", '  File "x.py", line 1']
        lines += ["[fedllm] ERROR: task 1 of run 7 ended with exit code 1"]
        (tmp_path / "logs" / "node0-superexec.log").write_text("\n".join(lines) + "\n")
        hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
        result = dep.finish_run(hung, timeout=0.5)
    finally:
        alive.kill()
        alive.wait()
    text = result.output
    assert f"node0: SuperNode running (pid {alive.pid}), SuperExec exited with code 3 (pid {dead.pid})" in text
    assert text.index("timed out after 0.5 s") < text.index("node0: SuperNode")  # in the tail a test prints
    assert "task 1 of run 7 ended with exit code 1" in text and 'File "x.py"' not in text
    assert "Receiving: query message (ID: 9)" in text and "Received successfully" not in text
