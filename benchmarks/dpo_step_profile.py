"""Where a fedllm DPO client round's CPU time goes, on issue 18's workload, one process, one torch thread.

Builds ``benchmarks/vs_openfedllm.py``'s DPO workload (its random Llama, SentencePiece vocabulary and
Anthropic-HH rows) in a folder, composes fedllm's config with that script's overrides, builds client 0's
trainer (the fixed cost a worker pays once per partition: tokenising cold, then loading the cached rows, and
setting DPO's reference) and trains ``--rounds`` rounds of 5 DPO steps of batch 8 from the same starting
adapter, the rounds after the first under cProfile (process CPU time). It prints, per step, CPU seconds, the
padded batch width, forwards of the Llama backbone with grad (policy) and without (reference), and the CPU
seconds of each part of the step; then the functions with the most own time.

With ``--dump rows.jsonl`` it writes each round's 40 rows in TRL's form (the prompt rendered by fedllm's
vicuna template, chosen, rejected) for ``benchmarks/dpo_step_profile_trl07.py``, which runs TRL 0.7.2's
DPOTrainer (OpenFedLLM's) on the same model and rows in OpenFedLLM's environment::

    python benchmarks/dpo_step_profile.py --work /tmp/dpo-prof --dump /tmp/dpo-prof/rounds.jsonl
    ~/ofl-venv/bin/python benchmarks/dpo_step_profile_trl07.py --work /tmp/dpo-prof

Not a test; docs/benchmarks.md (issue 18) holds its findings.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_profile import ForwardClock, StepClock, Widths, cumulative, profiled, report, top  # noqa: E402
from vs_openfedllm import build_workload, fedllm_overrides  # noqa: E402

# (file suffix, function) of the parts of a step, TRL 1.16 / transformers 5 / PEFT 0.21 / torch.
PARTS = {
    "Trainer.train (whole round)": ("transformers/trainer.py", "train"),
    "fetch + collate batch": ("transformers/trainer.py", "get_batch_samples"),
    "  collator (DataCollatorForPreference)": ("trl/trainer/dpo_trainer.py", "torch_call"),
    "training_step": ("transformers/trainer.py", "training_step"),
    "  DPO loss (_compute_loss: both forwards, metrics)": ("trl/trainer/dpo_trainer.py", "_compute_loss"),
    "    fused LM head forward (chunked log-probs)": ("trl/kernels/chunked_logprob.py", "forward"),
    "    use_adapter('ref') context": ("trl/trainer/utils.py", "use_adapter"),
    "      PeftModel.set_adapter": ("peft/peft_model.py", "set_adapter"),
    "    accelerate gather / gather_for_metrics": ("accelerate/accelerator.py", "gather_for_metrics"),
    "  backward()": ("torch/_tensor.py", "backward"),
    "    fused LM head backward": ("trl/kernels/chunked_logprob.py", "backward"),
    "clip_grad_norm_": ("torch/nn/utils/clip_grad.py", "clip_grad_norm_"),
    "optimizer step": ("accelerate/optimizer.py", "step"),
    "zero_grad": ("accelerate/optimizer.py", "zero_grad"),
    "callbacks (call_event)": ("transformers/trainer_callback.py", "call_event"),
    "model.train()": ("torch/nn/modules/module.py", "train"),
    "floating_point_ops": ("transformers/trainer.py", "floating_point_ops"),
    "gc.collect": ("~", "<built-in method gc.collect>"),
}


def workload(work: Path, rows: int) -> tuple[Path, Path]:
    """The DPO rows and model folder under ``work``, built once."""
    if not (work / "model" / "config.json").is_file():
        return build_workload(work, rows, "dpo")
    return work / "data" / "dpo.jsonl", work / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the model, rows and caches (reused)")
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of client 0 (the first is warm-up)")
    parser.add_argument("--dump", type=Path, default=None, help="write each round's rows in TRL form here")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FEDLLM_CACHE", str(args.work / "fedllm-cache"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(args.work / "hf-cache"))
    rows_path, model_path = workload(args.work, args.rows)

    import torch

    from fedllm_app.client import trainer as trainer_module
    from fedllm_app.config import load_config
    from fedllm_app.data.pipeline import partition
    from fedllm_app.data.sampling import round_indices
    from fedllm_app.data.trl_form import to_trl
    from fedllm_app.model import get_adapter, get_model, set_adapter

    torch.set_num_threads(1)
    cfg = load_config(extra=shlex.split(fedllm_overrides(model_path, rows_path, args.rounds, "dpo")))
    t0 = time.process_time()
    model, tok = get_model(cfg.model, cfg.seed)
    load = time.process_time() - t0
    rows = partition(cfg, 0)
    start = get_adapter(model)
    builds = []
    for _ in range(2):  # cold tokenisation, then a second worker's build from the on-disk cache
        trainer_module._TRAINERS.clear()
        t0 = time.process_time()
        client = trainer_module.client_trainer(model, tok, rows, cfg, key="client 0")
        builds.append(time.process_time() - t0)
    trainer = client.trainer
    clock, widths = StepClock(), Widths(trainer.data_collator)
    trainer.add_callback(clock.callback)
    trainer.data_collator = widths
    backbone = ForwardClock(model.get_base_model().model)
    trl_rows = to_trl(rows, cfg.training.template)
    lr = float(cfg.training.learning_rate)
    out = [f"model load {load:.2f} s CPU; trainer build: cold {builds[0]:.2f} s, cached {builds[1]:.2f} s CPU"]
    dumped = []
    for rnd in range(1, args.rounds + 1):
        set_adapter(model, start)
        idx = round_indices(len(client.dataset), cfg, rnd, 0)
        dumped.append([trl_rows[i] for i in idx])  # the dataset keeps every row here (none dropped)
        clock.steps.clear()
        before = {k: dict(v) for k, v in (("s", backbone.seconds), ("n", backbone.calls))}
        t0 = time.process_time()
        if rnd == 1:
            result, stats = client.train_round(idx, lr, seed=rnd), None
        else:
            result, stats = profiled(client.train_round, idx, lr, seed=rnd)
        total = time.process_time() - t0
        steps = list(clock.steps)
        fwd = {k: backbone.seconds[k] - before["s"].get(k, 0.0) for k in ("policy", "ref")}
        calls = {k: backbone.calls[k] - before["n"].get(k, 0) for k in ("policy", "ref")}
        out.append(
            f"\nround {rnd}: train_round {total:.3f} s CPU, steps {sum(steps):.3f} s, outside the steps "
            f"{total - sum(steps):.3f} s; loss {result.loss:.4f}; batch shapes {widths.shapes[-len(steps) :]}, "
            f"real tokens {statistics.mean(widths.real[-len(steps) :]):.0%}; backbone forwards per step: policy "
            f"{calls['policy'] / len(steps):.1f} ({fwd['policy'] / len(steps):.4f} s), ref "
            f"{calls['ref'] / len(steps):.1f} ({fwd['ref'] / len(steps):.4f} s)"
            + (" (under cProfile)" if stats else "")
        )
        if stats:
            out += report(f"round {rnd} (TRL 1.16)", steps, cumulative(stats, PARTS), len(steps))
            out += ["", "most own time:", *top(stats, args.top)]
    if args.dump:
        args.dump.write_text("\n".join(json.dumps(r) for r in dumped) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
