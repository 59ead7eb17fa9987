"""QLoRA path on CPU: bitsandbytes 4-bit and 8-bit load, wrap with LoRA, and train a step."""

import numpy as np
import pytest
import torch

from fedllm_app.config import load_config
from fedllm_app.model import get_adapter, load_base, lora_config

pytestmark = pytest.mark.slow
pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_base_trains_lora(bits, tiny64_model):
    from peft import get_peft_model

    # bitsandbytes' CPU 4-bit kernels reject hidden size 96 (the default tiny model's); a 64-wide
    # variant exercises the same code path.
    cfg = load_config({"overrides": f"model.quantization={bits} model.name={tiny64_model}"})
    base, tok = load_base(cfg.model)
    linear = base.model.layers[0].self_attn.q_proj
    assert "bnb" in type(linear).__module__ or "bitsandbytes" in type(linear).__module__
    model = get_peft_model(base, lora_config(cfg.model))
    before = get_adapter(model)
    batch = tok(["<|user|>What is 1 + 1?\n<|assistant|>2</s>"], return_tensors="pt")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    opt.step()
    after = get_adapter(model)
    assert torch.isfinite(loss)
    assert any(not np.allclose(before[k], after[k]) for k in before)


def test_missing_hub_model_names_the_input(monkeypatch):
    import huggingface_hub.constants

    from fedllm_app.model import ModelLoadError

    # Offline, the Hub client fails at once; without a network it first retries the name lookup (~45 s here).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = load_config({"overrides": "model.name=no-such-org/no-such-model"})
    with pytest.raises(ModelLoadError, match="model.name='no-such-org/no-such-model'"):
        load_base(cfg.model)
