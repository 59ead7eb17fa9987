"""The one client training path: TRL's SFTTrainer or DPOTrainer on the process's LoRA model.

The task (``task=sft`` or ``task=dpo``) is a parameter: it picks the TRL trainer and its
config; everything else (the round's sample, learning rate and seed, the FedProx and
SCAFFOLD gradient terms, the step timer) is the same path. Each round reuses a light
trainer around the already-loaded model with a constant learning rate sent by the
server, trains ``max_steps`` steps on the round's sample and returns the mean loss.

DPO's reference policy is the adapter the run starts from: TRL copies the model's
adapter into a frozen ``ref`` adapter, which fedllm then sets to that starting adapter
(:func:`fedllm_app.model.reference_adapter`: the SFT checkpoint of ``model.adapter``, or
zeros, i.e. the base model with the adapter disabled), the same on every client and round.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from fedllm_app.client.gradient_terms import GradientTerms, RankTerms
from fedllm_app.client.token_cache import cached_trainer_class
from fedllm_app.config import task_name
from fedllm_app.data.rows import Row
from fedllm_app.data.trl_form import to_trl
from fedllm_app.model import keep_lora_float32, reference_adapter
from strategies.aggregation import Arrays

log = logging.getLogger("fedllm")


@dataclass
class TrainResult:
    loss: float
    num_examples: int
    steps: int
    seconds: float
    optimizer_seconds: float


class _StepTimer:
    """A TrainerCallback measuring time spent inside optimizer steps (forward, backward, update)."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        outer = self

        class _Cb(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw) -> None:  # noqa: ANN001, ANN003, ANN201
                outer.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kw) -> None:  # noqa: ANN001, ANN003, ANN201
                outer.total += time.perf_counter() - outer.start

        self.total = 0.0
        self.start = 0.0
        self.callback = _Cb()


def trainer_config(cfg: DictConfig, learning_rate: float, seed: int, output_dir: str) -> Any:
    """TRL's SFTConfig or DPOConfig (``beta`` from ``task.beta``) with the shared training settings."""
    from trl import DPOConfig, SFTConfig

    t, m = cfg.training, cfg.model
    cuda = torch.cuda.is_available()
    extra = {"beta": float(cfg.task.beta)} if task_name(cfg) == "dpo" else {}
    config_class = DPOConfig if extra else SFTConfig
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old name warns).
    names = {f.name for f in dataclasses.fields(config_class)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    extra[checkpointing] = bool(m.gradient_checkpointing)
    return config_class(
        output_dir=output_dir,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        max_steps=t.max_steps,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_length=t.max_length,
        logging_strategy="no",
        report_to="none",
        save_strategy="no",
        use_cpu=not cuda,
        bf16=cuda and m.dtype == "bfloat16",
        fp16=cuda and m.dtype == "float16",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        dataset_num_proc=None,
        **extra,
    )


def without_flop_count(trainer_class: type) -> type:
    """``trainer_class`` without transformers' per-step FLOP estimate (``total_flos``, which fedllm never logs).

    ``Trainer.floating_point_ops`` walks every module of the model on every step to count parameters: about 5%
    of a tiny model's CPU time per round. Training is unchanged.
    """

    class NoFlops(trainer_class):  # type: ignore[misc, valid-type]
        def floating_point_ops(self, inputs: dict[str, Any]) -> int:
            return 0

    NoFlops.__name__ = NoFlops.__qualname__ = trainer_class.__name__
    return NoFlops


# Devices that run TRL's fused LM head eagerly: a batch's count of labelled positions costs no recompilation.
_EAGER_DEVICES = frozenset({"cpu", "cuda", "xpu", "mps"})


def score_labelled_positions_only() -> bool:
    """Have TRL's fused LM head score only the positions that carry a label, on every eager device; True if set.

    TRL 1.16's SFTTrainer and DPOTrainer project the last hidden states through the LM head in tiles (its
    ``add_fused_lm_head``). Where Triton runs (CUDA, XPU) they first keep only the positions whose next-token
    label is not -100; elsewhere they score every position, so that compiled backends (Neuron, XLA) do not
    recompile for each batch's count. On the CPU nothing recompiles, and the prompt's positions are scored for
    nothing: in a DPO batch of issue 18's workload about 90% of them, and the head's forward and backward were
    half of a step's CPU time. The positions kept, their log-probabilities and the metrics are the same; only the
    wasted rows go. The trained DPO adapter is bit-identical (tested); the backward's products over fewer rows
    may round differently in the last bit (SFT on issue 18's workload), as TRL's own Triton path does.

    TRL makes that choice through ``trl.trainer.utils._use_triton`` alone; this wraps it, once per process. A
    TRL without it is left as it is (False), and a test says so.
    """
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        return False
    if getattr(original, "scores_labelled_only", False):
        return True

    def compact(device: torch.device) -> bool:
        return device.type in _EAGER_DEVICES or original(device)

    compact.scores_labelled_only = True  # type: ignore[attr-defined]
    compact.__wrapped__ = original  # type: ignore[attr-defined]
    trl_utils._use_triton = compact
    return True


def _trainer(model: Any, tokenizer: Any, dataset: Any, cfg: DictConfig, output_dir: str, **kw: Any) -> Any:
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOTrainer, SFTTrainer

    DPOTrainer, SFTTrainer = (without_flop_count(cached_trainer_class(c)) for c in (DPOTrainer, SFTTrainer))  # noqa: N806
    score_labelled_positions_only()
    args = trainer_config(cfg, cfg.training.learning_rate, cfg.seed, output_dir)
    if task_name(cfg) == "dpo":
        # ref_model=None with a PEFT model: TRL adds a frozen "ref" adapter (set by set_reference). A
        # process can serve several partitions: their trainers share the model and the one reference.
        if "ref" in model.peft_config:
            model.delete_adapter("ref")
        trainer = DPOTrainer(
            model=model, ref_model=None, args=args, train_dataset=dataset, processing_class=tokenizer, **kw
        )
    else:
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, **kw)
    trainer.remove_callback(PrinterCallback)  # the server logs one line per round instead
    keep_lora_float32(model)  # TRL casts a quantised model's LoRA weights to bf16; train them in float32
    return trainer


def set_reference(model: Any, reference: Arrays) -> None:
    """Load ``reference`` (adapter-keyed arrays) into DPO's frozen ``ref`` adapter."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, {k: torch.from_numpy(v) for k, v in reference.items()}, adapter_name="ref")


def count_truncated(dataset: Any, max_length: int) -> int:
    """Rows TRL keeps but cuts at ``max_length`` tokens (DPO: prompt + the longer completion)."""
    if "chosen_ids" in dataset.column_names:
        cols = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
        return sum(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) > max_length for r in cols)
    return sum(len(ids) >= max_length for ids in dataset["input_ids"])


class ClientTrainer:
    """One TRL trainer (SFT or DPO) per (process, partition), built once and reused every round.

    At construction TRL tokenises the whole partition (SFT: prompt/completion, ``labels``
    at -100 outside the response; DPO: prompt, chosen and rejected ids). Each round then
    only swaps in the sampled rows, the round's learning rate and seed, and a fresh
    optimizer (as a new trainer would have), so a round costs little more than its
    optimizer steps.

    TRL drops rows whose prompt fills ``training.max_length`` (and cuts longer ones);
    both are counted and reported here instead of vanishing.
    """

    def __init__(
        self, model: Any, tokenizer: Any, rows: list[Row], cfg: DictConfig, name: str, reference: Arrays | None = None
    ) -> None:
        self.timer = _StepTimer()
        self.terms = GradientTerms()
        self.output_dir = tempfile.mkdtemp(prefix="fedllm-trainer-")
        self.trainer = _trainer(
            model,
            tokenizer,
            to_trl(rows, cfg.training.template),
            cfg,
            self.output_dir,
            callbacks=[self.timer.callback, self.terms.callback()],
        )
        if task_name(cfg) == "dpo":
            set_reference(model, reference if reference is not None else reference_adapter(cfg.model, model))
        self.dataset = self.trainer.train_dataset
        self.max_steps = cfg.training.max_steps
        max_length = cfg.training.max_length
        self.dropped = len(rows) - len(self.dataset)
        if self.dropped:
            log.warning(
                "%s: %d of %d rows dropped: prompt longer than training.max_length=%d; "
                "raise training.max_length to keep them",
                name, self.dropped, len(rows), max_length,
            )  # fmt: skip
        if len(self.dataset) == 0:
            raise ValueError(f"{name}: no row fits training.max_length={max_length}; raise it")
        self.truncated = count_truncated(self.dataset, max_length)
        if self.truncated:
            log.warning(
                "%s: %d of %d rows truncated to training.max_length=%d tokens; "
                "raise training.max_length to keep them whole",
                name, self.truncated, len(rows), max_length,
            )  # fmt: skip
        # Trainer.train() starts with a full gc.collect(); moving the long-lived model and
        # data out of the collector's view makes that ~0.3 s -> ~0.01 s per round.
        gc.collect()
        gc.freeze()

    def train_round(
        self,
        indices: list[int],
        learning_rate: float,
        seed: int,
        mu: float = 0.0,
        correction: Arrays | None = None,
        max_steps: int | None = None,
        ranks: RankTerms | None = None,
    ) -> TrainResult:
        """Train the model's adapter in place on the rows ``indices`` for ``training.max_steps`` steps.

        ``mu`` (FedProx), ``correction`` (SCAFFOLD's ``c - c_i``) and ``ranks`` (HetLoRA's self-pruning) act on
        the gradients.
        """
        start = time.perf_counter()
        trainer = self.trainer
        self.terms.start_round(trainer.model, mu, correction, ranks)
        trainer.train_dataset = self.dataset.select(indices)
        trainer.args.learning_rate = learning_rate
        trainer.args.seed = trainer.args.data_seed = seed
        trainer.args.max_steps = max_steps or self.max_steps
        trainer.optimizer, trainer.lr_scheduler = None, None
        self.timer.total = 0.0
        out = trainer.train()
        return TrainResult(
            loss=float(out.training_loss),
            num_examples=len(indices),
            steps=int(out.global_step),
            seconds=time.perf_counter() - start,
            optimizer_seconds=self.timer.total,
        )


# Explicit per-process cache of ClientTrainers, keyed by partition and config.
_TRAINERS: dict[str, ClientTrainer] = {}


def client_trainer(
    model: Any, tokenizer: Any, rows: list[Row], cfg: DictConfig, key: str, reference: Arrays | None = None
) -> ClientTrainer:
    """The process's :class:`ClientTrainer` for ``key``, built on first use.

    ``reference`` is DPO's reference adapter (ignored for SFT).
    """
    if key not in _TRAINERS:
        _TRAINERS[key] = ClientTrainer(model, tokenizer, rows, cfg, key, reference)
    return _TRAINERS[key]
