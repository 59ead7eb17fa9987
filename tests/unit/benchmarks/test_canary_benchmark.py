"""benchmarks/canary.py: the runs it asks for and the table row it reads from a run folder (no Flower run here)."""

import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"


@pytest.fixture
def canary(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import canary

    yield canary
    sys.modules.pop("canary", None)


def test_both_settings_insert_the_same_canaries_and_only_the_dp_one_asks_for_dp(canary):
    from fedllm_app.config import load_config

    args = Namespace(clients=6, sample=3, rounds=2, count=2, repeats=4, digits=3, clip=0.5, extra="seed=3")
    plain, private = canary.overrides(args, None), canary.overrides(args, 0.8)
    assert private.startswith(plain) and "privacy.dp" not in plain
    assert private.endswith("privacy.dp=true privacy.noise_multiplier=0.8 privacy.clip_norm=0.5")
    for cell in (plain, private):
        cfg = load_config({"overrides": cell})  # each is a valid run config
        assert (cfg.privacy.canaries.count, cfg.privacy.canaries.repeats, cfg.privacy.canaries.digits) == (2, 4, 3)
    assert canary.label(None, 0.5) == "no DP" and canary.label(0.8, 0.5) == "DP z=0.8 C=0.5"


def test_a_row_reads_epsilon_and_exposure_from_the_run_folder(canary, tmp_path):
    exposure = {"mean": 3.25, "max": 5.5, "log2_space": 19.9316, "initial": {"mean": 1.125, "max": 2.0}}
    (tmp_path / "summary.json").write_text(json.dumps({"canary_exposure": exposure, "final": {"accuracy": 0.25}}))
    rows = [{"round": 1, "epsilon": 1.5, "delta": 1e-5}, {"round": 2, "epsilon": 2.345, "delta": 1e-5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert canary.row("DP z=1 C=1", tmp_path) == "| DP z=1 C=1 | 2.35 (1e-05) | 3.25 | 5.50 | 1.12 | 19.93 | 0.250 |"
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n")
    assert canary.row("no DP", tmp_path).startswith("| no DP | - | 3.25 |")
    assert canary.row("no DP", None) == "| no DP | failed | | | | | |"
