"""FlowerTune challenge presets (conf/challenge/): the board's fixed settings, the baseline recipe, a warning
when a fixed setting is changed, and nodes that accept the preset.
"""

import logging

import pytest

from fedllm_app.client.policy import NodePolicy, PolicyError
from fedllm_app.config import CHALLENGES, challenge_warning, group_options, load_config
from fedllm_app.data import pipeline

# (training set, SuperNodes, clients per round) as the board fixes them.
BOARD = {
    "general_nlp": ("flowertune_general", 20, 2),
    "finance": ("flowertune_finance", 50, 5),
    "medical": ("flowertune_medical", 20, 2),
    "code": ("flowertune_code", 10, 2),
}


def test_the_four_challenges_are_the_presets_on_disk():
    assert tuple(group_options("challenge")) == tuple(sorted(CHALLENGES)) == tuple(sorted(BOARD))


@pytest.mark.parametrize("name", sorted(BOARD))
def test_a_challenge_fixes_the_boards_settings_and_defaults_to_the_baseline_recipe(name):
    cfg = load_config({"overrides": f"challenge={name}"})
    dataset, clients, per_round = BOARD[name]
    assert (cfg.dataset.name, cfg.num_clients, cfg.sample_clients) == (dataset, clients, per_round)
    assert cfg.partition.name == "iid" and cfg.dataset.heldout_in_training is True
    assert (cfg.model.name, cfg.model.quantization) == ("mistralai/Mistral-7B-v0.3", "4bit")
    lora = cfg.model.lora
    assert (lora.r, lora.alpha, lora.dropout, list(lora.target_modules)) == (32, 64, 0.075, ["q_proj", "v_proj"])
    t = cfg.training
    assert (t.max_steps, t.batch_size, t.grad_accum, t.max_length) == (10, 16, 1, 512)
    assert (t.learning_rate, t.min_learning_rate) == (5e-5, 1e-6)
    assert (cfg.num_rounds, cfg.save_every, cfg.strategy.name, cfg.comm.budget_mb) == (200, 5, "fedavg", 200000)
    assert challenge_warning(cfg) is None


def test_no_challenge_changes_nothing():
    cfg = load_config({})
    assert cfg.get("challenge") is None and cfg.dataset.name == "synthetic" and cfg.comm.budget_mb is None


def test_model_strategy_and_rounds_can_be_set_on_top_and_keep_the_entry_eligible():
    cfg = load_config({"overrides": "challenge=medical model=tiny strategy=fedprox num_rounds=3 comm.codec=none"})
    assert (cfg.model.name, cfg.strategy.name, cfg.num_rounds, cfg.num_clients) == ("builtin:tiny", "fedprox", 3, 20)
    assert cfg.dataset.name == "flowertune_medical" and challenge_warning(cfg) is None


def test_changing_a_fixed_setting_gets_one_line_saying_the_entry_is_void():
    cfg = load_config({"overrides": "challenge=finance dataset=alpaca num_clients=8 sample_clients=2"})
    line = challenge_warning(cfg)
    assert line.count("\n") == 0 and line.startswith("challenge=finance: ")
    assert "dataset='alpaca' (the board fixes 'flowertune_finance')" in line
    assert "num_clients=8 (the board fixes 50)" in line and "cannot be a FlowerTune leaderboard entry" in line


def test_the_server_logs_the_warning_once_at_start(tmp_path, caplog):
    from fedllm_app.server.run import FederatedRun

    overrides = f"challenge=code model=tiny training=tiny num_clients=3 dataset=synthetic output_dir={tmp_path}"
    with FederatedRun(load_config({"overrides": overrides}), started=0.0):
        pass
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w for w in warnings if "leaderboard" in w] == [challenge_warning(load_config({"overrides": overrides}))]


def test_a_node_accepts_a_challenge_and_refuses_an_unknown_one():
    policy = NodePolicy.from_node_config({"partition-id": 0}, simulation=False)
    policy.check_run_config({"overrides": "challenge=code num_rounds=3"})
    with pytest.raises(PolicyError, match="challenge='nope' is not one of the app's challenge choices"):
        policy.check_run_config({"overrides": "challenge=nope"})


def test_a_challenge_trains_on_every_row_of_its_fixed_set(tmp_path):
    rows = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(12)]
    data = tmp_path / "general.jsonl"
    data.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    base = f"dataset=flowertune_general dataset.path={data} dataset.heldout=3 num_clients=2"
    plain = load_config({"overrides": base})
    board = load_config({"overrides": f"{base} +dataset.heldout_in_training=true"})
    assert sum(map(len, pipeline.all_partitions(plain))) == 9
    assert sum(map(len, pipeline.all_partitions(board))) == 12 and len(pipeline.heldout(board)) == 3


def test_the_docs_tables_are_the_presets():
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[3] / "docs" / "flowertune.md").read_text()
    shown = {}
    for line in docs.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[0].startswith("`") and cells[0].strip("`") in BOARD:
            shown[cells[0].strip("`")] = (cells[1].split()[0].strip("`"), int(cells[2]), int(cells[3]))
    assert shown == BOARD
    cfg = load_config({"overrides": "challenge=code"})
    for text in ("r 32, alpha 64, dropout 0.075", "10 steps of batch 16", "sequence length 512", "5e-5 to 1e-6"):
        assert text in docs
    assert (cfg.model.lora.r, cfg.training.max_steps, cfg.training.max_length) == (32, 10, 512)
    assert f"{cfg.num_rounds} rounds" in docs and f"{cfg.comm.budget_mb:,} MB" in docs
