"""Per-step instruments shared by the two DPO step profiles (fedllm's TRL 1.16 and OpenFedLLM's TRL 0.7.2).

Imports only the standard library and torch (transformers lazily), so it runs in either environment:
``benchmarks/dpo_step_profile.py`` (fedllm's) and ``benchmarks/dpo_step_profile_trl07.py`` (OpenFedLLM's
venv) both import it from this folder. Every time here is process CPU time (``time.process_time``): with one
torch thread it is the work done, whatever else the machine runs.
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import time
from collections import defaultdict
from typing import Any

import torch


class StepClock:
    """Process CPU seconds of each optimizer step of a ``Trainer.train()`` call, and of the call itself.

    A step runs from the previous step's end (the first: from ``on_train_begin``) to its own end, so it holds
    the batch's collation as well as forward, backward and the update. ``callback`` is the TrainerCallback.
    """

    def __init__(self) -> None:
        from transformers import TrainerCallback

        outer = self
        self.steps: list[float] = []
        self.mark = 0.0

        class _Cb(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                outer.mark = time.process_time()

            def on_step_end(self, args, state, control, **kw):
                now = time.process_time()
                outer.steps.append(now - outer.mark)
                outer.mark = now

        self.callback = _Cb()


class ForwardClock:
    """CPU seconds and calls of a module's forward, split by grad mode: ``policy`` (grad on) and ``ref`` (off)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._start = 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, module: Any, args: Any) -> None:
        self._start = time.process_time()

    def _post(self, module: Any, args: Any, out: Any) -> None:
        kind = "policy" if torch.is_grad_enabled() else "ref"
        self.seconds[kind] += time.process_time() - self._start
        self.calls[kind] += 1


class Widths:
    """Wraps a data collator; records each batch's padded shapes and its share of real (attended) tokens.

    The sequences the model runs on only: TRL 0.7's separate ``prompt_*`` tensors are left out.
    """

    def __init__(self, collator: Any) -> None:
        self.collator = collator
        self.shapes: list[tuple[int, ...]] = []
        self.real: list[float] = []

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collator(examples)
        seqs = {k: v for k, v in batch.items() if torch.is_tensor(v) and not k.startswith("prompt")}
        masks = [v for k, v in seqs.items() if k.endswith("attention_mask")]
        ids = [v for k, v in seqs.items() if k.endswith("input_ids")]
        self.shapes.append(tuple(tuple(t.shape) for t in ids))
        self.real.append(sum(float(m.sum()) for m in masks) / max(1, sum(m.numel() for m in masks)))
        return batch


def profiled(fn: Any, *args: Any, **kw: Any) -> tuple[Any, pstats.Stats]:
    """``fn(*args, **kw)`` under cProfile timed in process CPU seconds; its result and the stats."""
    prof = cProfile.Profile(time.process_time)
    out = prof.runcall(fn, *args, **kw)
    return out, pstats.Stats(prof)


def cumulative(stats: pstats.Stats, parts: dict[str, tuple[str, str]]) -> dict[str, tuple[float, int]]:
    """For each named part ``(file suffix, function name)``: cumulative seconds and calls over the profile.

    A function found in several files with that suffix sums them; the outermost frames of a recursive function
    are counted once (cProfile's cumulative time already does that).
    """
    found: dict[str, tuple[float, int]] = {}
    for name, (suffix, func) in parts.items():
        seconds, calls = 0.0, 0
        for (file, _line, fname), (_cc, nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
            if fname == func and file.endswith(suffix):
                seconds, calls = seconds + ct, calls + nc
        found[name] = (seconds, calls)
    return found


def top(stats: pstats.Stats, n: int = 25) -> list[str]:
    """The ``n`` functions with the most own (``tottime``) CPU seconds, one line each."""
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:n]  # type: ignore[attr-defined]
    return [f"{tt:8.3f} s own {ct:8.3f} s cum {nc:7d} calls  {func} ({file}:{line})"
            for (file, line, func), (_cc, nc, tt, ct, _c) in rows]  # fmt: skip


def report(title: str, steps: list[float], parts: dict[str, tuple[float, int]], n_steps: int) -> list[str]:
    """Markdown lines: per-step CPU seconds, then each part's seconds and calls per step."""
    lines = [f"## {title}", "", f"steps ({len(steps)}): " + " ".join(f"{s:.3f}" for s in steps)]
    if steps:
        lines.append(f"mean {statistics.mean(steps):.3f} s, median {statistics.median(steps):.3f} s CPU per step")
    lines += ["", "| part | CPU s per step | calls per step |", "|---|---|---|"]
    lines += [f"| {k} | {s / n_steps:.4f} | {c / n_steps:.1f} |" for k, (s, c) in parts.items()]
    return lines
