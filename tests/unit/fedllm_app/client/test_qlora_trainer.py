"""QLoRA through the client's TRL trainers: the LoRA weights stay float32 on a 4-bit base, round after round."""

import pytest
import torch

from fedllm_app.client.trainer import client_trainer
from fedllm_app.config import load_config
from fedllm_app.data.pipeline import partition
from fedllm_app.data.sampling import round_indices
from fedllm_app.model import get_adapter, get_model, set_adapter

pytestmark = pytest.mark.slow
pytest.importorskip("bitsandbytes")


def lora_dtypes(model) -> dict[str, torch.dtype]:
    return {n: p.dtype for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_lora_weights_stay_float32_on_a_4bit_base_after_the_trainer_and_every_round(task, tiny64_model):
    cfg = load_config(
        {"overrides": f"task={task} model.name={tiny64_model} model.quantization=4bit training.max_steps=2"}
    )
    model, tok = get_model(cfg.model, cfg.seed)
    assert model.is_loaded_in_4bit
    start = get_adapter(model)
    trainer = client_trainer(model, tok, partition(cfg, 0)[:64], cfg, key=f"qlora-{task}")
    dtypes = lora_dtypes(model)
    assert dtypes and set(dtypes.values()) == {torch.float32}, "after the trainer was built"
    for rnd in (1, 2):
        set_adapter(model, start)
        trainer.train_round(round_indices(len(trainer.dataset), cfg, rnd, 0), 1e-3, seed=rnd)
        assert set(lora_dtypes(model).values()) == {torch.float32}, f"after round {rnd}"
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
