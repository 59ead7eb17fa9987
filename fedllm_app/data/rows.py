"""What flows through the pipeline: a row is a plain dict.

- SFT: ``{"instruction": str, "response": str, "domain": str, ...}``
- DPO: ``{"prompt": [{"role", "content"}, ...], "chosen": str, "rejected": str, "domain": str, ...}``

plus a source's other scalar columns (so ``partition.by=<column>`` can use them).
"""

from __future__ import annotations

from typing import Any

Row = dict[str, Any]


def is_preference(rows: list[Row]) -> bool:
    """Whether ``rows`` are DPO preference pairs (they have a ``chosen`` column)."""
    return bool(rows) and "chosen" in rows[0]
