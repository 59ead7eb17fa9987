"""SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020) over flat update vectors: the pure protocol.

One round, for ``n`` participants indexed ``0..n-1`` (the server's order):

1. **keys**: each client draws two X25519 key pairs (``c``: to encrypt the shares it sends; ``s``: to
   agree pairwise mask seeds) and a 32-byte self-mask seed ``b`` (:class:`ClientKeys`), and publishes
   the two public keys.
2. **share**: the server sends each client the public keys of its neighbourhood (:func:`neighbourhoods`:
   a random ``k``-regular ring, ``k ~ 2 log2 n``; ``k >= n - 1`` is the full graph of SecAgg). The client
   splits ``b`` and its ``s`` private key into Shamir shares (threshold ``t``; Flower's
   :mod:`flwr.common.secure_aggregation.crypto.shamir`) over its neighbourhood and itself, and encrypts
   each holder's pair with AES-GCM under a key agreed with that holder (:func:`share_secrets`). The
   server only relays the ciphertexts.
3. **mask**: each client quantises its update into ``Z_{2^bits}`` (:func:`quantize`), adds the self
   mask ``PRG(b)`` and, for each active neighbour ``j``, ``+PRG(s_ij)`` if ``i < j`` else ``-PRG(s_ij)``
   (:func:`mask`; ``PRG`` is AES-256-CTR), and sends only the masked vector. Pairwise masks cancel in the sum.
4. **unmask**: the server names the clients that dropped after step 2; each survivor returns, for each
   neighbour it holds shares of, the share of ``b`` (survivor) or of ``s`` (dropped), never both
   (:func:`reveal`). With at least ``t`` shares per secret the server removes the survivors' self masks and
   the dropped clients' pairwise masks (:func:`unmask`) and learns the sum, nothing else. Below ``t`` it
   raises :class:`SecAggError` before asking for any share.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

MASK_INFO = b"fedllm-secagg-mask"
SHARE_INFO = b"fedllm-secagg-share"
MIN_BITS, MAX_BITS = 16, 53  # above 53 bits float64 levels round up: +R would wrap past the field's half


class SecAggError(RuntimeError):
    """The round cannot be unmasked (too few survivors or shares); raised before anything is revealed."""


@dataclass(frozen=True)
class SecAggParams:
    """Settings of secure aggregation (``privacy.secagg_*``).

    Attributes
    ----------
    threshold : float | int
        Shares needed to rebuild a secret: a fraction in (0.5, 1] of the neighbourhood (itself included),
        or a count >= 2. More survivors than ``threshold`` in every neighbourhood are needed to unmask;
        fewer than ``threshold`` colluding clients (with the server) learn nothing of an honest one.
    neighbours : int | None
        Neighbours of each client (SecAgg+'s graph degree); None: ``2 ceil(log2 n)``, the full graph
        (plain SecAgg) when that reaches ``n - 1``.
    clip_range : float
        Each update coordinate is clipped to ``[-clip_range, clip_range]`` before quantisation.
    bits : int
        The field is ``Z_{2^bits}`` (16..53: the levels are computed in float64, exact up to 2^53); each
        client gets ``floor((2^bits - 1) / n)`` levels, so the sum of ``n`` quantised updates never wraps.
        ``bits <= 32`` travels as uint32 (as float32 updates).
    """

    threshold: float | int = 2 / 3
    neighbours: int | None = None
    clip_range: float = 1.0
    bits: int = 32

    def __post_init__(self) -> None:
        if isinstance(self.threshold, float) and not 0.5 < self.threshold <= 1.0:
            raise ValueError(f"privacy.secagg_threshold={self.threshold} as a fraction must be in (0.5, 1]")
        if isinstance(self.threshold, int) and self.threshold < 2:
            raise ValueError(f"privacy.secagg_threshold={self.threshold} as a count must be at least 2")
        if self.neighbours is not None and self.neighbours < 2:
            raise ValueError(f"privacy.secagg_neighbours={self.neighbours} must be at least 2 (or null)")
        if not self.clip_range > 0:
            raise ValueError(f"privacy.secagg_clip_range={self.clip_range} must be positive")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"privacy.secagg_bits={self.bits} must be in {MIN_BITS}..{MAX_BITS}")

    def degree(self, n: int) -> int:
        """Neighbours per client among ``n`` participants (even, at most ``n - 1``)."""
        k = self.neighbours if self.neighbours is not None else 2 * math.ceil(math.log2(max(n, 2)))
        return n - 1 if k >= n - 1 else k + (k % 2)

    def share_threshold(self, n: int) -> int:
        """Shares needed per secret, for a neighbourhood (itself included) of ``degree(n) + 1``."""
        size = self.degree(n) + 1
        t = self.threshold if isinstance(self.threshold, int) else math.ceil(self.threshold * size)
        if not (2 <= t <= size and 2 * t > size):  # more than half: two disjoint groups never both rebuild
            raise SecAggError(
                f"privacy.secagg_threshold={self.threshold} asks {t} shares of neighbourhoods of {size} clients "
                f"({n} participants); lower the threshold or raise privacy.secagg_neighbours"
            )
        return t

    def dtype(self) -> type:
        return np.uint32 if self.bits <= 32 else np.uint64


def neighbourhoods(n: int, k: int, seed: int) -> list[list[int]]:
    """Each participant's neighbours: a ring of ``k / 2`` on each side, over a permutation drawn from ``seed``."""
    if k >= n - 1:
        return [[j for j in range(n) if j != i] for i in range(n)]
    order = np.random.default_rng(seed).permutation(n)
    place = {int(node): pos for pos, node in enumerate(order)}
    return [sorted(int(order[(place[i] + d) % n]) for d in range(-k // 2, k // 2 + 1) if d != 0) for i in range(n)]


# --- keys and key agreement ---------------------------------------------------------------------------------


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def public_bytes(private: bytes) -> bytes:
    """The raw X25519 public key of a raw private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def check_public_key(public: bytes) -> bytes:
    """``public`` if it is a 32-byte X25519 key that agrees to a non-zero secret; else ValueError."""
    if len(public) != 32:
        raise ValueError(f"a public key of {len(public)} bytes, not 32")
    X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(public))  # a low-order key raises
    return public


def agree(private: bytes, public: bytes, info: bytes) -> bytes:
    """A 32-byte key from X25519(private, public) through HKDF-SHA256 (symmetric in the two parties)."""
    shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


@dataclass(frozen=True)
class ClientKeys:
    """A client's secrets for one round: ``c`` (share encryption), ``s`` (mask agreement), self-mask seed ``b``."""

    c_sk: bytes
    s_sk: bytes
    b: bytes

    @classmethod
    def generate(cls) -> ClientKeys:
        return cls(_raw_private(X25519PrivateKey.generate()), _raw_private(X25519PrivateKey.generate()), os.urandom(32))

    def public(self) -> tuple[bytes, bytes]:
        """``(c_pk, s_pk)``: what the client publishes in the keys stage."""
        return public_bytes(self.c_sk), public_bytes(self.s_sk)


# --- masks --------------------------------------------------------------------------------------------------


def prg(seed: bytes, size: int, info: bytes = MASK_INFO) -> np.ndarray:
    """``size`` pseudo-random uint64 from a 32-byte seed: AES-256-CTR of zeros (key from HKDF of the seed)."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(seed)
    stream = Cipher(algorithms.AES(key), modes.CTR(b"\x00" * 16)).encryptor().update(b"\x00" * (8 * size))
    return np.frombuffer(stream, dtype=np.uint64).copy()


def pair_mask(s_sk: bytes, s_pk: bytes, size: int, round_tag: bytes) -> np.ndarray:
    """The mask two clients agree on (the same from either side)."""
    return prg(agree(s_sk, s_pk, MASK_INFO + round_tag), size)


def mask(
    quantised: np.ndarray, me: int, keys: ClientKeys, s_pks: dict[int, bytes], round_tag: bytes, bits: int
) -> np.ndarray:
    """``quantised + PRG(b) + sum_j +-PRG(s_ij)`` in ``Z_{2^bits}`` over the active neighbours ``s_pks``."""
    out = quantised.astype(np.uint64) + prg(keys.b, quantised.size)
    for j, pk in s_pks.items():
        m = pair_mask(keys.s_sk, pk, quantised.size, round_tag)
        out = out + m if me < j else out - m  # uint64 arithmetic wraps: mod 2^64, then mod 2^bits
    return reduce(out, bits)


def reduce(values: np.ndarray, bits: int) -> np.ndarray:
    """``values mod 2^bits`` in the smallest unsigned type that holds them."""
    values = values.astype(np.uint64)
    if bits < 64:
        values = values & np.uint64((1 << bits) - 1)
    return values.astype(np.uint32) if bits <= 32 else values


# --- fixed point -----------------------------------------------------------------------------------------------


def levels(bits: int, n: int) -> int:
    """Quantisation levels per client, so that ``n`` of them sum below ``2^bits``."""
    return ((1 << bits) - 1) // n


def quantize(x: np.ndarray, clip_range: float, bits: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``x`` clipped to ``[-R, R]`` and mapped to ``0..levels`` with unbiased stochastic rounding."""
    scaled = (np.clip(x.astype(np.float64), -clip_range, clip_range) + clip_range) * (
        levels(bits, n) / (2 * clip_range)
    )
    low = np.floor(scaled)
    return (low + (rng.random(x.shape) < scaled - low)).astype(np.uint64)


def dequantize(total: np.ndarray, clip_range: float, bits: int, n: int, count: int) -> np.ndarray:
    """The float sum of ``count`` clipped updates from the sum of their quantised values."""
    return total.astype(np.float64) * (2 * clip_range / levels(bits, n)) - count * clip_range


# --- shares ----------------------------------------------------------------------------------------------------


def _aad(round_tag: bytes, src: int, dst: int) -> bytes:
    return round_tag + struct.pack("<II", src, dst)


def share_secrets(
    me: int, keys: ClientKeys, c_pks: dict[int, bytes], threshold: int, round_tag: bytes
) -> dict[int, bytes]:
    """Holder -> AES-GCM ciphertext of its shares of ``b`` and ``s_sk``; holders: ``c_pks`` (me included)."""
    holders = sorted(c_pks)
    b_shares = create_shares(keys.b, threshold, len(holders))
    s_shares = create_shares(keys.s_sk, threshold, len(holders))
    out = {}
    for holder, b_share, s_share in zip(holders, b_shares, s_shares, strict=True):
        key = agree(keys.c_sk, c_pks[holder], SHARE_INFO)
        nonce = os.urandom(12)
        plain = struct.pack("<H", len(b_share)) + b_share + s_share
        out[holder] = nonce + AESGCM(key).encrypt(nonce, plain, _aad(round_tag, me, holder))
    return out


def open_shares(
    me: int, keys: ClientKeys, src: int, src_c_pk: bytes, ciphertext: bytes, round_tag: bytes
) -> tuple[bytes, bytes]:
    """``(b share, s share)`` that ``src`` sent ``me`` (AES-GCM refuses a forged or misdirected one)."""
    key = agree(keys.c_sk, src_c_pk, SHARE_INFO)
    plain = AESGCM(key).decrypt(ciphertext[:12], ciphertext[12:], _aad(round_tag, src, me))
    (length,) = struct.unpack("<H", plain[:2])
    return plain[2 : 2 + length], plain[2 + length :]


def reveal(
    me: int,
    keys: ClientKeys,
    held: dict[int, bytes],
    c_pks: dict[int, bytes],
    dropped: set[int],
    round_tag: bytes,
    unopened: list[int] | None = None,
) -> dict[int, bytes]:
    """For each client whose shares ``me`` holds: its ``s`` share if it dropped, else its ``b`` share.

    A ciphertext that does not open (forged, misdirected, from an unknown client) is skipped, its sender
    appended to ``unopened``: one hostile neighbour cannot stop this client from revealing the others' shares.
    """
    out = {}
    for src, ciphertext in held.items():
        try:
            b_share, s_share = open_shares(me, keys, src, c_pks[src], ciphertext, round_tag)
        except (InvalidTag, KeyError, ValueError, struct.error):
            if unopened is not None:
                unopened.append(src)
            continue
        out[src] = s_share if src in dropped else b_share
    return out


# --- the server's unmasking ----------------------------------------------------------------------------------------


def check_survivors(survivors: set[int], active: set[int], graph: list[list[int]], threshold: int) -> None:
    """Raise :class:`SecAggError` unless every secret the server must rebuild has ``threshold`` live holders."""
    if len(survivors) < threshold:
        raise SecAggError(
            f"{len(survivors)} of {len(active)} clients returned a masked update, fewer than the threshold of "
            f"{threshold} shares: the round cannot be unmasked and nothing was revealed"
        )
    for i in sorted(active):
        holders = ({i, *graph[i]} & active) & survivors
        if len(holders) < threshold:
            raise SecAggError(
                f"client {i}'s neighbourhood has {len(holders)} surviving clients, fewer than the threshold of "
                f"{threshold}: the round cannot be unmasked and nothing was revealed"
            )


def rebuild(shares: list[bytes], threshold: int, what: str) -> bytes:
    """The secret from at least ``threshold`` Shamir shares."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares of {what} arrived, fewer than the threshold of {threshold}")
    return combine_shares(shares[:threshold])


def unmask(
    masked_sum: np.ndarray,
    survivors: set[int],
    dropped: set[int],
    revealed: dict[int, dict[int, bytes]],
    s_pks: dict[int, bytes],
    graph: list[list[int]],
    threshold: int,
    round_tag: bytes,
    bits: int,
) -> np.ndarray:
    """The sum of the survivors' quantised updates from the sum of their masked vectors.

    ``revealed``: client -> {holder -> share}, ``b`` shares of survivors, ``s`` shares of the dropped.
    """
    total = masked_sum.astype(np.uint64)
    size = total.size
    for i in sorted(survivors):
        b = rebuild(list(revealed.get(i, {}).values()), threshold, f"client {i}'s self-mask seed")
        total = total - prg(b, size)
    for d in sorted(dropped):
        s_sk = rebuild(list(revealed.get(d, {}).values()), threshold, f"dropped client {d}'s mask key")
        for j in sorted(set(graph[d]) & survivors):
            m = pair_mask(s_sk, s_pks[j], size, round_tag)
            total = total - m if j < d else total + m  # j added +m if j < d, else -m
    return reduce(total, bits).astype(np.uint64)
