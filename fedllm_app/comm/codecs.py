"""The codecs of one array: what travels instead of a float32 array, and how it is read back.

Each codec turns a float32 array into a few named *parts* (numpy arrays) and back; the parts are
what the message carries, so the bytes counted are the codec's real bytes:

========  =====================================================  ========================================
codec     parts                                                  error of a decoded value
========  =====================================================  ========================================
none      ``values`` float32                                     exact
fp16      ``values`` float16                                     relative <= 2**-11 (normal range)
bf16      ``values`` uint16 (the bfloat16 bits)                  relative <= 2**-8
int8      ``codes`` uint8 (one a value), ``absmax`` float32      <= 0.00704 x block absmax (bitsandbytes'
          (one a block of ``block_size`` values)                 dynamic 8-bit code book)
nf4       ``codes`` uint8 (two values a byte), ``absmax``        <= half the widest gap of the NF4 levels
          float32 (one a block)                                  (0.152) x block absmax
topk      ``indices`` int32 and ``values`` float32 of the        the values not sent are zero: each error
          ``ceil(topk_fraction * n)`` largest magnitudes         <= the smallest magnitude sent
========  =====================================================  ========================================

int8 and NF4 are bitsandbytes' blockwise quantisers (``quantize_blockwise``, ``quantize_4bit``), which
run on CPU tensors. The shape travels beside the parts (:mod:`fedllm_app.comm.wire`). This module
imports neither the app nor Flower; torch and bitsandbytes are imported when a codec needs them.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

CODECS = ("none", "fp16", "bf16", "int8", "nf4", "topk")
LOSSY = ("fp16", "bf16", "int8", "nf4", "topk")
BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' blockwise quantisers accept
Parts = dict[str, np.ndarray]


class CodecError(ValueError):
    """A bad codec setting, or encoded parts that do not decode; the message names what and why."""


@dataclass(frozen=True)
class CommParams:
    """The ``comm`` config section (``conf/config.yaml``).

    Attributes
    ----------
    codec : str
        How arrays travel client -> server (one of :data:`CODECS`); the client sends its update's
        delta against the global it received.
    topk_fraction : float
        ``codec=topk``: the fraction of each array's values sent, in (0, 1].
    block_size : int
        ``int8``/``nf4``: values per absmax scale (one of :data:`BLOCK_SIZES`).
    error_feedback : bool
        Lossy codecs: the client adds what it did not send to its next update.
    downlink : str or None
        How the global adapter travels server -> client; None: ``codec`` itself, except ``topk``,
        whose downlink is ``fp16`` (a sparse global adapter would zero most of it).
    downlink_delta : bool
        Send a node the global's change against the copy it already holds (encoded with ``downlink``, or
        ``codec`` itself, top-k included), and the full global only to a node whose copy the server does not
        know (:mod:`fedllm_app.comm.downlink`).
    budget_mb : float or None
        Megabytes (10**6 bytes), counted both ways on the message bytes, the run may spend; None: no budget.
    """

    codec: str = "none"
    topk_fraction: float = 0.1
    block_size: int = 64
    error_feedback: bool = True
    downlink: str | None = None
    downlink_delta: bool = False
    budget_mb: float | None = None

    def __post_init__(self) -> None:
        for key in ("codec", "downlink"):
            value = getattr(self, key)
            if value is None and key == "downlink":
                continue
            if value not in CODECS:
                raise CodecError(f"comm.{key}={value!r} is not a codec; use one of {', '.join(CODECS)}")
        for key in ("codec", "downlink"):
            if getattr(self, key) in ("int8", "nf4") and importlib.util.find_spec("bitsandbytes") is None:
                raise CodecError(
                    f"comm.{key}={getattr(self, key)} needs bitsandbytes; pip install 'fedllm[quant]', "
                    f"or choose fp16, bf16 or topk"
                )
        if not (isinstance(self.topk_fraction, int | float) and 0 < self.topk_fraction <= 1):
            raise CodecError(f"comm.topk_fraction={self.topk_fraction!r} must be in (0, 1]; e.g. 0.1 sends 10%")
        if self.block_size not in BLOCK_SIZES:
            raise CodecError(
                f"comm.block_size={self.block_size!r} is not one bitsandbytes accepts; use one of {BLOCK_SIZES}"
            )
        if not isinstance(self.downlink_delta, bool):
            raise CodecError(f"comm.downlink_delta={self.downlink_delta!r} must be true or false")
        if self.downlink == "topk" and not self.downlink_delta:
            raise CodecError(
                f"comm.downlink=topk without comm.downlink_delta would send the global adapter with all but "
                f"{self.topk_fraction:g} of its values zeroed; set comm.downlink_delta=true (each node gets a top-k "
                f"of the change against its copy) or comm.downlink=fp16"
            )
        budget = self.budget_mb
        if budget is not None and not (isinstance(budget, int | float) and not isinstance(budget, bool) and budget > 0):
            raise CodecError(f"comm.budget_mb={budget!r} must be a positive number of MB or null (no budget)")

    @classmethod
    def from_config(cls, section: Any) -> CommParams:
        return cls(**dict(section)) if section is not None else cls()

    @property
    def downlink_codec(self) -> str:
        """The codec of the server -> client arrays."""
        if self.downlink is not None:
            return self.downlink
        return "fp16" if self.codec == "topk" else self.codec

    @property
    def delta_codec(self) -> str:
        """The codec of a node's change under ``downlink_delta``: ``downlink``, else ``codec`` (top-k included)."""
        return self.downlink if self.downlink is not None else self.codec

    @property
    def full_codec(self) -> str:
        """The codec of a full global under ``downlink_delta``: :attr:`downlink_codec`, never top-k (``fp16``)."""
        return "fp16" if self.downlink_codec == "topk" else self.downlink_codec

    @property
    def downlink_advice(self) -> str | None:
        """A sentence for the run's log when the whole global goes down quantised every round, else None.

        Without ``downlink_delta`` an ``int8``/``nf4`` downlink re-quantises the full global each round with no
        error feedback in that direction; on the built-in benchmark that cost NF4 0.095 of exact match that
        the delta downlink won back at the same bytes (docs/communication.md). It is advice, not the default:
        the server then keeps a float32 copy per node, and secure aggregation cannot use it.
        """
        if self.downlink_delta or self.downlink_codec not in ("int8", "nf4"):
            return None
        return (
            f"comm.downlink={self.downlink_codec} sends the whole global adapter re-quantised every round, with no "
            f"error feedback on the way down; comm.downlink_delta=true sends each node the change against its copy "
            f"instead, at the same bytes and with less accuracy lost (docs/communication.md), for a float32 copy "
            f"per node kept on the server"
        )

    @property
    def feedback(self) -> bool:
        """Whether the client keeps an error-feedback residual."""
        return self.error_feedback and self.codec in LOSSY


def encode(x: np.ndarray, codec: str, *, block_size: int = 64, topk_fraction: float = 0.1) -> Parts:
    """The parts that carry float array ``x`` with ``codec``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if codec == "none":
        return {"values": x}
    if codec == "fp16":
        return {"values": x.astype(np.float16)}
    if codec == "bf16":
        return {"values": _torch(x).to(_torch_module().bfloat16).view(_torch_module().int16).numpy().view(np.uint16)}
    if codec == "int8":
        codes, state = _bnb().quantize_blockwise(_torch(x.reshape(-1)), blocksize=block_size)
        return {"codes": codes.numpy(), "absmax": state.absmax.numpy().astype(np.float32)}
    if codec == "nf4":
        codes, state = _bnb().quantize_4bit(_torch(x.reshape(-1)), blocksize=block_size, quant_type="nf4")
        return {"codes": codes.numpy().reshape(-1), "absmax": state.absmax.numpy().astype(np.float32)}
    if codec == "topk":
        flat = x.reshape(-1)
        k = topk_count(flat.size, topk_fraction)
        idx = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :] if k < flat.size else np.arange(flat.size)
        idx = np.sort(idx).astype(np.int32)
        return {"indices": idx, "values": flat[idx]}
    raise CodecError(f"unknown codec {codec!r}; use one of {', '.join(CODECS)}")


def decode(parts: Parts, shape: tuple[int, ...], codec: str, *, block_size: int = 64) -> np.ndarray:
    """The float32 array of ``shape`` that ``parts`` carry; a :class:`CodecError` if they cannot be it."""
    n = math.prod(shape)
    expected = _expected_parts(codec, n, shape, block_size, parts)
    if set(parts) != set(expected):
        raise CodecError(f"{codec} parts are {sorted(parts)}, expected {sorted(expected)}")
    for name, (dtype, part_shape) in expected.items():
        got = parts[name]
        if got.dtype != dtype or tuple(got.shape) != part_shape:
            raise CodecError(f"{codec} part '{name}' is {got.dtype} {tuple(got.shape)}, expected {dtype} {part_shape}")
    if codec == "none":
        return parts["values"].astype(np.float32)
    if codec == "fp16":
        return parts["values"].astype(np.float32)
    if codec == "bf16":
        torch = _torch_module()
        return torch.from_numpy(parts["values"].view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    if codec == "int8":
        out = _bnb().dequantize_blockwise(_torch(parts["codes"]), absmax=_torch(parts["absmax"]), blocksize=block_size)
        return out.numpy().astype(np.float32).reshape(shape)
    if codec == "nf4":
        return _nf4_decode(parts, shape, block_size)
    idx = parts["indices"]
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise CodecError(f"topk indices must lie in [0, {n}), got [{idx.min()}, {idx.max()}]")
    out = np.zeros(n, dtype=np.float32)
    out[idx] = parts["values"]
    return out.reshape(shape)


def topk_count(n: int, fraction: float) -> int:
    """How many of ``n`` values top-k sends: ``ceil(fraction * n)``, at least one of a non-empty array."""
    return min(n, max(1 if n else 0, math.ceil(fraction * n)))


def encoded_bytes(n: int, codec: str, *, block_size: int = 64, topk_fraction: float = 0.1) -> int:
    """The bytes of the parts of an ``n``-value array (the payload :func:`encode` returns, for projections)."""
    blocks = math.ceil(n / block_size)
    return {
        "none": 4 * n,
        "fp16": 2 * n,
        "bf16": 2 * n,
        "int8": n + 4 * blocks,
        "nf4": math.ceil(n / 2) + 4 * blocks,
        "topk": 8 * topk_count(n, topk_fraction),
    }[codec]


def _expected_parts(
    codec: str, n: int, shape: tuple[int, ...], block_size: int, parts: Parts
) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    blocks = (math.ceil(n / block_size),)
    if codec in ("none", "fp16", "bf16"):
        dtype = {"none": np.float32, "fp16": np.float16, "bf16": np.uint16}[codec]
        return {"values": (np.dtype(dtype), shape)}
    if codec == "int8":
        return {"codes": (np.dtype(np.uint8), (n,)), "absmax": (np.dtype(np.float32), blocks)}
    if codec == "nf4":
        return {"codes": (np.dtype(np.uint8), (math.ceil(n / 2),)), "absmax": (np.dtype(np.float32), blocks)}
    if codec == "topk":
        k = parts["indices"].shape[0] if "indices" in parts and parts["indices"].ndim == 1 else -1
        if not 0 <= k <= n:
            raise CodecError(f"topk indices must be a 1-d array of at most {n} values")
        return {"indices": (np.dtype(np.int32), (k,)), "values": (np.dtype(np.float32), (k,))}
    raise CodecError(f"unknown codec {codec!r}; use one of {', '.join(CODECS)}")


def _nf4_decode(parts: Parts, shape: tuple[int, ...], block_size: int) -> np.ndarray:
    torch, bnb = _torch_module(), _bnb()
    n = math.prod(shape)
    state = bnb.QuantState(
        absmax=_torch(parts["absmax"]),
        shape=torch.Size((n,)),
        code=bnb.get_4bit_type("nf4", device="cpu"),
        blocksize=block_size,
        quant_type="nf4",
        dtype=torch.float32,
    )
    codes = _torch(parts["codes"]).reshape(-1, 1)
    return bnb.dequantize_4bit(codes, state).numpy().astype(np.float32).reshape(shape)


def _torch_module() -> Any:
    import torch

    return torch


def _torch(x: np.ndarray) -> Any:
    return _torch_module().from_numpy(np.ascontiguousarray(x).copy())


def _bnb() -> Any:
    import bitsandbytes.functional as bnb_functional

    return bnb_functional
