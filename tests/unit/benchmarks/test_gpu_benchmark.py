"""benchmarks/gpu.py's small (CPU) config runs end to end and its JSON holds real measurements."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def small_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-bench")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--small", "--concurrent", "2", "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads((out / "gpu.json").read_text()), (out / "gpu.md").read_text()


def test_both_paths_train_the_same_tokens_of_a_randomly_built_model_and_change_the_lora_weights(small_result):
    result, _ = small_result
    setting = result["setting"]
    (shape,) = result["shapes"]
    assert shape["shape"] == "small" and shape["parameters"] > 0 and 0 < shape["trainable_parameters"]
    expected = setting["steps"] * setting["batch_size"] * setting["max_length"]  # every row is cut to max_length
    for path in ("ours", "plain"):
        for measured in shape[f"{path}_all"]:
            assert measured["tokens"] == expected, path
            assert measured["seconds"] > 0 and measured["tokens_per_s"] > 0
            assert measured["lora_max_change"] > 0, f"{path}: the LoRA weights did not change"
    assert shape["ours_vs_plain"] == pytest.approx(shape["ours"]["tokens_per_s"] / shape["plain"]["tokens_per_s"])


def test_load_times_memory_and_the_table_are_reported(small_result):
    result, table = small_result
    (shape,) = result["shapes"]
    assert shape["model_load_cold_seconds"] > shape["model_load_warm_seconds"] >= 0
    assert shape["ours"]["model_load_seconds"] < shape["model_load_cold_seconds"]  # the round reused the model
    assert shape["memory_training"]["peak_rss_mb"] > 0
    assert result["environment"]["device"] == "cpu"
    assert "| small (" in table and f"{shape['ours_vs_plain']:.0%}" in table


def test_clients_sharing_the_device_each_train_their_own_round_and_the_round_lasts_until_the_last_ends(small_result):
    result, table = small_result
    setting, shared = result["setting"], result["concurrent"]
    assert shared["clients"] == 2 and [c["client"] for c in shared["per_client"]] == [0, 1]
    expected = setting["sim_steps"] * setting["batch_size"] * setting["max_length"]
    for client in shared["per_client"]:
        assert client["tokens"] == expected and client["lora_max_change"] > 0
        assert client["lora_dtype"] == "float32"
        assert client["model_load_cold_seconds"] > client["model_load_seconds"]  # loaded once, reused in the round
        assert shared["round_seconds"] >= client["ended"] - client["began"] > 0
    assert shared["tokens_per_s_total"] == pytest.approx(2 * expected / shared["round_seconds"])
    assert "| 2 | " in table.split("Sharing the device")[1]
