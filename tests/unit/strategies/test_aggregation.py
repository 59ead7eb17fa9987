"""The aggregation math on small hand-computed arrays (one and two rounds)."""

import numpy as np
import pytest

from strategies import aggregation as agg


def A(*xs):
    return {"w": np.array(xs, dtype=np.float64)}


def test_weighted_and_unweighted_mean():
    np.testing.assert_allclose(agg.weighted_mean([A(1.0, 2.0), A(3.0, 6.0)], [1, 3])["w"], [2.5, 5.0])
    np.testing.assert_allclose(agg.weighted_mean([A(1.0), A(3.0)], [2, 2])["w"], [2.0])
    with pytest.raises(ValueError, match="positive"):
        agg.weighted_mean([A(1.0)], [0])


def test_fedavgm_two_rounds():
    x = A(1.0)
    x1, m1 = agg.fedavgm_step(x, A(0.5), None, server_lr=1.0, beta=0.9)
    assert m1["w"][0] == pytest.approx(0.5)  # first round: m = delta
    assert x1["w"][0] == pytest.approx(1.5)
    x2, m2 = agg.fedavgm_step(x1, A(-1.0), m1, server_lr=0.5, beta=0.9)
    assert m2["w"][0] == pytest.approx(0.9 * 0.5 + 0.1 * -1.0)  # 0.35
    assert x2["w"][0] == pytest.approx(1.5 + 0.5 * 0.35)


def test_fedadagrad_two_rounds():
    x, tau, eta = A(0.0), 0.1, 1.0
    v0 = agg.initial_second_moment(x, tau)
    x1, v1 = agg.fedadagrad_step(x, A(0.3), v0, eta, tau)
    assert v1["w"][0] == pytest.approx(0.01 + 0.09)
    assert x1["w"][0] == pytest.approx(0.3 / (np.sqrt(0.1) + 0.1))
    x2, v2 = agg.fedadagrad_step(x1, A(-0.4), v1, eta, tau)
    assert v2["w"][0] == pytest.approx(0.1 + 0.16)
    assert x2["w"][0] == pytest.approx(x1["w"][0] - 0.4 / (np.sqrt(0.26) + 0.1))


def test_fedadam_two_rounds_second_moment_from_the_squared_delta():
    """Reddi et al. Alg. 2: v accumulates delta**2, not the squared first moment."""
    x, tau, eta, b1, b2 = A(0.0), 0.1, 0.5, 0.9, 0.99
    v0 = agg.initial_second_moment(x, tau)
    x1, m1, v1 = agg.fedadam_step(x, A(0.2), A(0.0), v0, eta, b1, b2, tau)
    assert m1["w"][0] == pytest.approx(0.02)
    assert v1["w"][0] == pytest.approx(0.99 * 0.01 + 0.01 * 0.04)  # 0.0103: delta**2, not m**2 = 0.0004
    assert x1["w"][0] == pytest.approx(0.5 * 0.02 / (np.sqrt(0.0103) + 0.1))
    x2, m2, v2 = agg.fedadam_step(x1, A(0.0), m1, v1, eta, b1, b2, tau)
    assert m2["w"][0] == pytest.approx(0.018)
    assert v2["w"][0] == pytest.approx(0.99 * 0.0103)  # delta 0 adds nothing
    assert x2["w"][0] == pytest.approx(x1["w"][0] + 0.5 * 0.018 / (np.sqrt(v2["w"][0]) + 0.1))


def test_fedadam_openfedllm_form_squares_the_first_moment():
    x, tau, eta, b1, b2 = A(0.0), 0.1, 0.5, 0.9, 0.99
    v0 = agg.initial_second_moment(x, tau)
    x1, m1, v1 = agg.fedadam_step(x, A(0.2), None, v0, eta, b1, b2, tau, second_moment="momentum")
    assert m1["w"][0] == pytest.approx(0.2)  # OpenFedLLM's first moment starts at the first delta
    assert v1["w"][0] == pytest.approx(0.99 * 0.01 + 0.01 * 0.04)
    x2, m2, v2 = agg.fedadam_step(x1, A(0.0), m1, v1, eta, b1, b2, tau, second_moment="momentum")
    assert m2["w"][0] == pytest.approx(0.18)
    assert v2["w"][0] == pytest.approx(0.99 * 0.0103 + 0.01 * 0.18**2)
    assert x2["w"][0] == pytest.approx(x1["w"][0] + 0.5 * 0.18 / (np.sqrt(v2["w"][0]) + 0.1))


def test_fedyogi_second_moment_moves_toward_delta_squared_additively():
    x, tau, eta, b1, b2 = A(0.0, 0.0), 0.1, 1.0, 0.9, 0.99
    v0 = agg.initial_second_moment(x, tau)  # 0.01 everywhere
    x1, m1, v1 = agg.fedyogi_step(x, A(0.5, 0.05), A(0.0, 0.0), v0, eta, b1, b2, tau)
    # d^2 = 0.25 > v: v grows by (1 - b2) d^2; d^2 = 0.0025 < v: v shrinks by (1 - b2) d^2
    np.testing.assert_allclose(m1["w"], [0.05, 0.005])
    np.testing.assert_allclose(v1["w"], [0.01 + 0.01 * 0.25, 0.01 - 0.01 * 0.0025])
    np.testing.assert_allclose(x1["w"], m1["w"] / (np.sqrt(v1["w"]) + tau))
    _, _, v_m = agg.fedyogi_step(x, A(0.5, 0.05), A(0.0, 0.0), v0, eta, b1, b2, tau, second_moment="momentum")
    np.testing.assert_allclose(v_m["w"], [0.01 - 0.01 * 0.0025, 0.01 - 0.01 * 0.005**2])


def test_fedyogi_leaves_v_where_it_already_equals_the_squared_delta():
    x, tau, eta, b1, b2 = A(0.0), 0.1, 1.0, 0.9, 0.99
    _, _, v1 = agg.fedyogi_step(x, A(0.5), A(0.0), {"w": np.array([0.25])}, eta, b1, b2, tau)  # v = d^2 = 0.25
    np.testing.assert_array_equal(v1["w"], [0.25])


def test_an_unknown_second_moment_form_is_refused():
    with pytest.raises(ValueError, match="second moment form 'm2' must be one of delta, momentum"):
        agg.squared_update(A(1.0), A(1.0), "m2")


def test_scaffold_client_control_and_server_step():
    new, dc = agg.scaffold_client_control(A(0.1), A(0.8))
    assert new["w"][0] == pytest.approx(0.8) and dc["w"][0] == pytest.approx(0.7)
    x1, c1 = agg.scaffold_server_step(A(1.0), A(0.5), A(0.3), A(0.2), num_sampled=2, num_clients=4, server_lr=1.0)
    assert x1["w"][0] == pytest.approx(0.5) and c1["w"][0] == pytest.approx(0.3 + 0.5 * 0.2)


def test_mean_gradient_equals_option_ii_under_local_sgd():
    """c_i+ = mean raw gradient is SCAFFOLD's option II when the local optimizer is SGD."""
    x, c, c_i, lr, curv, opt = 1.0, 0.3, 0.1, 0.05, 2.0, -1.0
    y, grads = x, []
    for _ in range(5):
        g = curv * (y - opt)
        grads.append(g)
        y -= lr * (g + c - c_i)
    option_ii = c_i - c + (x - y) / (5 * lr)
    new, _ = agg.scaffold_client_control(A(c_i), A(float(np.mean(grads))))
    assert new["w"][0] == pytest.approx(option_ii)


def _local_sgd(x, opt, curv, steps, lr, correction=0.0):
    grads = []
    for _ in range(steps):
        g = curv * (x - opt)
        grads.append(g)
        x = x - lr * (g + correction)
    return x, float(np.mean(grads))


def test_scaffold_reaches_the_global_optimum_where_fedavg_drifts():
    """Quadratic clients f_i = a_i/2 (x - o_i)^2 with different curvatures and optima."""
    curv, opts = np.array([1.0, 10.0]), np.array([-2.0, 3.0])
    optimum = (curv * opts).sum() / curv.sum()
    steps, lr, rounds = 10, 0.05, 60

    x = 0.0
    for _ in range(rounds):
        x = np.mean([_local_sgd(x, o, a, steps, lr)[0] for a, o in zip(curv, opts, strict=True)])
    fedavg_gap = abs(x - optimum)

    x, c, c_is = A(0.0), A(0.0), [A(0.0), A(0.0)]
    for _ in range(rounds):
        ys, dcs = [], []
        for i, (a, o) in enumerate(zip(curv, opts, strict=True)):
            y, mean_grad = _local_sgd(x["w"][0], o, a, steps, lr, c["w"][0] - c_is[i]["w"][0])
            c_is[i], dc = agg.scaffold_client_control(c_is[i], A(mean_grad))
            ys.append(A(y))
            dcs.append(dc)
        x, c = agg.scaffold_server_step(x, agg.weighted_mean(ys, [1, 1]), c, agg.weighted_mean(dcs, [1, 1]), 2, 2)
    scaffold_gap = abs(x["w"][0] - optimum)

    assert fedavg_gap > 0.3
    assert scaffold_gap < 1e-3


def test_weighted_mean_takes_fractional_weights_and_names_what_is_wrong():
    np.testing.assert_allclose(agg.weighted_mean([A(1.0), A(3.0)], [0.25, 0.5])["w"], [7 / 3])
    with pytest.raises(ValueError, match="^no updates to average$"):
        agg.weighted_mean([], [])
    with pytest.raises(ValueError, match=r"weights must sum to a positive number, got \[0, 0\]"):
        agg.weighted_mean([A(1.0), A(2.0)], [0, 0])
    with pytest.raises(ValueError):
        agg.weighted_mean([A(1.0), A(2.0)], [1.0])  # one weight per update


def test_scaffold_server_step_takes_the_clients_mean_by_default():
    x1, _ = agg.scaffold_server_step(A(1.0), A(0.5), A(0.0), A(0.0), num_sampled=1, num_clients=1)
    assert x1["w"][0] == pytest.approx(0.5)


def test_the_zero_first_moment_has_each_global_arrays_shape_and_dtype_and_the_delta_form_starts_empty():
    like = {"a": np.ones((2, 3), np.float32), "b": np.ones(4, np.float64)}
    m = agg.initial_first_moment(like, "zero")
    assert {k: (v.shape, v.dtype, float(np.abs(v).sum())) for k, v in m.items()} == {
        "a": ((2, 3), np.float32, 0.0),
        "b": ((4,), np.float64, 0.0),
    }
    assert agg.initial_first_moment(like, "delta") is None
