"""The model card (``README.md``) written next to the final adapter, in the Hugging Face Hub's format.

YAML front matter (``base_model`` and ``datasets`` only where they are Hub ids, ``library_name: peft``, tags),
then what a reader needs to trust and reuse the adapter: base model, data and its split over the clients,
strategy and hyperparameters, task, rounds and steps, held-out metrics before and after (and the local-only
baseline's mean when it ran), bytes exchanged, the fedllm version and a PEFT snippet that loads it.
It replaces the placeholder card that PEFT's ``save_pretrained`` leaves in the folder.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

TINY = "builtin:tiny"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def fedllm_version() -> str:
    """The installed fedllm's version, or ``unknown`` (e.g. run from a Flower app bundle without install)."""
    try:
        return version("fedllm")
    except PackageNotFoundError:
        return "unknown"


def hub_id(name: Any) -> str | None:
    """``name`` if it looks like a Hub id (``owner/name``) and is no local path, else None."""
    text = str(name or "")
    return text if _HUB_ID.match(text) and not Path(text).expanduser().exists() else None


def _params(node: DictConfig, skip: tuple[str, ...] = ("name", "_target_")) -> str:
    items = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in skip}
    return ", ".join(f"{k}={v}" for k, v in items.items()) or "no hyperparameters"


def _strategy_skip(cfg: DictConfig) -> tuple[str, ...]:
    """Labels, and the robust aggregation keys when the rule is the plain mean (the default)."""
    robust = ("aggregator", "num_malicious", "trim_fraction")
    return ("name", "_target_", *(robust if cfg.strategy.get("aggregator", "mean") == "mean" else ()))


def _dataset_ids(cfg: DictConfig) -> list[str]:
    """The training data's Hub id, unless a local copy (``dataset.path``) was used instead."""
    d = cfg.dataset
    hub = hub_id(d.get("hub_id"))
    return [hub] if hub and not d.get("path") else []


def front_matter(cfg: DictConfig) -> str:
    """The card's YAML header (Hugging Face ``ModelCardData``)."""
    from huggingface_hub import ModelCardData

    task = str(cfg.task.name)
    data = ModelCardData(
        base_model=hub_id(cfg.model.name),
        library_name="peft",
        pipeline_tag="text-generation",
        datasets=_dataset_ids(cfg) or None,
        tags=["fedllm", "federated-learning", "flower", "lora", "peft", "trl", task, str(cfg.strategy.name)],
    )
    return f"---\n{data.to_yaml()}\n---\n"


def _data_line(cfg: DictConfig) -> str:
    d = cfg.dataset
    if d.get("path"):
        return f"`{d.name}` from the local file `{d.path}`"
    if d.get("hub_id"):
        return f"`{d.name}` ([{d.hub_id}](https://huggingface.co/datasets/{d.hub_id}))"
    return f"`{d.name}` (fedllm's built-in seeded synthetic set)"


def _base_line(cfg: DictConfig) -> str:
    name = str(cfg.model.name)
    text = "fedllm's built-in tiny byte-level Llama (`builtin:tiny`)" if name == TINY else f"`{name}`"
    return text + (f", quantised {cfg.model.quantization}" if cfg.model.quantization else "")


def training_table(cfg: DictConfig, summary: dict[str, Any]) -> str:
    """How the adapter was trained, one row per aspect."""
    t, lora = cfg.training, cfg.model.lora
    task = "SFT (TRL SFTTrainer)" if cfg.task.name == "sft" else f"DPO (TRL DPOTrainer, beta={cfg.task.beta})"
    sent, received = summary.get("bytes_sent_total", 0) / 1e6, summary.get("bytes_received_total", 0) / 1e6
    rows = [
        ("base model", _base_line(cfg)),
        ("task", task),
        ("data", _data_line(cfg)),
        ("partition", f"{cfg.partition.name} ({_params(cfg.partition, ('name',))})"),
        ("clients", f"{cfg.num_clients}, {cfg.sample_clients} sampled per round"),
        ("strategy", f"{cfg.strategy.name} ({_params(cfg.strategy, _strategy_skip(cfg))})"),
        (
            "rounds",
            f"{cfg.num_rounds} rounds x {t.max_steps} steps per client (batch {t.batch_size} x grad_accum "
            f"{t.grad_accum}), lr {t.learning_rate} -> {t.min_learning_rate} (cosine over rounds)",
        ),
        ("LoRA", f"r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, on {', '.join(lora.target_modules)}"),
        ("prompt template", f"`{t.template}`"),
        ("seed", str(cfg.seed)),
        ("bytes exchanged", f"{sent:.2f} MB sent to clients, {received:.2f} MB received (record payloads)"),
        ("fedllm", fedllm_version()),
    ]
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def metrics_table(summary: dict[str, Any]) -> str:
    """Held-out metrics before training, after the last round and, if it ran, the local-only baseline's mean."""
    final, initial = summary.get("final") or {}, summary.get("initial") or {}
    local = (summary.get("baseline_local") or {}).get("mean") or {}
    columns = [("before training", initial), ("final", final)] + ([("local-only mean", local)] if local else [])
    keys = sorted(set(final) | set(initial), key=lambda k: (not k.startswith("accuracy"), k))
    if not keys:
        return "No held-out metrics were recorded."

    def cell(values: dict[str, Any], key: str) -> str:
        value = values.get(key)
        return f"{value:.4f}" if isinstance(value, int | float) else ""

    head = "| metric | " + " | ".join(name for name, _ in columns) + " |"
    lines = [head, "|---|" + "---|" * len(columns)]
    lines += [f"| {k} | " + " | ".join(cell(v, k) for _, v in columns) + " |" for k in keys]
    return "\n".join(lines)


def load_snippet(cfg: DictConfig, adapter: str) -> str:
    """Python that loads the base model and this adapter with PEFT."""
    name = str(cfg.model.name)
    if name == TINY:
        base = (
            "from fedllm_app.config import load_config  # pip install fedllm: builds the tiny model offline\n"
            "from fedllm_app.model import load_base\n\n"
            "base, tokenizer = load_base(load_config({}).model)\n"
        )
    else:
        base = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{name}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{name}")\n'
        )
    return f'```python\nfrom peft import PeftModel\n{base}model = PeftModel.from_pretrained(base, "{adapter}")\n```'


def model_card(cfg: DictConfig, summary: dict[str, Any], adapter: str) -> str:
    """The whole card; ``adapter`` is where a reader loads it from (the Hub repo, or the local folder)."""
    local = (
        " The local-only mean is over the clients, each trained alone for the same rounds and steps."
        if "baseline_local" in summary
        else ""
    )
    return (
        f"{front_matter(cfg)}\n"
        f"# {summary.get('run', 'fedllm run')}\n\n"
        f"A LoRA adapter for {_base_line(cfg)}, fine-tuned with federated learning ({cfg.strategy.name}) over "
        f"{cfg.num_clients} clients with fedllm on [Flower](https://flower.ai): "
        f"each client's data stayed with it; only adapter weights were exchanged.\n\n"
        f"## Training\n\n{training_table(cfg, summary)}\n\n"
        f"## Held-out results\n\nMeasured by the server on data no client trained on.{local}\n\n"
        f"{metrics_table(summary)}\n\n"
        f"## How to load\n\n{load_snippet(cfg, adapter)}\n\n"
        f"Training prompts used fedllm's `{cfg.training.template}` template (`fedllm_app/data/templates.py`: "
        f"alpaca and vicuna are fixed strings, chat is the tokenizer's chat template); prompt the adapter the "
        f"same way.\n"
    )


def write_model_card(folder: Path, cfg: DictConfig, summary: dict[str, Any]) -> Path:
    """Write ``README.md`` into the adapter ``folder``; the snippet points at ``hub.repo_id`` when pushed."""
    adapter = str(cfg.hub.repo_id) if cfg.hub.push and cfg.hub.repo_id else str(folder)
    path = folder / "README.md"
    path.write_text(model_card(cfg, summary, adapter))
    return path
