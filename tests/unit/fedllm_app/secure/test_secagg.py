"""SecAgg+ protocol on its own: the sum is exact up to quantisation, dropouts after masking are recovered,
too few survivors fail before anything is revealed, and one masked vector says nothing of its update."""

import numpy as np
import pytest

from fedllm_app.secure.secagg import (
    ClientKeys,
    SecAggError,
    SecAggParams,
    check_survivors,
    dequantize,
    mask,
    neighbourhoods,
    quantize,
    reduce,
    reveal,
    share_secrets,
    unmask,
)

TAG = b"round-1"


def run_protocol(updates, params, drop_after_masking=(), seed=0):
    """Every stage for ``len(updates)`` clients; those in ``drop_after_masking`` send their masked vector
    to nobody. Returns the float sum the server recovers and the masked vectors it received."""
    n = len(updates)
    rng = np.random.default_rng(seed)
    keys = [ClientKeys.generate() for _ in range(n)]
    pubs = [k.public() for k in keys]
    graph = neighbourhoods(n, params.degree(n), seed)
    t = params.share_threshold(n)
    held = {i: {} for i in range(n)}
    for i in range(n):
        for holder, ct in share_secrets(i, keys[i], {j: pubs[j][0] for j in [i, *graph[i]]}, t, TAG).items():
            held[holder][i] = ct
    masked = {}
    for i in range(n):
        q = quantize(updates[i], params.clip_range, params.bits, n, rng)
        vec = mask(q, i, keys[i], {j: pubs[j][1] for j in graph[i]}, TAG, params.bits)
        if i not in drop_after_masking:
            masked[i] = vec
    survivors, dropped = set(masked), set(drop_after_masking)
    check_survivors(survivors, set(range(n)), graph, t)
    revealed = {}
    for holder in survivors:
        for src, share in reveal(holder, keys[holder], held[holder], {j: pubs[j][0] for j in range(n)},
                                 dropped, TAG).items():  # fmt: skip
            revealed.setdefault(src, {})[holder] = share
    total = reduce(np.sum([v.astype(np.uint64) for v in masked.values()], axis=0), params.bits)
    s_pks = {j: pubs[j][1] for j in range(n)}
    q_sum = unmask(total, survivors, dropped, revealed, s_pks, graph, t, TAG, params.bits)
    return dequantize(q_sum, params.clip_range, params.bits, n, len(survivors)), masked


def updates_of(n, size=50, seed=1):
    return [np.random.default_rng(seed + i).normal(0, 0.1, size) for i in range(n)]


def test_the_server_recovers_the_sum_exactly_up_to_quantisation():
    params = SecAggParams(clip_range=1.0, bits=32)
    ups = updates_of(5)
    got, _ = run_protocol(ups, params)
    step = 2 * params.clip_range / ((2**32 - 1) // 5)
    assert np.max(np.abs(got - np.sum(ups, axis=0))) <= 5 * step


@pytest.mark.parametrize(("n", "dropped"), [(4, {2}), (10, {0, 4, 9})])
def test_clients_dropping_after_masking_still_leave_the_survivors_sum(n, dropped):
    params = SecAggParams()
    ups = updates_of(n)
    got, _ = run_protocol(ups, params, drop_after_masking=dropped)
    want = np.sum([u for i, u in enumerate(ups) if i not in dropped], axis=0)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_secagg_plus_neighbourhoods_of_log_size_recover_the_sum_with_dropouts():
    params = SecAggParams(neighbours=4, threshold=3)
    assert params.degree(12) == 4
    ups = updates_of(12)
    got, _ = run_protocol(ups, params, drop_after_masking={3})
    np.testing.assert_allclose(got, np.sum([u for i, u in enumerate(ups) if i != 3], axis=0), atol=1e-6)


def test_fewer_survivors_than_the_threshold_fail_loudly_before_any_share_is_asked():
    params = SecAggParams()  # 4 clients: threshold ceil(2/3 * 4) = 3
    with pytest.raises(SecAggError, match="2 of 4 clients returned a masked update, fewer than the threshold of 3"):
        run_protocol(updates_of(4), params, drop_after_masking={0, 1})


def test_the_neighbourhood_graph_is_symmetric_and_of_the_asked_degree():
    graph = neighbourhoods(100, SecAggParams().degree(100), seed=3)
    assert all(len(g) == 14 for g in graph)  # 2 * ceil(log2 100)
    assert all(i in graph[j] for i in range(100) for j in graph[i])


def test_one_masked_vector_is_uniform_and_independent_of_its_update():
    params = SecAggParams(bits=16)
    size = 20000
    zeros, big = np.zeros(size), np.full(size, 0.9)  # two very different updates of one client
    _, masked_a = run_protocol([zeros, *updates_of(3, size)], params, seed=5)
    _, masked_b = run_protocol([big, *updates_of(3, size)], params, seed=6)
    a, b = masked_a[0].astype(np.float64), masked_b[0].astype(np.float64)
    for v in (a, b):  # uniform over Z_{2^16}: mean, spread and histogram of a uniform draw
        assert abs(v.mean() / 2**16 - 0.5) < 0.01
        hist, _ = np.histogram(v, bins=16, range=(0, 2**16))
        assert hist.min() > 0.9 * size / 16 and hist.max() < 1.1 * size / 16
    assert abs(a.mean() - b.mean()) / 2**16 < 0.01  # the masked vectors of 0 and 0.9 look alike
    update = np.random.default_rng(9).normal(0, 0.3, size)
    _, masked_c = run_protocol([update, *updates_of(3, size)], params, seed=7)
    assert abs(np.corrcoef(update, masked_c[0].astype(np.float64))[0, 1]) < 0.05


@pytest.mark.parametrize("bits", [32, 53])
def test_updates_at_the_clip_range_sum_to_n_times_the_range_at_every_allowed_width(bits):
    """Every client at +R: the sum decodes to +nR, never wraps past the field's half to -nR."""
    n = 4
    params = SecAggParams(bits=bits, threshold=3)
    got, _ = run_protocol([np.full(8, 1.0) for _ in range(n)], params)
    np.testing.assert_allclose(got, n * 1.0, atol=1e-6)


def test_a_field_wider_than_float64_can_quantise_exactly_is_refused():
    with pytest.raises(ValueError, match=r"privacy.secagg_bits=64 must be in 16..53"):
        SecAggParams(bits=64)


def test_a_threshold_count_of_half_a_neighbourhood_or_less_is_refused():
    with pytest.raises(SecAggError, match="asks 2 shares of neighbourhoods of 4 clients"):
        SecAggParams(threshold=2).share_threshold(4)


def test_a_holder_skips_and_reports_a_forged_share_ciphertext_and_still_reveals_the_others():
    keys = [ClientKeys.generate() for _ in range(3)]
    c_pks = {j: k.public()[0] for j, k in enumerate(keys)}
    held = {src: share_secrets(src, keys[src], c_pks, 2, TAG)[0] for src in (1, 2)}
    held[1] = held[1][:-1] + bytes([held[1][-1] ^ 1])  # one flipped bit: AES-GCM refuses it
    unopened = []
    out = reveal(0, keys[0], held, c_pks, set(), TAG, unopened)
    assert set(out) == {2} and unopened == [1]
