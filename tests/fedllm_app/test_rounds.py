"""The server's reply polling: returns as soon as every reply is in, stops at the timeout."""

import time
from types import SimpleNamespace

from fedllm_app.rounds import send_and_receive


class SlowGrid:
    """A Grid whose replies become available ``delay`` seconds after the push."""

    def __init__(self, delay: float, answer: set[str]) -> None:
        self.delay, self.answer, self.pulls = delay, answer, 0

    def push_messages(self, messages):
        self.pushed = time.monotonic()
        return [f"id{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        if time.monotonic() - self.pushed < self.delay:
            return []
        ready = [i for i in ids if i in self.answer]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ready]


def test_returns_soon_after_the_last_reply():
    grid = SlowGrid(0.2, {"id0", "id1"})
    start = time.monotonic()
    replies = send_and_receive(grid, ["a", "b"], timeout=10, poll_interval=0.02)
    assert len(replies) == 2
    assert time.monotonic() - start < 0.5
    assert grid.pulls >= 2


def test_missing_replies_end_at_the_timeout():
    grid = SlowGrid(0.0, {"id0"})
    start = time.monotonic()
    replies = send_and_receive(grid, ["a", "b"], timeout=0.3, poll_interval=0.05)
    assert [r.metadata.reply_to_message_id for r in replies] == ["id0"]
    assert 0.3 <= time.monotonic() - start < 1.0
