"""Real deployments on loopback: flower-superlink + two flower-supernode processes + `flwr run`.

One plain SuperLink with two SuperNodes serves most tests (starting one costs ~20 s); the dropout test kills one of
its SuperNodes, so it comes last. A second deployment runs with TLS and SuperNode authentication, secure aggregation
and DP. Both run the ClientApp inline in fedllm's warm SuperExec (the default). Tiny model, 1-2 optimizer steps a
round.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import numpy as np
import pytest
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE
from flwr.supercore.constant import FORCE_EXIT_TIMEOUT_SECONDS
from safetensors.numpy import load_file

from fedllm_app.ops.deploy import Deployment

pytestmark = [pytest.mark.slow, pytest.mark.integration]

FAST = (
    "training.max_steps=2 baseline=none dataset.test_per_domain=2 training.max_new_tokens=4 "
    "num_clients=2 sample_clients=2 eval.exact_match_every=1"  # the tests read every round's exact match
)


def nodes(n=2):
    return [{"partition-id": p, "num-partitions": n} for p in range(n)]


def plain_nodes():
    """The plain deployment's nodes; node 1 declares its LoRA rank (16 = model.lora.r, so homogeneous runs are
    unaffected) for the run with mixed ranks."""
    configs = nodes()
    configs[1]["lora-rank"] = 16
    return configs


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    with Deployment(tmp_path_factory.mktemp("plain"), input_timeout=45) as dep:  # the killed run's ghost task
        dep.start_superlink()
        for p, config in enumerate(plain_nodes()):
            dep.start_node(f"node{p}", config)
        dep.wait_for_nodes(2)
        yield dep


def metrics(dep, run):
    return [json.loads(x) for x in (dep.root / "out" / run / "metrics.jsonl").read_text().splitlines()]


def adapter(dep, run, rnd):
    return load_file(dep.root / "out" / run / "checkpoints" / f"round-{rnd}" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(plain):
    """A 4-round FedAdam run: the loopback test's subject and the resume test's reference."""
    result = plain.run(f"strategy=fedadam num_rounds=4 save_every=1 {FAST} output_dir=out run_name=whole")
    assert result.status == "finished:completed", result.output[-3000:]
    return result


def test_rounds_on_loopback_train_and_account_bytes(plain, uninterrupted):
    rows = metrics(plain, "whole")
    assert [(r["round"], r["replied"], r["failed"], r["rejected"]) for r in rows] == [
        (rnd, 2, 0, []) for rnd in (1, 2, 3, 4)
    ]
    for r in rows:
        assert np.isfinite(r["train_loss"]) and 0 <= r["accuracy"] <= 1
        by_node = r["bytes_by_node"]
        assert sorted(e["partition"] for e in by_node.values()) == [0, 1]
        assert all(e["sent"] > 100_000 and e["received"] > 100_000 for e in by_node.values())
        assert r["bytes_sent"] == sum(e["sent"] for e in by_node.values())
    assert rows[1]["bytes_sent_total"] == rows[0]["bytes_sent"] + rows[1]["bytes_sent"]
    first, final = adapter(plain, "whole", 1), adapter(plain, "whole", 4)
    b_keys = [k for k in final if "lora_B" in k]
    assert b_keys and all(np.abs(final[k]).max() > 0 for k in b_keys), "the global adapter did not move"
    assert any(not np.array_equal(first[k], final[k]) for k in final)
    summary = json.loads((plain.root / "out" / "whole" / "summary.json").read_text())
    assert summary["bytes_received_total"] == rows[-1]["bytes_received_total"]
    assert "[fedllm] fedadam round 4/4 | clients 2 sampled, 2 replied, 0 failed" in uninterrupted.output


def test_bad_updates_are_rejected_and_an_empty_round_keeps_the_model(plain):
    """Also with clients of different ranks (HetLoRA): node 0 at rank 4 by model.lora.client_ranks, node 1 at 16 by
    its node config; each reply is checked against the shapes of its own rank."""
    faults = "fault_injection=[nan-r1-p0,shape-r1-p1,negative_examples-r2-p1]"
    ranks = "lora_aggregation=hetlora model.lora.client_ranks=[4]"
    result = plain.run(f"num_rounds=2 save_every=1 {FAST} {faults} {ranks} output_dir=out run_name=bad")
    assert result.status == "finished:completed", result.output[-3000:]
    r1, r2 = metrics(plain, "bad")
    assert (r1["replied"], r1["aggregated"], len(r1["rejected"])) == (0, False, 2)
    assert (r2["replied"], r2["aggregated"], [x["partition"] for x in r2["rejected"]]) == (1, True, [1])
    summary = json.loads((plain.root / "out" / "bad" / "summary.json").read_text())
    assert (summary["rounds_aggregated"], summary["rounds_not_aggregated"]) == (1, [1])
    node = r2["rejected"][0]["node"]
    assert f"rejected the update of node {node} (partition 1): 'num-examples' is -5" in result.output
    assert "contains NaN or Inf" in result.output and "has shape" in result.output
    assert "the round is NOT aggregated and the global adapter is unchanged" in result.output
    after_empty_round = adapter(plain, "bad", 1)
    assert all(np.abs(v).max() == 0 for k, v in after_empty_round.items() if "lora_B" in k)  # still the init
    after_rank_4_alone = adapter(plain, "bad", 2)
    assert any(np.abs(v).max() > 0 for k, v in after_rank_4_alone.items() if "lora_B" in k)
    for k, v in after_rank_4_alone.items():  # rank 16; ranks 4..15, which only the rejected node trains, keep round 1's
        upper, before = (v[:, 4:], after_empty_round[k][:, 4:]) if "lora_B" in k else (v[4:], after_empty_round[k][4:])
        assert v.shape == after_empty_round[k].shape and 16 in v.shape
        np.testing.assert_array_equal(upper, before)


def test_waiting_for_nodes_that_never_come_fails_clearly(plain):
    start = time.monotonic()
    result = plain.run(f"num_rounds=1 {FAST} num_clients=3 node_wait_timeout=3 output_dir=out run_name=wait")
    assert result.status == "finished:failed"
    assert "2 SuperNodes are connected after waiting node_wait_timeout=3" in result.output
    assert time.monotonic() - start < 120


def test_resume_after_the_server_is_killed_matches_an_uninterrupted_run(plain, uninterrupted):
    """Also the inline SuperExec's hang: node1's SuperExec is stalled (SIGSTOP, as an overloaded machine would)
    while it runs the killed run's task, past Flower's heartbeat patience, so its SuperNode drops the task's token;
    woken, the task meets a 401 and Flower ends it from inside (SIGINT), or its --input-timeout ends it, whichever
    comes first. The SuperExec must survive that and serve the resumed run: before the first fix it force-exited 5 s
    later, and before the second a SIGINT landing as the timeout ended the task deadlocked it in the task's exit
    handlers; either way the resumed run waited on node1 for ever. The
    killed run usually also leaves a ghost task on node1 (its message's pull failed as the run stopped), which
    the SuperExec must end at its --input-timeout (45 s here) instead of waiting on it for up to 2 h.
    """
    common = f"strategy=fedadam num_rounds=4 save_every=1 {FAST} output_dir=out"
    run = plain.start_run(f"{common} run_name=cut")
    state = plain.root / "out" / "cut" / "resume_state.npz"
    deadline = time.monotonic() + 300
    while not (state.exists() and len(metrics(plain, "cut")) >= 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    superexec = stall_next_task(plain, "node1")
    try:
        servers = plain.serverapp_pids()
        assert servers, "no flwr-serverapp process to kill"
        for pid in servers:
            os.kill(pid, signal.SIGKILL)
        killed = plain.finish_run(run, timeout=5)  # the streaming `flwr run` dies with the server; stop it
        time.sleep(HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL + 2)  # the SuperNode drops the stalled token
    finally:
        superexec.send_signal(signal.SIGCONT)
    done = len(metrics(plain, "cut"))
    assert 2 <= done < 4, f"the server was not killed between rounds 2 and 4 ({done} rounds done)"
    log = plain.root / "logs" / "node1-superexec.log"
    # Woken, the task meets the 401 (Flower's SIGINT: exit code 1) or its --input-timeout (800), whichever comes
    # first: the stall outlasts both. ?: before its input.
    ended = re.compile(rf"task \d+ of run (?:{killed.run_id}|\?) ended with exit code (?:1|800) ")
    deadline = time.monotonic() + 120
    while not ended.search(log.read_text()) and superexec.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(FORCE_EXIT_TIMEOUT_SECONDS + 2)
    assert superexec.poll() is None, f"node1's SuperExec died after its task was ended:\n{log.read_text()[-3000:]}"
    assert ended.search(log.read_text()), f"the stalled task did not end:\n{log.read_text()[-3000:]}"

    resumed = plain.run(f"{common} run_name=cut resume=out/cut")
    assert resumed.status == "finished:completed", resumed.output[-3000:]
    assert f"resuming {plain.root / 'out' / 'cut'} after round {done}" in resumed.output
    assert [r["round"] for r in metrics(plain, "cut")] == [1, 2, 3, 4]
    a, b = adapter(plain, "whole", 4), adapter(plain, "cut", 4)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bit-identical on CPU with fixed seeds
    assert metrics(plain, "cut")[-1]["bytes_sent_total"] == metrics(plain, "whole")[-1]["bytes_sent_total"]


def stall_next_task(dep, name, timeout=120):
    """SIGSTOP node ``name``'s warm SuperExec as soon as it starts its next task; return the SuperExec process."""
    log = dep.root / "logs" / f"{name}-superexec.log"
    started = re.compile(r"task \d+ started")
    before, deadline = len(started.findall(log.read_text())), time.monotonic() + timeout
    while len(started.findall(log.read_text())) <= before:
        assert time.monotonic() < deadline, f"{name}'s SuperExec started no task in {timeout} s"
        time.sleep(0.02)
    superexec = dep.nodes[name].extra[0]
    superexec.send_signal(signal.SIGSTOP)
    return superexec


def test_flexlora_nodes_of_different_ranks_each_get_and_send_their_own_rank(plain):
    """FlexLoRA in deployment: node 0 at rank 4 by model.lora.client_ranks, node 1 at 16 by its node config; the
    global stays a standard rank-16 adapter and each node moves only its own rank's factors (about a quarter of
    the bytes for rank 4)."""
    ranks = "lora_aggregation=flexlora model.lora.client_ranks=[4]"
    result = plain.run(f"num_rounds=2 {FAST} {ranks} output_dir=out run_name=flex")
    assert result.status == "finished:completed", result.output[-3000:]
    rows = metrics(plain, "flex")
    assert [(r["replied"], r["aggregated"], r["rejected"]) for r in rows] == [(2, True, []), (2, True, [])]
    final = adapter(plain, "flex", 2)
    assert {v.shape[0] for k, v in final.items() if "lora_A" in k} == {16}
    assert all(np.abs(v).max() > 0 for k, v in final.items() if "lora_B" in k), "the global adapter did not move"
    for r in rows:
        by_pid = {e["partition"]: e for e in r["bytes_by_node"].values()}
        for way in ("sent", "received"):
            assert by_pid[0][way] / by_pid[1][way] == pytest.approx(0.25, abs=0.03), (way, r["bytes_by_node"])


# Last: it kills node1 of the shared deployment.
def test_a_supernode_killed_mid_round_the_run_completes_with_the_survivor(plain):
    run = plain.start_run(f"num_rounds=2 {FAST} node_wait_timeout=5 round_timeout=120 output_dir=out run_name=drop")
    log = plain.nodes["node1"].log
    before, deadline = log.read_text().count("Received successfully"), time.monotonic() + 120
    while log.read_text().count("Received successfully") < before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)  # until node1 has taken the server's partition query, then its round-1 message
    plain.kill_node("node1")  # SIGKILL: its SuperExec child stays behind until close()
    result = plain.finish_run(run, timeout=300)
    assert result.status == "finished:completed", result.output[-3000:]
    r1, r2 = metrics(plain, "drop")
    assert (r1["sampled"], r1["replied"], r1["failed"]) == (2, 1, 1)
    assert r1["aggregated"] and len(r1["failed_nodes"]) == 1
    assert f"nodes {r1['failed_nodes']} failed" in result.output
    assert (r2["sampled"], r2["replied"]) == (1, 1)
    assert "only 1 of 2 SuperNodes connected" in result.output


PRIVATE_ROWS = (
    [{"prompt": f"Say {w}.", "response": w} for w in "red blue green amber".split()],
    [{"prompt": f"Count to {n}.", "response": str(n)} for n in range(1, 8)],
)


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    """TLS + SuperNode auth, as in production; each SuperNode trains on its own private file (``data-path``)."""
    root = tmp_path_factory.mktemp("secure")
    with Deployment(root, tls=True, auth=True) as dep:
        dep.start_superlink()
        for p, config in enumerate(nodes()):
            private = root / f"private{p}.jsonl"
            private.write_text("".join(json.dumps(r) + "\n" for r in PRIVATE_ROWS[p]))
            dep.start_node(f"node{p}", {**config, "data-path": str(private)})
        dep.wait_for_nodes(2)
        yield dep


def test_tls_and_supernode_auth_run_on_each_nodes_own_file_with_secure_aggregation_and_dp(secure):
    """The production setting: TLS, SuperNode auth, private files on the nodes, and both privacy layers at once
    (the server sees only the masked updates and noises the mean of their unmasked sum)."""
    assert "--insecure" not in secure.superlink_command() and "--enable-supernode-auth" in secure.superlink_command()
    private = "privacy.secagg=true privacy.dp=true privacy.clip_norm=0.5 privacy.noise_multiplier=0.3"
    result = secure.run(f"num_rounds=2 {FAST} {private} output_dir=out run_name=tls")
    assert result.status == "finished:completed", result.output[-3000:]
    rows = metrics(secure, "tls")
    assert [(r["replied"], r["failed"]) for r in rows] == [(2, 0), (2, 0)]
    assert [(r["secagg_survivors"], r["aggregated"]) for r in rows] == [(2, True), (2, True)]
    epsilons = [r["epsilon"] for r in rows]
    assert 0 < epsilons[0] < epsilons[1]
    assert "| epsilon " in result.output
    for p, private in enumerate(PRIVATE_ROWS):
        log = "\n".join(
            (secure.root / "logs" / f"{name}.log").read_text(errors="replace")
            for name in (f"node{p}", f"node{p}-superexec")
            if (secure.root / "logs" / f"{name}.log").exists()
        )
        path = secure.root / f"private{p}.jsonl"
        assert f"client {p}: training on its own file '{path}' ({len(private)} rows, never sent)" in log
    # Both nodes' replies were counted (the per-node byte accounting names each partition).
    by_node = rows[0]["bytes_by_node"].values()
    assert sorted(e["partition"] for e in by_node) == [0, 1]


def test_an_unregistered_supernode_is_refused(secure):
    key = secure.make_node_key("intruder", register=False)
    node = secure.start_node("intruder", nodes()[0], key=key)
    secure.wait_for_log("intruder", "Failed to activate SuperNode", timeout=60)
    assert node.process.wait(timeout=30) != 0
    assert len(secure.connected_nodes()) == 2


def test_a_plaintext_supernode_cannot_join_a_tls_superlink(secure):
    secure.start_node("plaintext", nodes()[0], key=None, tls=False)
    secure.wait_for_log("plaintext", "Connection attempt failed", timeout=60)
    assert len(secure.connected_nodes()) == 2
