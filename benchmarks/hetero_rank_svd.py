"""The server's cost per round of FlexLoRA's SVD (and of HetLoRA's padded average), on CPU.

Two shapes:

- the tiny default model's adapter (every target module of every layer, the run's own shapes);
- one 4096 x 4096 layer of a 7B Llama at r_max=64, projected to its 32 layers x q/v (64 layers).

Each is timed for FlexLoRA's factored SVD (:func:`strategies.hetero_rank.low_rank_svd`: QR of the
thin factors and an ``R x R`` SVD, ``R = sum of the clients' ranks``) and, for comparison, for the
dense SVD of the averaged ``out x in`` product that a direct implementation would compute.

Usage::

    python benchmarks/hetero_rank_svd.py [--ranks 4 8 16 32] [--r-max 64] [--repeat 3]

(set ``OMP_NUM_THREADS`` to fix the BLAS threads)

Not a test: it prints a markdown table to paste into docs/heterogeneous.md.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from strategies.hetero_rank import A_SUFFIX, B_SUFFIX, flexlora_aggregate, hetlora_aggregate, hetlora_weights


def clients_for(shapes: dict[str, tuple[int, int]], ranks: list[int], seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Random float32 adapters of the given ranks for layers ``name -> (out, in)``."""
    rng = np.random.default_rng(seed)
    out = []
    for r in ranks:
        arrays = {}
        for layer, (o, i) in shapes.items():
            arrays[layer + A_SUFFIX] = rng.normal(size=(r, i)).astype(np.float32)
            arrays[layer + B_SUFFIX] = rng.normal(size=(o, r)).astype(np.float32)
        out.append(arrays)
    return out


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def dense_svd(clients: list[dict[str, np.ndarray]], n: list[float]) -> None:
    """What FlexLoRA costs when the mean product is formed and decomposed densely."""
    for key in clients[0]:
        if key.endswith(A_SUFFIX):
            layer = key[: -len(A_SUFFIX)]
            mean = sum(w * c[layer + B_SUFFIX] @ c[layer + A_SUFFIX] for c, w in zip(clients, n, strict=True))
            np.linalg.svd(mean / sum(n), full_matrices=False)


def tiny_shapes() -> dict[str, tuple[int, int]]:
    from fedllm_app.config import load_config
    from fedllm_app.model import get_adapter, get_model

    model, _ = get_model(load_config({}).model)
    adapter = get_adapter(model)
    return {k[: -len(A_SUFFIX)]: (adapter[k[: -len(A_SUFFIX)] + B_SUFFIX].shape[0], v.shape[1])
            for k, v in adapter.items() if k.endswith(A_SUFFIX)}  # fmt: skip


def row(what: str, shapes: dict, ranks: list[int], r_max: int, repeat: int, scale: int = 1) -> str:
    clients, n = clients_for(shapes, ranks), [1.0] * len(ranks)
    factored = best_of(lambda: flexlora_aggregate(clients, n, r_max), repeat) * scale
    dense = best_of(lambda: dense_svd(clients, n), repeat) * scale
    het = best_of(lambda: hetlora_aggregate(clients, hetlora_weights(clients, n), r_max), repeat) * scale
    return f"| {what} | {len(shapes) * scale} | {r_max} | {factored:.3f} | {dense:.3f} | {het:.3f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--r-max", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-tiny", action="store_true")
    args = parser.parse_args()
    print(f"clients' ranks {args.ranks}; seconds per round, best of {args.repeat}")
    print("| adapter | layers | r_max | FlexLoRA factored SVD (s) | FlexLoRA dense SVD (s) | HetLoRA (s) |")
    print("|---|---|---|---|---|---|")
    if not args.skip_tiny:
        ranks = [min(r, 16) for r in args.ranks]
        print(row("tiny model (built-in), all 7 modules", tiny_shapes(), ranks, 16, args.repeat))
    one = {"model.layers.0.self_attn.q_proj": (4096, 4096)}
    print(row("7B: one 4096x4096 layer x 64 (32 layers x q/v)", one, args.ranks, args.r_max, args.repeat, 64))


if __name__ == "__main__":
    main()
