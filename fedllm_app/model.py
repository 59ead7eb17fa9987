"""Base model + LoRA loading (once per process) and adapter <-> ArrayRecord conversion.

:func:`get_model` is the explicit per-process cache: the base model is loaded
once for a given model config and wrapped with LoRA once; every round then only
loads the global adapter weights into it (:func:`set_adapter`).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from fedllm_app.config import ConfigError

TINY = "builtin:tiny"
# Node-config key of a SuperNode's LoRA rank (deployment): flower-supernode ... --node-config "lora-rank=8".
RANK_NODE_KEY = "lora-rank"


class ModelLoadError(RuntimeError):
    """The model or tokenizer could not be loaded; the message names model.name and the fix."""


def resolve_name(name: str) -> str:
    """Map ``builtin:tiny`` to the cached embedded model (built on first use); pass others through."""
    if name == TINY:
        from fedllm_app.tiny_model import ensure_tiny_model

        return str(ensure_tiny_model())
    return str(Path(name).expanduser()) if name.startswith(("~", ".", "/")) else name


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def quantization_config(model_cfg: DictConfig) -> Any:
    """Bitsandbytes config for ``model.quantization`` (4bit: NF4 with double quantisation and the model's compute
    dtype, as QLoRA trains; 4bit-fp4: bitsandbytes' defaults, FP4 computing in float32, as the FlowerTune
    leaderboard evaluates; 8bit), or None.
    """
    if model_cfg.quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    if model_cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if model_cfg.quantization == "4bit-fp4":
        return BitsAndBytesConfig(load_in_4bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=_dtype(model_cfg.dtype),
    )


def load_tokenizer(name: str, model_cfg: DictConfig) -> Any:
    """The tokenizer of model folder or Hub id ``name``, in the older SentencePiece form too.

    A folder with only ``tokenizer.model`` (``tokenizer_class: LlamaTokenizer``, as transformers 4.3x
    saved Llama-2 derivatives) is converted on the fly by the ``sentencepiece`` package. When that fails,
    transformers falls back to reading the file as tiktoken and says only that tiktoken is missing; this
    names the real cause instead.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=model_cfg.trust_remote_code)
    except ValueError as err:
        if "tiktoken" not in str(err):
            raise
        raise ModelLoadError(
            f"cannot read the SentencePiece tokenizer of model.name={model_cfg.name!r} "
            "(tokenizer.model, no tokenizer.json): the file is not a SentencePiece model the installed "
            "sentencepiece can read. Reinstall fedllm so it brings sentencepiece>=0.2,<0.2.3 (0.2.3 needs "
            "protobuf 7, which Flower 1.42 forbids), or re-save the tokenizer with a tokenizer.json "
            "(AutoTokenizer.from_pretrained(folder).save_pretrained(folder) where it loads)."
        ) from err


def placement(model_cfg: DictConfig) -> Any:
    """The ``device_map`` for ``from_pretrained``: one device (GPU 0, else CPU), or accelerate's spread.

    ``model.device_map=null`` puts the whole model on the client's one GPU (``{"": 0}``, CPU without one);
    ``auto`` (or ``balanced``, ``balanced_low_0``, ``sequential``) lets accelerate split its layers over every
    GPU the client sees (``client-resources-num-gpus=2`` in a simulation; ``CUDA_VISIBLE_DEVICES`` on a
    SuperNode), for a base or sequence too large for one; the Trainer then runs the layers in turn
    (model parallel), not data parallel. Without a GPU every choice is the CPU.
    """
    choice = model_cfg.get("device_map")
    if choice is None:
        return {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    return str(choice)


def load_base(model_cfg: DictConfig) -> tuple[Any, Any]:
    """Load the base causal LM and tokenizer (Hub id or local folder); quantised if configured."""
    from transformers import AutoModelForCausalLM

    name = resolve_name(str(model_cfg.name))
    device_map = placement(model_cfg)
    try:
        tokenizer = load_tokenizer(name, model_cfg)
        model = AutoModelForCausalLM.from_pretrained(
            name,
            dtype=_dtype(model_cfg.dtype),
            quantization_config=quantization_config(model_cfg),
            device_map=device_map,
            trust_remote_code=model_cfg.trust_remote_code,
        )
    except OSError as err:
        raise ModelLoadError(
            f"cannot load model.name={model_cfg.name!r}: {str(err).splitlines()[0]} "
            f"Give a local folder saved with save_pretrained, a reachable Hub id, or builtin:tiny."
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model_cfg.quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(model_cfg.gradient_checkpointing)
        )
    elif model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return model, tokenizer


def lora_config(model_cfg: DictConfig) -> Any:
    from peft import LoraConfig

    lora = model_cfg.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


@lru_cache(maxsize=2)
def _cached(key: str, seed: int) -> tuple[Any, Any, dict[str, np.ndarray]]:
    """(model, tokenizer, the adapter it was built with): the seeded PEFT init, or ``model.adapter``'s weights."""
    from peft import get_peft_model

    model_cfg = OmegaConf.create(json.loads(key))
    base, tokenizer = load_base(model_cfg)
    torch.manual_seed(seed)
    model = get_peft_model(base, lora_config(model_cfg))
    if model_cfg.get("adapter"):
        set_adapter(model, load_saved_adapter(str(model_cfg.adapter)), what=f"model.adapter={model_cfg.adapter!r}")
    return model, tokenizer, get_adapter(model)


def keep_lora_float32(model: Any) -> int:
    """Store every LoRA tensor (trainable and DPO's frozen ``ref``) in float32; return how many were recast.

    TRL 1.16's SFTTrainer and DPOTrainer cast a quantised model's trainable parameters to
    bfloat16 when they are built (QLoRA paper, section 3), and the process's cached model keeps
    them so: AdamW then updates bf16 weights with no float32 master copy and small updates
    vanish. PEFT keeps adapters in float32 by default; this puts them back after the trainer.
    """
    recast = 0
    for name, param in model.named_parameters():
        if "lora_" in name and param.dtype != torch.float32:
            param.data = param.data.float()
            recast += 1
    return recast


def load_saved_adapter(path: str) -> dict[str, np.ndarray]:
    """The weights of a saved PEFT adapter folder (e.g. an SFT run's ``checkpoints/round-N``)."""
    from safetensors.numpy import load_file

    folder = Path(path).expanduser()
    file = folder / "adapter_model.safetensors"
    if not file.is_file():
        raise ModelLoadError(
            f"model.adapter={path!r} has no adapter_model.safetensors; give a checkpoint folder of an earlier run, "
            f"e.g. outputs/<run>/checkpoints/round-<N>"
        )
    return {k: v.astype(np.float32) for k, v in load_file(str(file)).items()}


def reference_adapter(model_cfg: DictConfig, model: Any) -> dict[str, np.ndarray]:
    """DPO's reference: the adapter the run starts from.

    ``model.adapter``'s weights when DPO starts from an SFT checkpoint; otherwise zeros,
    which (LoRA adds ``B @ A``) is the base model with the adapter disabled.
    """
    if model_cfg.get("adapter"):
        return load_saved_adapter(str(model_cfg.adapter))
    return {k: np.zeros_like(v) for k, v in get_adapter(model).items()}


def _model_key(model_cfg: DictConfig) -> str:
    return json.dumps(OmegaConf.to_container(model_cfg, resolve=True), sort_keys=True)


def get_model(model_cfg: DictConfig, seed: int = 0) -> tuple[Any, Any]:
    """The process's LoRA-wrapped model and tokenizer for ``model_cfg`` (loaded once).

    The model is shared: its adapter holds whatever was last set into it. A run starts from
    :func:`initial_adapter`, never from that.
    """
    model, tokenizer, _ = _cached(_model_key(model_cfg), seed)
    return model, tokenizer


def initial_adapter(model_cfg: DictConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """A copy of the adapter a run of ``model_cfg`` and ``seed`` starts from: LoRA's init drawn under ``seed``
    (``model.adapter``'s weights when set), whatever the process's cached model was set to since.
    """
    _, _, initial = _cached(_model_key(model_cfg), seed)
    return {k: v.copy() for k, v in initial.items()}


def client_rank(cfg: DictConfig, pid: int, node_rank: Any = None) -> int:
    """The LoRA rank a client trains: its node config's ``lora-rank``, else ``model.lora.client_ranks[pid % len]``,
    else ``model.lora.r``.

    Raises a ConfigError naming the value when the rank is not in ``1..model.lora.r`` or when it
    differs from ``model.lora.r`` in a homogeneous run.
    """
    lora = cfg.model.lora
    ranks = list(lora.get("client_ranks") or [])
    if node_rank is None or node_rank == "":
        return int(ranks[pid % len(ranks)]) if ranks else int(lora.r)
    rank = int(node_rank) if isinstance(node_rank, int) or str(node_rank).isdigit() else -1
    if not 1 <= rank <= lora.r:
        raise ConfigError(
            f"node config {RANK_NODE_KEY}={node_rank!r} must be an integer in 1..model.lora.r={lora.r} (the global "
            f"adapter's rank); start the SuperNode with a rank of at most {lora.r} or raise model.lora.r"
        )
    if rank != lora.r and cfg.get("lora_aggregation", "homogeneous") == "homogeneous":
        raise ConfigError(
            f"node config {RANK_NODE_KEY}={rank} but lora_aggregation=homogeneous trains every client at "
            f"model.lora.r={lora.r}; run with overrides='lora_aggregation=hetlora' (or flexlora), or drop "
            f"{RANK_NODE_KEY} from the node config"
        )
    return rank


def with_client_rank(cfg: DictConfig, rank: int) -> DictConfig:
    """``cfg`` whose LoRA has rank ``rank`` and ``lora_alpha = alpha rank / r``: the global's scaling ``alpha / r``.

    Every client then adds ``(alpha / r) B A`` like the global adapter, so its factors are the
    first ``rank`` ranks of the global's in the same units (:mod:`strategies.hetero_rank`), and
    its saved adapter (``r=rank``, ``lora_alpha=alpha rank / r``) applies the update it trained.
    ``cfg`` itself when ``rank`` is ``model.lora.r``.
    """
    lora = cfg.model.lora
    if rank == lora.r:
        return cfg
    return OmegaConf.merge(cfg, {"model": {"lora": {"r": rank, "alpha": lora.alpha * rank / lora.r}}})


def load_count() -> int:
    """How many times a base model was actually loaded in this process (cache misses)."""
    return _cached.cache_info().misses


def get_adapter(model: Any) -> dict[str, np.ndarray]:
    """The trainable LoRA weights as float32 numpy arrays, keyed by PEFT's saved names."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().cpu().numpy().copy() for k, v in get_peft_model_state_dict(model).items()}


def set_adapter(model: Any, arrays: dict[str, np.ndarray], what: str = "adapter arrays") -> None:
    """Load adapter weights into the model; the names and shapes must match exactly."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    current = get_peft_model_state_dict(model)  # tensors, no copies: only names and shapes are compared
    missing = sorted(set(current) - set(arrays))
    unexpected = sorted(set(arrays) - set(current))
    fix = "" if what == "adapter arrays" else "; use the model and model.lora settings of the run that saved it"
    if missing or unexpected:
        raise ValueError(f"{what} do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}{fix}")
    for k, v in arrays.items():
        if tuple(v.shape) != tuple(current[k].shape):
            raise ValueError(f"{what}: {k!r} has shape {v.shape}, the model expects {tuple(current[k].shape)}{fix}")
    set_peft_model_state_dict(model, {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})
