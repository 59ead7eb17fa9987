"""The run's communication budget (``comm.budget_mb``): megabytes (2**20 bytes, the leaderboard's unit) counted both
ways on the message bytes.

Before each round the server estimates what the round will cost: the downlink exactly (the encoded
messages are built before they are sent) plus, per sampled client, the largest reply seen so far
(before any reply: the size of the message it is sent). A round that would take the run past its
budget is not started: the run stops there, after its last round's checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

MB = 2**20  # bytes: the FlowerTune leaderboard's tracker counts MB as 1024**2 bytes (its 200,000 MB budget)


@dataclass
class Budget:
    """The budget in MB (None: none) and the largest reply seen, in bytes."""

    budget_mb: float | None = None
    reply_bytes: int = 0

    def note(self, bytes_by_node: dict[str, dict[str, int]]) -> None:
        """Remember the largest reply of a round (``traffic``'s per-node counts)."""
        self.reply_bytes = max([self.reply_bytes, *(int(e["received"]) for e in bytes_by_node.values())])

    def estimate(self, message_bytes: list[int]) -> int:
        """Bytes of a round whose messages carry ``message_bytes``: those, plus one reply per message."""
        return sum(message_bytes) + sum(self.reply_bytes or size for size in message_bytes)

    def stop_reason(self, rnd: int, used_bytes: int, message_bytes: list[int]) -> str | None:
        """Why round ``rnd`` must not start (one line), or None when it fits (or there is no budget)."""
        if self.budget_mb is None:
            return None
        need = self.estimate(message_bytes)
        if used_bytes + need <= self.budget_mb * MB:
            return None
        return (
            f"communication budget: round {rnd} would need about {need / MB:.2f} MB more, and {used_bytes / MB:.2f} "
            f"of comm.budget_mb={self.budget_mb:g} MB are used; the run stops before it, its last checkpoint "
            f"is round {rnd - 1}"
        )

    def fields(self, used_bytes: int) -> dict[str, float | None]:
        """The running total for the round's record (metrics.jsonl and the round line)."""
        return {"comm_mb_used": used_bytes / MB, "comm_budget_mb": self.budget_mb}
