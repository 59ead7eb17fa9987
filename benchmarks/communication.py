"""Bytes, codec time and accuracy of each ``comm.codec`` (docs/communication.md). Usage::

    python benchmarks/communication.py bytes       # the tiny adapter: exact message bytes and codec seconds
    python benchmarks/communication.py project     # the FlowerTune baseline adapter: bytes per round and run
    python benchmarks/communication.py accuracy --strategies fedavg fedadam --seeds 0 1 2 --rounds 10

Rows ending ``-delta`` use ``comm.downlink_delta=true`` (:mod:`fedllm_app.comm.downlink`).

``bytes`` builds the real messages (:mod:`fedllm_app.comm.wire`: the server's encoded train message, the
client's encoded reply with error feedback) and counts them as the server does
(:func:`fedllm_app.server.rounds.content_bytes`). ``project`` encodes random arrays of the FlowerTune
baseline's shapes (Mistral-7B, LoRA r32 on q_proj and v_proj of 32 layers) the same way and multiplies by
its rounds and clients. ``accuracy`` runs one ``flwr run`` simulation per (strategy, codec, seed) of the
built-in benchmark and prints the final held-out exact match and total bytes. Not a test: it prints
markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedllm_app.comm.codecs import CODECS, CommParams
from fedllm_app.comm.downlink import Held
from fedllm_app.comm.wire import decode_message, decode_reply, encode_reply, to_wire
from fedllm_app.server.rounds import content_bytes
from strategies.fedavg import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY
from strategies.records import to_record

Arrays = dict[str, np.ndarray]
SETTINGS = {
    "none": {},
    "fp16": {},
    "bf16": {},
    "int8": {},
    "nf4": {},
    "topk-10%": {"codec": "topk", "topk_fraction": 0.1},
    "topk-1%": {"codec": "topk", "topk_fraction": 0.01},
    # comm.downlink_delta=true: the node holds last round's global, and is sent the change
    "int8-delta": {"codec": "int8", "downlink_delta": True},
    "nf4-delta": {"codec": "nf4", "downlink_delta": True},
    "topk-10%-delta": {"codec": "topk", "topk_fraction": 0.1, "downlink_delta": True},
    "topk-1%-delta": {"codec": "topk", "topk_fraction": 0.01, "downlink_delta": True},
}
FLOWERTUNE = {"layers": 32, "hidden": 4096, "kv_dim": 1024, "r": 32, "rounds": 200, "clients": 2}


def params_of(label: str) -> CommParams:
    extra = SETTINGS[label]
    return CommParams(**(extra or {"codec": label}))


def tiny_adapter() -> Arrays:
    """The built-in model's LoRA adapter at its initial values (LoRA B random here so top-k has values)."""
    from fedllm_app.config import load_config
    from fedllm_app.model import get_adapter, get_model

    cfg = load_config({})
    model, _ = get_model(cfg.model, cfg.seed)
    rng = np.random.default_rng(0)
    return {k: v + rng.standard_normal(v.shape).astype(np.float32) * 0.01 for k, v in get_adapter(model).items()}


def flowertune_adapter() -> Arrays:
    """Random arrays of the FlowerTune baseline adapter's shapes (PEFT names, float32)."""
    f, rng = FLOWERTUNE, np.random.default_rng(0)
    out = {}
    for layer in range(f["layers"]):
        for proj, out_dim in (("q_proj", f["hidden"]), ("v_proj", f["kv_dim"])):
            stem = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            out[f"{stem}.lora_A.weight"] = rng.standard_normal((f["r"], f["hidden"])).astype(np.float32) * 0.01
            out[f"{stem}.lora_B.weight"] = rng.standard_normal((out_dim, f["r"])).astype(np.float32) * 1e-3
    return out


def train_message(arrays: Arrays) -> Message:
    config = ConfigRecord({"server-round": 1, "lr": 1e-4})
    return Message(RecordDict({ARRAYS_KEY: to_record(arrays), CONFIG_KEY: config}), dst_node_id=1, message_type="train")


def one_round(global_: Arrays, params: CommParams) -> dict[str, float]:
    """One node's round trip: bytes down and up as counted by the server, and each side's codec seconds.

    With ``downlink_delta`` the node already holds the previous global (``global_`` less a round's change of
    about 1e-3 a value), so the message timed and counted is the change.
    """
    held, state = (Held(), {}) if params.downlink_delta else (None, {})
    if held is not None:
        rng = np.random.default_rng(2)
        previous = {k: v - rng.standard_normal(v.shape).astype(np.float32) * 1e-3 for k, v in global_.items()}
        [first] = to_wire([train_message(previous)], params, held)
        decode_message(first, state)
        held.settle({1})
    msg = train_message(global_)
    t0 = time.perf_counter()
    [wire] = to_wire([msg], params, held)
    t1 = time.perf_counter()
    down = content_bytes(wire.content)
    decode_message(wire, state)
    t2 = time.perf_counter()
    rng = np.random.default_rng(1)
    trained = {k: v + rng.standard_normal(v.shape).astype(np.float32) * 1e-3 for k, v in global_.items()}
    metrics = MetricRecord({"num-examples": 16, "data-size": 100, "partition-id": 0, "train_loss": 1.0})
    content = RecordDict({ARRAYS_KEY: to_record(trained), METRICS_KEY: metrics})
    received = {k: v.numpy() for k, v in wire.content[ARRAYS_KEY].items()}
    t3 = time.perf_counter()
    reply_content = encode_reply(content, received, params, state, 0)
    t4 = time.perf_counter()
    up = content_bytes(reply_content)
    reply = Message(reply_content, dst_node_id=1, message_type="train")
    t5 = time.perf_counter()
    decode_reply(reply, global_, params)
    t6 = time.perf_counter()
    return {"down": down, "up": up, "server_s": (t1 - t0) + (t6 - t5), "client_s": (t2 - t1) + (t4 - t3)}


def bytes_table(global_: Arrays, title: str, per_run: tuple[int, int] | None = None) -> str:
    """Markdown: bytes per message each way vs none, and codec seconds (median of 3) per node and round."""
    head = f"| {title} | down B/msg | up B/msg | vs fp32 (both ways) | server codec s | client codec s |"
    if per_run:
        head += f" projected total for {per_run[0]} rounds x {per_run[1]} clients (GB / GiB) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base = None
    for label in SETTINGS:
        runs = [one_round(global_, params_of(label)) for _ in range(3)]
        r = runs[0]
        both = r["down"] + r["up"]
        base = base or both
        srv = statistics.median(x["server_s"] for x in runs)
        cli = statistics.median(x["client_s"] for x in runs)
        row = f"| {label} | {r['down']:,} | {r['up']:,} | {both / base:.3f} | {srv:.3f} | {cli:.3f} |"
        if per_run:
            total = both * per_run[0] * per_run[1]
            row += f" {total / 1e9:.2f} / {total / 2**30:.2f} |"
        lines.append(row)
    return "\n".join(lines)


def accuracy(strategies: list[str], codecs: list[str], seeds: list[int], rounds: int, extra: str) -> str:
    """Markdown: final held-out exact match (mean +- sd over seeds) and MB down, up and both ways (10**6 bytes,
    mean over seeds) per (strategy, codec)."""
    from flower_cells import run_cell, summary_of

    head = "| strategy | codec | exact match (mean ± sd) | per seed | MB down | MB up | total MB both ways |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for strategy in strategies:
            for label in codecs:
                p = params_of(label)
                accs, downs, ups = [], [], []
                for seed in seeds:
                    name = f"{strategy}-{label.replace('%', '')}-{seed}"
                    cell = (
                        f"strategy={strategy} comm.codec={p.codec} comm.topk_fraction={p.topk_fraction} "
                        f"comm.downlink_delta={str(p.downlink_delta).lower()} "
                        f"seed={seed} num_rounds={rounds} baseline=none {extra}"
                    )
                    s = summary_of(run_cell(cell, 2, work, name))
                    if s is not None:
                        accs.append(s["final"].get("accuracy", float("nan")))
                        downs.append(s["bytes_sent_total"] / 1e6)
                        ups.append(s["bytes_received_total"] / 1e6)
                sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
                mean = statistics.mean(accs) if accs else float("nan")
                cells = ", ".join(f"{a:.3f}" for a in accs)
                down = statistics.mean(downs) if downs else float("nan")
                up = statistics.mean(ups) if ups else float("nan")
                mbs = f"{down:.2f} | {up:.2f} | {down + up:.2f}"
                lines.append(f"| {strategy} | {label} | {mean:.3f} ± {sd:.3f} | {cells} | {mbs} |")
                print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # messages built outside a run
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["bytes", "project", "accuracy"])
    parser.add_argument("--strategies", nargs="+", default=["fedavg", "fedadam"])
    parser.add_argument("--codecs", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--extra", default="", help="more overrides for every accuracy run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the codec timings")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)  # on a shared CPU, thread pools add ~20 ms to each small bitsandbytes call
    assert set(CODECS) <= {params_of(label).codec for label in SETTINGS}
    if args.what == "bytes":
        print(bytes_table(tiny_adapter(), "built-in tiny model (58,368 LoRA values)"))
    elif args.what == "project":
        f = FLOWERTUNE
        title = f"Mistral-7B LoRA r{f['r']} q/v x {f['layers']} layers (13,631,488 values)"
        print(bytes_table(flowertune_adapter(), title, per_run=(f["rounds"], f["clients"])))
    else:
        print(accuracy(args.strategies, args.codecs, args.seeds, args.rounds, args.extra))


if __name__ == "__main__":
    main()
