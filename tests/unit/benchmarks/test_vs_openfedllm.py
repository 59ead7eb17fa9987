"""benchmarks/vs_openfedllm.py: OpenFedLLM's output becomes per-round times, and its rows land where it reads them.

OpenFedLLM itself is not installed here (it is run by hand from a checkout); these check the pure parts on
output lines of the shape its main_sft.py prints (a "Round N" line per round, transformers' metrics dict at
the end of each client's training, tqdm bars on the same stream).
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("vs_openfedllm", REPO / "benchmarks" / "vs_openfedllm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def round_line(n: int, clients: str) -> str:
    return f">> ==================== Round {n} : {clients} ====================\n"


def train_line(runtime: float, loss: float) -> str:
    return (
        f"                                             \x1b[A{{'train_runtime': {runtime}, 'train_samples_per_second'"
        f": 65.3, 'train_steps_per_second': 8.1, 'train_loss': {loss}, 'epoch': 1.0}}\n"
    )


OUTPUT = [
    (100.0, "ScriptArguments(model_name_or_path='/m', ...)\n"),
    (108.0, round_line(1, "[1, 3]")),
    (109.0, " 20%|##        | 1/5 [00:00<00:00,  4.32it/s]\x1b[A\n"),
    (110.0, train_line(0.6, 6.8)),
    (111.0, train_line(0.4, 7.0)),
    (112.5, " 50%|#####     | 1/2 [00:02<00:02,  2.95s/it]" + round_line(2, "[1, 2]")),  # a bar before it
    (113.0, train_line(0.3, 6.6)),
    (114.0, train_line(0.5, 6.8)),
    (114.25, "100%|##########| 2/2 [00:06<00:00,  3.00s/it]\n"),  # the rounds bar closes; then the exit
]


def test_rounds_run_from_each_round_line_to_the_next_and_the_last_to_the_last_output(bench):
    r = bench.parse_openfedllm(OUTPUT, launched=100.0, ended=115.0)
    assert r["rounds"] == pytest.approx([4.5, 1.75])
    assert r["first_start"] == pytest.approx(8.0)
    assert r["wall"] == pytest.approx(15.0)


def test_a_rounds_training_phase_and_loss_come_from_its_clients_train_metrics(bench):
    r = bench.parse_openfedllm(OUTPUT, launched=100.0, ended=115.0)
    assert r["train"] == pytest.approx([1.0, 0.8])
    assert r["loss"] == pytest.approx([6.9, 6.7])
    assert r["eval"] == [0.0, 0.0]


def test_output_without_round_lines_is_an_error_naming_the_expected_script(bench):
    with pytest.raises(ValueError, match="main_sft.py or main_dpo.py of rui-ye/OpenFedLLM"):
        bench.parse_openfedllm(OUTPUT[:1], launched=100.0, ended=101.0)


@pytest.mark.parametrize(("task", "name"), [("sft", "yahma/alpaca-cleaned"), ("dpo", "Anthropic/hh-rlhf")])
def test_rows_land_in_the_folder_openfedllm_loads_as_local_data_dir_plus_its_dataset_name(bench, tmp_path, task, name):
    rows = tmp_path / "rows.jsonl"
    bench.write_rows(rows, 5, task)
    data_dir = bench.openfedllm_data(rows, tmp_path / "work", task)
    assert data_dir.endswith("/")  # it concatenates the two strings
    assert Path(data_dir + name, "train.jsonl").read_text() == rows.read_text()
    args = bench.openfedllm_args(Path("/m"), data_dir, 3, tmp_path / "out", task)
    assert args[0] == bench.TASKS[task].script
    assert args[args.index("--dataset_name") + 1] == name
    assert args[args.index("--local_data_dir") + 1] == data_dir


def test_dpo_pairs_share_the_human_turn_and_part_where_the_replies_begin(bench, tmp_path):
    rows = tmp_path / "pairs.jsonl"
    bench.write_rows(rows, 50, "dpo")
    for line in rows.read_text().splitlines():
        pair = json.loads(line)
        turn = pair["chosen"][: pair["chosen"].index("\n\nAssistant: ") + len("\n\nAssistant: ")]
        assert pair["rejected"].startswith(turn)
        assert pair["chosen"][len(turn)] != pair["rejected"][len(turn)]


def test_openfedllm_gets_a_thread_count_only_when_one_is_asked_for(bench, tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert "OMP_NUM_THREADS" not in bench.openfedllm_env(tmp_path)
    env = bench.openfedllm_env(tmp_path, threads=1)
    assert env["OMP_NUM_THREADS"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1" and "PYTHONPATH" not in env


def test_a_fedllm_round_that_lost_clients_stops_the_benchmark_instead_of_timing_failures(bench):
    """Its DPO clients once dropped every row (vicuna prompts longer than max_length) and the failed rounds' times
    were reported as training times."""
    check_every_round_trained = bench.check_every_round_trained
    good = {"round": 1, "aggregated": True, "failed": 0}
    check_every_round_trained([good], "")
    log = "x\n[fedllm] ERROR: ValueError: client 0: no row fits training.max_length=128; raise it\n"
    with pytest.raises(SystemExit, match=r"(?s)rounds \[2\] lost clients.*no row fits"):
        check_every_round_trained([good, {"round": 2, "aggregated": False, "failed": 2}], log)


def test_fedllms_dpo_length_fits_its_vicuna_prompts(bench):
    fedllm_overrides = bench.fedllm_overrides
    assert fedllm_overrides(Path("m"), Path("r.jsonl"), 2, "dpo").count("training.max_length=") == 1
    assert "training.max_length=256" in fedllm_overrides(Path("m"), Path("r.jsonl"), 2, "dpo")
    assert "training.max_length=128" in fedllm_overrides(Path("m"), Path("r.jsonl"), 2, "sft")
