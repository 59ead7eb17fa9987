"""Held-out loss (response tokens only) and greedy exact-match accuracy per domain.

Both see the tokens training sees: the loss scores each row as TRL's SFTTrainer tokenises it
(:func:`fedllm_app.data.trl_form.trl_token_ids`: a string template's BOS included, the response
tokenised together with its prompt, EOS appended), and generation starts from the same prompt ids.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

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
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in _batches(rows, batch_size):
        ids, labels = [], []
        for r in batch:
            seq, lab = sft_token_ids(tokenizer, r, template, max_length)
            ids.append(seq)
            labels.append(lab)
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id)
        attn = torch.zeros_like(input_ids)
        lab = torch.full_like(input_ids, -100)
        for i, (x, y) in enumerate(zip(ids, labels, strict=False)):
            input_ids[i, : len(x)] = torch.tensor(x)
            attn[i, : len(x)] = 1
            lab[i, : len(y)] = torch.tensor(y)
        logits = model(input_ids=input_ids.to(device), attention_mask=attn.to(device)).logits.float()
        shift_logits, shift_labels = logits[:, :-1].reshape(-1, logits.size(-1)), lab[:, 1:].reshape(-1).to(device)
        loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
        total += loss.item()
        count += int((shift_labels != -100).sum())
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


def evaluate_adapter(
    model: Any, tokenizer: Any, rows: list[dict], training_cfg: Any, exact: bool = True
) -> dict[str, float]:
    """Loss and (unless ``exact`` is false) exact match of the model's current adapter on ``rows``."""
    t = training_cfg
    metrics = {"eval_loss": heldout_loss(model, tokenizer, rows, t.template, t.eval_batch_size, t.max_length)}
    if exact:
        metrics.update(exact_match(model, tokenizer, rows, t.template, t.eval_batch_size, t.max_new_tokens))
    return metrics
