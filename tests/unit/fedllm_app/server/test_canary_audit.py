"""The server's canary audit: a canary trained into the adapter shows a high exposure in summary.json."""

import json

import pytest

pytestmark = pytest.mark.slow


def test_a_canary_trained_into_the_adapter_is_exposed_far_above_the_untrained_model(tmp_path):
    """60 steps on rows half of which are one canary (4 digits, |R| = 10^4): from 4.5 bits in the untrained
    model to 10.5 (rank 7 of 10^4) when written, of at most log2 |R| = 13.3.
    """
    from fedllm_app.client.trainer import client_trainer
    from fedllm_app.config import load_config
    from fedllm_app.data import pipeline
    from fedllm_app.data.canaries import CanarySpec, insert
    from fedllm_app.model import get_adapter, set_adapter
    from fedllm_app.server.run import FederatedRun
    from strategies.records import to_record

    over = (
        "num_clients=2 dataset.test_per_domain=2 baseline=none training.max_steps=60 training.batch_size=8 "
        "privacy.canaries.count=1 privacy.canaries.repeats=32 privacy.canaries.digits=4"
    )
    cfg = load_config({"overrides": over}, [f"output_dir={tmp_path}", "run_name=audit"])
    run = FederatedRun(cfg, started=0.0)
    start = get_adapter(run.model)
    try:
        spec = CanarySpec.from_config(cfg)
        rows = insert([pipeline.partition(load_config({}), 0)[:32]], spec)[0]
        trainer = client_trainer(run.model, run.tokenizer, rows, cfg, key="canary-audit-test")
        trainer.train_round(list(range(len(rows))), 1e-2, seed=1)
        run.canary_audit(to_record(get_adapter(run.model)))
    finally:
        set_adapter(run.model, start)  # the cached model is shared with other tests
    run.writer.write_summary(run.summary)
    report = json.loads((tmp_path / "audit" / "summary.json").read_text())["canary_exposure"]
    assert report["log2_space"] == pytest.approx(13.2877, abs=1e-4) and report["partition"] == 0
    assert [c["method"] for c in report["canaries"]] == ["exact"]
    assert report["initial"]["mean"] < 8.0
    assert report["mean"] > 9.0 and report["mean"] > report["initial"]["mean"] + 4.0  # rank 16 or better
    assert report["max"] == report["mean"] == report["canaries"][0]["exposure"]
