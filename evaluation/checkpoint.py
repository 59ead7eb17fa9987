"""Load a saved checkpoint for evaluation (base model + PEFT adapter, or a merged model) and merge adapters.

A fedllm checkpoint is ``<output_dir>/<run>/checkpoints/round-N/``, written by PEFT's ``save_pretrained``
(``adapter_config.json`` names the base model); the run's ``config.yaml`` two folders up holds the model
config (quantization, dtype) and the prompt template. Without it, the adapter's base model is loaded with the
default model settings; ``overrides`` (Hydra syntax, e.g. ``model.quantization=4bit``) adjust either.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from fedllm_app.config import ConfigError, load_config

_MISSING = object()


def run_config_path(checkpoint: Path) -> Path | None:
    """The run's ``config.yaml`` for a checkpoint folder (``.../<run>/checkpoints/round-N``), if any."""
    for folder in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def checkpoint_config(checkpoint: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The run config that produced ``checkpoint`` (or the defaults), with ``model.name`` = its base model."""
    ckpt = Path(checkpoint).expanduser()
    if not ckpt.is_dir():
        raise ConfigError(f"checkpoint {str(checkpoint)!r} is not a folder; give a checkpoints/round-N folder")
    adapter = ckpt / "adapter_config.json"
    if adapter.is_file():
        base = json.loads(adapter.read_text())["base_model_name_or_path"]
    elif (ckpt / "config.json").is_file():
        base = str(ckpt.resolve())  # a merged (or any full) model
    else:
        raise ConfigError(
            f"checkpoint {str(checkpoint)!r} has neither adapter_config.json (a PEFT adapter) nor config.json "
            f"(a full model); point at a checkpoints/round-N folder or a merged model folder"
        )
    saved = run_config_path(ckpt)
    cfg = OmegaConf.load(saved) if saved else OmegaConf.create(OmegaConf.to_container(load_config({})))
    if not saved or not adapter.is_file():
        cfg.model.name = base
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            raise ConfigError(f"override {item!r} must be KEY=VALUE with an existing key, e.g. model.quantization=4bit")
        OmegaConf.update(cfg, key, yaml.safe_load(value))
    return cfg


def load_for_eval(checkpoint: str | Path, cfg: DictConfig) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer): the base with the adapter applied, or the full model."""
    from peft import PeftModel

    from fedllm_app.model import load_base

    ckpt = Path(checkpoint).expanduser()
    model_cfg = OmegaConf.merge(cfg.model, {"gradient_checkpointing": False})
    model, tokenizer = load_base(model_cfg)
    if (ckpt / "adapter_config.json").is_file():
        model = PeftModel.from_pretrained(model, str(ckpt))
    model.eval()
    return model, tokenizer


def merge(checkpoint: str | Path, out: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Write base + adapter merged into one model (``save_pretrained``, loadable by plain transformers)."""
    ckpt = Path(checkpoint).expanduser()
    if not (ckpt / "adapter_config.json").is_file():
        raise ConfigError(f"{str(checkpoint)!r} has no adapter_config.json: only a PEFT adapter can be merged")
    cfg = checkpoint_config(ckpt, overrides)
    # Merging into quantised weights would round the adapter away: merge in the compute dtype.
    cfg.model.quantization = None
    model, tokenizer = load_for_eval(ckpt, cfg)
    merged = model.merge_and_unload()
    target = Path(out).expanduser()
    merged.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
