"""TRL 0.7.2's DPOTrainer (OpenFedLLM's) on the rows ``dpo_step_profile.py`` dumped: CPU time per step, and where.

Runs in OpenFedLLM's environment (transformers 4.31, PEFT 0.4, TRL 0.7.2; docs/benchmarks.md says how to build
it), one torch thread, and imports nothing of fedllm. It trains as OpenFedLLM's main_dpo.py does with the
issue-18 settings, written here against TRL's and PEFT's public API: the model folder loaded with LoRA r8/alpha
16/dropout 0.05 on q/v (PEFT's Llama default), the slow tokenizer padding on the right, and per round a new
DPOTrainer (beta 0.1, no reference model: the adapter disabled) on that round's 40 rows, 5 steps of batch 8,
lr 1e-3 constant, from the same starting adapter every round. Rounds after the first run under cProfile; the
output has the same form as ``dpo_step_profile.py``'s::

    ~/ofl-venv/bin/python benchmarks/dpo_step_profile_trl07.py --work /tmp/dpo-prof
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_profile import ForwardClock, StepClock, Widths, cumulative, profiled, report, top  # noqa: E402

# (file suffix, function) of the parts of a step, TRL 0.7.2 / transformers 4.31 / PEFT 0.4 / torch.
PARTS = {
    "Trainer.train (whole round)": ("transformers/trainer.py", "train"),
    "DPOTrainer.__init__ (per round)": ("trl/trainer/dpo_trainer.py", "__init__"),
    "collator (tokenises and pads, every step)": ("trl/trainer/utils.py", "__call__"),
    "training_step": ("transformers/trainer.py", "training_step"),
    "  DPO loss (get_batch_metrics: both forwards)": ("trl/trainer/dpo_trainer.py", "get_batch_metrics"),
    "    concatenated_forward (policy + ref)": ("trl/trainer/dpo_trainer.py", "concatenated_forward"),
    "    _get_batch_logps (log_softmax, gather)": ("trl/trainer/dpo_trainer.py", "_get_batch_logps"),
    "    disable_adapter context": ("peft/peft_model.py", "disable_adapter"),
    "  backward()": ("torch/_tensor.py", "backward"),
    "clip_grad_norm_": ("torch/nn/utils/clip_grad.py", "clip_grad_norm_"),
    "optimizer step": ("accelerate/optimizer.py", "step"),
    "zero_grad": ("torch/nn/modules/module.py", "zero_grad"),
    "callbacks (call_event)": ("transformers/trainer_callback.py", "call_event"),
    "model.train()": ("torch/nn/modules/module.py", "train"),
    "floating_point_ops": ("transformers/trainer.py", "floating_point_ops"),
    "gc.collect": ("~", "<built-in method gc.collect>"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="the folder dpo_step_profile.py used")
    parser.add_argument("--rows", type=Path, default=None, help="its --dump file (default: WORK/rounds.jsonl)")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    rounds = [json.loads(x) for x in (args.rows or args.work / "rounds.jsonl").read_text().splitlines() if x]

    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments
    from trl import DPOTrainer

    torch.set_num_threads(1)
    folder = str(args.work / "model")
    t0 = time.process_time()
    model = AutoModelForCausalLM.from_pretrained(folder)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.config.use_cache = False
    tok = AutoTokenizer.from_pretrained(folder, use_fast=False, padding_side="right")
    tok.pad_token = tok.pad_token or tok.unk_token
    load = time.process_time() - t0
    start = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    backbone = ForwardClock(model.get_base_model().model)
    out = [f"model load {load:.2f} s CPU"]
    with tempfile.TemporaryDirectory() as tmp:
        for rnd, rows in enumerate(rounds, start=1):
            set_peft_model_state_dict(model, start)
            targs = TrainingArguments(
                output_dir=tmp, per_device_train_batch_size=8, gradient_accumulation_steps=1, learning_rate=1e-3,
                logging_steps=100, max_steps=5, report_to="none", save_steps=1000, gradient_checkpointing=False,
                lr_scheduler_type="constant", disable_tqdm=True,
            )  # fmt: skip
            clock = StepClock()

            def one_round(rows=rows, targs=targs, clock=clock):
                trainer = DPOTrainer(
                    model=model, ref_model=None, args=targs, beta=0.1, train_dataset=Dataset.from_list(rows),
                    tokenizer=tok, callbacks=[clock.callback],
                )  # fmt: skip
                widths = Widths(trainer.data_collator)
                trainer.data_collator = widths
                return trainer.train(), widths

            before = ({**backbone.seconds}, {**backbone.calls})
            t0 = time.process_time()
            if rnd == 1:
                (result, widths), stats = one_round(), None
            else:
                (result, widths), stats = profiled(one_round)
            total = time.process_time() - t0
            steps = clock.steps
            fwd = {k: backbone.seconds[k] - before[0].get(k, 0.0) for k in ("policy", "ref")}
            calls = {k: backbone.calls[k] - before[1].get(k, 0) for k in ("policy", "ref")}
            out.append(
                f"\nround {rnd}: trainer build + train {total:.3f} s CPU, steps {sum(steps):.3f} s, outside the "
                f"steps {total - sum(steps):.3f} s; loss {result.training_loss:.4f}; batch shapes {widths.shapes}, "
                f"real tokens {statistics.mean(widths.real):.0%}; backbone forwards per step: policy "
                f"{calls['policy'] / len(steps):.1f} ({fwd['policy'] / len(steps):.4f} s), ref "
                f"{calls['ref'] / len(steps):.1f} ({fwd['ref'] / len(steps):.4f} s)"
                + (" (under cProfile)" if stats else "")
            )
            if stats:
                out += report(f"round {rnd} (TRL 0.7.2)", steps, cumulative(stats, PARTS), len(steps))
                out += ["", "most own time:", *top(stats, args.top)]
    print("\n".join(out))


if __name__ == "__main__":
    main()
