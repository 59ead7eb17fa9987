"""fedllm against OpenFedLLM on the same small workload, built offline; per-round and total wall times.

The workload (issue 18): a random Llama (hidden 128, 2 layers) with a SentencePiece vocabulary of 1,024
trained here on the rows, 4,000 rows of random words (alpaca-format for SFT, Anthropic-HH pairs for DPO),
4 clients with 2 sampled per round, 5 steps of batch 8, sequence length 128 (DPO: 256), LoRA r8/alpha 16 on q/v (dropout
0.05), lr 1e-3 cosine over the rounds down to OpenFedLLM's fixed floor (1e-6 SFT, 1e-5 DPO), FedAvg, IID,
20 rounds. fedllm runs through ``flwr run`` (simulation, one CPU and one thread per client). With
``--openfedllm PATH`` (a checkout of github.com/rui-ye/OpenFedLLM, never vendored here) its ``main_sft.py``
(``--task dpo``: ``main_dpo.py``) runs on the same model and rows in its own environment
(``--openfedllm-python``); its per-round times come from its own "Round N" lines, timed as they arrive.
Usage::

    python benchmarks/vs_openfedllm.py [--task sft|dpo] [--rounds 20] \\
        [--openfedllm ~/OpenFedLLM --openfedllm-python ~/ofl-venv/bin/python]

Not a test: it prints a markdown table to paste into docs/benchmarks.md (docs/benchmarks.md says how to
get the checkout and build its environment).
"""

from __future__ import annotations

import argparse
import ast
import collections
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fedllm_app.ops.flower_run import FlowerRunner, kill_flower_processes

WORDS = "red blue green fox dog cat runs jumps over under the a quick lazy small big river hill sun moon".split()


@dataclass(frozen=True)
class Task:
    """One task's settings on each side.

    Attributes
    ----------
    script : str
        OpenFedLLM's entry point.
    dataset : str
        The dataset name OpenFedLLM is told; it reads ``local_data_dir + dataset`` and formats the rows by
        that name (alpaca-cleaned: instruction/input/output; hh-rlhf: chosen/rejected conversations).
    template : str
        OpenFedLLM's ``--template`` (alpaca string; DPO: a FastChat conversation template).
    fedllm : str
        fedllm's overrides for the same: its dataset format, prompt template and OpenFedLLM's lr floor for
        the task (its cosine ends at 1e-6 for SFT, 1e-5 for DPO; neither is an argument there).
    """

    script: str
    dataset: str
    template: str
    fedllm: str


TASKS = {
    "sft": Task(
        "main_sft.py", "yahma/alpaca-cleaned", "alpaca",
        "dataset=alpaca training.template=alpaca training.min_learning_rate=1e-6 training.max_length=128",
    ),
    "dpo": Task(
        "main_dpo.py", "Anthropic/hh-rlhf", "vicuna_v1.1",
        "task=dpo dataset=hh_rlhf training.template=vicuna training.min_learning_rate=1e-5 training.max_length=256",
    ),
}  # fmt: skip


def write_rows(path: Path, n: int, task: str = "sft", seed: int = 0) -> None:
    """``n`` rows of random words as jsonl: alpaca (instruction, input, output) for SFT; Anthropic HH pairs
    (chosen, rejected: the same Human turn, the reversed words against "No: " and the words) for DPO.

    The rejected reply starts with a letter no chosen reply starts with, so the two conversations part
    exactly where the replies begin (OpenFedLLM cuts its DPO prompt at their longest common prefix).
    """
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            words = rng.choices(WORDS, k=rng.randint(4, 12))
            if task == "sft":
                row = {"instruction": f"Task {i}: reverse the words.", "input": " ".join(words)}
                row["output"] = " ".join(reversed(words))
            else:
                turn = f"\n\nHuman: Task {i}: reverse the words. {' '.join(words)}\n\nAssistant: "
                row = {"chosen": turn + " ".join(reversed(words)), "rejected": turn + "No: " + " ".join(words)}
            f.write(json.dumps(row) + "\n")


def build_model(folder: Path, rows: Path) -> None:
    """A SentencePiece tokenizer (vocab 1,024, trained on ``rows``) and a random 2-layer Llama in ``folder``."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "corpus.txt"
    text.write_text("\n".join(" ".join(json.loads(x).values()) for x in rows.read_text().splitlines()))
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(folder / "tokenizer"), vocab_size=1024, model_type="bpe",
        pad_id=3, bos_id=1, eos_id=2, unk_id=0, hard_vocab_limit=False,
    )  # fmt: skip
    tok = LlamaTokenizer.from_pretrained(folder, legacy=False)  # converted from tokenizer.model
    tok.pad_token = "<pad>"
    tok.save_pretrained(folder)  # tokenizer.json as well as tokenizer.model
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024, hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)


def build_workload(work: Path, num_rows: int, task: str) -> tuple[Path, Path]:
    """The issue's workload under ``work``: ``data/<task>.jsonl`` (``num_rows`` rows) and ``model/`` built on
    them; returns (rows file, model folder).
    """
    rows, model = work / "data" / f"{task}.jsonl", work / "model"
    rows.parent.mkdir(parents=True, exist_ok=True)
    write_rows(rows, num_rows, task)
    build_model(model, rows)
    return rows, model


def fedllm_overrides(model: Path, rows: Path, rounds: int, task: str = "sft") -> str:
    """fedllm's Hydra overrides for the workload."""
    return (
        f"model.name={model} model.lora.r=8 model.lora.alpha=16 model.lora.dropout=0.05 "
        f"model.lora.target_modules=[q_proj,v_proj] {TASKS[task].fedllm} "
        f"dataset.path={rows} num_clients=4 sample_clients=2 strategy=fedavg num_rounds={rounds} "
        "baseline=none save_every=1000 training.batch_size=8 training.max_steps=5 "
        "training.learning_rate=1e-3 training.max_new_tokens=16 training.num_threads=1"
    )


def run_fedllm(work: Path, model: Path, rows: Path, rounds: int, task: str = "sft") -> dict:
    """fedllm through ``flwr run``; its times, phases and losses per round from its metrics.jsonl."""
    home = work / "home"
    home.mkdir()
    out = work / "out"
    runner = FlowerRunner(home)
    # Cold caches of its own (tokenised rows, datasets), as OpenFedLLM's run gets; none left in ~/.cache.
    runner.env.update(FEDLLM_CACHE=str(work / "fedllm-cache"), HF_DATASETS_CACHE=str(work / "fedllm-hf-cache"))
    launched = time.time()
    try:
        status, log = runner.run(
            f"{fedllm_overrides(model, rows, rounds, task)} output_dir={out} run_name=bench",
            num_supernodes=4,
            federation_extra="client-resources-num-cpus=1",
            timeout=1800,
        )
    finally:
        kill_flower_processes(str(home))
    # As OpenFedLLM's ends when its process exits: until `flwr run` exits; the status check and clean-up after
    # it are this script's, timed apart.
    wall = (runner.exited_at or time.time()) - launched
    after = time.time() - launched - wall
    if status != "finished:completed":
        raise SystemExit(f"fedllm run ended {status}:\n{log[-3000:]}")
    lines = [json.loads(x) for x in (out / "bench" / "metrics.jsonl").read_text().splitlines()]
    check_every_round_trained(lines, log)
    return {
        "wall": wall,
        "status_and_cleanup": after,
        "rounds": [r["seconds"] for r in lines],
        "first_start": lines[0]["started_at"] - launched,
        "train": [number(r.get("train_phase_seconds")) for r in lines],
        "eval": [number(r.get("eval_seconds"), 0.0) for r in lines],
        "loss": [number(r.get("train_loss")) for r in lines],
    }


def check_every_round_trained(lines: list[dict], log: str) -> None:
    """Stop when a round of the fedllm run lost a client or was not aggregated: its times would be those of
    clients that failed (e.g. every row dropped by ``training.max_length``), not of training."""
    bad = [r["round"] for r in lines if not r.get("aggregated") or r.get("failed")]
    if bad:
        errors = [line for line in log.splitlines() if "ERROR" in line][-3:]
        raise SystemExit(f"fedllm rounds {bad} lost clients or were not aggregated; the times would not be "
                         f"training's:\n" + "\n".join(errors))  # fmt: skip


def number(value: float | None, missing: float = float("nan")) -> float:
    """A metric of metrics.jsonl as a float; ``missing`` where the round has none (null or absent)."""
    return missing if value is None else float(value)


# Its own per-round line (printed before a round's clients train) and the metrics dict transformers prints
# at the end of each client's ``trainer.train()``.
OFL_ROUND = re.compile(r">> =+ Round (\d+) : \[")
OFL_TRAIN = re.compile(r"\{'train_runtime'.*?\}")


def openfedllm_data(rows: Path, work: Path, task: str = "sft") -> str:
    """Lay ``rows`` out where OpenFedLLM looks for them; its ``--local_data_dir`` (the trailing slash matters:
    it loads ``local_data_dir + dataset_name``, a folder that ``datasets`` reads as json).
    """
    folder = work / "ofl-data" / TASKS[task].dataset
    folder.mkdir(parents=True)
    shutil.copy(rows, folder / "train.jsonl")
    return f"{work / 'ofl-data'}/"


def openfedllm_args(model: Path, data_dir: str, rounds: int, out: Path, task: str = "sft") -> list[str]:
    """main_sft.py's or main_dpo.py's arguments (its config.py names) for the issue-18 workload.

    LoRA targets (PEFT's Llama default: q/v), dropout (0.05), DPO's beta (0.1) and the per-round cosine lr
    are fixed in its code; its default gradient checkpointing is turned off (fedllm's local models train
    without) and checkpoints every ``save_model_freq`` rounds are pushed past the run, as fedllm's
    ``save_every=1000``. ``dataset_sample 0`` keeps every row. main_dpo.py ignores ``seq_length`` (TRL 0.7's
    DPOTrainer then caps at 512 tokens and cuts a prompt to 128 only when prompt and reply pass 512); the rows
    (about 150 tokens with the vicuna system prompt) are far shorter. fedllm's DPO gets ``training.max_length=256``:
    at 128 its vicuna prompts alone (about 140 tokens) do not fit and every row is dropped.
    """
    t = TASKS[task]
    return [
        t.script, "--model_name_or_path", str(model), "--dataset_name", t.dataset,
        "--local_data_dir", data_dir, "--dataset_sample", "0", "--fed_alg", "fedavg",
        "--num_rounds", str(rounds), "--num_clients", "4", "--sample_clients", "2", "--split_strategy", "iid",
        "--max_steps", "5", "--batch_size", "8", "--gradient_accumulation_steps", "1", "--seq_length", "128",
        "--use_peft", "--peft_lora_r", "8", "--peft_lora_alpha", "16", "--learning_rate", "1e-3",
        "--template", t.template, "--gradient_checkpointing", "False", "--save_model_freq", "1000000",
        "--output_dir", str(out),
    ]  # fmt: skip


def openfedllm_env(work: Path, threads: int = 0) -> dict[str, str]:
    """Unbuffered output (its round lines are timed as they arrive), offline, a fresh datasets cache; with
    ``threads`` > 0 that many torch threads (``OMP_NUM_THREADS``), else torch's default (one per core).
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return {
        **env, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_CACHE": str(work / "ofl-hf-cache"), "WANDB_DISABLED": "true",
    }  # fmt: skip


def parse_openfedllm(lines: list[tuple[float, str]], launched: float, ended: float) -> dict:
    """Per-round times from OpenFedLLM's timestamped output.

    A round runs from its ``Round N`` line to the next, the last to the last line of output (tqdm closing
    its rounds bar as the loop ends; the interpreter's exit comes after); its training phase is the sum of
    its clients' ``train_runtime``; launch to round 1 is the start-up (imports, data, model, tokenizer).
    OpenFedLLM evaluates nothing during training, so its evaluation time is 0.
    """
    marks: list[float] = []
    train: list[float] = []
    losses: list[list[float]] = []
    for stamp, line in lines:
        if OFL_ROUND.search(line):
            marks.append(stamp)
            train.append(0.0)
            losses.append([])
        for found in OFL_TRAIN.findall(line):
            metrics = ast.literal_eval(found)
            if not marks:
                raise ValueError(f"OpenFedLLM trained before its first round line: {line!r}")
            train[-1] += metrics["train_runtime"]
            losses[-1].append(metrics["train_loss"])
    if not marks:
        raise ValueError(
            "no 'Round N' line in OpenFedLLM's output: is it main_sft.py or main_dpo.py of rui-ye/OpenFedLLM?"
        )
    ends = [*marks[1:], lines[-1][0]]
    return {
        "wall": ended - launched,
        "rounds": [b - a for a, b in zip(marks, ends, strict=True)],
        "first_start": marks[0] - launched,
        "train": train,
        "eval": [0.0] * len(marks),
        "loss": [statistics.mean(x) if x else float("nan") for x in losses],
    }


def run_openfedllm(
    checkout: Path, python: str, model: Path, rows: Path, rounds: int, work: Path, task: str = "sft", threads: int = 0
) -> dict:
    """OpenFedLLM's main_sft.py (main_dpo.py) on the same model and rows, in its own environment; its output
    timed line by line.
    """
    script = TASKS[task].script
    if not (checkout / script).is_file():
        raise SystemExit(f"--openfedllm {checkout}: no {script} there; pass a checkout of rui-ye/OpenFedLLM")
    out = work / "ofl-out"
    out.mkdir()  # its save_config makes one folder inside, with os.mkdir
    args = [python, *openfedllm_args(model, openfedllm_data(rows, work, task), rounds, out, task)]
    tail: collections.deque[str] = collections.deque(maxlen=60)
    lines: list[tuple[float, str]] = []
    launched = time.time()
    with subprocess.Popen(
        args,
        cwd=checkout,
        env=openfedllm_env(work, threads),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        for line in proc.stdout:
            lines.append((time.time(), line))
            tail.append(line)
    ended = time.time()
    if proc.returncode:
        raise SystemExit(f"OpenFedLLM failed ({proc.returncode}):\n{''.join(tail)[-3000:]}")
    return parse_openfedllm(lines, launched, ended)


def later(values: list[float]) -> list[float]:
    """Rounds after the first (the first pays warm-up), or all when there is one."""
    return values[1:] or values


def row(name: str, r: dict) -> str:
    """One markdown table row of a tool's times."""
    steady = later(r["rounds"])
    return (
        f"| {name} | {r['wall']:.1f} s | {r['first_start']:.1f} s | {r['rounds'][0]:.2f} s | "
        f"{statistics.mean(steady):.2f} s ({statistics.median(steady):.2f} s) | "
        f"{statistics.mean(later(r['train'])):.2f} s | {statistics.mean(later(r['eval'])):.2f} s | "
        f"{r['loss'][-1]:.3f} |"
    )


def ratios(ours: dict, theirs: dict) -> str:
    """fedllm over OpenFedLLM, end to end and per later round (issue 18's goals: <= 1.0 and <= 0.8)."""
    wall = ours["wall"] / theirs["wall"]
    per_round = statistics.mean(later(ours["rounds"])) / statistics.mean(later(theirs["rounds"]))
    return f"fedllm / OpenFedLLM: end to end {wall:.2f}x (goal <= 1.0), later rounds {per_round:.2f}x (goal <= 0.8)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--task", choices=sorted(TASKS), default="sft")
    parser.add_argument("--openfedllm", type=Path, default=None, help="a checkout of OpenFedLLM (optional)")
    parser.add_argument("--openfedllm-python", default="python", help="the Python of OpenFedLLM's environment")
    parser.add_argument(
        "--openfedllm-threads", type=int, default=0,
        help="torch threads of OpenFedLLM's one process (0: torch's default, one per core)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write the raw per-round results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows, model = build_workload(work, args.rows, args.task)
        results = {"fedllm": run_fedllm(work, model, rows, args.rounds, args.task)}
        if args.openfedllm:
            results["OpenFedLLM"] = run_openfedllm(
                args.openfedllm, args.openfedllm_python, model, rows, args.rounds, work, args.task,
                args.openfedllm_threads,
            )  # fmt: skip
    if args.json:
        args.json.write_text(
            json.dumps(
                {"task": args.task, "rounds": args.rounds, "openfedllm_threads": args.openfedllm_threads, **results},
                indent=1,
            )
        )
    print(
        "| tool | total wall | launch to round 1 | round 1 | later rounds mean (median) "
        "| training phase, later rounds mean | evaluation, later rounds mean | last round's train loss |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(row(name, r))
    if "OpenFedLLM" in results:
        print("\n" + ratios(results["fedllm"], results["OpenFedLLM"]))
    after = results["fedllm"]["status_and_cleanup"]
    print(f"\nfedllm's total wall ends as `flwr run` exits; the `flwr ls` and clean-up after it: {after:.1f} s")
    for name, r in results.items():
        for key in ("rounds", "train", "eval"):
            print(f"\n{name} per-round {key} seconds: " + " ".join(f"{s:.2f}" for s in r[key]))
        print(f"\n{name} per-round train loss: " + " ".join(f"{s:.3f}" for s in r["loss"]))


if __name__ == "__main__":
    main()
