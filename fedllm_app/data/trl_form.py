"""Rows in TRL's form: prompt/completion (SFT) or prompt/chosen/rejected (DPO), rendered by a template.

:func:`trl_token_ids` tokenises such a row exactly as TRL's SFTTrainer and DPOTrainer do, so
the server's held-out metrics score the very tokens the clients train on.
"""

from __future__ import annotations

from typing import Any

from fedllm_app.data.rows import Row, is_preference
from fedllm_app.data.templates import STRING_TEMPLATES, check_template, to_prompt_completion


def flatten_turns(messages: list[dict[str, str]]) -> str:
    """A conversation as one instruction string (for the alpaca/vicuna string templates)."""
    if len(messages) == 1:
        return messages[0]["content"]
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names.get(m['role'], m['role'])}: {m['content']}" for m in messages)


def to_preference(row: Row, template: str) -> dict[str, Any]:
    """One row in TRL's preference form (conversational for ``chat``)."""
    check_template(template)
    if template == "chat":
        return {
            "prompt": list(row["prompt"]),
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}],
        }
    prompt = STRING_TEMPLATES[template].format(instruction=flatten_turns(row["prompt"]))
    return {"prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"]}


def to_trl(rows: list[Row], template: str) -> Any:
    """A ``datasets.Dataset`` in TRL's prompt/completion (SFT) or prompt/chosen/rejected (DPO) form."""
    from datasets import Dataset

    if is_preference(rows):
        return Dataset.from_list([to_preference(r, template) for r in rows])
    return Dataset.from_list([to_prompt_completion(r["instruction"], r["response"], template) for r in rows])


def trl_token_ids(tokenizer: Any, prompt: str | list, completions: list) -> tuple[list[int], list[list[int]]]:
    """Token ids of a TRL-form prompt and its completions, as TRL 1.x's SFT and DPO trainers make them.

    A string prompt is tokenised with the tokenizer's special tokens (e.g. Llama's BOS) and each
    completion gets the EOS text appended, then is tokenised *together with* the prompt; a
    conversational one goes through the chat template. The completion starts where the prompt's
    ids and the prompt+completion ids diverge (TRL's ``common_prefix_length``; for DPO the
    shortest over chosen and rejected), so a token merged across the boundary counts as completion.
    """
    from trl.data_utils import common_prefix_length

    if isinstance(prompt, str):
        eos = tokenizer.eos_token or ""
        ends = [c if c.endswith(eos) else c + eos for c in completions]
        prompt_ids = tokenizer(prompt)["input_ids"]
        full = [tokenizer(prompt + c)["input_ids"] for c in ends]
    else:
        prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True)
        full = [_chat_ids(tokenizer, prompt + c) for c in completions]
    start = min(common_prefix_length(prompt_ids, f) for f in full)
    return prompt_ids[:start], [f[start:] for f in full]


def _chat_ids(tokenizer: Any, messages: list, add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(out["input_ids"])
