"""Canary exposure (Carlini et al., "The Secret Sharer", USENIX Security 2019) of a model and its adapter.

A canary is a secret ``r`` from a randomness space R (every string of ``digits`` decimal digits) written into a
fixed template (:mod:`fedllm_app.data.canaries`). Its log-perplexity under the model is
``-log p(r | context)``, the context being the canary's prompt and the response up to the secret, tokenised as
training tokenises it; the tokens after the secret (end of turn) are not scored, so every candidate is scored
on the same positions. The canary's rank is its place among all ``|R|`` candidates sorted by log-perplexity,
lowest first, and

    exposure = log2 |R| - log2 rank,

from 0 (the secret is the least likely candidate) to ``log2 |R|`` (the most likely). Ties rank ahead of the
canary: rank = the number of candidates whose log-perplexity is at most the canary's (itself included), so an
exposure is never overstated (a model that scores every candidate alike gives exposure 0).

Two ways to find the rank (``method``):

- ``exact``: every candidate is scored. A secret's log-probability is the sum of its digits' log-probabilities,
  each given the context and the digits before it, so one batched forward pass over the ``10^k`` prefixes of
  length ``k`` gives the next digit's distribution for all of them, and ``1 + 10 + ... + 10^(digits-1)``
  prefixes give all ``10^digits`` scores (:func:`digit_tree_scores`) instead of ``10^digits`` full sequences.
  This needs a tokenizer that writes each digit as one token after the context (checked:
  :func:`secret_layout`), as the tiny model's, Llama 2's and Qwen 2's do.
- ``estimate``: Carlini et al.'s approximation (their section 4.3) for large spaces or other tokenizers: a
  skew-normal is fitted to the log-perplexities of ``sample`` candidates drawn uniformly from R, and
  ``exposure ~ -log2 P(X <= canary's log-perplexity)`` under it, clipped to [0, log2 |R|].

``auto`` takes ``exact`` up to :data:`EXACT_MAX_DIGITS` digits when the tokenizer allows it.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedllm_app.config import CANARY_METHODS
from fedllm_app.data.canaries import Canary, CanarySpec, make_canaries
from fedllm_app.data.templates import to_prompt_completion
from fedllm_app.data.trl_form import trl_token_ids

METHODS = CANARY_METHODS
# auto scores every candidate up to 10^6 of them (111,111 prefixes); beyond, it estimates.
EXACT_MAX_DIGITS = 6
DIGITS = "0123456789"


# ------------------------------------------------------------------ the math (pure)


def rank_of(log_perplexities: np.ndarray, index: int) -> int:
    """The rank of candidate ``index`` among all: how many have a log-perplexity at most its own (ties ahead)."""
    values = np.asarray(log_perplexities)
    return int(np.count_nonzero(values <= values[index]))


def exposure_from_rank(rank: int, space_size: int) -> float:
    """``log2 |R| - log2 rank``, for a rank in ``1..|R|``."""
    if not 1 <= rank <= space_size:
        raise ValueError(f"rank {rank} must lie in 1..{space_size} (the size of the randomness space)")
    return math.log2(space_size) - math.log2(rank)


def estimated_exposure(log_perplexity: float, sample: np.ndarray, space_size: int) -> float:
    """Carlini et al.'s estimate: ``-log2`` of the probability, under a skew-normal fitted to the ``sample``
    of candidates' log-perplexities, of a log-perplexity at most ``log_perplexity``; clipped to [0, log2 |R|].
    """
    from scipy.stats import skewnorm

    sample = np.asarray(sample, dtype=np.float64)
    if sample.size < 3 or np.ptp(sample) == 0:
        return 0.0  # no spread to fit: the model does not tell candidates apart
    shape, loc, scale = skewnorm.fit(sample)
    log_p = float(skewnorm.logcdf(log_perplexity, shape, loc, scale))
    return float(np.clip(-log_p / math.log(2), 0.0, math.log2(space_size)))


def summarise(values: list[float]) -> dict[str, float]:
    """Mean and max of the canaries' exposures."""
    return {"mean": float(np.mean(values)), "max": float(np.max(values))}


# ------------------------------------------------------------------ tokens


@dataclass(frozen=True)
class SecretLayout:
    """Where a canary's secret sits in its training tokens: ``context + secret tokens + suffix``.

    ``digit_ids[k]`` is the token of digit ``k`` when every digit is one token of its own (else None).
    """

    context: tuple[int, ...]
    suffix: tuple[int, ...]
    digit_ids: tuple[int, ...] | None

    def target(self, full: list[int], secret: str) -> list[int]:
        """The secret's tokens within ``full`` (the candidate's whole training sequence)."""
        n, s = len(self.context), len(self.suffix)
        if tuple(full[:n]) != self.context or (s and tuple(full[-s:]) != self.suffix) or len(full) <= n + s:
            raise ValueError(
                f"the candidate secret {secret!r} is not tokenised as context + secret + end like the probes; "
                f"this tokenizer merges the secret with the text around it"
            )
        return full[n : len(full) - s]


def full_ids(tokenizer: Any, canary: Canary, secret: str, template: str) -> list[int]:
    """The training tokens of ``canary`` holding ``secret``, as TRL tokenises the row."""
    row = to_prompt_completion(canary.instruction, canary.response(secret), template)
    prompt, (completion,) = trl_token_ids(tokenizer, row["prompt"], [row["completion"]])
    return prompt + completion


def candidate_ids(tokenizer: Any, canary: Canary, secrets: list[str], template: str) -> list[list[int]]:
    """:func:`full_ids` of many candidate secrets at once: the canary's training text is rendered once, the
    secret replaced in it and the texts tokenised in one batch. Checked against :func:`full_ids` for the canary
    and the first candidate; where a tokenizer or template does not render that way, one by one instead.
    """
    row = to_prompt_completion(canary.instruction, canary.response(), template)
    if isinstance(row["prompt"], str):  # a string template: TRL appends EOS and adds the special tokens
        eos = tokenizer.eos_token or ""
        completion = row["completion"] if row["completion"].endswith(eos) else row["completion"] + eos
        text, special = row["prompt"] + completion, True
    else:
        text, special = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False), False
    mark = canary.response()
    texts = [text.replace(mark, canary.response(s)) for s in [canary.secret, *secrets]]
    ids = [list(x) for x in tokenizer(texts, add_special_tokens=special)["input_ids"]]
    checks = [canary.secret, *secrets[:1]]
    if text.count(mark) == 1 and all(ids[i] == full_ids(tokenizer, canary, s, template) for i, s in enumerate(checks)):
        return ids[1:]
    return [full_ids(tokenizer, canary, s, template) for s in secrets]


def _common_prefix(seqs: list[list[int]]) -> int:
    n = 0
    while all(len(s) > n for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    return n


def secret_layout(tokenizer: Any, canary: Canary, template: str, digits: int) -> SecretLayout:
    """The context, suffix and digit tokens, found by tokenising ``0...0`` to ``9...9`` and the canary itself."""
    probes = [k * digits for k in DIGITS] + [canary.secret]
    seqs = [full_ids(tokenizer, canary, p, template) for p in probes]
    n = _common_prefix(seqs)
    s = _common_prefix([q[n:][::-1] for q in seqs])
    context, suffix = tuple(seqs[0][:n]), tuple(seqs[0][len(seqs[0]) - s :])
    middles = [q[n : len(q) - s] for q in seqs]
    per_digit = all(len(m) == digits for m in middles) and all(len(set(m)) == 1 for m in middles[:10])
    ids = tuple(m[0] for m in middles[:10]) if per_digit else ()
    if per_digit and len(set(ids)) == 10 and middles[10] == [ids[int(ch)] for ch in canary.secret]:
        return SecretLayout(context, suffix, ids)
    return SecretLayout(context, suffix, None)


# ------------------------------------------------------------------ scoring


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def digit_tree_scores(
    model: Any, context: tuple[int, ...], digit_ids: tuple[int, ...], digits: int, batch_size: int
) -> np.ndarray:
    """``log p(secret | context)`` (nats) of every secret of ``digits`` digits, at index ``int(secret)``.

    The context runs once (its key/value cache is reused); then level ``k`` runs the ``10^k`` prefixes of
    ``k`` digits (all the same length: no padding) and adds each one's next-digit log-probabilities to its
    score: ``1 + 10 + ... + 10^(digits-1)`` prefixes in all.
    """
    model.eval()
    device = _device(model)
    ids = torch.tensor(digit_ids, device=device)
    key = _cache_key(model)
    out = model(input_ids=torch.tensor([context], device=device), use_cache=True, logits_to_keep=1)
    cache = getattr(out, key)
    scores = _digit_log_probs(out.logits, ids).reshape(-1)
    for level in range(1, digits):
        prefixes = _prefixes(level, ids)  # (10^level, level) digit tokens, row p = the digits of p
        nexts = []
        for start in range(0, len(prefixes), batch_size):
            chunk = prefixes[start : start + batch_size]
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(len(chunk))
            logits = model(input_ids=chunk, **{key: past}, use_cache=True, logits_to_keep=1).logits
            nexts.append(_digit_log_probs(logits, ids))
        scores = (scores[:, None] + np.concatenate(nexts)).reshape(-1)
    return scores


def _cache_key(model: Any) -> str:
    """The name of the key/value cache in the model's forward and output: ``cache`` (transformers 5.2x and later)
    or ``past_key_values`` (before).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _digit_log_probs(logits: torch.Tensor, ids: torch.Tensor) -> np.ndarray:
    """The last position's log-probabilities of the ten digit tokens, float64: shape ``(batch, 10)``."""
    return torch.log_softmax(logits[:, -1].float(), dim=-1)[:, ids].double().cpu().numpy()


def _prefixes(level: int, ids: torch.Tensor) -> torch.Tensor:
    """Every string of ``level`` digits in numeric order, as token ids: shape ``(10^level, level)``."""
    if level == 0:
        return torch.zeros((1, 0), dtype=torch.long, device=ids.device)
    numbers = torch.arange(10**level, device=ids.device)
    powers = 10 ** torch.arange(level - 1, -1, -1, device=ids.device)
    return ids[(numbers[:, None] // powers) % 10]


@torch.no_grad()
def sequence_scores(model: Any, context: tuple[int, ...], targets: list[list[int]], batch_size: int) -> np.ndarray:
    """``log p(target | context)`` (nats) of each target sequence, scored as a whole (right-padded batches)."""
    model.eval()
    device = _device(model)
    out = np.zeros(len(targets), dtype=np.float64)
    n = len(context)
    for start in range(0, len(targets), batch_size):
        chunk = targets[start : start + batch_size]
        width = n + max(map(len, chunk))
        input_ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, t in enumerate(chunk):
            input_ids[i, : n + len(t)] = torch.tensor(list(context) + list(t))
            mask[i, : n + len(t)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, n - 1 : -1], dim=-1)  # position n - 1 + j predicts target token j
        for i, t in enumerate(chunk):
            picked = logp[i, torch.arange(len(t)), torch.tensor(t, device=logp.device)]
            out[start + i] = float(picked.double().sum())
    return out


# ------------------------------------------------------------------ one canary, all canaries


@dataclass(frozen=True)
class ExposureSettings:
    """How exposure is measured (``privacy.canaries.method`` and ``.sample``).

    Attributes
    ----------
    method : str
        ``auto``, ``exact`` or ``estimate`` (module docstring).
    sample : int
        Candidates drawn for the estimate.
    batch_size : int
        Sequences per forward pass.
    seed : int
        Seeds the estimate's sample of candidates.
    """

    method: str = "auto"
    sample: int = 5000
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} must be one of {', '.join(METHODS)}")
        if self.sample < 3 or self.batch_size < 1:
            raise ValueError(f"sample={self.sample} must be >= 3 and batch_size={self.batch_size} >= 1")


def choose_method(settings: ExposureSettings, layout: SecretLayout, digits: int) -> str:
    """``exact`` or ``estimate`` for this canary (``exact`` asked of a tokenizer that merges digits is an error)."""
    if settings.method == "exact" and layout.digit_ids is None:
        raise ValueError(
            "privacy.canaries.method=exact needs a tokenizer that writes each digit as one token; this one merges "
            "them: set privacy.canaries.method=estimate (or auto)"
        )
    if settings.method == "auto":
        return "exact" if layout.digit_ids is not None and digits <= EXACT_MAX_DIGITS else "estimate"
    return settings.method


def canary_exposure(
    model: Any, tokenizer: Any, canary: Canary, digits: int, template: str, settings: ExposureSettings
) -> dict[str, Any]:
    """One canary's exposure, log-perplexity (nats) and method; its rank too when exact."""
    layout = secret_layout(tokenizer, canary, template, digits)
    if choose_method(settings, layout, digits) == "exact":
        logppl = -digit_tree_scores(model, layout.context, layout.digit_ids, digits, settings.batch_size)
        rank = rank_of(logppl, int(canary.secret))
        found = {"method": "exact", "exposure": exposure_from_rank(rank, 10**digits), "rank": rank}
        return {"number": canary.number, **found, "log_perplexity": float(logppl[int(canary.secret)])}
    rng = np.random.default_rng([settings.seed, canary.number])
    candidates = [f"{int(n):0{digits}d}" for n in rng.integers(0, 10**digits, settings.sample)] + [canary.secret]
    ids = candidate_ids(tokenizer, canary, candidates, template)
    targets = [layout.target(f, s) for f, s in zip(ids, candidates, strict=True)]
    logppl = -sequence_scores(model, layout.context, targets, settings.batch_size)
    own = float(logppl[-1])  # the canary's own secret, scored with the sample
    exposure = estimated_exposure(own, logppl[:-1], 10**digits)
    return {"number": canary.number, "method": "estimate", "exposure": exposure, "log_perplexity": own}


def check_method(tokenizer: Any, cfg: Any) -> str:
    """The method the audit will use for a run config's canaries (before the run: ``exact`` asked of a tokenizer
    that merges digits fails here, not after the last round).
    """
    spec = CanarySpec.from_config(cfg)
    layout = secret_layout(tokenizer, make_canaries(spec)[0], cfg.training.template, spec.digits)
    return choose_method(_settings(cfg), layout, spec.digits)


def _settings(cfg: Any) -> ExposureSettings:
    c = cfg.privacy.canaries
    return ExposureSettings(
        method=str(c.method), sample=int(c.sample), batch_size=int(cfg.training.eval_batch_size), seed=int(c.seed)
    )


def exposure_report(
    model: Any, tokenizer: Any, canaries: list[Canary], digits: int, template: str, settings: ExposureSettings
) -> dict[str, Any]:
    """Every canary's exposure under the model's current adapter, their mean and max, and log2 |R| (the most
    an exposure can be).
    """
    per = [canary_exposure(model, tokenizer, c, digits, template, settings) for c in canaries]
    return {
        **summarise([p["exposure"] for p in per]),
        "log2_space": digits * math.log2(10),
        "digits": digits,
        "canaries": per,
    }


def audit(model: Any, tokenizer: Any, cfg: Any) -> dict[str, Any]:
    """:func:`exposure_report` of the canaries a run config's ``privacy.canaries`` inserts, rebuilt from their
    seed (no client data needed), under the model's current adapter.
    """
    spec = CanarySpec.from_config(cfg)
    report = exposure_report(model, tokenizer, make_canaries(spec), spec.digits, cfg.training.template, _settings(cfg))
    return {**report, "partition": spec.partition, "repeats": spec.repeats}
