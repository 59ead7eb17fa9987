"""What secure aggregation (SecAgg+, ``privacy.secagg=true``) costs per round against plain FedAvg.

For ``n`` clients on an adapter of ``d`` parameters it times, with the protocol's own functions
(:mod:`fedllm_app.secure.secagg`), one client's work (key generation, Shamir shares of its two secrets for
its neighbours, quantisation and masking) and the server's unmasking (self masks of the survivors, pairwise
masks of the dropped), and counts the bytes each client uploads: plain = the float32 adapter; secure = the
masked vector plus the public keys, share ciphertexts and revealed shares of the extra stages (Flower's own
record byte count, as the round line reports). Usage::

    python benchmarks/secagg_cost.py                      # 10 and 100 clients, tiny default adapter
    python benchmarks/secagg_cost.py --project-7b         # also one 7B LoRA r32 q/v client, and the projection

Not a test: it prints a markdown table for docs/privacy.md. Timings depend on the machine (AES-NI, load).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedllm_app.secure.secagg import (
    ClientKeys,
    SecAggParams,
    mask,
    neighbourhoods,
    prg,
    quantize,
    reduce,
    reveal,
    share_secrets,
    unmask,
)

TAG = b"bench"


def llama7b_qv_lora_params(r: int = 32, hidden: int = 4096, layers: int = 32) -> int:
    """LoRA on q_proj and v_proj (4096 x 4096 each in Llama-2-7B): A (r x 4096) + B (4096 x r) per module."""
    return layers * 2 * (r * hidden + hidden * r)


def tiny_adapter_params() -> int:
    from fedllm_app.config import load_config
    from fedllm_app.model import get_adapter, get_model

    cfg = load_config({})
    return sum(v.size for v in get_adapter(get_model(cfg.model, cfg.seed)[0]).values())


def one_client(i: int, n: int, d: int, params: SecAggParams, keys: list, pubs: list, graph: list, t: int):
    """Client ``i``'s share and mask stages: (seconds to share, seconds to mask, held ciphertexts, vector)."""
    start = time.perf_counter()
    cts = share_secrets(i, keys[i], {j: pubs[j][0] for j in [i, *graph[i]]}, t, TAG)
    shared = time.perf_counter() - start
    update = np.random.default_rng(i).normal(0, 0.01, d)
    start = time.perf_counter()
    q = quantize(update, params.clip_range, params.bits, n, np.random.default_rng())
    vec = mask(q, i, keys[i], {j: pubs[j][1] for j in graph[i]}, TAG, params.bits)
    return shared, time.perf_counter() - start, cts, vec


def measure(n: int, d: int, dropped: int, params: SecAggParams) -> dict[str, float]:
    """One round among ``n`` clients of ``d`` parameters, ``dropped`` of them lost after masking."""
    keys = [ClientKeys.generate() for _ in range(n)]
    pubs = [k.public() for k in keys]
    graph = neighbourhoods(n, params.degree(n), 0)
    t = params.share_threshold(n)
    held: dict[int, dict[int, bytes]] = {i: {} for i in range(n)}
    share_s, mask_s, vectors = [], [], {}
    for i in range(n):
        s, m, cts, vec = one_client(i, n, d, params, keys, pubs, graph, t)
        share_s.append(s)
        mask_s.append(m)
        for holder, ct in cts.items():
            held[holder][i] = ct
        vectors[i] = vec
    lost = set(range(dropped))
    survivors = set(range(n)) - lost
    revealed: dict[int, dict[int, bytes]] = {}
    for h in survivors:
        for src, share in reveal(h, keys[h], held[h], {j: pubs[j][0] for j in range(n)}, lost, TAG).items():
            revealed.setdefault(src, {})[h] = share
    start = time.perf_counter()
    total = reduce(np.sum([vectors[i].astype(np.uint64) for i in survivors], axis=0), params.bits)
    unmask(total, survivors, lost, revealed, {j: pubs[j][1] for j in range(n)}, graph, t, TAG, params.bits)
    unmask_s = time.perf_counter() - start
    extra = _extra_bytes(held, revealed, graph, pubs, n)
    plain = ArrayRecord({"a": Array(np.zeros(d, dtype=np.float32))}).count_bytes()
    masked = ArrayRecord({"m": Array(vectors[0])}).count_bytes()
    return {"n": n, "d": d, "k": params.degree(n), "t": t, "dropped": dropped,
            "share_ms": 1e3 * float(np.mean(share_s)), "mask_ms": 1e3 * float(np.mean(mask_s)),
            "unmask_s": unmask_s, "plain_up": plain, "secure_up": masked + extra}  # fmt: skip


def _extra_bytes(held, revealed, graph, pubs, n) -> int:
    """A client's extra upload, averaged: its public keys, its share ciphertexts, the shares it reveals."""
    keys = ConfigRecord({"c-pk": pubs[0][0], "s-pk": pubs[0][1]}).count_bytes()
    cts = sum(ConfigRecord({"ct": list(h.values())}).count_bytes() for h in held.values()) / n
    shares = sum(len(s) for per in revealed.values() for s in per.values()) / n
    return int(keys + cts + shares)


def project_7b(n: int, params: SecAggParams) -> dict[str, float]:
    """One 7B q/v r32 client's masking measured; the server's unmasking projected from one PRG expansion."""
    d = llama7b_qv_lora_params()
    k = params.degree(n)
    keys = [ClientKeys.generate() for _ in range(k + 1)]
    pks = {j: keys[j].public()[1] for j in range(1, k + 1)}
    update = np.random.default_rng(0).normal(0, 0.01, d)
    start = time.perf_counter()
    q = quantize(update, params.clip_range, params.bits, n, np.random.default_rng())
    vec = mask(q, 0, keys[0], pks, TAG, params.bits)
    mask_s = time.perf_counter() - start
    start = time.perf_counter()
    prg(b"\x00" * 32, d)
    prg_s = time.perf_counter() - start
    plain = 4 * d
    return {"n": n, "d": d, "k": k, "mask_s": mask_s, "prg_s": prg_s, "unmask_no_drop_s": n * prg_s,
            "unmask_10pct_drop_s": (n + n // 10 * k) * prg_s, "plain_mb": plain / 1e6,
            "secure_mb": vec.nbytes / 1e6}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--project-7b", action="store_true")
    args = parser.parse_args()
    params = SecAggParams()
    d = tiny_adapter_params()
    print(
        "| clients | params | neighbours k | threshold t | dropped | client shares (ms) | client quantise+mask "
        "(ms) | server unmask (s) | upload plain (B) | upload secure (B) | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.clients:
        for dropped in (0, n // 10):
            r = measure(n, d, dropped, params)
            print(f"| {n} | {d} | {r['k']} | {r['t']} | {dropped} | {r['share_ms']:.1f} | {r['mask_ms']:.1f} | "
                  f"{r['unmask_s']:.2f} | {r['plain_up']} | {r['secure_up']} | "
                  f"{r['secure_up'] / r['plain_up']:.2f} |")  # fmt: skip
    if args.project_7b:
        print(
            "\n| clients | 7B q/v r32 params | k | client quantise+mask (s) | one PRG (s) | server unmask, no "
            "drop (s, projected) | 10% dropped (s, projected) | upload plain (MB) | masked (MB) |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for n in args.clients:
            r = project_7b(n, params)
            print(f"| {n} | {r['d']} | {r['k']} | {r['mask_s']:.1f} | {r['prg_s']:.2f} | "
                  f"{r['unmask_no_drop_s']:.0f} | {r['unmask_10pct_drop_s']:.0f} | {r['plain_mb']:.1f} | "
                  f"{r['secure_mb']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
