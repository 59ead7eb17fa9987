"""DP with distributed noise under secure aggregation (``privacy.noise=distributed``), on the server's real round
loop with clients running the real secure handlers (:mod:`fedllm_app.client.secure`): each client adds its own
noise share before masking, the server adds none, and the unmasked sum still carries noise of std >= z C.

Each client's "training" adds a known small delta (norm well below C) to the global adapter, so the tests can
take the noise out of what the server released. The adapter has 20,000 values: enough coordinates for a
sample standard deviation within 5% of the truth with overwhelming probability (its relative standard error
is 1 / sqrt(2 * 20,000) = 0.5%, so 5% is ten standard errors).
"""

import math

import numpy as np
import pytest

from fedllm_app.secure.secagg import SecAggParams
from fedllm_app.server.rounds import run_rounds
from strategies.dp import with_dp
from strategies.fedavg import ARRAYS_KEY, FedAvgLoRA
from strategies.privacy import DPParams
from strategies.records import from_record, to_record
from strategies.scaffold import C_DELTA_KEY, Scaffold
from tests.fakes import Writer
from tests.unit.fedllm_app.server.test_secure_round import STRATEGIES, LoopbackGrid, kw
from tests.unit.fedllm_app.server.test_secure_round import client_app as secure_client_app

START = {"a": np.zeros((100, 150), dtype=np.float32), "b": np.full(5000, 0.5, dtype=np.float32)}
SIZE = sum(v.size for v in START.values())
Z, C, N = 0.5, 1.0, 4  # threshold ceil(0.667 * 4) = 3 of the 4 sampled clients
RANGE = 4.0  # >= C + 8 s for the largest share here, z C / sqrt(3 - 1)


def delta_of(pid, like=START):
    """Partition ``pid``'s update: small (norm ~0.14, within C), distinct."""
    rng = np.random.default_rng(100 + pid)
    return {k: rng.normal(0, 0.001, v.shape).astype(np.float32) for k, v in like.items()}


def seeded(pid):
    """A test-only generator for partition ``pid``'s noise share, so the test can draw the same share again."""
    return np.random.default_rng(1000 + pid)


def client_app(noise_rng=None):
    """The real secure handlers (:func:`test_secure_round.client_app`) adding :func:`delta_of`; ``noise_rng(pid)``:
    the share's generator (None: the client's own, from the OS's entropy).
    """
    return secure_client_app(delta_of, lambda pid: {k: v / 10 for k, v in delta_of(pid + 50).items()}, noise_rng)


def dp(colluders=0):
    return DPParams(clip_norm=C, noise_multiplier=Z, sample_rate=1.0, num_clients=N, noise="distributed",
                    noise_colluders=colluders)  # fmt: skip


def run(strategy, grid):
    writer = Writer()
    arrays, _ = run_rounds(grid, strategy, to_record(START), 1, 0.3, writer, "noise", poll_interval=0.001,
                           min_replies=1, secagg=SecAggParams(clip_range=RANGE))  # fmt: skip
    return from_record(arrays), writer.rows[0]


def flat(arrays):
    return np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in START])


def released_noise_sum(got, pids):
    """What the server released minus the survivors' true updates, times q N: the noise on the unmasked sum."""
    return N * (flat(got) - flat(START)) - sum(flat(delta_of(p)) for p in pids)


def share(pid, std, size=SIZE):
    return seeded(pid).normal(0.0, std, size=size)


def test_the_server_adds_no_noise_the_sum_is_the_clients_noised_updates_up_to_quantisation():
    server_rng = np.random.default_rng(7)
    before = server_rng.bit_generator.state
    strategy = with_dp(FedAvgLoRA)(dp=dp(), rng=server_rng, **kw(N))
    got, row = run(strategy, LoopbackGrid(N, client_app(seeded)))
    s = Z * C / math.sqrt(3)  # each share: z C / sqrt(t - c), t = 3, c = 0
    want = sum(flat(delta_of(p)) + share(p, s) for p in range(N)) / N  # the fixed-weight mean, q N = 4
    np.testing.assert_allclose(flat(got) - flat(START), want, atol=2e-6)  # float32 adapter, ~1e-8 quantisation
    assert server_rng.bit_generator.state == before  # the server drew no noise of its own
    assert row["dp_noise_shares"] == N and row["dp_noise_std"] == pytest.approx(2 * s / N)  # sqrt(4) s / (q N)


@pytest.mark.parametrize("colluders", [0, 1])
def test_a_curious_server_with_exactly_t_survivors_and_c_colluders_still_sees_noise_of_std_zc_on_the_sum(colluders):
    """One client lost after masking leaves exactly t = 3 shares; a server that adds nothing and removes what
    its ``colluders`` know (their own shares) is left with noise of std z C on the sum, no less.
    """
    grid = LoopbackGrid(N, client_app(seeded), lost={("mask", 3)})
    got, row = run(with_dp(FedAvgLoRA)(dp=dp(colluders), **kw(N)), grid)
    assert row["secagg_survivors"] == 3
    s = Z * C / math.sqrt(3 - colluders)
    noise = released_noise_sum(got, [0, 1, 2]) - sum(share(p, s) for p in range(colluders))
    assert abs(noise.mean()) < 7 * Z * C / math.sqrt(SIZE)  # seven standard errors
    assert noise.std() == pytest.approx(Z * C, rel=0.05)


def test_each_round_the_clients_draw_fresh_noise_from_the_os_not_from_a_seed():
    """Two identical rounds with the clients' own generators release different adapters: the shares are not
    reproducible from anything the run shares; their sum has the calibrated std sqrt(4 / 3) z C.
    """
    noises = []
    for _ in range(2):
        got, _ = run(with_dp(FedAvgLoRA)(dp=dp(), **kw(N)), LoopbackGrid(N, client_app()))
        noises.append(released_noise_sum(got, range(N)))
    assert noises[0].std() == pytest.approx(Z * C * math.sqrt(4 / 3), rel=0.05)
    assert abs(np.corrcoef(noises[0], noises[1])[0, 1]) < 0.05


@pytest.mark.parametrize(("cls", "hp"), STRATEGIES, ids=[c.__name__ for c, _ in STRATEGIES])
def test_every_strategy_steps_on_the_mean_of_the_clients_noised_updates(cls, hp):
    """The server step is post-processing of the noised mean, for each of the seven strategies (SCAFFOLD: the
    share covers the adapter delta and the control delta, clipped together)."""
    strategy = with_dp(cls)(dp=dp(), **hp, **kw(N))
    got, _ = run(strategy, LoopbackGrid(N, client_app(seeded)))
    scaffold = cls is Scaffold
    s = Z * C / math.sqrt(3)
    noised = [share(p, s, 2 * SIZE if scaffold else SIZE) for p in range(N)]
    adapter = {k: np.mean([delta_of(p)[k] for p in range(N)], axis=0) for k in START}
    parts, pos = {ARRAYS_KEY: {}}, 0
    for k, v in START.items():
        parts[ARRAYS_KEY][k] = adapter[k] + np.mean([e[pos : pos + v.size] for e in noised], axis=0).reshape(v.shape)
        pos += v.size
    if scaffold:
        parts[C_DELTA_KEY] = {}
        for k, v in START.items():
            c = np.mean([delta_of(p + 50)[k] / 10 for p in range(N)], axis=0)
            parts[C_DELTA_KEY][k] = c + np.mean([e[pos : pos + v.size] for e in noised], axis=0).reshape(v.shape)
            pos += v.size
    reference = cls(**hp, **kw(N))
    if scaffold:  # the server control variate as configure_train starts it
        reference.c = {k: np.zeros_like(v) for k, v in START.items()}
    want = reference.step_from_mean(START, parts, N, {})
    for k in START:
        np.testing.assert_allclose(got[k], np.asarray(want[k], dtype=np.float32), atol=2e-5)
    if scaffold:
        for k in START:
            np.testing.assert_allclose(strategy.c[k], reference.c[k], atol=2e-6)


def test_a_client_refuses_to_mask_a_share_its_quantiser_range_would_clip():
    """The server sized secagg_clip_range below C + 8 s: every client refuses (a dropout each), the round fails
    loudly and releases nothing."""
    strategy = with_dp(FedAvgLoRA)(dp=dp(), **kw(N))
    writer = Writer()
    grid = LoopbackGrid(N, client_app())
    arrays, _ = run_rounds(grid, strategy, to_record(START), 1, 0.3, writer, "noise", poll_interval=0.001,
                           min_replies=1, secagg=SecAggParams(clip_range=1.0))  # fmt: skip
    np.testing.assert_array_equal(flat(from_record(arrays)), flat(START))
    assert writer.rows[0]["aggregated"] is False and "fewer than the threshold" in writer.rows[0]["secagg_error"]
