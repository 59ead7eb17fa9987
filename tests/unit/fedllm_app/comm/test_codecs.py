"""Each codec round-trips random arrays within its stated error, its parts are its bytes, and error feedback
makes the sum of what was sent follow the sum of the true updates."""

import math

import numpy as np
import pytest

from fedllm_app.comm.codecs import CODECS, CodecError, CommParams, decode, encode, encoded_bytes
from fedllm_app.comm.wire import roundtrip, with_feedback
from fedllm_app.config import ConfigError, load_config

SHAPES = [(1,), (7,), (33, 17), (16, 64), (3, 5, 129)]


def _codebook_half_gap(codec):
    """The largest error of bitsandbytes' code book relative to absmax: half its widest gap, or the distance
    from -1 or 1 to its end levels (the signed 8-bit map ends at -0.99297)."""
    import bitsandbytes.functional as F  # noqa: N812

    code = np.sort((F.get_4bit_type("nf4", device="cpu") if codec == "nf4" else F.create_dynamic_map()).numpy())
    return max(float(np.diff(code).max()) / 2, 1 + float(code[0]), 1 - float(code[-1]))


def _block_absmax(x, block):
    flat = np.abs(x.reshape(-1))
    pad = np.pad(flat, (0, -flat.size % block))
    return np.repeat(pad.reshape(-1, block).max(axis=1), block)[: flat.size].reshape(x.shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("codec", CODECS)
def test_each_codec_round_trips_within_its_stated_error(codec, shape):
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * rng.choice([1e-3, 1.0, 30.0], size=shape)).astype(np.float32)
    y = decode(encode(x, codec, block_size=64, topk_fraction=0.3), shape, codec, block_size=64)
    assert y.dtype == np.float32 and y.shape == shape
    err = np.abs(y - x)
    if codec == "none":
        np.testing.assert_array_equal(y, x)
    elif codec == "fp16":
        assert (err <= np.abs(x) * 2.0**-11 + 6e-8).all()
    elif codec == "bf16":
        assert (err <= np.abs(x) * 2.0**-8).all()
    elif codec in ("int8", "nf4"):
        assert (err <= _codebook_half_gap(codec) * _block_absmax(x, 64) * (1 + 1e-4)).all()
    else:
        k = math.ceil(0.3 * x.size)
        kept = np.sort(np.abs(x.reshape(-1)))[::-1][:k]
        assert np.count_nonzero(y) == k
        assert (err <= kept[-1]).all()
        np.testing.assert_array_equal(y[y != 0], x[y != 0])  # the values sent are exact


@pytest.mark.parametrize("codec", CODECS)
def test_the_parts_hold_the_bytes_the_projection_counts(codec):
    x = np.random.default_rng(0).standard_normal((130, 33)).astype(np.float32)
    parts = encode(x, codec, block_size=128, topk_fraction=0.05)
    assert sum(p.nbytes for p in parts.values()) == encoded_bytes(x.size, codec, block_size=128, topk_fraction=0.05)


def test_int8_and_nf4_send_about_a_quarter_and_an_eighth_of_fp32():
    n = 4096 * 32
    assert encoded_bytes(n, "int8", block_size=64) / (4 * n) == pytest.approx(0.2656, abs=1e-3)
    assert encoded_bytes(n, "nf4", block_size=64) / (4 * n) == pytest.approx(0.1406, abs=1e-3)


@pytest.mark.parametrize(
    ("codec", "parts", "words"),
    [
        ("int8", {"codes": np.zeros(10, np.uint8)}, "parts are ['codes']"),
        ("int8", {"codes": np.zeros(9, np.uint8), "absmax": np.ones(1, np.float32)}, "'codes' is uint8 (9,)"),
        ("nf4", {"codes": np.zeros(5, np.float32), "absmax": np.ones(1, np.float32)}, "'codes' is float32"),
        ("topk", {"indices": np.array([3, 10], np.int32), "values": np.ones(2, np.float32)}, "must lie in [0, 10)"),
        ("topk", {"indices": np.arange(11, dtype=np.int32), "values": np.ones(11, np.float32)}, "at most 10"),
        ("fp16", {"values": np.ones(10, np.float64)}, "'values' is float64"),
        ("zip", {"values": np.ones(10, np.float32)}, "unknown codec 'zip'"),
    ],
)
def test_parts_that_cannot_be_the_array_are_refused_by_name(codec, parts, words):
    with pytest.raises(CodecError) as err:
        decode(parts, (10,), codec, block_size=64)
    assert words in str(err.value)


@pytest.mark.parametrize("codec", ["topk", "nf4", "int8"])
def test_error_feedback_makes_the_sum_sent_follow_the_true_sum(codec):
    rng = np.random.default_rng(1)
    mean = rng.standard_normal(2000).astype(np.float32) * 0.1  # the drift every update shares
    state, params = {}, CommParams(codec=codec, topk_fraction=0.05)
    plain = CommParams(codec=codec, topk_fraction=0.05, error_feedback=False)
    true_sum, with_ef, without_ef, gaps = np.zeros(2000), np.zeros(2000), np.zeros(2000), {}
    for t in range(1, 201):
        update = mean + rng.standard_normal(2000).astype(np.float32) * 0.05
        true_sum += update
        corrected = with_feedback({"w": update}, params, state, "r")["w"]
        with_ef += roundtrip(corrected, codec, params)
        without_ef += roundtrip(update, codec, plain)
        # What was not sent is exactly what the node keeps for the next round.
        residual = state["r"]["w"].numpy()
        np.testing.assert_allclose(true_sum - with_ef, residual, atol=1e-3)
        gaps[t] = np.linalg.norm(with_ef - true_sum) / np.linalg.norm(true_sum)
    gap = np.linalg.norm(without_ef - true_sum) / np.linalg.norm(true_sum)
    # The residual stays bounded, so the relative gap shrinks as the sums grow; without feedback it does not.
    assert gaps[200] < gaps[50] / 2 and gaps[200] < gap / 2


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("comm.codec=zip", "comm.codec='zip' is not a codec; use one of none, fp16, bf16, int8, nf4, topk"),
        ("comm.downlink=gzip", "comm.downlink='gzip' is not a codec"),
        ("comm.topk_fraction=0", "comm.topk_fraction=0 must be in (0, 1]"),
        ("comm.topk_fraction=1.5", "comm.topk_fraction=1.5 must be in (0, 1]"),
        ("comm.block_size=100", "comm.block_size=100 is not one bitsandbytes accepts"),
        ("comm.budget_mb=0", "comm.budget_mb=0 must be a positive number of MB or null"),
        ("comm.budget_mb=-5", "comm.budget_mb=-5 must be a positive number of MB or null"),
        (
            "comm.downlink=topk",
            "comm.downlink=topk without comm.downlink_delta would send the global adapter with "
            "all but 0.1 of its values zeroed; set comm.downlink_delta=true",
        ),
    ],
)
def test_a_bad_comm_setting_fails_at_start_naming_it(override, words):
    with pytest.raises(ConfigError) as err:
        load_config({}, [override])
    assert words in str(err.value)


def test_topk_travels_down_as_fp16_unless_a_downlink_is_named():
    assert CommParams(codec="topk").downlink_codec == "fp16"
    assert CommParams(codec="int8").downlink_codec == "int8"
    assert CommParams(codec="topk", downlink="none").downlink_codec == "none"


@pytest.mark.parametrize(
    "settings, advised",
    [
        ({"codec": "nf4"}, True),
        ({"codec": "int8"}, True),
        ({"codec": "topk", "downlink": "nf4"}, True),
        ({"codec": "nf4", "downlink_delta": True}, False),
        ({"codec": "nf4", "downlink": "fp16"}, False),
        ({"codec": "topk"}, False),  # its downlink is fp16
        ({"codec": "none"}, False),
    ],
)
def test_a_quantised_full_downlink_is_advised_the_delta_downlink_by_its_keys(settings, advised):
    params = CommParams(**settings)
    advice = params.downlink_advice
    assert (advice is not None) == advised
    if advised:
        assert f"comm.downlink={params.downlink_codec} sends the whole global" in advice
        assert "comm.downlink_delta=true" in advice
