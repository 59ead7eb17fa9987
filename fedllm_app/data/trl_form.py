"""Rows in TRL's form: prompt/completion (SFT) or prompt/chosen/rejected (DPO), rendered by a template."""

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
