"""Held-out loss (response tokens only) and greedy exact-match accuracy per domain.

Both see the tokens training sees: the loss scores each row as TRL's SFTTrainer tokenises it
(:func:`fedllm_app.data.trl_form.trl_token_ids`: a string template's BOS included, the response
tokenised together with its prompt, EOS appended), and generation starts from the same prompt ids.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from evaluation.generation import right_padded, token_logps
from fedllm_app.config import ConfigError
from fedllm_app.data.templates import prompt_text, to_prompt_completion
from fedllm_app.data.trl_form import trl_token_ids


def _batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def sft_token_ids(tokenizer: Any, row: dict, template: str, max_length: int) -> tuple[list[int], list[int]]:
    """Input ids and labels of an instruction/response row as SFTTrainer trains on it.

    Labels are -100 outside the completion (completion-only loss); both are cut at ``max_length``.
    """
    trl_row = to_prompt_completion(row["instruction"], row["response"], template)
    prompt, (completion,) = trl_token_ids(tokenizer, trl_row["prompt"], [trl_row["completion"]])
    return (prompt + completion)[:max_length], ([-100] * len(prompt) + completion)[:max_length]


@torch.no_grad()
def heldout_loss(
    model: Any, tokenizer: Any, rows: list[dict], template: str, batch_size: int, max_length: int
) -> float:
    """Mean cross-entropy over the response (+ end) tokens of ``rows``, tokenised as in training."""
    tokens = [sft_token_ids(tokenizer, r, template, max_length) for r in rows]
    return token_loss(model, tokens, tokenizer.pad_token_id, batch_size)


@torch.no_grad()
def token_loss(model: Any, tokens: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> float:
    """Mean cross-entropy of the labelled tokens of ``[(input ids, labels)]`` (labels -100 where unscored)."""
    model.eval()
    total, count = 0.0, 0
    for batch in _batches(tokens, batch_size):
        ids, mask = right_padded([seq for seq, _ in batch], pad_id)
        scored = [(j, t) for j, (_, labels) in enumerate(batch) for t in range(1, len(labels)) if labels[t] != -100]
        if not scored:
            continue
        rows, cols = (torch.tensor(x, dtype=torch.long) for x in zip(*scored, strict=True))
        total -= float(token_logps(model, ids, mask, rows, cols).sum())
        count += len(scored)
    return total / max(count, 1)


@torch.no_grad()
def generate(
    model: Any, tokenizer: Any, prompts: list[str], batch_size: int, max_new_tokens: int, special_tokens: bool = False
) -> list[str]:
    """Greedy, batched, left-padded generation; returns only the new text.

    ``special_tokens`` adds the tokenizer's special tokens (e.g. BOS) to each prompt, as TRL
    does for a string template's prompt.
    """
    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    try:
        for batch in _batches(prompts, batch_size):
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=special_tokens).to(device)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            out.extend(tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return out


def exact_match(
    model: Any, tokenizer: Any, rows: list[dict], template: str, batch_size: int, max_new_tokens: int
) -> dict[str, float]:
    """``accuracy`` over all rows and ``accuracy/<domain>`` per domain (stripped exact match).

    The prompt ids are the ones training uses: a string template's prompt gets the tokenizer's
    special tokens (BOS), a chat template writes its own.
    """
    prompts = [prompt_text(r["instruction"], template, tokenizer) for r in rows]
    answers = generate(model, tokenizer, prompts, batch_size, max_new_tokens, special_tokens=template != "chat")
    hits: dict[str, list[int]] = defaultdict(list)
    for r, a in zip(rows, answers, strict=False):
        ok = int(a.strip() == r["response"].strip())
        hits["accuracy"].append(ok)
        hits[f"accuracy/{r.get('domain', 'all')}"].append(ok)
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


def exact_match_due(every: int, rnd: int, num_rounds: int) -> bool:
    """Whether round ``rnd`` gets the generation-based exact match: every ``every`` rounds and the last one.

    ``every`` is ``eval.exact_match_every`` (>= 1; 1 = every round).
    """
    if int(every) < 1:
        raise ConfigError(
            f"eval.exact_match_every={every} must be >= 1 (1 = every round); e.g. eval.exact_match_every=5"
        )
    return rnd % int(every) == 0 or rnd >= num_rounds


class HeldoutRows:
    """Held-out instruction/response rows, tokenised once as training tokenises them, scored on demand.

    The server scores the same rows every round: only the model's adapter changes between calls.
    """

    def __init__(self, tokenizer: Any, rows: list[dict], training_cfg: Any) -> None:
        self.tokenizer, self.rows, self.t = tokenizer, rows, training_cfg
        self.tokens = [sft_token_ids(tokenizer, r, training_cfg.template, training_cfg.max_length) for r in rows]

    def evaluate(self, model: Any, exact: bool = True) -> dict[str, float]:
        """Loss and (unless ``exact`` is false) exact match of the model's current adapter."""
        t = self.t
        metrics = {"eval_loss": token_loss(model, self.tokens, self.tokenizer.pad_token_id, t.eval_batch_size)}
        if exact:
            metrics.update(
                exact_match(model, self.tokenizer, self.rows, t.template, t.eval_batch_size, t.max_new_tokens)
            )
        return metrics


def evaluate_adapter(
    model: Any, tokenizer: Any, rows: list[dict], training_cfg: Any, exact: bool = True
) -> dict[str, float]:
    """Loss and (unless ``exact`` is false) exact match of the model's current adapter on ``rows``."""
    return HeldoutRows(tokenizer, rows, training_cfg).evaluate(model, exact)
