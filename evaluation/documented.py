"""Settings dataclasses documented once: each field's ``metadata["help"]`` is its documentation.

``fedllm-eval`` turns those fields into flags (``transformers.HfArgumentParser`` shows the help and the
default), and :func:`documented` writes the same text into the class docstring's numpy ``Attributes``
section, so ``help(EvalSettings)`` and ``fedllm-eval --help`` cannot disagree.
"""

from __future__ import annotations

import inspect
import textwrap
from dataclasses import fields
from typing import TypeVar

T = TypeVar("T")
WIDTH = 116


def documented(cls: type[T]) -> type[T]:
    """Append a numpy ``Attributes`` section (name, type, help) to a dataclass's docstring, from its fields."""
    lines = ["Attributes", "----------"]
    for f in fields(cls):  # type: ignore[arg-type]
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        lines.append(f"{f.name} : {type_name}")
        lines += textwrap.wrap(f.metadata["help"], WIDTH, initial_indent="    ", subsequent_indent="    ")
    cls.__doc__ = inspect.cleandoc(cls.__doc__ or "") + "\n\n" + "\n".join(lines) + "\n"
    return cls
