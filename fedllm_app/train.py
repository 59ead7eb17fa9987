"""The one client training path: TRL's SFTTrainer on the process's LoRA model.

The task is a parameter (SFT now; DPO joins this path later). Each round builds a
light trainer around the already-loaded model with a constant learning rate sent
by the server, trains ``max_steps`` steps on the round's sample and returns the
mean loss.
"""

from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from fedllm_app.data import Row, to_trl


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


def quiet_libraries() -> None:
    """Silence per-round progress bars of datasets/transformers (one log line per round is ours)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def sft_config(cfg: DictConfig, learning_rate: float, seed: int, output_dir: str) -> Any:
    from trl import SFTConfig

    t, m = cfg.training, cfg.model
    cuda = torch.cuda.is_available()
    return SFTConfig(
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
        gradient_checkpointing=bool(m.gradient_checkpointing),
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        dataset_num_proc=None,
    )


# Explicit per-process cache: a partition tokenised by TRL once, reused every round.
_PROCESSED: dict[str, Any] = {}


def _trainer(
    model: Any, tokenizer: Any, dataset: Any, cfg: DictConfig, lr: float, seed: int, tmp: str, **kw: Any
) -> Any:
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=model, args=sft_config(cfg, lr, seed, tmp), train_dataset=dataset, processing_class=tokenizer, **kw
    )
    trainer.remove_callback(PrinterCallback)  # the server logs one line per round instead
    return trainer


def processed_partition(model: Any, tokenizer: Any, rows: list[Row], cfg: DictConfig, key: str) -> Any:
    """``rows`` tokenised by TRL (``input_ids``, and ``labels`` at -100 outside the response), once per ``key``.

    TRL drops rows whose completion is cut off by ``training.max_length``; they are
    counted and reported here instead of vanishing.
    """
    if key not in _PROCESSED:
        quiet_libraries()
        with tempfile.TemporaryDirectory(prefix="fedllm-tokenize-") as tmp:
            dataset = _trainer(model, tokenizer, to_trl(rows, cfg.training.template), cfg, 1e-3, 0, tmp).train_dataset
        dropped = len(rows) - len(dataset)
        if dropped:
            print(
                f"[fedllm] {key}: {dropped} of {len(rows)} rows dropped: prompt longer than "
                f"training.max_length={cfg.training.max_length}; raise training.max_length to keep them",
                flush=True,
            )
        if len(dataset) == 0:
            raise ValueError(f"{key}: no row fits training.max_length={cfg.training.max_length}; raise it")
        _PROCESSED[key] = dataset
        # Trainer.train() starts with a full gc.collect(); moving the long-lived model and
        # data out of the collector's view makes that ~0.3 s -> ~0.01 s per round.
        gc.collect()
        gc.freeze()
    return _PROCESSED[key]


def train_round(
    model: Any, tokenizer: Any, dataset: Any, cfg: DictConfig, learning_rate: float, seed: int
) -> TrainResult:
    """Train the model's adapter in place on a TRL-processed ``dataset`` for ``training.max_steps`` steps."""
    quiet_libraries()
    start = time.perf_counter()
    timer = _StepTimer()
    with tempfile.TemporaryDirectory(prefix="fedllm-trainer-") as tmp:
        trainer = _trainer(model, tokenizer, dataset, cfg, learning_rate, seed, tmp, callbacks=[timer.callback])
        out = trainer.train()
    return TrainResult(
        loss=float(out.training_loss),
        num_examples=len(dataset),
        steps=int(out.global_step),
        seconds=time.perf_counter() - start,
        optimizer_seconds=timer.total,
    )
