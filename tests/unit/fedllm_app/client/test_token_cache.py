"""Each partition is tokenised once per machine: later workers and rounds load TRL's prepared dataset."""

import copy
import stat

import pytest

from fedllm_app.client import trainer as trainer_module
from fedllm_app.client.token_cache import cache_dir, cache_key, prepare_count
from fedllm_app.client.trainer import client_trainer, trainer_config
from fedllm_app.config import load_config
from fedllm_app.data.pipeline import partition
from fedllm_app.data.trl_form import to_trl
from fedllm_app.model import get_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config({"overrides": "training.max_steps=2"})
    model, tokenizer = get_model(cfg.model, cfg.seed)  # before FEDLLM_CACHE moves: the tiny model lives there
    return cfg, model, tokenizer


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path))
    saved = dict(trainer_module._TRAINERS)
    yield tmp_path
    trainer_module._TRAINERS.clear()
    trainer_module._TRAINERS.update(saved)


def test_a_second_worker_meeting_the_same_partition_does_not_tokenise_again(tiny, fresh_cache):
    cfg, model, tok = tiny
    rows = partition(cfg, 0)[:40]
    before = prepare_count()
    first = client_trainer(model, tok, rows, cfg, key="cache-first-worker").dataset
    trainer_module._TRAINERS.clear()  # as in another worker process
    second = client_trainer(model, tok, rows, cfg, key="cache-second-worker").dataset
    assert prepare_count() == before + 1
    assert second["input_ids"] == first["input_ids"] and second["labels"] == first["labels"]


def test_changed_rows_or_tokenizer_miss_the_cache(tiny, tmp_path):
    from trl import SFTTrainer

    cfg, _, tok = tiny
    rows = partition(cfg, 0)[:10]
    args = trainer_config(cfg, 1e-3, seed=1, output_dir=str(tmp_path / "a"))
    other_run = trainer_config(cfg, 5e-3, seed=7, output_dir=str(tmp_path / "b"))

    def key(rows, tok, args):
        return cache_key(SFTTrainer, to_trl(rows, cfg.training.template), tok, args, False, None, "train")

    base = key(rows, tok, args)
    assert key(rows, tok, other_run) == base  # seed, learning rate and paths do not touch the data
    edited = [dict(rows[0], response=rows[0]["response"] + "!"), *rows[1:]]
    assert key(edited, tok, args) != base
    changed_tok = copy.deepcopy(tok)
    changed_tok.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    assert key(rows, changed_tok, args) != base
    longer = trainer_config(load_config({"overrides": "training.max_length=64"}), 1e-3, 1, str(tmp_path / "c"))
    assert key(rows, tok, longer) != base


def test_cached_token_files_are_private_to_their_owner(tiny, fresh_cache):
    cfg, model, tok = tiny
    client_trainer(model, tok, partition(cfg, 1)[:20], cfg, key="cache-private")
    folders = [cache_dir(), *(p for p in cache_dir().rglob("*") if p.is_dir())]
    files = [p for p in cache_dir().rglob("*") if p.is_file()]
    assert files
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o700 for p in folders)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
