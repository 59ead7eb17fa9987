"""Model calls shared by the benchmarks: batched left-padded generation and option log-likelihoods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedllm_app.data.templates import STRING_TEMPLATES, prompt_text


@dataclass
class Generator:
    """A model, its tokenizer and how to prompt it.

    Attributes
    ----------
    model, tokenizer : Any
        A causal LM (PEFT-wrapped or merged) and its tokenizer.
    template : str
        Prompt template (``alpaca``, ``vicuna`` or ``chat``), as in training.
    batch_size : int
        Prompts per forward pass.
    max_new_tokens : int
        Default generation length; benchmarks may ask for more or less.
    progress : bool
        Show a tqdm progress bar.
    record : list[dict] | None
        When a list, every generation is appended to it as ``{"step", "prompt", "output"}`` (the runner
        saves them per benchmark for inspection).
    """

    model: Any
    tokenizer: Any
    template: str = "chat"
    batch_size: int = 8
    max_new_tokens: int = 256
    progress: bool = True
    record: list[dict] | None = None

    def prompt(self, instruction: str) -> str:
        """The text given to the model for a single-turn ``instruction``."""
        return prompt_text(instruction, self.template, self.tokenizer)

    def conversation(self, turns: list[str], answers: list[str]) -> str:
        """The prompt for the next answer after ``turns[:-1]`` were answered with ``answers``."""
        if self.template == "chat":
            messages: list[dict[str, str]] = []
            for i, q in enumerate(turns):
                messages.append({"role": "user", "content": q})
                if i < len(answers):
                    messages.append({"role": "assistant", "content": answers[i]})
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text = ""
        for i, q in enumerate(turns):
            text += STRING_TEMPLATES[self.template].format(instruction=q) if i == 0 else _next_turn(self.template, q)
            if i < len(answers):
                text += answers[i] + (self.tokenizer.eos_token or "") + "\n\n"
        return text

    @property
    def add_bos(self) -> bool:
        """String templates get the tokenizer's special tokens (e.g. Llama's BOS), as TRL adds them in
        training; a chat template writes its own.
        """
        return self.template != "chat"

    def _bar(self, total: int, desc: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        desc: str = "generate",
        top_p: float = 1.0,
        stop: list[str] | None = None,
    ) -> list[str]:
        """Batched, left-padded generation, greedy unless ``temperature > 0`` (then nucleus ``top_p``); returns
        only the new text. Each sequence ends early once it has written one of the ``stop`` strings (which stay in
        the text: cut them off as the benchmark does).
        """
        model, tok = self.model, self.tokenizer
        model.eval()
        device = next(model.parameters()).device
        side, tok.padding_side = tok.padding_side, "left"
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
        )
        if stop:
            sampling |= {"stop_strings": stop, "tokenizer": tok}
        out: list[str] = []
        try:
            with self._bar(len(prompts), desc) as bar:
                for i in range(0, len(prompts), self.batch_size):
                    batch = prompts[i : i + self.batch_size]
                    enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=self.add_bos).to(device)
                    gen = model.generate(
                        **enc,
                        max_new_tokens=max_new_tokens or self.max_new_tokens,
                        pad_token_id=tok.pad_token_id,
                        eos_token_id=tok.eos_token_id,
                        **sampling,
                    )
                    texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                    out.extend(texts)
                    if self.record is not None:
                        pairs = zip(batch, texts, strict=True)
                        self.record.extend({"step": desc, "prompt": p, "output": t} for p, t in pairs)
                    bar.update(len(batch))
        finally:
            tok.padding_side = side
        return out

    def harness_loglikelihoods(self, pairs: list[tuple[str, str]], desc: str = "score") -> list[float]:
        """:func:`harness_logps` of raw ``[(context, continuation)]`` texts (no prompt template)."""
        with self._bar(len(pairs), desc) as bar:
            return harness_logps(self.model, self.tokenizer, pairs, self.batch_size, progress=bar.update)

    def loglikelihoods(self, pairs: list[tuple[str, str]], desc: str = "score") -> list[float]:
        """Sum of log-probabilities of each continuation given its context, ``[(context, continuation)]``."""
        with self._bar(len(pairs), desc) as bar:
            return continuation_logps(
                self.model, self.tokenizer, pairs, self.batch_size, add_bos=self.add_bos, progress=bar.update
            )


_SEQLEN_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx")
_TOKENIZER_INFINITY = 10**20


def context_length(model: Any, tokenizer: Any, default: int = 2048) -> int:
    """The model's context length as lm-evaluation-harness reads it: the config's ``n_positions``,
    ``max_position_embeddings`` or ``n_ctx``, else the tokenizer's ``model_max_length``, else ``default``.
    """
    config = getattr(model, "config", None)
    for cfg in (getattr(config, "text_config", None), config):
        for attr in _SEQLEN_ATTRS:
            if cfg is not None and getattr(cfg, attr, None):
                return int(getattr(cfg, attr))
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < _TOKENIZER_INFINITY else default


def harness_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) tokenised as lm-evaluation-harness does for a causal model: trailing
    spaces of the context move to the continuation, the whole text is tokenised with the tokenizer's own
    special tokens, and the continuation is what follows the separately tokenised context.
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    return ctx, whole[len(ctx) :]


@torch.no_grad()
def harness_logps(
    model: Any, tokenizer: Any, pairs: list[tuple[str, str]], batch_size: int, progress: Any = None
) -> list[float]:
    """Summed log-probability of each continuation as lm-evaluation-harness's ``loglikelihood`` computes it
    (:func:`harness_pair` tokenisation; a sequence longer than the context length keeps its last tokens).
    """
    limit = context_length(model, tokenizer)
    seqs, starts = [], []
    for context, continuation in pairs:
        ctx, cont = harness_pair(tokenizer, context, continuation)
        seq = (ctx + cont)[-(limit + 1) :]
        seqs.append(seq)
        starts.append(len(seq) - len(cont))
    return _scored(model, tokenizer.pad_token_id or 0, seqs, starts, batch_size, progress)


def _scored(model: Any, pad_id: int, seqs: list, starts: list, batch_size: int, progress: Any) -> list[float]:
    """Sum of the log-probabilities of ``seq[start:]`` for each token sequence, in right-padded batches."""
    model.eval()
    out: list[float] = []
    for i in range(0, len(seqs), batch_size):
        batch, first = seqs[i : i + batch_size], starts[i : i + batch_size]
        ids, mask = right_padded(batch, pad_id)
        spans = [range(f, len(seq)) for seq, f in zip(batch, first, strict=True)]
        rows = torch.tensor([j for j, span in enumerate(spans) for _ in span], dtype=torch.long)
        cols = torch.tensor([t for span in spans for t in span], dtype=torch.long)
        logp = token_logps(model, ids, mask, rows, cols)
        sums = torch.zeros(len(batch), dtype=logp.dtype).index_add_(0, rows, logp.cpu())
        out.extend(float(x) for x in sums)  # a continuation cut away entirely scores 0.0
        if progress is not None:
            progress(len(batch))
    return out


def right_padded(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one right-padded ``[batch, longest]`` id tensor and its attention mask."""
    ids = torch.full((len(seqs), max(map(len, seqs))), pad_id)
    mask = torch.zeros_like(ids)
    for j, seq in enumerate(seqs):
        ids[j, : len(seq)] = torch.tensor(seq)
        mask[j, : len(seq)] = 1
    return ids, mask


class HeadNotSeparable(RuntimeError):
    """The model's LM head is not a module whose output the forward returns as it is."""


@torch.no_grad()
def token_logps(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """``log p(ids[r, c] | ids[r, :c])`` for each (r, c) of ``rows``, ``cols`` (every ``c >= 1``), float32.

    The LM head (and whatever the model applies to its output, e.g. a logit soft-cap) runs only at the
    positions that predict those tokens, not at every position of the batch: held-out completions are a
    small part of their rows, and the head over the whole vocabulary is a large part of a small model's
    forward. A model whose forward reshapes the head's output gets the full logits instead.
    """
    device = next(model.parameters()).device
    ids, rows, cols = ids.to(device), rows.to(device), cols.to(device)
    picked, _ = picked_logits(model, rows, cols - 1, input_ids=ids, attention_mask=mask.to(device))
    return torch.log_softmax(picked, dim=-1).gather(-1, ids[rows, cols].unsqueeze(-1)).squeeze(-1)


def picked_logits(
    model: Any, rows: torch.Tensor, positions: torch.Tensor, *, rerun: bool = True, **inputs: Any
) -> tuple[torch.Tensor, Any]:
    """The model's float32 logits at each (row, position) of ``rows``, ``positions`` (``[len(rows), vocab]``),
    and the forward's output, for the forward ``model(**inputs)``; the LM head runs only at those positions
    where the model's head is a module whose output it does not reshape (:func:`token_logps`). Elsewhere the
    forward runs again with the head at every position, unless ``rerun`` is false (a forward that extends a
    key/value cache must not run twice): then :class:`HeadNotSeparable` is raised.
    """
    head = model.get_output_embeddings()

    def predicting_positions(_module: Any, args: tuple) -> tuple:
        return (args[0][rows, positions].unsqueeze(0), *args[1:])

    if head is not None:
        handle = head.register_forward_pre_hook(predicting_positions)
        try:
            out = model(**inputs)
            if out.logits.shape[:2] == (1, len(rows)):
                return out.logits[0].float(), out
        except RuntimeError:  # the model's forward reshaped the head's output
            pass
        finally:
            handle.remove()
    if not rerun:
        raise HeadNotSeparable(f"{type(model).__name__}'s LM head cannot be run at chosen positions only")
    out = model(**inputs)  # no separate head module, or one whose output the model reshapes: every position
    return out.logits[rows, positions].float(), out


@torch.no_grad()
def continuation_logps(
    model: Any,
    tokenizer: Any,
    pairs: list[tuple[str, str]],
    batch_size: int,
    *,
    add_bos: bool = False,
    max_length: int | None = None,
    progress: Any = None,
) -> list[float]:
    """Summed log-probability of each continuation given its context, in right-padded batches.

    The context gets the tokenizer's special tokens when ``add_bos``; the continuation never does.
    With ``max_length`` each sequence is cut to that many tokens, and a continuation cut away
    entirely scores 0.0. ``progress(n)`` is called after each batch of ``n`` pairs.
    """

    def encode(text: str, special: bool) -> list[int]:
        return tokenizer(text, add_special_tokens=special)["input_ids"]

    ids = [(encode(ctx, add_bos), encode(cont, False)) for ctx, cont in pairs]
    return sequence_logps(model, tokenizer.pad_token_id, ids, batch_size, max_length=max_length, progress=progress)


@torch.no_grad()
def sequence_logps(
    model: Any,
    pad_token_id: int,
    pairs: list[tuple[list[int], list[int]]],
    batch_size: int,
    *,
    max_length: int | None = None,
    progress: Any = None,
) -> list[float]:
    """:func:`continuation_logps` over token ids: ``[(context ids, continuation ids)]``."""
    seqs = [(c + cont)[:max_length] for c, cont in pairs]
    starts = [max(1, min(len(c), len(seq))) for (c, _), seq in zip(pairs, seqs, strict=True)]
    return _scored(model, pad_token_id, seqs, starts, batch_size, progress)


def _next_turn(template: str, question: str) -> str:
    if template == "alpaca":
        return f"### Instruction:\n{question}\n\n### Response:\n"
    return f"USER: {question} ASSISTANT: "
