"""The model card next to the final adapter: Hub front matter and what a reader needs to reuse the adapter."""

import re

from huggingface_hub import ModelCard

from fedllm_app.config import load_config
from fedllm_app.server.model_card import fedllm_version, write_model_card

SUMMARY = {
    "run": "fedadam-alpaca-seed0",
    "initial": {"accuracy": 0.1, "eval_loss": 3.0},
    "final": {"accuracy": 0.5, "accuracy/units": 0.25, "eval_loss": 1.5},
    "baseline_local": {"mean": {"accuracy": 0.3, "accuracy/units": 0.125, "eval_loss": 2.0}, "clients": {}},
    "bytes_sent_total": 12_340_000,
    "bytes_received_total": 12_000_000,
}


def _card(tmp_path, overrides, summary=SUMMARY):
    cfg = load_config({}, overrides)
    folder = tmp_path / "checkpoints" / f"round-{cfg.num_rounds}"
    folder.mkdir(parents=True)
    path = write_model_card(folder, cfg, summary)
    assert path == folder / "README.md"
    return ModelCard.load(path), folder


def test_the_card_names_base_model_data_strategy_metrics_bytes_and_how_to_load(tmp_path):
    card, folder = _card(tmp_path, ["model=llama2-7b", "dataset=alpaca", "strategy=fedadam", "num_rounds=3"])
    assert card.data.base_model == "meta-llama/Llama-2-7b-hf" and card.data.library_name == "peft"
    assert card.data.datasets == ["tatsu-lab/alpaca"] and card.data.pipeline_tag == "text-generation"
    assert {"federated-learning", "flower", "lora", "fedadam", "sft"} <= set(card.data.tags)
    text = card.text
    assert (
        "| strategy | fedadam (eta=0.001, beta_1=0.9, beta_2=0.99, tau=0.001, first_moment=zero, second_moment=delta) |"
        in text
    )
    assert "| clients | 4, 4 sampled per round |" in text and "| partition | iid (by=domain) |" in text
    assert "| rounds | 3 rounds x 40 steps per client (batch 16 x grad_accum 1)" in text
    assert "quantised 4bit" in text and "r=32, alpha=64, dropout=0.05, on q_proj, v_proj" in text
    assert "| metric | before training | final | local-only mean |" in text
    assert "| accuracy | 0.1000 | 0.5000 | 0.3000 |" in text and "| accuracy/units |  | 0.2500 | 0.1250 |" in text
    assert "12.34 MB sent to clients, 12.00 MB received" in text
    assert f"| fedllm | {fedllm_version()} |" in text
    assert 'AutoModelForCausalLM.from_pretrained("meta-llama/Llama-2-7b-hf")' in text
    assert f'PeftModel.from_pretrained(base, "{folder}")' in text


def test_the_tiny_model_card_claims_no_hub_model_or_dataset_and_has_no_baseline_column(tmp_path):
    summary = {k: v for k, v in SUMMARY.items() if k != "baseline_local"}
    card, _ = _card(tmp_path, ["num_rounds=2"], summary)
    assert card.data.base_model is None and card.data.datasets is None
    assert "builtin:tiny" in card.text and "fedllm's built-in seeded synthetic set" in card.text
    assert "local-only mean" not in card.text and "load_base(load_config({}).model)" in card.text
    assert "| partition | dominance (by=domain, dominance=0.9) |" in card.text


def test_a_dataset_read_from_a_local_file_is_not_claimed_as_a_hub_dataset(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text("")
    card, _ = _card(tmp_path, ["dataset=alpaca", f"dataset.path={data}"])
    assert card.data.datasets is None and f"from the local file `{data}`" in card.text


def test_with_hub_push_the_snippet_loads_the_adapter_from_the_repo(tmp_path):
    card, _ = _card(tmp_path, ["hub.push=true", "hub.repo_id=alice/fedllm-tiny"])
    assert re.search(r'PeftModel.from_pretrained\(base, "alice/fedllm-tiny"\)', card.text)


def test_a_dpo_card_names_the_task_and_beta(tmp_path):
    card, _ = _card(tmp_path, ["task=dpo", "dataset=hh_rlhf"])
    assert "dpo" in card.data.tags and "DPO (TRL DPOTrainer, beta=0.1)" in card.text
