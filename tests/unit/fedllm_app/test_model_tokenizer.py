"""The tokenizer loader: older SentencePiece-only model folders load, broken ones fail with a sentence."""

import json

import pytest
from omegaconf import OmegaConf

from fedllm_app.model import ModelLoadError, load_tokenizer

MODEL_CFG = OmegaConf.create({"name": "my-llama", "trust_remote_code": False})


def _sentencepiece_folder(folder):
    """A folder as transformers 4.3x saved Llama-2 derivatives: tokenizer.model, no tokenizer.json."""
    import sentencepiece as spm

    folder.mkdir()
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox jumps over the lazy dog {i}" for i in range(500)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=120,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                    "unk_token": "<unk>", "add_bos_token": True, "legacy": True})
    )  # fmt: skip
    return folder


def test_a_tokenizer_model_only_folder_loads_with_bos(tmp_path):
    tokenizer = load_tokenizer(str(_sentencepiece_folder(tmp_path / "llama")), MODEL_CFG)
    ids = tokenizer("the lazy fox").input_ids
    assert ids[0] == tokenizer.bos_token_id == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the lazy fox"


def test_an_unreadable_tokenizer_model_names_the_model_and_sentencepiece(tmp_path):
    folder = _sentencepiece_folder(tmp_path / "llama")
    (folder / "tokenizer.model").write_bytes(b"\x00not a sentencepiece model" * 20)
    with pytest.raises(ModelLoadError, match=r"model\.name='my-llama'.*sentencepiece"):
        load_tokenizer(str(folder), MODEL_CFG)
