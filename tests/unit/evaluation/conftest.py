"""Shared by the evaluation tests: one saved demo checkpoint and one loaded model per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "evaluation"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint written by the project's own RunWriter: the tiny model's adapter with non-zero LoRA B
    (so base and base+adapter differ), under <output_dir>/<run>/checkpoints/round-1 next to config.yaml."""
    from fedllm_app.config import load_config
    from fedllm_app.model import get_adapter, get_model, set_adapter
    from fedllm_app.server.outputs import RunWriter

    out = tmp_path_factory.mktemp("outputs")
    cfg = load_config({}, [f"output_dir={out}", "run_name=demo"])
    model, _ = get_model(cfg.model, cfg.seed)
    original = get_adapter(model)
    rng = np.random.default_rng(0)
    perturbed = {k: v + rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in original.items()}
    set_adapter(model, perturbed)
    try:
        path = RunWriter(cfg).save_adapter(model, 1)
    finally:
        set_adapter(model, original)  # the cached model is shared with other tests
    return path


@pytest.fixture(scope="session")
def gen(checkpoint):
    """The checkpoint loaded for evaluation, wrapped in a Generator (no progress bars); one torch thread, as
    the run config says, since several processes share the CPU cores."""
    import torch

    from evaluation.checkpoint import checkpoint_config, load_for_eval
    from evaluation.generation import Generator

    cfg = checkpoint_config(checkpoint)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.training.num_threads or threads)
    model, tok = load_for_eval(checkpoint, cfg)
    yield Generator(model, tok, cfg.training.template, batch_size=4, max_new_tokens=32, progress=False)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def rows():
    """``rows(name)``: a benchmark's fixture rows, loaded the way --data-dir loads them."""
    from evaluation.runner import SOURCES
    from evaluation.sources import load_rows

    return lambda name: load_rows(SOURCES[name], FIXTURES)
