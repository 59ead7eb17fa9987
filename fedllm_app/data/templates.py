"""Prompt templates: OpenFedLLM's alpaca and vicuna strings, and the tokenizer's chat template.

Every template turns an instruction/response pair into TRL's prompt/completion form,
so SFTTrainer computes the loss on the completion (response) tokens only.
"""

from __future__ import annotations

from typing import Any

from fedllm_app.config import TEMPLATE_NAMES

ALPACA = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions. "
    "USER: {instruction} ASSISTANT: "
)
STRING_TEMPLATES: dict[str, str] = {"alpaca": ALPACA, "vicuna": VICUNA}


def check_template(name: str) -> None:
    """Raise a ValueError naming the valid templates if ``name`` is not one."""
    if name not in TEMPLATE_NAMES:
        raise ValueError(f"unknown template {name!r}; set training.template to one of {', '.join(TEMPLATE_NAMES)}")


def to_prompt_completion(instruction: str, response: str, template: str) -> dict[str, Any]:
    """One row in TRL's prompt/completion form (conversational for ``chat``)."""
    check_template(template)
    if template == "chat":
        return {
            "prompt": [{"role": "user", "content": instruction}],
            "completion": [{"role": "assistant", "content": response}],
        }
    return {"prompt": STRING_TEMPLATES[template].format(instruction=instruction), "completion": response}


def prompt_text(instruction: str, template: str, tokenizer: Any) -> str:
    """The text a model is given at generation time (up to where the response starts)."""
    check_template(template)
    if template == "chat":
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
    return STRING_TEMPLATES[template].format(instruction=instruction)
