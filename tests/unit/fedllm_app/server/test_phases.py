"""fedllm_app.server.phases: the ServerApp's start-up phases, wall and this thread's CPU, for summary.json."""

import time

from fedllm_app.server.phases import Phases


def test_each_phase_gets_the_wall_and_thread_cpu_since_the_previous_mark():
    phases = Phases(time.perf_counter())
    time.sleep(0.05)  # wall, no CPU
    phases.mark("waiting")
    end = time.thread_time() + 0.05
    while time.thread_time() < end:  # CPU in this thread
        pass
    phases.mark("working")
    out = phases.summary()
    assert set(out) == {"cpu_before_main", "waiting", "working"}
    assert out["waiting"]["wall"] >= 0.05 and out["waiting"]["cpu"] < 0.03
    assert out["working"]["cpu"] >= 0.05 and out["working"]["wall"] >= out["working"]["cpu"] - 0.01


def test_a_repeated_phase_adds_up():
    phases = Phases(time.perf_counter())
    for _ in range(2):
        time.sleep(0.02)
        phases.mark("again")
    assert phases.summary()["again"]["wall"] >= 0.04
