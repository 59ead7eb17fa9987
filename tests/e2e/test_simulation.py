"""End to end through Flower: `flwr run .` on the local simulation SuperLink, tiny model, 2 rounds."""

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

EVAL_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "evaluation"
DATA_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data" / "datasets"


def test_two_round_simulation_trains_saves_and_reloads(flower, tmp_path):
    """The same run also checks the server's per-round benchmark hook (eval.benches) and its canary audit
    (privacy.canaries: two canaries of 2 digits in partition 0, their exposure in summary.json).
    """
    out = tmp_path / "outputs"
    overrides = (
        f"num_rounds=2 num_clients=2 sample_clients=2 save_every=1 training.max_steps=5 output_dir={out} run_name=it "
        "logging.report_to=[tensorboard] eval.exact_match_every=1 "
        f"eval.benches=[tfns] eval.every=2 eval.data_dir={EVAL_FIXTURES} "
        "privacy.canaries.count=2 privacy.canaries.repeats=3 privacy.canaries.digits=2"
    )
    status, log = flower.run(overrides, num_supernodes=2)
    assert status == "finished:completed", log[-3000:]
    run = out / "it"

    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    for r in lines:
        assert r["sampled"] == 2 and r["replied"] == 2 and r["failed"] == 0
        assert r["bytes_sent"] > 0 and r["bytes_received"] > 0 and r["seconds"] > 0
        assert sorted(e["partition"] for e in r["bytes_by_node"].values()) == [0, 1]
        assert r["bytes_received"] == sum(e["received"] for e in r["bytes_by_node"].values())
        assert np.isfinite(r["train_loss"]) and 0 <= r["accuracy"] <= 1
    assert lines[1]["bytes_sent_total"] == lines[0]["bytes_sent"] + lines[1]["bytes_sent"]
    assert "[fedllm] fedavg round 2/2 | clients 2 sampled, 2 replied, 0 failed" in log
    # The console shows our lines and real warnings only (fedllm_app/console.py); logging.verbose brings the rest.
    for noise in ("FutureWarning", "DeprecationWarning", "configure_train:", "aggregate_train:", "Loading weights"):
        assert noise not in log, noise
    assert "fraction_evaluate" not in log and "Manually terminating" not in log

    from peft import PeftModel
    from safetensors.numpy import load_file

    from fedllm_app.config import load_config
    from fedllm_app.model import get_adapter, load_base

    cfg = load_config({})
    base, _ = load_base(cfg.model)
    reloaded = PeftModel.from_pretrained(base, run / "checkpoints" / "round-2")
    saved = get_adapter(reloaded)
    first = load_file(run / "checkpoints" / "round-1" / "adapter_model.safetensors")
    assert set(saved) == set(first)
    # LoRA B starts at zero: after two rounds of training it must not be.
    b_keys = [k for k in saved if "lora_B" in k]
    assert b_keys and all(np.abs(saved[k]).max() > 0 for k in b_keys)
    assert any(not np.allclose(saved[k], first[k]) for k in saved)

    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["baseline_local"]["clients"]) == {"0", "1"}
    assert summary["final"]["accuracy"] == pytest.approx(lines[-1]["accuracy"])
    exposure = summary["canary_exposure"]
    assert [(c["number"], c["method"]) for c in exposure["canaries"]] == [(1, "exact"), (2, "exact")]
    assert exposure["log2_space"] == pytest.approx(6.6439, abs=1e-4)  # log2 of 10^2 candidates
    assert all(0 <= c["exposure"] <= exposure["log2_space"] for c in exposure["canaries"])
    assert "privacy.canaries: 2 secret(s) of 2 digits" in log
    assert (run / "metrics.png").stat().st_size > 1000
    assert "| held-out exact match | fedavg | local-only mean |" in (run / "comparison.md").read_text()
    local_lines = (run / "baseline_local" / "metrics.jsonl").read_text().splitlines()
    assert len(local_lines) == 2
    assert_tensorboard_has_every_round(run, lines, log)
    assert_the_card_names_the_run(run, lines)
    assert_benchmarks_land_in_metrics_jsonl(run, lines)


def assert_benchmarks_land_in_metrics_jsonl(run, rows):
    """eval.benches=[tfns] eval.every=2: the benchmark's scores in round 2's metrics line only, and its report."""
    assert "bench/tfns/accuracy" not in rows[0]
    assert 0 <= rows[1]["bench/tfns/accuracy"] <= 1 and rows[1]["bench/tfns/f1_macro"] >= 0
    assert (run / "eval" / "round-2.md").is_file()


def assert_tensorboard_has_every_round(run, rows, log):
    """logging.report_to=[tensorboard]: one point per round of each metric, equal to metrics.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for key in ("train_loss", "accuracy", "eval_loss", "bytes_sent_total"):
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert got == [(r["round"], pytest.approx(r[key], rel=1e-6)) for r in rows], key
    assert len(events.Scalars("baseline_local/train_loss")) == 2
    assert f"[fedllm] trackers: tensorboard in {run}" in log


def assert_the_card_names_the_run(run, rows):
    """The model card beside the final checkpoint: tags and the final accuracy."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(run / "checkpoints" / "round-2" / "README.md")
    assert {"federated-learning", "flower", "lora", "fedavg"} <= set(card.data.tags)
    line = next(x for x in card.text.splitlines() if x.startswith("| accuracy |"))
    _, before, final, local_mean = (cell.strip() for cell in line.strip("|").split("|"))
    assert float(final) == pytest.approx(rows[-1]["accuracy"], abs=5e-5) and before
    summary = json.loads((run / "summary.json").read_text())
    assert float(local_mean) == pytest.approx(summary["baseline_local"]["mean"]["accuracy"], abs=5e-5)


def test_bad_override_fails_the_run_with_the_message(flower, tmp_path):
    status, log = flower.run(f"strategy=nope output_dir={tmp_path}", num_supernodes=2, timeout=300)
    assert status == "finished:failed"
    assert "unknown strategy 'nope'" in log


# Two runs also train clients of different LoRA ranks (partition 0 at rank 4, partition 1 at 16 = r_max):
# FlexLoRA under FedProx, HetLoRA under FedAvgM's server step (docs/heterogeneous.md). The HetLoRA run also
# self-prunes its ranks, with a threshold loose enough (a tail below 10x its size at the round's start) that both
# clients prune in round 2 (in round 1 the tail starts at LoRA's zero B, so neither does): their replies, with
# the shapes they were sent and their new lora-rank, pass the reply checks and aggregate.
MIXED_RANKS = {
    "fedprox": "lora_aggregation=flexlora model.lora.client_ranks=[4,16]",
    "fedavgm": "lora_aggregation=hetlora model.lora.client_ranks=[4,16] hetlora_prune.enabled=true "
    "hetlora_prune.threshold=10",
}
# Two runs also take another data path, which would otherwise need runs of their own: a Hub-shaped local file
# of the catalogue (FedYogi) and federated DPO (FedAdam).
ALPACA = DATA_FIXTURES / "alpaca_gpt4.jsonl"
DATA = {
    "fedyogi": f"dataset=alpaca_gpt4 dataset.path={ALPACA} dataset.heldout=2 training.batch_size=2",
    "fedadam": "task=dpo training.batch_size=8 dataset.train_per_domain=40 dataset.test_per_domain=5",
}


# Secure aggregation (docs/privacy.md) rides along on FedYogi's run, with DP and distributed noise too: each
# client adds its noise share before masking (t = 2 of 2 clients, so each share has std z C / sqrt(2) and the
# range C + 8 s = 1.35 fits in secagg_clip_range=1.5), and the server unmasks an already noised sum, adding none.
# (The TLS deployment test runs DP with secure aggregation and the server's noise.)
SECURE = {"fedyogi": "privacy.secagg=true privacy.noise=distributed privacy.secagg_clip_range=1.5"}

# DP-FedAvg (docs/privacy.md) rides along on two of these runs: SCAFFOLD (adapter and control deltas clipped
# together on the client) and FedAdam (its moments act on the noised mean), which privacy.target_epsilon stops
# after round 1 (q = 1, z = 0.3, PLD: epsilon 19.1 after one round, 30.5 after two).
PRIVATE = {
    "scaffold": "privacy.dp=true privacy.clip_norm=0.5 privacy.noise_multiplier=0.3",
    "fedyogi": "privacy.dp=true privacy.clip_norm=0.5 privacy.noise_multiplier=0.3",
    "fedadam": "privacy.dp=true privacy.clip_norm=0.5 privacy.noise_multiplier=0.3 privacy.accountant=pld "
    "privacy.target_epsilon=25",
}
LAST_ROUND = {"fedadam": 1}

# Four runs send compressed updates (docs/communication.md), the share of fp32 bytes they may use each way
# (the tiny adapter's small arrays add headers and names: int8 is 0.32 of fp32 here, 0.27 on a 7B adapter):
# SCAFFOLD int8 (its control arrays too, under DP, with the delta downlink: round 2 sends each node the change
# against the copy its node state kept, or the node fails the round), FedAdam NF4 (federated DPO under DP),
# central top-k 25% (fp16 down), FedAdagrad bf16 with a budget that stops the run before round 2 (each round
# moves about 0.48 MB). (Not on the mixed-rank runs: a codec's per-array scales and headers break their "a
# quarter of the bytes" check.)
CODECS = {
    "scaffold": ("comm.codec=int8 comm.downlink_delta=true", 0.35),
    "fedadam": ("comm.codec=nf4", 0.22),
    "central": ("comm.codec=topk comm.topk_fraction=0.25", 0.6),
    "fedadagrad": ("comm.codec=bf16 comm.budget_mb=0.7", 0.55),
}


@pytest.mark.parametrize(
    "name", ["fedprox", "scaffold", "fedavgm", "fedadagrad", "fedyogi", "fedadam", "local", "central"]
)
def test_every_algorithm_runs_two_rounds_through_flower(flower, tmp_path, name):
    out = tmp_path / "outputs"
    overrides = (
        f"strategy={name} num_rounds=2 num_clients=2 sample_clients=2 training.max_steps=3 baseline=none "
        f"output_dir={out} run_name={name} {DATA.get(name, 'dataset.test_per_domain=5')} {MIXED_RANKS.get(name, '')} "
        f"{SECURE.get(name, '')} {PRIVATE.get(name, '')} {CODECS.get(name, ('', 0))[0]}"
    )
    verbose = name == "fedprox"  # one run shows that logging.verbose brings Flower's own round lines back
    status, log = flower.run(overrides + (" logging.verbose=true" if verbose else ""), num_supernodes=2)
    assert status == "finished:completed", log[-3000:]
    assert ("configure_train: Sampled 2 nodes" in log) == verbose
    lines = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    nodes = 1 if name == "central" else 2  # central trains the pooled data on one node
    last = 1 if "budget_mb" in CODECS.get(name, ("", 0))[0] else LAST_ROUND.get(name, 2)
    assert [(r["round"], r["replied"], r["failed"]) for r in lines] == [(r, nodes, 0) for r in range(1, last + 1)]
    if name in SECURE:  # both clients' masked updates unmasked as one sum, every round
        assert [(r["secagg_survivors"], r["aggregated"]) for r in lines] == [(2, True), (2, True)]
        # two shares of std 0.3 * 0.5 / sqrt(2) on the sum: z C / (q N) = 0.075 on the mean, none from the server
        assert [(r["dp_noise_shares"], round(r["dp_noise_std"], 6)) for r in lines] == [(2, 0.075), (2, 0.075)]
    if name in PRIVATE:  # q = 1: both clients every round; every update clipped by its client, none by the server
        epsilons = [r["epsilon"] for r in lines]
        assert 0 < epsilons[0] and epsilons == sorted(epsilons)
        # a lossy codec's quantisation error can push a clipped update a little past C: the server clips it again
        assert lines[-1]["dp_server_clipped"] == 0 or (name in CODECS and lines[-1]["dp_server_clipped"] <= nodes)
        assert f"{name} round {last}/2" in log and "| epsilon " in log
    if name in LAST_ROUND:
        assert f"stopping before round {last + 1}" in log
        assert json.loads((out / name / "summary.json").read_text())["stopped_after_round"] == last
    if name == "local":
        summary = json.loads((out / name / "summary.json").read_text())
        assert set(summary["baseline_local"]["clients"]) == {"0", "1"}
        assert summary["final"] == summary["baseline_local"]["mean"]
        return
    from safetensors.numpy import load_file

    saved = load_file(out / name / "checkpoints" / f"round-{last}" / "adapter_model.safetensors")
    assert all(np.abs(v).max() > 0 for k, v in saved.items() if "lora_B" in k), "the global adapter did not move"
    if name in CODECS:
        assert_compressed_both_ways(name, lines, saved, log, out / name)
    if name in MIXED_RANKS:
        assert_each_rank_travels_alone(lines, saved)
    if name == "fedavgm":
        assert "pruned its LoRA rank 16 -> 14" in log and "pruned its LoRA rank 4 -> 3" in log, log[-3000:]
    if name == "fedyogi":
        assert_alpaca_gpt4_came_from_the_local_file(log, lines)
    if name == "fedadam":
        assert_dpo_reports_preference_metrics_every_round(out / name, log, lines)


def assert_alpaca_gpt4_came_from_the_local_file(log, lines):
    """dataset=alpaca_gpt4 read from a Hub-shaped local file: 8 rows, 2 held out, 3 per client."""
    assert "alpaca_gpt4.jsonl': 8 rows read, 8 kept" in log
    assert "[fedllm] client 0: 3 rows, domain mix {'alpaca_gpt4': 3}" in log
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["eval_loss"]) for r in lines)


def assert_dpo_reports_preference_metrics_every_round(run, log, lines):
    """task=dpo: the round line and metrics.jsonl carry the preference metrics; the margin starts at 0 and moves."""
    assert f"acc {lines[-1]['accuracy']:.3f} margin {lines[-1]['reward_margin']:.3f}" in log
    for r in lines:
        assert np.isfinite(r["train_loss"]) and np.isfinite(r["dpo_loss"]) and np.isfinite(r["reward_margin"])
        assert 0 <= r["preference_accuracy"] <= 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["initial"]["reward_margin"] == 0 and lines[-1]["reward_margin"] != 0


def assert_compressed_both_ways(name, lines, saved, log, run):
    """Replies and messages carry the codec's bytes (SCAFFOLD: the adapter and one control array each way);
    the budget run stops before round 2 with its round-1 checkpoint and says so."""
    codec, ratio = CODECS[name]
    fp32 = 4 * sum(v.size for v in saved.values())
    up, down = (2, 3) if name == "scaffold" else (1, 1)  # SCAFFOLD: c-delta up, c-server and c-client down
    for r in lines:
        assert r["rejected"] == [], r["rejected"]
        for entry in r["bytes_by_node"].values():
            assert entry["received"] < ratio * up * fp32 and entry["sent"] < ratio * down * fp32 * (
                1.02 if name == "central" else 1
            )
    if "budget_mb" in codec:
        assert "communication budget: round 2 would need about" in log
        assert lines[0]["comm_budget_mb"] == 0.7 and 0 < lines[0]["comm_mb_used"] <= 0.7
        assert f"| comm {lines[0]['comm_mb_used']:.2f}/0.7 MB" in log
        assert json.loads((run / "summary.json").read_text())["stopped_by_budget_after_round"] == 1


def assert_each_rank_travels_alone(lines, saved):
    """The checkpoint is a standard adapter at r_max=16; the rank-4 node sent and received about a quarter of the
    rank-16 node's bytes (only its own rank's factors travel)."""
    assert {v.shape[0] for k, v in saved.items() if "lora_A" in k} == {16}
    for r in lines:
        by_pid = {e["partition"]: e for e in r["bytes_by_node"].values()}
        for way in ("sent", "received"):
            assert by_pid[0][way] / by_pid[1][way] == pytest.approx(0.25, abs=0.03), (way, r["bytes_by_node"])
