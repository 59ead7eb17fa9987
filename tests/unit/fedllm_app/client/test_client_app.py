"""Through the ClientApp's own code path (a real Flower Message and Context): every catalogue entry
trains 2 rounds from its Hub-shaped fixture, and a SuperNode with ``data-path`` trains on its own file.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedllm_app.client.round import DATA_PATH_KEY
from fedllm_app.client_app import ERRORS, NodeError, app
from fedllm_app.comm.packing import PACK_KEY, unpack_content
from fedllm_app.config import ConfigError, conf_dir, load_config
from fedllm_app.model import get_adapter, get_model
from fedllm_app.server.reply_checks import ReplySpec, reply_problem, shapes_of
from strategies.fedavg import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES_KEY
from strategies.records import from_record, to_record

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures" / "data" / "datasets"
ENTRIES = sorted(p.stem for p in (conf_dir() / "dataset").glob("*.yaml") if p.stem not in ("synthetic", "custom"))
SMALL = "training.max_steps=1 training.batch_size=2 training.max_length=256 num_clients=2 sample_clients=2"


def train_message(arrays: dict, rnd: int, mode: str = "federated") -> Message:
    config = ConfigRecord({"server-round": rnd, "lr": 5e-3, "mode": mode})
    return Message(RecordDict({ARRAYS_KEY: to_record(arrays), CONFIG_KEY: config}), dst_node_id=1, message_type="train")


def run_rounds(overrides: str, node_config: dict, rounds: int = 2, mode: str = "federated"):
    """Rounds of one node through the ClientApp, each starting from the previous reply's adapter."""
    run_config = {"overrides": overrides}
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)
    model, _ = get_model(load_config(context.run_config).model, 0)
    arrays = start = get_adapter(model)
    replies = []
    for rnd in range(1, rounds + 1):
        reply = app(train_message(arrays, rnd, mode), context)
        assert not reply.has_error()
        assert PACK_KEY in reply.content  # the adapter travels packed, one array per record
        reply.content = unpack_content(reply.content)  # as the server reads it
        arrays = from_record(reply.content[ARRAYS_KEY])
        replies.append(reply)
    return start, arrays, replies


@pytest.mark.parametrize("name", ENTRIES)
def test_every_catalogue_entry_trains_two_rounds_from_its_fixture(name):
    task = "dpo" if name in ("hh_rlhf", "ultrafeedback") else "sft"
    overrides = f"dataset={name} dataset.path={FIXTURES / f'{name}.jsonl'} dataset.heldout=2 task={task} {SMALL}"
    # A simulation's node (one owner): the run config may name local files; trust-run-config says so here.
    start, end, replies = run_rounds(overrides, {"partition-id": 1, "num-partitions": 2, "trust-run-config": True})
    spec = ReplySpec(shapes_of(to_record(start)), num_partitions=2)
    for reply in replies:
        metrics = reply.content[METRICS_KEY]
        assert np.isfinite(metrics["train_loss"]) and metrics[NUM_EXAMPLES_KEY] == 2
        assert reply_problem(reply.content, spec) is None, "the server accepts a real client's reply"
    assert all(np.abs(end[k]).max() > 0 for k in end if "lora_B" in k), "LoRA B did not move"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_two_supernodes_each_train_on_their_own_file(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"Say {w}.", "response": w} for w in "red blue green".split()])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"Count to {n}.", "response": str(n)} for n in range(1, 7)])
    over = f"{SMALL} training.max_steps=2"  # 4 rows per round
    _, end_a, replies_a = run_rounds(over, {"partition-id": 0, "num-partitions": 2, DATA_PATH_KEY: str(a)})
    _, end_b, replies_b = run_rounds(over, {"partition-id": 1, "num-partitions": 2, DATA_PATH_KEY: str(b)})
    out = capsys.readouterr().out  # the ClientApp set up the console: what the node's operator sees
    assert f"[fedllm] client 0: training on its own file '{a}' (3 rows, never sent)" in out
    assert f"[fedllm] client 1: training on its own file '{b}' (6 rows, never sent)" in out
    # Node a has 3 rows (all of them each round), node b 6 (4 sampled per round): not the synthetic partitions.
    assert [r.content[METRICS_KEY][NUM_EXAMPLES_KEY] for r in replies_a] == [3, 3]
    assert [r.content[METRICS_KEY][NUM_EXAMPLES_KEY] for r in replies_b] == [4, 4]
    for reply in replies_a + replies_b:
        assert set(reply.content.keys()) == {ARRAYS_KEY, METRICS_KEY}, "only the adapter and metrics travel"
        assert all(isinstance(v, int | float) for v in reply.content[METRICS_KEY].values())
    assert any(not np.allclose(end_a[k], end_b[k]) for k in end_a)


def refused(capsys, details, *args, **kwargs):
    """The server sees only E_CONFIG; the node's log (its console) names the problem and the fix."""
    capsys.readouterr()
    with pytest.raises(NodeError) as err:
        run_rounds(*args, **kwargs)
    assert str(err.value) == ERRORS[ConfigError]
    seen = capsys.readouterr()
    assert re.search(details, seen.out + seen.err), seen


def test_own_file_errors_name_the_client_and_the_fix_in_the_node_log(tmp_path, capsys):
    missing = {"partition-id": 0, "num-partitions": 2, DATA_PATH_KEY: str(tmp_path / "none.jsonl")}
    refused(capsys, r"client 0: dataset file '.*none.jsonl' does not exist", SMALL, missing, rounds=1)
    f = write_jsonl(tmp_path / "qa.jsonl", [{"q": "x", "a": "y"}])
    node = {"partition-id": 0, "num-partitions": 2, DATA_PATH_KEY: str(f)}
    refused(capsys, r"no column 'prompt'.*dataset=custom dataset.columns.prompt", SMALL, node, rounds=1)
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "p", "response": "r"}])
    pooled = {"partition-id": 0, DATA_PATH_KEY: str(ok)}
    refused(capsys, r"private files cannot be pooled", SMALL, pooled, rounds=1, mode="central")
    no_pid = r"node config has no partition-id; start the SuperNode with --node-config"
    refused(capsys, no_pid, SMALL, {DATA_PATH_KEY: str(ok)}, rounds=1)


def test_custom_columns_map_a_node_file(tmp_path):
    f = write_jsonl(tmp_path / "qa.jsonl", [{"q": f"Echo {i}.", "a": str(i)} for i in range(4)])
    over = f"dataset=custom dataset.columns.prompt=q dataset.columns.response=a {SMALL}"
    _, _, replies = run_rounds(over, {"partition-id": 0, "num-partitions": 2, DATA_PATH_KEY: str(f)}, rounds=1)
    assert replies[0].content[METRICS_KEY][NUM_EXAMPLES_KEY] == 2
