"""HetLoRA's padding and weights, FlexLoRA's SVD, on small hand-computed arrays."""

import numpy as np
import pytest

from strategies import hetero_rank as hr
from strategies.hetero import HeteroRankParams

L = "m.layers.0.q_proj"


def lora(a, b, layer=L):
    return {layer + hr.A_SUFFIX: np.array(a, dtype=np.float64), layer + hr.B_SUFFIX: np.array(b, dtype=np.float64)}


def random_lora(rank, out=6, inp=5, seed=0, layers=(L,)):
    rng = np.random.default_rng(seed)
    arrays = {}
    for layer in layers:
        arrays.update(lora(rng.normal(size=(rank, inp)), rng.normal(size=(out, rank)), layer))
    return arrays


def product(arrays, layer=L):
    return arrays[layer + hr.B_SUFFIX] @ arrays[layer + hr.A_SUFFIX]


def test_a_client_gets_the_first_ranks_of_the_global():
    g = lora([[1, 2], [3, 4], [5, 6]], [[1, 0, 2], [0, 1, 3]])  # rank 3, in 2, out 2
    got = hr.slice_rank(g, 2)
    np.testing.assert_array_equal(got[L + hr.A_SUFFIX], [[1, 2], [3, 4]])
    np.testing.assert_array_equal(got[L + hr.B_SUFFIX], [[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="rank 4 must be between 1 and the global adapter's rank 3"):
        hr.slice_rank(g, 4)


def test_padding_adds_zero_rows_to_a_and_zero_columns_to_b_and_keeps_the_product():
    c = lora([[1, 2]], [[3], [4]])  # rank 1
    p = hr.pad_rank(c, 3)
    np.testing.assert_array_equal(p[L + hr.A_SUFFIX], [[1, 2], [0, 0], [0, 0]])
    np.testing.assert_array_equal(p[L + hr.B_SUFFIX], [[3, 0, 0], [4, 0, 0]])
    np.testing.assert_array_equal(product(p), product(c))
    with pytest.raises(ValueError, match="rank 1 is above r_max=0"):
        hr.pad_rank(c, 0)


def test_hetlora_weights_are_the_norms_of_the_clients_products_or_their_example_counts():
    small = lora([[1, 0]], [[3], [4]])  # B A = [[3, 0], [4, 0]]: norm 5
    big = lora([[1, 0], [0, 1]], [[6, 0], [0, 8]])  # B A = diag(6, 8): norm 10
    assert hr.hetlora_weights([small, big], [1, 1]) == pytest.approx([1 / 3, 2 / 3])
    assert hr.hetlora_weights([small, big], [30, 10], "examples") == pytest.approx([0.75, 0.25])
    zero = lora([[0, 0]], [[0], [0]])
    assert hr.hetlora_weights([zero, zero], [1, 1]) == [0.5, 0.5]
    with pytest.raises(ValueError, match="^weighting='size' must be one of norm, examples$"):
        hr.hetlora_weights([small], [1], "size")


def test_the_product_norm_adds_every_layers_squared_norm_and_may_be_below_one():
    two = {**lora([[0.3, 0]], [[1], [0]]), **lora([[0.4, 0]], [[1], [0]], layer="m.v")}  # ||B A||: 0.3 and 0.4
    assert hr.product_norm(two) == pytest.approx(0.5)


def test_hetlora_averages_the_zero_padded_factors_with_its_weights():
    small = lora([[1, 0]], [[3], [4]])
    big = lora([[1, 0], [0, 1]], [[6, 0], [0, 8]])
    got = hr.hetlora_aggregate([small, big], [1 / 3, 2 / 3], r_max=2)
    # A: (1/3)[[1, 0], [0, 0]] + (2/3)[[1, 0], [0, 1]]; B: (1/3)[[3, 0], [4, 0]] + (2/3)[[6, 0], [0, 8]]
    np.testing.assert_allclose(got[L + hr.A_SUFFIX], [[1, 0], [0, 2 / 3]])
    np.testing.assert_allclose(got[L + hr.B_SUFFIX], [[5, 0], [4 / 3, 16 / 3]])


def test_hetlora_per_rank_averages_each_rank_over_the_clients_that_hold_it():
    """Rank 0 (both clients) is the same as zero-padding's; rank 1 (only the rank-2 client, weight 2/3) is that
    client's own row and column, where zero-padding keeps 2/3 of them."""
    small = lora([[1, 0]], [[3], [4]])
    big = lora([[1, 0], [0, 1]], [[6, 0], [0, 8]])
    got = hr.hetlora_aggregate([small, big], [1 / 3, 2 / 3], r_max=2, average="per_rank")
    np.testing.assert_allclose(got[L + hr.A_SUFFIX], [[1, 0], [0, 1]])
    np.testing.assert_allclose(got[L + hr.B_SUFFIX], [[5, 0], [4 / 3, 8]])
    with pytest.raises(ValueError, match="average='mean' must be one of zero_padded, per_rank"):
        hr.hetlora_aggregate([small], [1.0], r_max=2, average="mean")


def test_hetlora_per_rank_leaves_ranks_no_client_holds_at_zero_and_keeps_float32():
    only = {k: v.astype(np.float32) for k, v in lora([[1, 2]], [[3], [4]]).items()}  # rank 1 of r_max 3
    got = hr.hetlora_aggregate([only], [1.0], r_max=3, average="per_rank")
    np.testing.assert_array_equal(got[L + hr.A_SUFFIX], [[1, 2], [0, 0], [0, 0]])
    np.testing.assert_array_equal(got[L + hr.B_SUFFIX], [[3, 0, 0], [4, 0, 0]])
    assert got[L + hr.A_SUFFIX].dtype == np.float32 and got[L + hr.B_SUFFIX].dtype == np.float32


def test_hetlora_per_rank_keeps_a_rank_held_by_one_client_instead_of_shrinking_it_every_round():
    """Zero-padding shrinks the top rank's product by the holder's weight squared each round (here 1/4); per
    rank keeps it, round after round."""
    small, big = lora([[1, 0]], [[1], [1]]), lora([[1, 0], [0, 1]], [[1, 0], [0, 1]])
    for average, top in (("zero_padded", 0.5**6), ("per_rank", 1.0)):
        g = big
        for _ in range(3):  # every round the rank-2 client sends back what it got (no training)
            g = hr.hetlora_aggregate([small, hr.slice_rank(g, 2)], [0.5, 0.5], r_max=2, average=average)
        assert g[L + hr.A_SUFFIX][1, 1] * g[L + hr.B_SUFFIX][1, 1] == pytest.approx(top)


def test_flexlora_of_one_rank_one_client_returns_its_product_split_evenly():
    c = lora([[0, 2]], [[0], [8]])  # B A = [[0, 0], [0, 16]]: singular value 16
    got = hr.flexlora_aggregate([c], [5], r_max=2)
    np.testing.assert_allclose(np.abs(got[L + hr.A_SUFFIX]), [[0, 4], [0, 0]], atol=1e-12)
    np.testing.assert_allclose(np.abs(got[L + hr.B_SUFFIX]), [[0, 0], [4, 0]], atol=1e-12)
    np.testing.assert_allclose(product(got), [[0, 0], [0, 16]], atol=1e-12)


def test_flexlora_returns_the_clients_float32():
    c = {k: v.astype(np.float32) for k, v in lora([[0, 2]], [[0], [8]]).items()}
    got = hr.flexlora_aggregate([c], [5], r_max=2)
    assert got[L + hr.A_SUFFIX].dtype == np.float32 and got[L + hr.B_SUFFIX].dtype == np.float32


@pytest.mark.parametrize(
    "aggregate",
    [
        lambda: hr.hetlora_aggregate([], [], 2),
        lambda: hr.flexlora_aggregate([], [], 2),
        lambda: hr.frozen_tail_aggregate(lora([[1, 0]], [[1], [0]]), [], []),
    ],
)
def test_no_client_adapter_cannot_be_aggregated(aggregate):
    with pytest.raises(ValueError, match="^no client adapters to aggregate$"):
        aggregate()


def test_flexlora_refuses_example_counts_that_sum_to_zero():
    with pytest.raises(ValueError, match=r"^example counts must sum to a positive number, got \[0, 0\]$"):
        hr.flexlora_aggregate([lora([[1, 0]], [[1], [0]])] * 2, [0, 0], 2)


def test_flexlora_gives_each_rank_the_best_approximation_of_the_example_weighted_mean_product():
    clients = [random_lora(2, seed=1), random_lora(3, seed=2), random_lora(4, seed=3)]
    n = [10, 30, 60]
    mean = sum(w * product(c) for c, w in zip(clients, n, strict=True)) / sum(n)
    glob = hr.flexlora_aggregate(clients, n, r_max=4)
    u, s, vt = np.linalg.svd(mean)
    for r in (1, 2, 3, 4):
        own = hr.slice_rank(glob, r)
        numpy_best = (u[:, :r] * s[:r]) @ vt[:r]
        np.testing.assert_allclose(product(own), numpy_best, atol=1e-10)
        # Eckart-Young: the error is that of numpy's own truncation, sqrt of the sum of the dropped s^2
        err = np.linalg.norm(mean - product(own))
        assert err == pytest.approx(np.sqrt(np.sum(s[r:] ** 2)))
        assert err == pytest.approx(np.linalg.norm(mean - numpy_best))
    a, b = glob[L + hr.A_SUFFIX], glob[L + hr.B_SUFFIX]
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=0))  # sqrt(s) on each side


def test_flexlora_pads_with_zeros_when_the_mean_has_rank_below_r_max():
    glob = hr.flexlora_aggregate([random_lora(1, seed=4)], [1], r_max=3)
    assert glob[L + hr.A_SUFFIX].shape == (3, 5) and glob[L + hr.B_SUFFIX].shape == (6, 3)
    np.testing.assert_allclose(glob[L + hr.A_SUFFIX][1:], 0, atol=1e-12)


def test_flexlora_updates_adds_the_mean_of_the_clients_product_changes_to_the_global():
    """W + sum_k p_k (B_k A_k - W_{r_k}), W_{r_k} the slice client k was sent; r_max holds it exactly."""
    previous = random_lora(3, seed=1)
    small = random_lora(1, seed=2)  # sent previous's rank 1
    big = random_lora(3, seed=3)  # sent all of it
    got = hr.flexlora_aggregate([small, big], [1, 3], r_max=6, previous=previous)
    sent_small = product(hr.slice_rank(previous, 1))
    want = product(previous) + 0.25 * (product(small) - sent_small) + 0.75 * (product(big) - product(previous))
    np.testing.assert_allclose(product(got), want, atol=1e-10)
    with pytest.raises(ValueError, match="flexlora_average='mean' must be one of products, updates"):
        HeteroRankParams("flexlora", r_max=4, flexlora_average="mean")


def test_flexlora_updates_keeps_the_global_when_clients_return_what_they_got_where_products_shrinks_it():
    """Averaging products mixes W with a rank-1 client's truncation of it, losing the rest of W by that client's
    weight each round; averaging updates keeps W."""
    w = hr.flexlora_aggregate([random_lora(2, seed=4)], [1], r_max=2)  # an SVD-ordered rank-2 global
    for previous, kept in ((w, 1.0), (None, 0.5)):
        clients = [hr.slice_rank(w, 1), w]  # both send back what they got (no training), equal weights
        got = hr.flexlora_aggregate(clients, [1, 1], r_max=2, previous=previous)
        rest = product(w) - product(hr.slice_rank(w, 1))  # the part of W beyond rank 1
        got_rest = product(got) - product(hr.slice_rank(w, 1))
        np.testing.assert_allclose(got_rest, kept * rest, atol=1e-10)


def test_low_rank_svd_equals_numpys_svd_of_the_product():
    rng = np.random.default_rng(5)
    b, a = rng.normal(size=(7, 3)), rng.normal(size=(3, 9))
    u, s, vt = hr.low_rank_svd(b, a)
    np.testing.assert_allclose(s, np.linalg.svd(b @ a, compute_uv=False)[:3])
    np.testing.assert_allclose((u * s) @ vt, b @ a, atol=1e-12)


def test_every_layer_is_aggregated_on_its_own_and_exactly_when_the_ranks_sum_to_at_most_r_max():
    layers = (L, "m.layers.0.v_proj")
    clients = [random_lora(1, layers=layers, seed=6), random_lora(2, layers=layers, seed=7)]
    glob = hr.flexlora_aggregate(clients, [1, 3], r_max=4)
    for layer in layers:
        mean = (product(clients[0], layer) + 3 * product(clients[1], layer)) / 4
        np.testing.assert_allclose(product(glob, layer), mean, atol=1e-10)


def test_an_adapter_with_an_unpaired_array_is_refused_by_name():
    with pytest.raises(ValueError, match="'x.lora_B.weight' is not half of a LoRA pair"):
        hr.lora_layers({"x.lora_B.weight": np.zeros((2, 1))})


def test_hetlora_keeps_the_previous_global_in_ranks_no_client_of_the_round_holds():
    previous = random_lora(3, seed=8)
    small = lora([[1, 0, 0, 0, 0]], [[2], [0], [0], [0], [0], [0]])
    got = hr.hetlora_aggregate([small], [1.0], r_max=3, previous=previous)
    np.testing.assert_array_equal(got[L + hr.A_SUFFIX][0], [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(got[L + hr.A_SUFFIX][1:], previous[L + hr.A_SUFFIX][1:])
    np.testing.assert_array_equal(got[L + hr.B_SUFFIX][:, 1:], previous[L + hr.B_SUFFIX][:, 1:])
    # Without it (the paper's formula) those ranks would be zero in both factors: no gradient would revive them.
    assert np.abs(hr.hetlora_aggregate([small], [1.0], r_max=3)[L + hr.A_SUFFIX][1:]).max() == 0


def test_flexlora_starts_ranks_beyond_the_mean_as_lora_does_without_changing_the_product():
    client = random_lora(1, seed=9)
    got = hr.flexlora_aggregate([client], [1], r_max=3, rng=np.random.default_rng(0))
    a, b = got[L + hr.A_SUFFIX], got[L + hr.B_SUFFIX]
    assert np.abs(b[:, 1:]).max() == 0
    bound = 1 / np.sqrt(5)  # PEFT's U(-1/sqrt(in), 1/sqrt(in)), in = 5, drawn from the generator given
    np.testing.assert_array_equal(a[1:], np.random.default_rng(0).uniform(-bound, bound, size=(2, 5)))
    np.testing.assert_allclose(product(got), product(client), atol=1e-10)


def test_hetlora_weights_by_products_whose_norms_sum_below_one_are_still_proportional_to_them():
    small = lora([[0.1, 0]], [[1], [0]])  # ||B A|| = 0.1
    big = lora([[0.3, 0]], [[1], [0]])  # ||B A|| = 0.3
    assert hr.hetlora_weights([small, big], [1, 1]) == pytest.approx([0.25, 0.75])


def test_hetlora_refuses_weights_that_do_not_pair_one_to_one_with_the_clients():
    small, big = lora([[1, 0]], [[3], [4]]), lora([[1, 0], [0, 1]], [[6, 0], [0, 8]])
    with pytest.raises(ValueError, match=r"^zip\(\) argument 2 is shorter than argument 1$"):
        hr.hetlora_aggregate([small, big], [1.0], r_max=2)
    with pytest.raises(ValueError, match=r"^zip\(\) argument 2 is longer than argument 1$"):
        hr.hetlora_aggregate([big], [0.5, 0.5], r_max=2)


def test_an_adapter_whose_layers_have_different_ranks_is_refused_naming_the_ranks():
    mixed = {**lora([[1, 0], [0, 1]], [[1, 0]]), **lora([[1, 0]], [[1]], layer="m.v")}  # ranks 2 and 1
    with pytest.raises(ValueError) as err:
        hr.rank_of(mixed)
    assert str(err.value) == "the adapter's layers have different ranks [1, 2]; one rank per adapter"


def test_flexlora_refuses_example_counts_that_do_not_pair_one_to_one_with_the_clients():
    """Not a silent mean over a count with no client: one client with counts [1, 1] would have its product halved."""
    client = lora([[1, 0]], [[1], [0]])
    with pytest.raises(ValueError, match=r"^zip\(\) argument 2 is longer than argument 1$"):
        hr.flexlora_aggregate([client], [1, 1], 2)
