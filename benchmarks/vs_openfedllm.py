"""fedllm against OpenFedLLM on the same small workload, built offline; per-round and total wall times.

The workload (issue 18): a random Llama (hidden 128, 2 layers) with a SentencePiece vocabulary of 1,024
trained here on the rows, 4,000 alpaca-format rows, 4 clients with 2 sampled per round, 5 steps of batch 8,
sequence length 128, LoRA r8/alpha 16 on q/v (dropout 0.05), lr 1e-3 constant, FedAvg, 20 rounds, IID.
fedllm runs through ``flwr run`` (simulation, one CPU and one thread per client). With
``--openfedllm PATH`` (a checkout of OpenFedLLM, never vendored here) its ``main_sft.py`` runs on the
same model and rows in its own environment (``--openfedllm-python``). Usage::

    python benchmarks/vs_openfedllm.py [--rounds 20] [--openfedllm ~/OpenFedLLM --openfedllm-python ~/ofl/bin/python]

Not a test: it prints a markdown table to paste into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from fedllm_app.ops.flower_run import FlowerRunner, kill_flower_processes

WORDS = "red blue green fox dog cat runs jumps over under the a quick lazy small big river hill sun moon".split()


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    """``n`` alpaca-format rows (instruction, input, output) of random words, as jsonl."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            words = rng.choices(WORDS, k=rng.randint(4, 12))
            row = {"instruction": f"Task {i}: reverse the words.", "input": " ".join(words)}
            f.write(json.dumps({**row, "output": " ".join(reversed(words))}) + "\n")


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


def fedllm_overrides(model: Path, rows: Path, rounds: int) -> str:
    return (
        f"model.name={model} model.lora.r=8 model.lora.alpha=16 model.lora.dropout=0.05 "
        "model.lora.target_modules=[q_proj,v_proj] "
        f"dataset=alpaca dataset.path={rows} num_clients=4 sample_clients=2 strategy=fedavg num_rounds={rounds} "
        "baseline=none save_every=1000 training.template=alpaca training.batch_size=8 training.max_steps=5 "
        "training.max_length=128 training.learning_rate=1e-3 training.min_learning_rate=1e-3 "
        "training.max_new_tokens=16 training.num_threads=1"
    )


def run_fedllm(work: Path, model: Path, rows: Path, rounds: int) -> dict:
    home = work / "home"
    home.mkdir()
    out = work / "out"
    launched = time.time()
    try:
        status, log = FlowerRunner(home).run(
            f"{fedllm_overrides(model, rows, rounds)} output_dir={out} run_name=bench",
            num_supernodes=4,
            federation_extra="client-resources-num-cpus=1",
            timeout=1800,
        )
    finally:
        kill_flower_processes(str(home))
    wall = time.time() - launched
    if status != "finished:completed":
        raise SystemExit(f"fedllm run ended {status}:\n{log[-3000:]}")
    lines = [json.loads(x) for x in (out / "bench" / "metrics.jsonl").read_text().splitlines()]
    return {
        "wall": wall,
        "rounds": [r["seconds"] for r in lines],
        "first_start": lines[0]["started_at"] - launched,
        "train": [r["train_phase_seconds"] for r in lines],
        "eval": [r.get("eval_seconds", 0.0) for r in lines],
    }


def run_openfedllm(checkout: Path, python: str, model: Path, rows: Path, rounds: int, work: Path) -> dict:
    """OpenFedLLM's main_sft.py with the same settings (its argument names; untested without a checkout)."""
    args = [
        python, "main_sft.py", "--model_name_or_path", str(model), "--dataset_name", str(rows),
        "--local_data_dir", str(rows.parent), "--fed_alg", "fedavg", "--num_rounds", str(rounds),
        "--num_clients", "4", "--sample_clients", "2", "--split_strategy", "iid", "--max_steps", "5",
        "--batch_size", "8", "--gradient_accumulation_steps", "1", "--seq_length", "128", "--use_peft",
        "--peft_lora_r", "8", "--peft_lora_alpha", "16", "--learning_rate", "1e-3", "--template", "alpaca",
        "--output_dir", str(work / "ofl-out"),
    ]  # fmt: skip
    start = time.time()
    done = subprocess.run(args, cwd=checkout, capture_output=True, text=True, check=False)
    wall = time.time() - start
    if done.returncode:
        raise SystemExit(f"OpenFedLLM failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {"wall": wall, "rounds": [wall / rounds] * rounds, "first_start": float("nan")}


def row(name: str, r: dict) -> str:
    steady = r["rounds"][1:] or r["rounds"]
    return (
        f"| {name} | {r['wall']:.1f} s | {r['first_start']:.1f} s | {r['rounds'][0]:.2f} s | "
        f"{statistics.mean(steady):.2f} s | {statistics.median(steady):.2f} s |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--openfedllm", type=Path, default=None, help="a checkout of OpenFedLLM (optional)")
    parser.add_argument("--openfedllm-python", default="python", help="the Python of OpenFedLLM's environment")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows, model = work / "data" / "alpaca.jsonl", work / "model"
        rows.parent.mkdir()
        write_rows(rows, args.rows)
        build_model(model, rows)
        results = {"fedllm": run_fedllm(work, model, rows, args.rounds)}
        if args.openfedllm:
            results["OpenFedLLM"] = run_openfedllm(
                args.openfedllm, args.openfedllm_python, model, rows, args.rounds, work
            )
    print("| tool | total wall | launch to round 1 | round 1 | later rounds (mean) | later rounds (median) |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(row(name, r))
    for key in ("rounds", "train", "eval"):
        print(f"\nfedllm per-round {key} seconds: " + " ".join(f"{s:.2f}" for s in results["fedllm"][key]))


if __name__ == "__main__":
    main()
