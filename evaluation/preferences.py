"""DPO metrics on held-out preference pairs, as DPO scores them.

The implicit reward of a completion is ``beta * (log p_policy - log p_reference)``;
the DPO loss is ``-log sigmoid(r_chosen - r_rejected)``, the reward margin
``r_chosen - r_rejected`` and the preference accuracy the share of pairs with a
positive margin. :class:`HeldoutPreferences` is the server's per-round DPO evaluation. Pairs
are tokenised exactly as TRL's DPOTrainer tokenises them (:func:`pair_token_ids`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import torch

from evaluation.generation import sequence_logps
from evaluation.shared_prefix import SharedPrefixUnsupported, shared_prefix_logps
from fedllm_app.data.rows import Row
from fedllm_app.data.trl_form import to_preference, trl_token_ids
from fedllm_app.model import reference_adapter, set_adapter

log = logging.getLogger("fedllm")

# Scoring each prompt once is used when its summed log-probabilities agree with scoring each sequence whole
# within AGREE x (1 + |value|) on the reference adapter (float32 on a CPU: ~1e-5).
AGREE = 1e-3


def pair_token_ids(row: Row, template: str, tokenizer: Any) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) token ids of a pair exactly as TRL's DPOTrainer tokenises it."""
    trl_row = to_preference(row, template)
    prompt, (chosen, rejected) = trl_token_ids(tokenizer, trl_row["prompt"], [trl_row["chosen"], trl_row["rejected"]])
    return prompt, chosen, rejected


def pair_logps(model: Any, tokenizer: Any, rows: list[Row], t: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the chosen and rejected completions of ``rows`` (training config ``t``)."""
    ids = [pair_token_ids(r, t.template, tokenizer) for r in rows]
    return ids_logps(model, tokenizer.pad_token_id, ids, t)


def ids_logps(
    model: Any, pad: int, ids: list[tuple[list[int], list[int], list[int]]], t: Any, *, shared: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pair_logps` from token ids ``[(prompt, chosen, rejected)]``.

    Each sequence (prompt + completion) is kept within ``t.max_length`` tokens, as DPOTrainer's collator keeps it.
    With ``shared`` each prompt runs once for both completions (:mod:`evaluation.shared_prefix`; a prompt
    that is empty or fills ``t.max_length`` by itself is scored the plain way).
    """
    limit = t.max_length
    together = [i for i, (p, _, _) in enumerate(ids) if shared and p and (limit is None or len(p) < limit)]
    out = torch.zeros(len(ids), 2)
    if together:
        items = []
        for i in together:
            p, c, r = ids[i]
            keep = None if limit is None else limit - len(p)
            items.append((p, [c[:keep], r[:keep]]))
        # half the pairs a batch: the two completions and the repeated cache make as many rows as the plain way's
        per_batch = max(1, int(t.eval_batch_size) // 2)
        out[together] = torch.tensor(shared_prefix_logps(model, pad, items, per_batch))
    alone = sorted(set(range(len(ids))) - set(together))
    for which in (1, 2):
        pairs = [(ids[i][0], ids[i][which]) for i in alone]
        if pairs:
            out[alone, which - 1] = torch.tensor(sequence_logps(model, pad, pairs, t.eval_batch_size, max_length=limit))
    return out[:, 0], out[:, 1]


def dpo_scores(
    policy: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor], beta: float
) -> dict[str, torch.Tensor]:
    """Per-pair DPO rewards, margin and loss (sigmoid loss) from chosen/rejected log-probabilities."""
    r_chosen = beta * (policy[0] - reference[0])
    r_rejected = beta * (policy[1] - reference[1])
    margin = r_chosen - r_rejected
    return {
        "reward_chosen": r_chosen,
        "reward_rejected": r_rejected,
        "margin": margin,
        "loss": -torch.nn.functional.logsigmoid(margin),
    }


def preference_metrics(
    policy: tuple[torch.Tensor, torch.Tensor],
    reference: tuple[torch.Tensor, torch.Tensor],
    rows: list[Row],
    beta: float,
) -> dict[str, float]:
    """Held-out ``dpo_loss``, ``reward_margin``, ``preference_accuracy`` (also as ``accuracy`` and per domain).

    ``accuracy``/``accuracy/<domain>`` repeat the preference accuracy so the run's plot and
    comparison table (written for exact match) show it for DPO runs too. A tie counts as wrong.
    """
    s = dpo_scores(policy, reference, beta)
    correct = (s["margin"] > 0).float()
    metrics = {
        "dpo_loss": float(s["loss"].mean()),
        "reward_margin": float(s["margin"].mean()),
        "reward_chosen": float(s["reward_chosen"].mean()),
        "reward_rejected": float(s["reward_rejected"].mean()),
        "preference_accuracy": float(correct.mean()),
        "accuracy": float(correct.mean()),
        "eval_loss": float(s["loss"].mean()),
    }
    per: dict[str, list[float]] = defaultdict(list)
    for r, ok in zip(rows, correct.tolist(), strict=True):
        per[f"accuracy/{r.get('domain', 'all')}"].append(ok)
    metrics.update({k: sum(v) / len(v) for k, v in sorted(per.items())})
    return metrics


class HeldoutPreferences:
    """The server's per-round DPO evaluation on held-out pairs.

    The pairs are tokenised and the reference log-probabilities (the run's starting adapter) computed once;
    each round then scores only the policy. Each prompt runs once for both completions when, on this model,
    that gives the reference's log-probabilities as scoring each sequence whole does (:data:`AGREE`); else
    (another cache, a reshaped LM head, bf16 rounding beyond it) every round scores the sequences whole.
    """

    def __init__(self, model: Any, tokenizer: Any, rows: list[Row], cfg: Any) -> None:
        self.rows, self.pad, self.t, self.beta = rows, tokenizer.pad_token_id, cfg.training, float(cfg.task.beta)
        self.ids = [pair_token_ids(r, self.t.template, tokenizer) for r in rows]
        set_adapter(model, reference_adapter(cfg.model, model))
        self.reference = ids_logps(model, self.pad, self.ids, self.t)
        shared = self._shared_reference(model)
        self.shared = shared is not None
        if shared is not None:  # the same path for the reference and the policy: equal adapters, a margin of 0
            self.reference = shared

    def _shared_reference(self, model: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The reference scored with each prompt once, when that agrees with scoring whole; else None."""
        if not self.ids:
            return None
        try:
            got = ids_logps(model, self.pad, self.ids, self.t, shared=True)
        except SharedPrefixUnsupported as err:
            log.info("held-out DPO pairs: each sequence scored whole (%s)", err)
            return None
        pairs = zip(got, self.reference, strict=True)
        excess = [float(((g - w).abs() - AGREE * (1 + w.abs())).max()) for g, w in pairs]
        if not all(e <= 0 for e in excess):  # NaN included
            log.warning("held-out DPO pairs: scoring the prompt once differs from scoring each sequence whole by "
                        "more than %g on this model; each sequence is scored whole", AGREE)  # fmt: skip
            return None
        return got

    def evaluate(self, model: Any) -> dict[str, float]:
        """Metrics of the model's current adapter against the reference."""
        policy = ids_logps(model, self.pad, self.ids, self.t, shared=self.shared)
        return preference_metrics(policy, self.reference, self.rows, self.beta)
