"""Where a run starts: the seeded initial adapter, whatever the process's shared model was left holding."""

import numpy as np
import pytest


@pytest.mark.slow
def test_a_run_starts_from_the_seeded_init_even_after_the_shared_model_was_trained(tmp_path):
    from fedllm_app.config import load_config
    from fedllm_app.model import get_adapter, set_adapter
    from fedllm_app.server.run import FederatedRun
    from strategies.records import from_record

    over = "num_clients=2 dataset.test_per_domain=1 baseline=none"
    first = FederatedRun(load_config({"overrides": over}, [f"output_dir={tmp_path}", "run_name=a"]), started=0.0)
    start = from_record(first.initial)
    assert any(np.abs(v).max() > 0 for k, v in start.items() if "lora_A" in k)  # LoRA's random A, zero B
    assert all(np.abs(v).max() == 0 for k, v in start.items() if "lora_B" in k)
    set_adapter(first.model, {k: v + 0.5 for k, v in start.items()})  # as another run or test leaves it

    second = FederatedRun(load_config({"overrides": over}, [f"output_dir={tmp_path}", "run_name=b"]), started=0.0)
    assert second.model is first.model  # the process's one cached model
    for name, value in from_record(second.initial).items():
        np.testing.assert_array_equal(value, start[name])
    for name, value in get_adapter(second.model).items():  # and the model holds it, for the run's first evaluation
        np.testing.assert_array_equal(value, start[name])
