"""Several continuations of one prefix scored with one pass over the prefix (DPO's chosen and rejected).

A held-out DPO pair is a prompt of ~100-500 tokens and two completions of a few dozen; scoring each
(prompt + completion) as its own sequence runs the prompt through the model twice. Here each batch's
prefixes run once, left-padded, and their key/value cache is repeated for the continuations, which then run
together after it. The summed log-probabilities are those of :func:`evaluation.generation.sequence_logps` on
the concatenated sequences, up to float rounding (tests: Llama, Gemma-2, a PEFT-wrapped model).

A model whose forward gives no repeatable cache, or whose LM head cannot run at chosen positions only,
raises :class:`SharedPrefixUnsupported`; :class:`evaluation.preferences.HeldoutPreferences` then scores the
sequences one by one, and it also checks the two ways agree on the model before it relies on this one.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from evaluation.generation import HeadNotSeparable, picked_logits


class SharedPrefixUnsupported(RuntimeError):
    """The model cannot score continuations after a shared, cached prefix."""


Item = tuple[list[int], list[list[int]]]  # (prefix ids, [continuation ids, ...])


@torch.no_grad()
def shared_prefix_logps(model: Any, pad_id: int, items: list[Item], batch_size: int) -> list[list[float]]:
    """For each ``(prefix, continuations)``: the summed log-probability of each continuation after the prefix.

    Every prefix holds at least one token and every item the same number of continuations; an empty
    continuation scores 0.0.
    """
    counts = {len(conts) for _, conts in items}
    if len(counts) > 1 or any(not prefix for prefix, _ in items):
        raise ValueError("shared_prefix_logps needs non-empty prefixes and the same number of continuations each")
    model.eval()
    out: list[list[float]] = []
    for i in range(0, len(items), batch_size):
        out.extend(_batch(model, pad_id, items[i : i + batch_size]).tolist())
    return out


def _batch(model: Any, pad_id: int, items: list[Item]) -> torch.Tensor:
    """``[len(items), K]`` summed log-probabilities of one batch."""
    device = next(model.parameters()).device
    k = len(items[0][1])
    prefixes = [p for p, _ in items]
    width = max(map(len, prefixes))
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, p in enumerate(prefixes):  # left-padded: every prefix ends at the last column
        ids[j, width - len(p) :] = torch.tensor(p)
        mask[j, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    rows = torch.arange(len(items), device=device)
    last, out = _logits(model, rows, torch.full_like(rows, width - 1), input_ids=ids, attention_mask=mask,
                        position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)  # fmt: skip
    first = torch.log_softmax(last, dim=-1)  # predicts each continuation's first token
    conts = [c for _, cs in items for c in cs]  # row r * k + m: item r's continuation m
    sums = torch.zeros(len(conts), dtype=torch.float32)
    for r, c in enumerate(conts):
        if c:
            sums[r] = first[r // k, c[0]].cpu()
    longest = max(map(len, conts))
    if longest < 2:
        return sums.view(len(items), k)
    cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        raise SharedPrefixUnsupported(f"{type(model).__name__} returned no key/value cache that can be repeated")
    cache.batch_repeat_interleave(k)
    cont_ids = torch.full((len(conts), longest), pad_id, dtype=torch.long)
    cont_mask = torch.zeros_like(cont_ids)
    for r, c in enumerate(conts):
        cont_ids[r, : len(c)] = torch.tensor(c, dtype=torch.long)
        cont_mask[r, : len(c)] = 1
    cont_ids, cont_mask = cont_ids.to(device), cont_mask.to(device)
    start = mask.sum(-1).repeat_interleave(k)  # each continuation's first position: its prefix's length
    spans = [(r, j) for r, c in enumerate(conts) for j in range(len(c) - 1)]  # position j predicts token j + 1
    pick_rows = torch.tensor([r for r, _ in spans], dtype=torch.long, device=device)
    pick_cols = torch.tensor([j for _, j in spans], dtype=torch.long, device=device)
    logits, _ = _logits(model, pick_rows, pick_cols, input_ids=cont_ids, **{_cache_arg(model): cache},
                        attention_mask=torch.cat([mask.repeat_interleave(k, 0), cont_mask], dim=1),
                        position_ids=start[:, None] + torch.arange(longest, device=device), use_cache=True)  # fmt: skip
    logp = torch.log_softmax(logits, dim=-1).gather(-1, cont_ids[pick_rows, pick_cols + 1].unsqueeze(-1))
    sums.index_add_(0, pick_rows.cpu(), logp.squeeze(-1).cpu())
    return sums.view(len(items), k)


def _cache_arg(model: Any) -> str:
    """The forward's name for a past key/value cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _logits(model: Any, rows: torch.Tensor, positions: torch.Tensor, **inputs: Any) -> tuple[torch.Tensor, Any]:
    try:
        return picked_logits(model, rows, positions, rerun=False, **inputs)
    except HeadNotSeparable as err:
        raise SharedPrefixUnsupported(str(err)) from None
