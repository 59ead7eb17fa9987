"""Real-scale client benchmark: a 7B-shaped (and a 1B-shaped) model, our client round vs plain TRL, one GPU.

Built for one GPU with no network: each model is a random-initialised Llama of the named shape, written to a
local folder (no Hub download), then loaded the way a client loads it (``fedllm_app.model.get_model``: the
paper's setting, 4-bit NF4 with double quantisation and bf16 compute, LoRA r32/alpha64 on q/v,
gradient checkpointing). Per shape, in a fresh process (so its GPU memory and load time are its own):

- model load time: once, cold (what ``fork``/``subprocess`` deployments pay every round), and warm (what a
  kept-warm client pays every round after the first);
- tokens/s of one client round through our path (``fedllm_app.client.round.train_one_round``: the adapter
  set from the server's message, the reused ``ClientTrainer``, the adapter read back) against a plain TRL
  ``SFTTrainer`` loop on the same model, batch, sequence length and rows (goal: ours >= 90% of plain);
  tokens are counted by a forward hook on the base model, not computed from the settings;
- peak GPU memory of that client (CPU: peak RSS).

Then a real ``flwr run`` simulation: 4 clients on one GPU (``client-resources-num-gpus=0.25``), its round
times and the clients' model-load seconds per round (round 1 loads, later rounds reuse the Ray actor's model).

Every row is exactly ``max_length`` tokens (short prompt, long response cut at ``max_length``), so both paths
see the same tokens per step with no padding. Usage::

    python benchmarks/gpu.py --out gpu-bench                 # one GPU: 7b and 1b shapes + simulation, ~8 min
    python benchmarks/gpu.py --small --out small-bench       # CPU proof (the test suite runs it), < 1 min
    python benchmarks/gpu.py --shapes 1b --no-simulation     # a quicker GPU check

Writes ``<out>/gpu.json`` and ``<out>/gpu.md``. Not a test: the suite only checks the small config's JSON
holds real measurements (tests/unit/benchmarks/test_gpu_benchmark.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import resource
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Shape:
    """A Llama architecture, built with random weights (no download)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int = 32000


SHAPES = {
    "7b": Shape(4096, 32, 32, 32, 11008),  # Llama-2-7B
    "1b": Shape(2048, 22, 32, 4, 5632),  # TinyLlama-1.1B (a Llama-2 architecture at 1.1B)
    "small": Shape(64, 2, 4, 4, 128, vocab_size=512),  # the CPU proof
}


@dataclass(frozen=True)
class Setting:
    """What one benchmark run measures.

    Attributes
    ----------
    shapes : tuple of str
        Keys of :data:`SHAPES`, each measured in its own process.
    model : str
        The conf/model/ group the client loads with (LoRA, gradient checkpointing).
    quantization : str or None
        ``model.quantization``: 4bit is bitsandbytes' NF4 with double quantisation (bf16 compute on GPU).
    batch_size, max_length, steps : int
        Rows per step, tokens per row, optimizer steps per measured round (both paths).
    rows : int
        Rows written to the data file.
    sim_shape : str or None
        The shape of the ``flwr run`` simulation (None: no simulation).
    sim_clients, sim_rounds, sim_steps : int
        Simulated clients (SuperNodes), rounds and steps per round.
    gpus_per_client, cpus_per_client : float, int
        Ray resources per client (``client-resources-num-gpus``/``-num-cpus``).
    isolate : bool
        Measure each shape in a fresh process (its own GPU memory and cold load); off, in this one.
    concurrent : int
        Client processes that share the device at once, each loading its own model and training one round
        (0: none). What Flower's Ray backend does with ``client-resources-num-gpus=1/concurrent``, without Ray.
    concurrent_shape : str
        The shape those clients train.
    """

    shapes: tuple[str, ...] = ("7b", "1b")
    model: str = "llama2-7b"
    quantization: str | None = "4bit"
    batch_size: int = 16
    max_length: int = 512
    steps: int = 5
    rows: int = 256
    sim_shape: str | None = "7b"
    sim_clients: int = 4
    sim_rounds: int = 2
    sim_steps: int = 3
    gpus_per_client: float = 0.25
    cpus_per_client: int = 2
    isolate: bool = True
    concurrent: int = 4
    concurrent_shape: str | None = "7b"


SMALL = Setting(
    shapes=("small",),
    model="tiny",
    quantization=None,  # bitsandbytes' CPU NF4 works (tests/unit/fedllm_app/test_model_quantized.py) but is slow
    batch_size=4,
    max_length=64,
    steps=3,
    rows=48,
    sim_shape=None,
    sim_clients=2,
    sim_rounds=2,
    sim_steps=2,
    gpus_per_client=0.0,
    cpus_per_client=1,
    isolate=False,  # one shape, and the imports of a second interpreter would double its time
    concurrent=0,
    concurrent_shape="small",
)


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------- model and data (no network)


def build_model(shape: Shape, folder: Path, max_length: int) -> float:
    """Write a random-initialised Llama of ``shape`` (bf16 on GPU, fp32 on CPU) and a byte tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from fedllm_app.tiny_model import build_tokenizer

    start = time.perf_counter()
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = max_length
    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    device, dtype = ("cuda", torch.bfloat16) if cuda() else ("cpu", torch.float32)
    with torch.device(device):  # initialise where the memory is: a 7B fp32 init on CPU takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - start


def write_rows(path: Path, rows: int, max_length: int) -> None:
    """Prompt/response rows whose response is longer than ``max_length`` tokens (bytes): every row is cut to it."""
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(rows):
            words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(max_length)]
            f.write(json.dumps({"prompt": f"Repeat {rng.randint(0, 999)}:", "response": " ".join(words)}) + "\n")


def overrides(setting: Setting, folder: Path, data: Path, steps: int) -> list[str]:
    """The client's Hydra overrides: the model group with our random folder, our data, the batch shape."""
    return [
        f"model={setting.model}",
        f"model.name={folder}",
        f"model.quantization={setting.quantization or 'null'}",
        f"model.dtype={'bfloat16' if cuda() else 'float32'}",
        "dataset=custom",
        f"dataset.path={data}",
        "dataset.heldout=4",
        "training.template=chat",
        f"training.batch_size={setting.batch_size}",
        "training.grad_accum=1",
        f"training.max_length={setting.max_length}",
        f"training.max_steps={steps}",
        "training.max_new_tokens=4",
        "training.eval_batch_size=4",
        "training.num_threads=0",
    ]


# ---------------------------------------------------------------- measuring one client (worker process)


class TokenCounter:
    """Counts the tokens (attention-mask ones) every forward pass of the base model sees."""

    def __init__(self, model: Any) -> None:
        self.tokens = 0
        self.handle = model.get_base_model().register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: Any, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if module.training:
            self.tokens += int(mask.sum()) if mask is not None else int(ids.numel())

    def take(self) -> int:
        tokens, self.tokens = self.tokens, 0
        return tokens


def peak_memory() -> dict[str, float]:
    import torch

    if cuda():
        return {"peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30}
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def reset_peak() -> None:
    import torch

    if cuda():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def max_change(before: dict, after: dict) -> float:
    import numpy as np

    return max(float(np.abs(after[k] - before[k]).max()) for k in before)


def lora_dtype(model: Any, dtype: Any = None) -> str:
    """The LoRA weights' storage dtype, after casting them to ``dtype`` when given."""
    names = []
    for name, param in model.named_parameters():
        if "lora_" in name:
            if dtype is not None:
                param.data = param.data.to(dtype)
            names.append(str(param.dtype).removeprefix("torch."))
    return "/".join(sorted(set(names)))


def train_message(arrays: dict, server_round: int, lr: float) -> Any:
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from strategies.fedavg import ARRAYS_KEY, CONFIG_KEY, NUM_CLIENTS_KEY
    from strategies.records import to_record

    # What a SuperNode sets before running a ClientApp; a Message cannot be built without it.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    config = ConfigRecord({"server-round": server_round, "lr": lr, NUM_CLIENTS_KEY: 1})
    return Message(RecordDict({ARRAYS_KEY: to_record(arrays), CONFIG_KEY: config}), dst_node_id=1, message_type="train")


def our_round(cfg: Any, model: Any, counter: TokenCounter, server_round: int, pid: int = 0) -> dict[str, Any]:
    """One client round exactly as the ClientApp runs it (adapter in, ClientTrainer, adapter out).

    The LoRA weights are float32, as in every real client round (the plain TRL trainer built beside it casts
    a quantised model's LoRA weights to bf16; our ClientTrainer puts them back when it is built).
    """
    import torch
    from flwr.app import RecordDict

    from fedllm_app.client.round import train_one_round
    from fedllm_app.model import get_adapter
    from strategies.fedavg import METRICS_KEY

    dtype = lora_dtype(model, torch.float32)
    before = get_adapter(model)
    msg = train_message(before, server_round, float(cfg.training.learning_rate))
    counter.take()
    start = time.perf_counter()
    content = train_one_round(cfg, pid, msg, RecordDict())
    if cuda():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    metrics = content[METRICS_KEY]
    tokens = counter.take()
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "optimizer_seconds": float(metrics["optimizer_seconds"]),
        "train_loss": float(metrics["train_loss"]),
        "model_load_seconds": float(metrics["model_load_seconds"]),
        "lora_max_change": max_change(before, get_adapter(model)),
        "lora_dtype": dtype,
    }


def plain_sft(cfg: Any, model: Any, tokenizer: Any, rows: list, steps: int) -> Any:
    """A plain TRL SFTTrainer on the same model, rows, batch and length (no fedllm code in its loop)."""
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from fedllm_app.data.trl_form import to_trl

    names = {f.name for f in dataclasses.fields(SFTConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="plain-sft-"),
        per_device_train_batch_size=cfg.training.batch_size,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=float(cfg.training.learning_rate),
        lr_scheduler_type="constant",
        max_length=cfg.training.max_length,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not cuda(),
        bf16=cuda(),
        **{checkpointing: bool(cfg.model.gradient_checkpointing)},
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=to_trl(rows, "chat"), processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # its end-of-training print only (as ours)
    trainer.plain_lora_dtype = next(p.dtype for n, p in model.named_parameters() if "lora_" in n)  # what TRL left
    return trainer


def plain_round(trainer: Any, model: Any, counter: TokenCounter, steps: int) -> dict[str, Any]:
    """``steps`` optimizer steps of the plain trainer, with the LoRA dtype TRL gives them and a fresh optimizer."""
    import torch

    from fedllm_app.model import get_adapter

    dtype = lora_dtype(model, trainer.plain_lora_dtype)
    trainer.optimizer, trainer.lr_scheduler = None, None  # the optimizer's state follows the weights' dtype
    before = get_adapter(model)
    trainer.args.max_steps = steps
    counter.take()
    start = time.perf_counter()
    out = trainer.train()
    if cuda():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = counter.take()
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "train_loss": float(out.training_loss),
        "lora_max_change": max_change(before, get_adapter(model)),
        "lora_dtype": dtype,
    }


def measure_shape(name: str, setting: Setting, work: Path) -> dict[str, Any]:
    """Build, load and train one shape (run in a fresh process: its memory and load time are its own)."""
    from fedllm_app.config import load_config
    from fedllm_app.data.pipeline import partition
    from fedllm_app.model import get_model

    folder, data = work / f"model-{name}", work / "rows.jsonl"
    build = build_model(SHAPES[name], folder, setting.max_length)
    cfg = load_config({}, [*overrides(setting, folder, data, setting.steps), "num_clients=1"])
    reset_peak()
    start = time.perf_counter()
    model, tokenizer = get_model(cfg.model, cfg.seed)
    load_cold = time.perf_counter() - start
    start = time.perf_counter()
    get_model(cfg.model, cfg.seed)
    load_warm = time.perf_counter() - start
    after_load = peak_memory()
    counter = TokenCounter(model)
    our_round(cfg, model, counter, 1)  # warm-up: builds the ClientTrainer and tokenises, as round 1 does
    plain = plain_sft(cfg, model, tokenizer, partition(cfg, 0), setting.steps)
    plain_round(plain, model, counter, 1)  # warm-up
    reset_peak()
    ours, theirs = [], []
    for server_round in (2, 3):  # alternate, so a slower phase of a busy machine hits both paths
        ours.append(our_round(cfg, model, counter, server_round))
        theirs.append(plain_round(plain, model, counter, setting.steps))
    trainable, total = model.get_nb_trainable_parameters()
    best_ours = max(ours, key=lambda r: r["tokens_per_s"])
    best_plain = max(theirs, key=lambda r: r["tokens_per_s"])
    return {
        "shape": name,
        **dataclasses.asdict(SHAPES[name]),
        "parameters": total - trainable,  # PEFT counts a 4-bit weight's packed elements twice, as it should
        "trainable_parameters": trainable,
        "quantization": setting.quantization,
        "build_seconds": build,
        "model_load_cold_seconds": load_cold,
        "model_load_warm_seconds": load_warm,
        "memory_after_load": after_load,
        "memory_training": peak_memory(),
        "ours": best_ours,
        "plain": best_plain,
        "ours_all": ours,
        "plain_all": theirs,
        "ours_vs_plain": best_ours["tokens_per_s"] / best_plain["tokens_per_s"],
    }


# ---------------------------------------------------------------- clients sharing the device (worker processes)


def concurrent_client(index: int, setting: Setting, work: Path) -> dict[str, Any]:
    """One of ``setting.concurrent`` clients: load, a warm-up round, wait for the others' go, one timed round."""
    from fedllm_app.config import load_config
    from fedllm_app.model import get_model

    name = setting.concurrent_shape
    given = overrides(setting, work / f"model-{name}", work / "rows.jsonl", setting.sim_steps)
    cfg = load_config({}, [*given, f"num_clients={setting.concurrent}"])
    start = time.perf_counter()
    model, _ = get_model(cfg.model, cfg.seed)
    load = time.perf_counter() - start
    counter = TokenCounter(model)
    our_round(cfg, model, counter, 1, pid=index)  # round 1: builds the ClientTrainer and tokenises
    reset_peak()
    (work / f"ready-{index}").touch()
    while not (work / "go").exists():
        time.sleep(0.02)
    began = time.time()
    measured = our_round(cfg, model, counter, 2, pid=index)
    return {"client": index, "model_load_cold_seconds": load, "began": began, "ended": time.time(), **measured,
            "memory_training": peak_memory()}  # fmt: skip


def gpu_memory_used_gb() -> float | None:
    """The whole device's used memory (all processes, CUDA contexts included) as nvidia-smi reads it."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        return float(done.stdout.split()[0]) / 1024
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def run_concurrent(setting: Setting, work: Path) -> dict[str, Any]:
    """``concurrent`` client processes on one device: each loads its model and trains, all starting together."""
    name, n = setting.concurrent_shape, setting.concurrent
    if not (work / f"model-{name}" / "config.json").exists():
        build_model(SHAPES[name], work / f"model-{name}", setting.max_length)
    given = json.dumps(dataclasses.asdict(setting))
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--client", str(i), "--setting", given, "--work", str(work)],
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(n)
    ]
    while not all((work / f"ready-{i}").exists() for i in range(n)):
        if any(p.poll() not in (None, 0) for p in procs):  # one failed (e.g. out of memory): stop the others
            for p in procs:
                p.kill()
            raise RuntimeError("a client failed before its timed round:\n" + failed_log(procs))
        time.sleep(0.1)
    loaded = gpu_memory_used_gb()
    go = time.time()
    (work / "go").touch()
    for p in procs:
        p.wait()
    if any(p.returncode != 0 for p in procs):
        raise RuntimeError("a client failed in its timed round:\n" + failed_log(procs))
    clients = [json.loads((work / f"client-{i}.json").read_text()) for i in range(n)]
    seconds = max(c["ended"] for c in clients) - go
    return {
        "how": f"{n} client processes on one device, each its own model (what Ray's 1/{n}-GPU actors amount to)",
        "shape": name,
        "clients": n,
        "steps_per_round": setting.sim_steps,
        "round_seconds": seconds,
        "tokens_per_s_total": sum(c["tokens"] for c in clients) / seconds,
        "device_memory_used_gb": loaded,
        "per_client": clients,
    }


def failed_log(procs: list) -> str:
    logs = []
    for p in procs:
        if p.returncode not in (None, 0):
            logs.append(p.stderr.read()[-3000:] if p.stderr else "")
    return "\n".join(logs)


# ---------------------------------------------------------------- the simulation (flwr run)


def simulate(setting: Setting, work: Path) -> dict[str, Any]:
    """A real ``flwr run`` simulation of ``sim_clients`` clients sharing the device; its per-round figures."""
    from fedllm_app.ops.flower_run import FlowerRunner, kill_flower_processes

    name = setting.sim_shape
    folder = work / f"model-{name}"
    if not (folder / "config.json").exists():
        build_model(SHAPES[name], folder, setting.max_length)
    extra = overrides(setting, folder, work / "rows.jsonl", setting.sim_steps)
    extra += [
        f"num_rounds={setting.sim_rounds}",
        f"num_clients={setting.sim_clients}",
        "baseline=none",
        "save_every=1000",
        f"output_dir={work / 'sim'}",
        "run_name=sim",
    ]
    home = work / "flwr-home"
    home.mkdir(exist_ok=True)
    runner = FlowerRunner(home)
    resources = (
        f"client-resources-num-cpus={setting.cpus_per_client} client-resources-num-gpus={setting.gpus_per_client}"
    )
    start = time.perf_counter()
    try:
        status, log = runner.run(" ".join(extra), num_supernodes=setting.sim_clients, federation_extra=resources)
    finally:
        kill_flower_processes(str(home))
    if status != "finished:completed":
        raise RuntimeError(f"the simulation ended {status}:\n{log[-3000:]}")
    rows = [json.loads(x) for x in (work / "sim" / "sim" / "metrics.jsonl").read_text().splitlines()]
    keep = ("round", "seconds", "train_phase_seconds", "replied", "client_model_load_seconds", "client_peak_rss_mb")
    return {
        "how": "flwr run (local simulation, Ray)",
        "shape": name,
        "clients": setting.sim_clients,
        "client_resources": resources,
        "steps_per_round": setting.sim_steps,
        "wall_seconds": time.perf_counter() - start,
        "rounds": [{k: r[k] for k in keep if k in r} for r in rows],
    }


# ---------------------------------------------------------------- orchestration and report


def environment() -> dict[str, str]:
    import importlib.metadata as md

    import torch

    env = {"python": platform.python_version(), "device": "cpu", "cpu": platform.processor() or platform.machine()}
    for package in ("torch", "transformers", "peft", "trl", "flwr", "bitsandbytes"):
        try:
            env[package] = md.version(package)
        except md.PackageNotFoundError:
            env[package] = "absent"
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
    return env


def run_worker(name: str, setting: Setting, work: Path) -> dict[str, Any]:
    """Measure one shape in a fresh Python process (its JSON comes back through a file), or in this one."""
    if not setting.isolate:
        return measure_shape(name, setting, work)
    out = work / f"shape-{name}.json"
    cmd = [sys.executable, __file__, "--worker", name, "--setting", json.dumps(dataclasses.asdict(setting))]
    done = subprocess.run([*cmd, "--work", str(work)], stderr=subprocess.PIPE, text=True)
    if done.returncode != 0 or not out.exists():  # e.g. out of GPU memory: keep the other shapes' figures
        print(done.stderr[-5000:], file=sys.stderr)
        return {"shape": name, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(out.read_text())


def size(parameters: int) -> str:
    return f"{parameters / 1e9:.2f} B" if parameters >= 1e8 else f"{parameters / 1e6:.2f} M"


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"Device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, trl {env['trl']}, "
        f"peft {env['peft']}, flwr {env['flwr']}, bitsandbytes {env['bitsandbytes']}.",
        "",
        "| shape | quant | batch x length | ours tok/s | plain TRL tok/s | ours / plain | tokens per round "
        "(ours, plain) | load cold (s) | load warm (s) | peak memory training |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    s = result["setting"]
    for r in result["shapes"]:
        if "error" in r:
            lines.append(f"| {r['shape']} | failed: {r['error']} |" + " |" * 8)
            continue
        memory = ", ".join(f"{k} {v:.2f}" for k, v in r["memory_training"].items())
        lines.append(
            f"| {r['shape']} ({size(r['parameters'])}) | {r['quantization'] or 'none'} | "
            f"{s['batch_size']} x {s['max_length']} | {r['ours']['tokens_per_s']:.0f} | "
            f"{r['plain']['tokens_per_s']:.0f} | {r['ours_vs_plain']:.0%} | {r['ours']['tokens']}, "
            f"{r['plain']['tokens']} | {r['model_load_cold_seconds']:.1f} | {r['model_load_warm_seconds']:.3f} | "
            f"{memory} |"
        )
    sim = result.get("simulation")
    if sim:
        lines += ["", f"Simulation ({sim['how']}): {sim['clients']} clients of the {sim['shape']} shape, "
                  f"{sim['client_resources']}, {sim['steps_per_round']} steps per round; "
                  f"whole `flwr run` {sim['wall_seconds']:.0f} s.", "",
                  "| round | round (s) | training phase (s) | replied | clients' model load (s, summed) |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for r in sim["rounds"]:
            lines.append(
                f"| {r['round']} | {r['seconds']:.1f} | {r.get('train_phase_seconds', 0):.1f} | {r['replied']} | "
                f"{r.get('client_model_load_seconds', 0):.2f} |"
            )
    shared = result.get("concurrent")
    if shared:
        per = shared["per_client"]
        memory = ", ".join(f"{k} {v:.2f}" for k, v in per[0]["memory_training"].items())
        speeds = ", ".join(f"{c['tokens_per_s']:.0f}" for c in per)
        loads = ", ".join(f"{c['model_load_cold_seconds']:.1f}" for c in per)
        used = shared["device_memory_used_gb"]
        lines += ["", f"Sharing the device: {shared['how']}; the {shared['shape']} shape, "
                  f"{shared['steps_per_round']} steps of {s['batch_size']} x {s['max_length']} each.", "",
                  "| clients | round (s) | tokens/s, all clients | tokens/s per client | model load per client (s) "
                  "| device memory used (GB) | client 0 peak |",
                  "|---|---|---|---|---|---|---|",
                  f"| {shared['clients']} | {shared['round_seconds']:.1f} | {shared['tokens_per_s_total']:.0f} | "
                  f"{speeds} | {loads} | {'-' if used is None else f'{used:.1f}'} | {memory} |"]  # fmt: skip
    if "concurrent_error" in result:
        lines += ["", f"Sharing the device failed: {result['concurrent_error'].strip().splitlines()[-1]}"]
    if "simulation_error" in result:
        lines += ["", f"Simulation failed: {result['simulation_error'].strip().splitlines()[-1]}"]
    return "\n".join(lines) + "\n"


def chosen_setting(args: argparse.Namespace) -> Setting:
    """The small or GPU setting, with the command line's changes."""
    setting = SMALL if args.small else Setting()
    changes: dict[str, Any] = {}
    if args.shapes:
        changes["shapes"] = tuple(args.shapes)
    if args.steps:
        changes["steps"] = args.steps
    if args.quantization:
        changes["quantization"] = None if args.quantization == "none" else args.quantization
    if args.concurrent is not None:
        changes["concurrent"] = args.concurrent
        changes["concurrent_shape"] = (args.shapes or setting.shapes)[0]
    if args.simulation is False:
        changes["sim_shape"] = None
    elif args.simulation and setting.sim_shape is None:
        changes["sim_shape"] = (args.shapes or setting.shapes)[0]
    return dataclasses.replace(setting, **changes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-bench"))
    parser.add_argument("--small", action="store_true", help="the CPU proof config (tiny shape, no quantisation)")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), help="override the shapes measured")
    parser.add_argument("--steps", type=int, help="override the optimizer steps per measured round")
    parser.add_argument("--simulation", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--quantization", choices=["4bit", "8bit", "none"], help="override model.quantization")
    parser.add_argument("--concurrent", type=int, help="client processes sharing the device (0: none)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from fedllm_app.console import setup_console

    setup_console(progress=False)  # the client's own console: no loading bars or library notices
    if args.worker or args.client is not None:
        given = json.loads(args.setting)
        setting = Setting(**{**given, "shapes": tuple(given["shapes"])})
        if args.client is not None:
            result = concurrent_client(args.client, setting, args.work)
            (args.work / f"client-{args.client}.json").write_text(json.dumps(result, indent=2))
        else:
            result = measure_shape(args.worker, setting, args.work)
            (args.work / f"shape-{args.worker}.json").write_text(json.dumps(result, indent=2))
        return
    setting = chosen_setting(args)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedllm-gpu-bench-") as tmp:
        work = Path(tmp)
        write_rows(work / "rows.jsonl", setting.rows, setting.max_length)
        result: dict[str, Any] = {"setting": dataclasses.asdict(setting), "environment": environment(), "shapes": []}
        for name in setting.shapes:
            result["shapes"].append(run_worker(name, setting, work))
            report(result, args.out, start)  # each part's figures are kept even if a later part is cut short
        if setting.concurrent:
            try:
                result["concurrent"] = run_concurrent(setting, work)
            except (RuntimeError, OSError) as err:
                result["concurrent_error"] = str(err)[-3000:]
            report(result, args.out, start)
        if setting.sim_shape:
            try:
                result["simulation"] = simulate(setting, work)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:  # keep the shapes' figures
                result["simulation_error"] = str(err)[-3000:]
    report(result, args.out, start)
    print(markdown(result))
    print(f"total {result['total_seconds']:.0f} s; wrote {args.out / 'gpu.json'} and {args.out / 'gpu.md'}")


def report(result: dict[str, Any], out: Path, start: float) -> None:
    """Write (or rewrite) ``gpu.json`` and ``gpu.md`` with the parts measured so far."""
    result["total_seconds"] = time.perf_counter() - start
    (out / "gpu.json").write_text(json.dumps(result, indent=2))
    (out / "gpu.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
