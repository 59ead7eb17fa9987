"""benchmarks/vs_plain_loop.py: the table compares steady rounds (the first two left out) as ratios; the loops
themselves run by hand (docs/benchmarks.md)."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("vs_plain_loop", REPO / "benchmarks" / "vs_plain_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_steady_rounds_leave_out_the_first_two_and_the_table_gives_each_ratio(bench):
    assert bench.steady([9.0, 5.0, 2.0, 4.0]) == 3.0
    assert bench.steady([7.0]) == 7.0  # too few rounds: all of them
    ours = {"wall": 300.0, "before_round_1": 30.0, "fedavg_rounds": [9.0, 5.0, 4.0, 4.0], "local_rounds": [8, 6, 3, 3]}
    plain = {"wall": 200.0, "before_round_1": 10.0, "fedavg_rounds": [3.0, 3.0, 2.0, 2.0], "local_rounds": [3, 3, 3, 3]}
    lines = bench.table(ours, plain).splitlines()
    assert lines[2].startswith("| fedllm (flwr run) | 300.0 s | 30.0 s | 9.00 s | 4.00 s | 3.00 s |")
    assert lines[-1] == "| fedllm / plain | 1.50x | | | 2.00x | 1.00x |"
