"""Round metrics score the tokens training sees: TRL's own SFT/DPO tokenisation is the reference.

A Llama-style SentencePiece tokenizer (BOS added, legacy prefix space: ``"5"`` alone is ``"▁5"``)
is built offline; TRL's SFTTrainer and DPOTrainer tokenise the held-out rows, and the server's
held-out loss, exact match and DPO log-probabilities must use exactly those ids.
"""

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf

from evaluation.generation import sequence_logps
from evaluation.heldout import exact_match, heldout_loss, sft_token_ids
from evaluation.preferences import pair_logps, pair_token_ids
from fedllm_app.data import pairs, synthetic
from fedllm_app.data.templates import STRING_TEMPLATES, prompt_text
from fedllm_app.data.trl_form import to_trl

pytestmark = pytest.mark.slow
MAX_LENGTH = 256


@pytest.fixture(scope="module")
def llama_tokenizer():
    from tokenizers import SentencePieceBPETokenizer
    from transformers import LlamaTokenizer

    rows = synthetic.generate(40, seed=0)
    corpus = [t.format(instruction=r.instruction) + r.response for r in rows for t in STRING_TEMPLATES.values()]
    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(corpus, vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    model = json.loads(sp.to_str())["model"]
    tok = LlamaTokenizer(
        vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], legacy=True, add_bos_token=True
    )
    tok.pad_token = tok.eos_token
    assert tok("5")["input_ids"][0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(tok("5", add_special_tokens=False)["input_ids"]) == ["▁5"]
    return tok


@pytest.fixture(scope="module")
def tiny_llama(llama_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = llama_tokenizer
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def heldout_rows():
    return [r.as_dict() for r in synthetic.generate(3, seed=5)]


def trl_dataset(trainer_class, config_class, model, tok, dataset, tmp_path, extra=None, **trainer_kw):
    args = config_class(
        output_dir=str(tmp_path), max_length=MAX_LENGTH, report_to="none", use_cpu=True, save_strategy="no",
        **(extra or {}),
    )  # fmt: skip
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tok, **trainer_kw)
    return trainer.train_dataset


@pytest.mark.parametrize("template", sorted(STRING_TEMPLATES))
def test_heldout_loss_scores_sft_trainers_own_tokens_bos_and_joint_completion_included(
    template, llama_tokenizer, tiny_llama, heldout_rows, tmp_path
):
    from trl import SFTConfig, SFTTrainer

    tok, model = llama_tokenizer, tiny_llama
    ref = trl_dataset(SFTTrainer, SFTConfig, model, tok, to_trl(heldout_rows, template), tmp_path)
    total, count = 0.0, 0
    for row, trl_row in zip(heldout_rows, ref, strict=True):
        ids, labels = sft_token_ids(tok, row, template, MAX_LENGTH)
        assert ids == trl_row["input_ids"] and ids[0] == tok.bos_token_id
        assert labels == trl_row["labels"]
        with torch.no_grad():
            x, y = torch.tensor([trl_row["input_ids"]]), torch.tensor([trl_row["labels"]])
            n = int((y[:, 1:] != -100).sum())
            total += float(model(input_ids=x, labels=y).loss) * n
            count += n
    assert heldout_loss(model, tok, heldout_rows, template, 2, MAX_LENGTH) == pytest.approx(total / count, rel=1e-5)


def test_exact_match_generates_from_the_prompt_ids_training_uses(llama_tokenizer, tiny_llama, heldout_rows):
    tok, model = llama_tokenizer, tiny_llama
    rows = []
    for row in heldout_rows:
        ids = tok(prompt_text(row["instruction"], "alpaca", tok))["input_ids"]  # TRL's prompt ids: BOS first
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        said = tok.decode(out[0, len(ids) :], skip_special_tokens=True).strip()
        rows.append({**row, "response": said})
    assert any(r["response"] for r in rows), "the greedy answers should not all be empty"
    assert exact_match(model, tok, rows, "alpaca", batch_size=1, max_new_tokens=6)["accuracy"] == 1.0


@pytest.mark.parametrize("template", sorted(STRING_TEMPLATES))
def test_dpo_heldout_logps_score_dpo_trainers_own_tokens(template, llama_tokenizer, tiny_llama, tmp_path):
    from trl import DPOConfig, DPOTrainer

    tok, model = llama_tokenizer, tiny_llama
    rows = pairs.make_pairs([r.as_dict() for r in synthetic.generate(3, seed=6)], seed=0)
    dataset, frozen = to_trl(rows, template), copy.deepcopy(model)
    ref = trl_dataset(DPOTrainer, DPOConfig, model, tok, dataset, tmp_path, {"beta": 0.1}, ref_model=frozen)
    for row, trl_row in zip(rows, ref, strict=True):
        prompt, chosen, rejected = pair_token_ids(row, template, tok)
        assert prompt[0] == tok.bos_token_id
        assert (prompt, chosen, rejected) == (trl_row["prompt_ids"], trl_row["chosen_ids"], trl_row["rejected_ids"])
    t = OmegaConf.create({"template": template, "eval_batch_size": 2, "max_length": MAX_LENGTH})
    chosen, rejected = pair_logps(model, tok, rows, t)
    expected = [
        sequence_logps(model, tok.pad_token_id, [(r["prompt_ids"], r[key]) for r in ref], 1)
        for key in ("chosen_ids", "rejected_ids")
    ]
    assert chosen.tolist() == pytest.approx(expected[0], rel=1e-5)
    assert rejected.tolist() == pytest.approx(expected[1], rel=1e-5)
