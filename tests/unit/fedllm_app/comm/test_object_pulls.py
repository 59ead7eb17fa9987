"""An object that is not there yet is asked for again after 0.1 s, not Flower's 1 s then 2 s (a round's message
reaches its ClientApp seconds sooner); Flower's own pull function is what is run."""

import time

import pytest
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_objects

from fedllm_app.comm.object_pulls import shorten_object_pull_backoff


@pytest.fixture
def flower_defaults():
    saved = {f: dict(f.__kwdefaults__) for f in (pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)}
    yield
    for fn, defaults in saved.items():
        fn.__kwdefaults__ = defaults


def arriving_after(misses: int):
    """A pull function whose object is "not there yet" ``misses`` times, then there."""
    asked = []

    def pull(object_id: str) -> bytes:
        asked.append(time.monotonic())
        if len(asked) <= misses:
            raise ObjectUnavailableError(object_id)
        return b"content"

    return pull, asked


def seconds_to_pull(misses: int) -> float:
    pull, _ = arriving_after(misses)
    start = time.monotonic()
    assert pull_objects(["a"], pull) == {"a": b"content"}
    return time.monotonic() - start


def test_flowers_pull_waits_a_second_then_two_for_an_object_that_arrives_late(flower_defaults):
    assert seconds_to_pull(2) >= 0.8 + 1.6  # 1 s and 2 s, each less 20% jitter at most


def test_after_the_change_the_same_object_is_pulled_within_a_fraction_of_a_second(flower_defaults):
    shorten_object_pull_backoff()
    assert seconds_to_pull(2) < 1.0  # 0.1 s and 0.2 s (plus jitter): under a second even on a loaded machine
    caller = inflatable_utils.pull_and_inflate_object_from_tree.__kwdefaults__
    assert caller["initial_backoff"] == 0.1 and caller["backoff_cap"] == 1.0  # the ClientApp's pull too


def test_retries_double_up_to_the_cap(flower_defaults):
    shorten_object_pull_backoff(initial=0.01, cap=0.04)
    pull, asked = arriving_after(5)
    pull_objects(["a"], pull)
    gaps = [b - a for a, b in zip(asked, asked[1:], strict=False)]
    assert len(gaps) == 5 and gaps[0] < gaps[2] and max(gaps) < 0.04 * 1.2 + 0.05


def test_a_flower_without_the_backoff_settings_is_refused_by_name(flower_defaults, monkeypatch):
    monkeypatch.setattr(pull_objects, "__kwdefaults__", {"max_time": 7200})
    with pytest.raises(RuntimeError, match="pull_objects has no initial_backoff/backoff_cap"):
        shorten_object_pull_backoff()
