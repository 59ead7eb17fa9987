"""fedllm_app.client.warmup: a simulation's Ray workers import the training libraries as they start.

The hook travels the way Flower's simulation starts Ray: the ClientApp module is imported first, then
``ray.init(runtime_env={"env_vars": ...})`` runs in that process; the slow test starts a real Ray and asks a
real actor what its worker process has imported before its first call.
"""

import os
import subprocess
import sys
import tempfile

import pytest

from fedllm_app.client import warmup


def test_the_runtime_env_hook_adds_the_preload_as_the_workers_setup_hook_and_keeps_the_rest():
    env = warmup.ray_runtime_env({"env_vars": {"PYTHONPATH": "/app"}})
    assert env == {"env_vars": {"PYTHONPATH": "/app"}, "worker_process_setup_hook": "fedllm_app.client.warmup.preload"}
    assert warmup.ray_runtime_env(None) == {"worker_process_setup_hook": "fedllm_app.client.warmup.preload"}


def test_the_runtime_env_hook_keeps_a_setup_hook_the_user_gave():
    env = warmup.ray_runtime_env({"worker_process_setup_hook": "mine.setup"})
    assert env["worker_process_setup_hook"] == "mine.setup"


def test_enable_names_the_hook_for_ray_unless_one_is_set_or_the_preload_is_off(monkeypatch):
    monkeypatch.delenv(warmup.HOOK_ENV, raising=False)
    monkeypatch.delenv(warmup.SWITCH_ENV, raising=False)
    warmup.enable()
    assert os.environ[warmup.HOOK_ENV] == "fedllm_app.client.warmup.ray_runtime_env"
    monkeypatch.setenv(warmup.HOOK_ENV, "mine.hook")
    warmup.enable()
    assert os.environ[warmup.HOOK_ENV] == "mine.hook"
    monkeypatch.delenv(warmup.HOOK_ENV)
    monkeypatch.setenv(warmup.SWITCH_ENV, "0")
    warmup.enable()
    assert warmup.HOOK_ENV not in os.environ


def test_importing_the_client_app_names_the_hook_without_importing_the_hf_stack():
    code = (
        "import os, sys; os.environ.pop('RAY_RUNTIME_ENV_HOOK', None); import fedllm_app.client_app; "
        "print(os.environ.get('RAY_RUNTIME_ENV_HOOK'), 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["fedllm_app.client.warmup.ray_runtime_env", "False"], out.stderr[-2000:]


def test_a_failing_preload_logs_a_warning_and_returns(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "peft", None)  # "import peft" raises ImportError
    warmup.preload()
    assert "could not preload the training libraries" in caplog.text


ACTOR = """
import os, sys
os.environ.pop("RAY_RUNTIME_ENV_HOOK", None)
import fedllm_app.client_app  # as Flower's simulation process does, before it starts Ray
import ray
ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
         runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}})

@ray.remote
class Probe:
    def imported(self):
        return sorted(m for m in ("torch", "transformers", "peft", "trl") if m in sys.modules)

print(ray.get(Probe.remote().imported.remote()))
ray.shutdown()
"""


@pytest.mark.slow
@pytest.mark.parametrize("switch", ["1", "0"])
def test_a_ray_worker_has_imported_the_training_libraries_before_its_first_call_unless_switched_off(switch):
    with tempfile.TemporaryDirectory(prefix="ray") as short:  # Ray's socket paths must stay under 108 bytes
        env = {**os.environ, warmup.SWITCH_ENV: switch, "RAY_TMPDIR": short}
        out = subprocess.run([sys.executable, "-c", ACTOR], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    expected = "['peft', 'torch', 'transformers', 'trl']" if switch == "1" else "[]"
    assert out.stdout.strip().splitlines()[-1] == expected, out.stderr[-3000:]
