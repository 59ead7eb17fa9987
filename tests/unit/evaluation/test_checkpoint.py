import json

import pytest

from evaluation.checkpoint import checkpoint_config, merge, run_config_path
from fedllm_app.config import ConfigError


def test_the_run_config_and_base_model_are_found(checkpoint):
    assert run_config_path(checkpoint) == checkpoint.parent.parent / "config.yaml"
    cfg = checkpoint_config(checkpoint)
    assert cfg.model.name == "builtin:tiny" and cfg.training.template == "chat"
    assert checkpoint_config(checkpoint, ["training.template=alpaca"]).training.template == "alpaca"
    with pytest.raises(ConfigError, match="override 'model.nope=1'"):
        checkpoint_config(checkpoint, ["model.nope=1"])


def test_a_bare_adapter_uses_its_saved_base_model(checkpoint, tmp_path):
    import shutil

    bare = tmp_path / "adapter"
    shutil.copytree(checkpoint, bare)  # no config.yaml above it
    saved_base = json.loads((bare / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert run_config_path(bare) is None
    assert checkpoint_config(bare).model.name == saved_base


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(ConfigError, match="is not a folder"):
        checkpoint_config(tmp_path / "missing")
    with pytest.raises(ConfigError, match="neither adapter_config.json"):
        checkpoint_config(tmp_path)
    with pytest.raises(ConfigError, match="only a PEFT adapter can be merged"):
        merge(tmp_path, tmp_path / "out")


@pytest.mark.slow
def test_merged_model_logits_equal_base_plus_adapter(checkpoint, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluation.checkpoint import load_for_eval

    out = merge(checkpoint, tmp_path / "merged")
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no PEFT
    tok = AutoTokenizer.from_pretrained(out)
    peft_model, _ = load_for_eval(checkpoint, checkpoint_config(checkpoint))
    base = AutoModelForCausalLM.from_pretrained(peft_model.peft_config["default"].base_model_name_or_path).eval()
    ids = tok("Reverse the words: cold blue sun", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-3)  # the adapter matters, so the comparison can fail
    # The merged folder is itself a checkpoint fedllm-eval accepts.
    assert checkpoint_config(out).model.name == str(out.resolve())
