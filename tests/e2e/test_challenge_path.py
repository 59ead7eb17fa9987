"""A FlowerTune challenge end to end in one process: ``challenge=general_nlp`` trains 2 rounds of the tiny model
with the board's 20 clients, 2 a round, then ``fedllm-eval CKPT --challenge general_nlp`` writes the board's row.

The nodes are fedllm's own ClientApp functions called in this process (:class:`InProcessGrid`), the server is
the ServerApp's own :class:`FederatedRun`: the same code a ``flwr run`` runs, without starting Flower's
SuperLink and 20 SuperNodes.
"""

import json
import logging
import time
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict

from evaluation.cli import main as eval_main
from fedllm_app import client_app
from fedllm_app.client.policy import TRUST_RUN_CONFIG_KEY as TRUST
from fedllm_app.config import load_config
from fedllm_app.server.run import FederatedRun

pytestmark = [pytest.mark.slow]

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


class InProcessGrid:
    """Nodes 1..n hold partitions 0..n-1 and answer with :mod:`fedllm_app.client_app`'s handlers, in process;
    they trust the run config (its dataset.path) as a simulation's nodes do.
    """

    def __init__(self, n: int, run_config: dict) -> None:
        self.sent: dict[str, Message] = {}
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": node - 1, "num-partitions": n, TRUST: "true"},
                state=RecordDict(),
                run_config=run_config,
            )
            for node in range(1, n + 1)
        }

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        return [client_app.query(m, self.contexts[m.metadata.dst_node_id]) for m in messages]

    def push_messages(self, messages):
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            self.sent[m.object_id] = m
        return [m.object_id for m in messages]

    def pull_messages(self, ids):
        out = []
        for i in ids:
            msg = self.sent.pop(i, None)
            if msg is not None:
                out.append(client_app.train(msg, self.contexts[msg.metadata.dst_node_id]))
        return out


def test_general_nlp_challenge_trains_with_the_boards_clients_and_evaluates_to_its_row(tmp_path, capsys, caplog):
    data = FIXTURES / "flowertune" / "flowertune_general.jsonl"
    overrides = (
        f"challenge=general_nlp model=tiny training=tiny training.max_steps=2 num_rounds=2 dataset.path={data} "
        f"dataset.heldout=4 output_dir={tmp_path} run_name=board"
    )
    run_config = {"overrides": overrides}
    cfg = load_config(run_config)
    assert (cfg.num_clients, cfg.sample_clients, cfg.comm.budget_mb) == (20, 2, 200000)

    with FederatedRun(cfg, started=time.perf_counter()) as run:
        run.federated(InProcessGrid(cfg.num_clients, run_config))
        run.finish()
    rows = [json.loads(line) for line in (tmp_path / "board" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["sampled"], r["replied"]) for r in rows] == [(1, 2, 2), (2, 2, 2)]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "leaderboard" in r.getMessage()]

    checkpoint = tmp_path / "board" / "checkpoints" / "round-2"
    argv = [str(checkpoint), "--challenge", "general_nlp", "--data-dir", str(FIXTURES / "evaluation")]
    eval_main([*argv, "--no-progress"])

    row = json.loads((checkpoint / "eval" / "leaderboard-general_nlp.json").read_text())["row"]
    assert list(row["columns"]) == ["stem", "social_sciences", "humanities"]
    assert all(0 <= v <= 100 for v in row["columns"].values())
    assert row["average"] == pytest.approx(sum(row["columns"].values()) / 3)
    sent = rows[-1]["bytes_sent_total"] + rows[-1]["bytes_received_total"]
    assert row["communication_mb"] == pytest.approx(sent / 2**20)
    # Trained as the board fixes; evaluated on local fixture files with the tiny model unquantised, which the row names.
    assert row["base_model"] == "builtin:tiny" and row["eligible"] is False
    assert row["not_eligible_because"] == [
        f"scored on local benchmark files ({FIXTURES / 'evaluation'}), not the board's",
        "the base model was evaluated with model.quantization=None, not the board's 4-bit (4bit-fp4, a CUDA GPU)",
    ]
    printed = capsys.readouterr().out
    assert "| Base model | Comm. costs (MB) | STEM | Social Sciences | Humanities | Average |" in printed
