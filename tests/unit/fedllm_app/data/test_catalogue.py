"""The dataset catalogue: every entry loads its Hub-shaped fixture through the Hub code path's mapping;
local files of every kind; column mapping; OpenFedLLM's sampling; bad input names the file and the fix.
"""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedllm_app.config import ConfigError, conf_dir, load_config
from fedllm_app.data import catalogue
from fedllm_app.data import pipeline as data

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures" / "data" / "datasets"
ENTRIES = sorted(p.stem for p in (conf_dir() / "dataset").glob("*.yaml") if p.stem not in ("synthetic", "custom"))
DPO_ENTRIES = ("hh_rlhf", "ultrafeedback")


def cfg_for(name: str, *extra: str, path: Path | None = None):
    task = "dpo" if name in DPO_ENTRIES else "sft"
    path = path or FIXTURES / f"{name}.jsonl"
    over = f"dataset={name} dataset.path={path} task={task} dataset.heldout=2 num_clients=2 sample_clients=2"
    return load_config({"overrides": " ".join([over, *extra])})


def test_every_catalogue_entry_has_a_fixture_and_a_real_hub_id():
    assert len(ENTRIES) >= 16
    for name in ENTRIES:
        assert (FIXTURES / f"{name}.jsonl").is_file(), f"no fixture for dataset={name}"
        hub_id = str(catalogue_entry(name).hub_id)
        assert "/" in hub_id and " " not in hub_id


def test_the_docs_table_lists_every_entry_with_its_hub_id():
    docs = (Path(__file__).resolve().parents[4] / "docs" / "data.md").read_text()
    for name in ENTRIES:
        assert f"| `{name}`" in docs and f"`{catalogue_entry(name).hub_id}`" in docs, name


def catalogue_entry(name):
    return data.catalogue_entry(name)


@pytest.mark.parametrize("name", ENTRIES)
def test_every_entry_loads_its_fixture_into_rows_and_partitions(name):
    cfg = cfg_for(name)
    parts, test = data.all_partitions(cfg), data.heldout(cfg)
    assert len(test) == 2 and all(len(p) >= 2 for p in parts)
    rows = [r for p in parts for r in p] + test
    raw = [json.loads(x) for x in (FIXTURES / f"{name}.jsonl").read_text().splitlines()]
    expected = len({r["instruction"] for r in raw}) if catalogue_entry(name).deduplicate else len(raw)
    assert len(rows) == expected
    for r in rows:
        assert r["domain"] == name
        if name in DPO_ENTRIES:
            assert r["prompt"][-1]["role"] == "user" and r["chosen"] and r["rejected"] and r["chosen"] != r["rejected"]
        else:
            assert r["instruction"].strip() and r["response"].strip()


# One hand-checked mapped row per format (OpenFedLLM's / FlowerTune's mapping).
MAPPED = {
    "alpaca_gpt4": ("Give an antonym. cold", "hot"),
    "alpaca_cleaned": ("Name a primary color.", "Red is a primary color."),
    "fingpt_sentiment": (
        "What is the sentiment of this tweet? Please choose an answer from {negative/neutral/positive}. "
        "$BOLT down again, ugh",
        "negative",
    ),
    "medalpaca_flashcards": ("Answer this question truthfully Which bone is in the thigh?", "The femur."),
    "flowertune_medical": ("Which bone is in the thigh?", "The femur."),
    "flowertune_general": ("Give an antonym.", "hot"),
    "code_alpaca": ("Reverse a list in Python. a = [1, 2, 3]", "a[::-1]"),
    "gsm8k": ("Tim runs 1 mile and then 2 more. Miles run?", "Tim runs 1 + 2 = <<1+2=3>>3 miles.\n#### 3"),
    "math": ("Solve $2x=8$.", "Divide by 2: $x=\\boxed{4}$."),
    "wizardlm_evol": ("Name a planet with rings.", "Saturn."),
}


@pytest.mark.parametrize(("name", "pair"), sorted(MAPPED.items()))
def test_formats_map_like_openfedllm_and_flowertune(name, pair):
    rows = catalogue.load_rows(catalogue_entry(name), "sft", seed=0, path=str(FIXTURES / f"{name}.jsonl"))
    assert pair in [(r["instruction"], r["response"]) for r in rows]


def test_math_instruct_is_deduplicated_on_instruction_and_keeps_its_source_column(caplog):
    rows = catalogue.load_rows(catalogue_entry("math_instruct"), "sft", 0, path=str(FIXTURES / "math_instruct.jsonl"))
    assert len(rows) == 8 and len({r["instruction"] for r in rows}) == 8
    assert "9 rows read, 8 kept (1 dropped: duplicate instruction)" in caplog.text
    first = next(r for r in rows if r["instruction"].startswith("Tom has 3 apples"))
    assert first["response"] == "3 + 2 = 5. The answer is 5." and first["source"] == "data/CoT/gsm_rft.json"


def test_hh_rlhf_shared_prefix_becomes_chat_turns_and_the_tails_the_pair():
    rows = catalogue.load_rows(catalogue_entry("hh_rlhf"), "dpo", 0, path=str(FIXTURES / "hh_rlhf.jsonl"))
    multi = next(r for r in rows if len(r["prompt"]) == 3)
    assert multi["prompt"] == [
        {"role": "user", "content": "Hi there."},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a fruit."},
    ]
    assert (multi["chosen"], multi["rejected"]) == ("An apple is a fruit.", "No.")
    with pytest.raises(ValueError, match="do not share"):
        catalogue.hh_pair("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: c\n\nAssistant: d")


def test_ultrafeedback_message_lists_give_prompt_and_final_replies():
    rows = catalogue.load_rows(catalogue_entry("ultrafeedback"), "dpo", 0, path=str(FIXTURES / "ultrafeedback.jsonl"))
    row = next(r for r in rows if r["chosen"] == "Rome is the capital of Italy.")
    assert row["prompt"] == [{"role": "user", "content": "What is the capital of Italy?"}]
    assert row["rejected"] == "Milan." and row["score_chosen"] == 9.0


def test_dataset_sample_is_a_seeded_shuffle_then_n_rows():
    path = str(FIXTURES / "wizardlm_evol.jsonl")
    entry = catalogue_entry("wizardlm_evol")
    full = catalogue.load_rows(entry, "sft", 0, path=path)
    sampled = OmegaConf.merge(entry, {"sample": 3})
    a, b = (catalogue.load_rows(sampled, "sft", 0, path=path) for _ in range(2))
    c = catalogue.load_rows(sampled, "sft", 1, path=path)
    assert a == b and len(a) == 3 and a != c
    assert a == catalogue.sample(full, 3, 0)


def test_custom_csv_with_a_column_mapping(tmp_path):
    f = tmp_path / "mine.csv"
    f.write_text("question,answer,user\n1+1?,2,u1\nCapital of France?,Paris,u2\nSky?,Blue,u1\n2+2?,4,u2\n")
    cfg = load_config(
        {
            "overrides": f"dataset=custom dataset.path={f} dataset.columns.prompt=question "
            f"dataset.columns.response=answer dataset.heldout=1 num_clients=2 sample_clients=2 "
            f"partition=natural partition.by=user"
        }
    )
    parts = data.all_partitions(cfg)
    assert sorted(len(p) for p in parts) == [1, 2] and len(data.heldout(cfg)) == 1
    assert sorted(len({r["user"] for r in p}) for p in parts) == [1, 1], "one user per client"
    rows = [r for p in parts for r in p] + data.heldout(cfg)
    assert ("Capital of France?", "Paris") in [(r["instruction"], r["response"]) for r in rows]


@pytest.mark.parametrize("kind", ["parquet", "saved"])
def test_parquet_and_saved_datasets_folders_load(tmp_path, kind):
    from datasets import Dataset

    rows = [json.loads(x) for x in (FIXTURES / "gsm8k.jsonl").read_text().splitlines()]
    ds = Dataset.from_list(rows)
    target = tmp_path / ("g.parquet" if kind == "parquet" else "saved")
    ds.to_parquet(str(target)) if kind == "parquet" else ds.save_to_disk(str(target))
    loaded = catalogue.load_rows(catalogue_entry("gsm8k"), "sft", 0, path=str(target))
    assert len(loaded) == 8 and loaded[0]["instruction"] == rows[0]["question"]


def test_hub_loading_calls_load_dataset_with_the_hub_id(monkeypatch):
    import datasets

    seen = {}

    def fake(path, name=None, split=None):
        seen.update(path=path, name=name, split=split)
        return datasets.Dataset.from_list([{"question": "q", "answer": "a"}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    rows = catalogue.load_rows(catalogue_entry("gsm8k"), "sft", 0)
    assert seen == {"path": "openai/gsm8k", "name": "main", "split": "train"} and rows[0]["response"] == "a"


# --- bad input: each error names the file/column and the fix -----------------------------------


def test_missing_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset file '.*nope.jsonl' does not exist; give an existing json"):
        data.all_partitions(cfg_for("alpaca_gpt4", path=tmp_path / "nope.jsonl"))


def test_unknown_dataset_lists_the_catalogue():
    with pytest.raises(ConfigError, match=r"unknown dataset 'alpaca_gpt5'; choose one of: .*alpaca_gpt4.*hh_rlhf"):
        load_config({"overrides": "dataset=alpaca_gpt5"})


def test_missing_column_names_file_column_and_mapping(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(f'{{"question": "q{i}", "output": "o"}}\n' for i in range(4)))
    with pytest.raises(ConfigError) as err:
        data.all_partitions(cfg_for("alpaca_gpt4", path=f))
    msg = str(err.value)
    assert "qa.jsonl' has no column 'instruction'" in msg and "dataset.columns.instruction=<your column>" in msg
    # ... and the mapping fixes it (input is optional for the alpaca format).
    rows = data.pooled(cfg_for("alpaca_gpt4", "dataset.columns.instruction=question", "dataset.heldout=1", path=f))
    assert rows[0]["instruction"].startswith("q") and rows[0]["response"] == "o"


def test_empty_and_non_utf8_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"'.*empty.jsonl' is empty; give a file with at least one row"):
        data.all_partitions(cfg_for("alpaca_gpt4", path=empty))
    latin = tmp_path / "latin.csv"
    latin.write_bytes("instruction,input,output\nCaf\xe9,,ok\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"'.*latin.csv' is not UTF-8 \(byte 28, line 2\); re-save it as UTF-8"):
        data.all_partitions(cfg_for("alpaca_gpt4", path=latin))


def test_dpo_data_with_sft_task_and_sft_data_with_dpo_task_are_refused():
    with pytest.raises(ConfigError, match="dataset=hh_rlhf holds DPO data but task=sft; use task=dpo"):
        data.all_partitions(cfg_for("hh_rlhf", "task=sft"))
    with pytest.raises(ConfigError, match="dataset=gsm8k has no preference pairs for task=dpo"):
        data.all_partitions(cfg_for("gsm8k", "task=dpo"))


def test_unparsable_and_empty_rows_are_counted_not_silently_dropped(tmp_path, caplog):
    f = tmp_path / "hh.jsonl"
    good = json.loads((FIXTURES / "hh_rlhf.jsonl").read_text().splitlines()[0])
    f.write_text("\n".join(json.dumps(r) for r in [good, good, {"chosen": "no turns", "rejected": "x"}]) + "\n")
    rows = catalogue.load_rows(catalogue_entry("hh_rlhf"), "dpo", 0, path=str(f))
    assert len(rows) == 2
    assert "3 rows read, 2 kept (1 dropped: unparsable" in caplog.text


def test_heldout_larger_than_the_data_is_refused():
    with pytest.raises(ConfigError, match=r"has 8 rows: dataset.heldout=8 would leave none for training"):
        data.all_partitions(cfg_for("wizardlm_evol", "dataset.heldout=8"))


def test_training_rows_repeating_a_heldout_prompt_stay_out_of_training(caplog):
    from fedllm_app.data.holdout import hold_out

    rows = [{"instruction": f"q{i % 5}", "response": str(i)} for i in range(20)]  # every prompt 4 times
    train, test = hold_out(rows, 2, seed=0, source="'dup.jsonl'")
    assert len(test) == 2
    assert not {r["instruction"] for r in test} & {r["instruction"] for r in train}
    assert len(train) == 20 - 4 * len({r["instruction"] for r in test})
    assert "training rows repeat a held-out prompt" in caplog.text
    with pytest.raises(ConfigError, match="every training row repeats a held-out prompt"):
        hold_out([{"instruction": "same", "response": str(i)} for i in range(5)], 1, seed=0, source="'one.jsonl'")
