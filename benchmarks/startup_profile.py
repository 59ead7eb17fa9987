"""Where fedllm's time goes outside its steady rounds: a ``flwr run`` of the issue-18 workload, phase by phase.

Runs fedllm alone on benchmarks/vs_openfedllm.py's workload (the same random Llama, SentencePiece vocabulary,
rows and overrides) and, while it runs, samples every process started under the run's own FLWR_HOME every
0.2 s from /proc: its start time and its user + system CPU seconds. The processes are grouped by role (the
``flwr`` CLI, SuperLink, SuperExec, the simulation process that holds the ServerApp and Ray's driver, Ray's own
processes, Ray's workers that run the ClientApps). Phase boundaries come from the processes' start times, the
ServerApp's ``startup_phases`` in summary.json (wall and the ServerApp thread's CPU: config, model, data,
initial evaluation), the rounds' start and length in metrics.jsonl, summary.json's write time, and this
script's own clock around ``flwr run``, ``flwr ls`` and the clean-up. CPU seconds stay meaningful on a busy
machine where wall seconds do not. Usage::

    python benchmarks/startup_profile.py [--task sft|dpo] [--rounds 3] [--json profile.json] [--keep DIR]

``--keep DIR`` keeps the run's folder there: FLWR_HOME (the SuperLink's log), the outputs, Ray's session logs
(Ray's temporary folder is put in the run's folder), and ``flwr-run.log`` (the output of ``flwr run``, each line
with its arrival time). Not a test: it prints markdown tables to paste into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from vs_openfedllm import build_workload, fedllm_overrides

from fedllm_app.ops.flower_run import (
    SUPERLINK_TOO_SLOW,
    FlowerRunner,
    kill_flower_processes,
    run_id_from,
    run_status,
)

TICK = os.sysconf("SC_CLK_TCK")
ROLES = (
    ("flower-superlink", "SuperLink"),
    ("flower-superexec", "SuperExec"),
    ("flwr-simulation", "simulation"),
    ("ray::ClientAppActor", "Ray workers"),
    ("ray::IDLE", "Ray workers"),
    ("default_worker.py", "Ray workers"),
    ("ray::", "Ray system"),
    ("ray/", "Ray system"),
    ("flwr", "flwr CLI"),
)


def role(cmdline: str) -> str:
    """The role of a process from its command line (the first rule of :data:`ROLES` that matches)."""
    return next((name for key, name in ROLES if key in cmdline), "other")


def boot_time() -> float:
    """The wall-clock time the machine booted, to 10 ms (from /proc/uptime)."""
    return time.time() - float(Path("/proc/uptime").read_text().split()[0])


@dataclass
class Proc:
    """One sampled process: start (wall clock), latest command line, and (time, CPU seconds) samples."""

    start: float
    cmdline: str
    samples: list[tuple[float, float]] = field(default_factory=list)

    def cpu_at(self, t: float) -> float:
        """CPU seconds used by time ``t`` (the last sample at or before it; 0 before the first)."""
        value = 0.0
        for stamp, cpu in self.samples:
            if stamp > t:
                break
            value = cpu
        return value


class Sampler(threading.Thread):
    """Samples, every ``interval`` s, the processes whose environment holds ``marker`` (their FLWR_HOME)."""

    def __init__(self, marker: str, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.marker, self.interval = marker.encode(), interval
        self.procs: dict[tuple[int, int], Proc] = {}
        self.others: set[tuple[int, int]] = set()
        self.boot = boot_time()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            self.done.wait(self.interval)
        self.sample()

    def sample(self) -> None:
        now = time.time()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                key = (int(entry.name), int(stat[19]))
                if key in self.others:
                    continue
                if key not in self.procs:
                    if self.marker not in (entry / "environ").read_bytes():
                        self.others.add(key)
                        continue
                    self.procs[key] = Proc(self.boot + key[1] / TICK, "")
                proc = self.procs[key]
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                proc.cmdline = cmdline or proc.cmdline  # an exited process (a zombie) shows none
                proc.samples.append((now, (int(stat[11]) + int(stat[12])) / TICK))
            except (OSError, IndexError, ValueError):
                continue

    def by_role(self) -> dict[str, list[Proc]]:
        groups: dict[str, list[Proc]] = {}
        for proc in self.procs.values():
            if proc.samples:
                groups.setdefault(role(proc.cmdline), []).append(proc)
        return groups


def run_profiled(work: Path, overrides: str, keep: Path | None) -> dict:
    """Run fedllm through ``flwr run`` with the sampler on; the marks, processes and run outputs."""
    home, out = work / "home", work / "out"
    home.mkdir()
    runner = FlowerRunner(home)
    runner.env.update(
        FEDLLM_CACHE=str(work / "fedllm-cache"), HF_DATASETS_CACHE=str(work / "fedllm-hf-cache"),
        RAY_TMPDIR=str(work / "ray"),
    )  # fmt: skip
    (work / "ray").mkdir()
    sampler = Sampler(f"FLWR_HOME={home}")
    sampler.start()
    cmd = runner.command(f"{overrides} output_dir={out} run_name=bench", 4, "client-resources-num-cpus=1")
    try:
        for _ in range(2):  # on a loaded machine the SuperLink may miss Flower's 15 s: start it here, try again
            marks: dict[str, float] = {"launch": time.time()}
            lines: list[tuple[float, str]] = []
            with subprocess.Popen(cmd, env=runner.env, cwd=home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) as proc:  # fmt: skip
                for line in proc.stdout:
                    lines.append((time.time(), line))
            if not any(SUPERLINK_TOO_SLOW in x for _, x in lines):
                break
            runner.start_superlink()
        marks["flwr run returned"] = time.time()
        run_id = run_id_from("".join(x for _, x in lines))
        status = run_status(runner.env, home, run_id) if run_id else "not started"
        marks["flwr ls returned"] = time.time()
    finally:
        kill_flower_processes(str(home))
        marks["processes ended"] = time.time()
        sampler.done.set()
        sampler.join()
    if keep is not None:
        (work / "flwr-run.log").write_text("".join(f"{t - marks['launch']:8.2f} {x}" for t, x in lines))
        shutil.copytree(work, keep, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.sock", "sockets"))
    if status != "finished:completed":
        raise SystemExit(f"fedllm run ended {status}:\n{''.join(x for _, x in lines)[-3000:]}")
    rounds = [json.loads(x) for x in (out / "bench" / "metrics.jsonl").read_text().splitlines()]
    summary_path = out / "bench" / "summary.json"
    marks["summary written"] = summary_path.stat().st_mtime
    return {"marks": marks, "sampler": sampler, "rounds": rounds, "summary": json.loads(summary_path.read_text())}


def phases(result: dict) -> list[tuple[str, float, float]]:
    """The run's consecutive phases as (name, start, end), wall clock."""
    marks, rounds, summary = result["marks"], result["rounds"], result["summary"]
    groups = result["sampler"].by_role()
    first = {name: min(p.start for p in procs) for name, procs in groups.items()}
    server = summary.get("startup_phases", {})
    main = rounds[0]["started_at"] - summary["startup_seconds"]
    r1_end = rounds[0]["started_at"] + rounds[0]["seconds"]
    last_end = rounds[-1]["started_at"] + rounds[-1]["seconds"]
    out = [
        ("`flwr run` CLI start, to the SuperLink's process start", marks["launch"], first.get("SuperLink", main)),
        ("SuperLink start, run submitted, SuperExec, to the simulation process start",
         first.get("SuperLink", main), first.get("simulation", main)),
        ("simulation process: imports (flwr, ServerApp module, ClientApp module), Ray start, to ServerApp main",
         first.get("simulation", main), main),
    ]  # fmt: skip
    t = main
    for name, label in (
        ("config", "ServerApp: config, nodes, strategy, outputs"),
        ("model", "ServerApp: base model + LoRA"),
        ("data", "ServerApp: held-out rows and partitions"),
        ("initial_eval", "ServerApp: evaluation of the initial adapter"),
    ):
        if name in server:
            out.append((label, t, t + server[name]["wall"]))
            t += server[name]["wall"]
    out.append(("(gap to round 1)", t, rounds[0]["started_at"]))
    out.append(("round 1 (workers import, load the model, tokenise, train; server evaluates)",
                rounds[0]["started_at"], r1_end))  # fmt: skip
    if len(rounds) > 1:
        out.append((f"rounds 2-{len(rounds)}", r1_end, last_end))
    out += [
        ("after the last round: the summary written", last_end, marks["summary written"]),
        ("summary to `flwr run`'s exit (plot, model card, simulation and Ray shut down, log stream ends)",
         marks["summary written"], marks["flwr run returned"]),
        ("`flwr ls` (the script reads the run's status)", marks["flwr run returned"], marks["flwr ls returned"]),
        ("the script ends leftover processes", marks["flwr ls returned"], marks["processes ended"]),
    ]  # fmt: skip
    return out


ORDER = ("flwr CLI", "SuperLink", "SuperExec", "simulation", "Ray system", "Ray workers", "other")


def phase_table(result: dict) -> str:
    """Markdown: each phase's wall seconds and the CPU seconds each role used in it."""
    groups = result["sampler"].by_role()
    names = [n for n in ORDER if n in groups]
    launch = result["marks"]["launch"]
    rows = [
        "| phase | starts at (s) | wall s | CPU s, all | " + " | ".join(f"CPU s, {n}" for n in names) + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    total = {n: 0.0 for n in names}
    for label, a, b in phases(result):
        cpu = {n: sum(p.cpu_at(b) - p.cpu_at(a) for p in groups[n]) for n in names}
        for n in names:
            total[n] += cpu[n]
        cells = " | ".join(f"{cpu[n]:.2f}" for n in names)
        rows.append(f"| {label} | {a - launch:.1f} | {b - a:.2f} | {sum(cpu.values()):.2f} | {cells} |")
    end = result["marks"]["processes ended"] - launch
    cells = " | ".join(f"{total[n]:.2f}" for n in names)
    rows.append(f"| **whole run** | 0.0 | {end:.2f} | {sum(total.values()):.2f} | {cells} |")
    return "\n".join(rows)


def process_table(result: dict) -> str:
    """Markdown: every sampled process, its role, start (s after launch) and CPU seconds."""
    launch = result["marks"]["launch"]
    rows = ["| role | process | started at (s) | CPU s |", "|---|---|---|---|"]
    for name, procs in sorted(result["sampler"].by_role().items(), key=lambda x: ORDER.index(x[0])):
        for p in sorted(procs, key=lambda p: p.start):
            rows.append(f"| {name} | `{p.cmdline[:70]}` | {p.start - launch:.1f} | {p.samples[-1][1]:.2f} |")
    return "\n".join(rows)


def server_table(summary: dict) -> str:
    """Markdown: the ServerApp thread's start-up phases (wall and its own CPU)."""
    phases_ = summary.get("startup_phases", {})
    rows = ["| ServerApp phase | wall s | ServerApp thread CPU s |", "|---|---|---|"]
    rows.append(f"| before main (module imports in this thread) | | {phases_.get('cpu_before_main', 0.0):.2f} |")
    for name, v in phases_.items():
        if isinstance(v, dict):
            rows.append(f"| {name} | {v['wall']:.2f} | {v['cpu']:.2f} |")
    return "\n".join(rows)


def client_table(rounds: list[dict]) -> str:
    """Markdown: the clients' own timings (mean per replying client) in the first rounds."""
    keys = (
        ("client_startup_seconds", "message sent to train call (worker start-up, imports)"),
        ("client_model_load_seconds", "base model load"),
        ("client_setup_seconds", "set-up before the first step (model load, rows, tokenisation, trainer)"),
        ("client_train_seconds", "training call"),
        ("client_optimizer_seconds", "optimizer steps"),
    )
    shown = rounds[:3]
    rows = ["| per client (mean) | " + " | ".join(f"round {r['round']}" for r in shown) + " |",
            "|---|" + "---|" * len(shown)]  # fmt: skip
    for key, label in keys:
        rows.append(
            f"| {label} | " + " | ".join(f"{r.get(key, 0.0) / max(r['replied'], 1):.2f} s" for r in shown) + " |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--task", choices=("sft", "dpo"), default="sft")
    parser.add_argument("--json", type=Path, default=None, help="also write the marks and per-process CPU here")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run's folder (logs, outputs) here")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows, model = build_workload(work, args.rows, args.task)
        result = run_profiled(work, fedllm_overrides(model, rows, args.rounds, args.task), args.keep)
    print(f"load average at start {load:.1f}, at end {os.getloadavg()[0]:.1f}\n")
    print(phase_table(result) + "\n\n" + server_table(result["summary"]) + "\n\n" + client_table(result["rounds"]))
    print("\n" + process_table(result))
    if args.json:
        procs = [
            {"role": role(p.cmdline), "cmdline": p.cmdline, "start": p.start, "samples": p.samples}
            for p in result["sampler"].procs.values()
        ]
        args.json.write_text(json.dumps({**{k: v for k, v in result.items() if k != "sampler"}, "procs": procs}))


if __name__ == "__main__":
    main()
