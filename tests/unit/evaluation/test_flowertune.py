"""FlowerTune leaderboard evaluation (evaluation/flowertune.py, evaluation/multipl_e.py): the board's prompts and
answer parsing, its MMLU categories, its table row, the communication read from the run, and the code
challenge's programs run in the sandbox.
"""

import json
import shutil
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from evaluation import flowertune, multipl_e
from evaluation.multiple_choice import MMLU_GROUP
from evaluation.sources import load_rows
from fedllm_app.config import ConfigError, load_config

SETTINGS = SimpleNamespace(data_dir=None, limit=None, seed=0, code_timeout=20.0, allow_weak_sandbox=False)


@pytest.mark.parametrize(
    ("output", "kind", "read"),
    [
        ("A", "mcq", "a"),
        (" (B) because", "mcq", "b"),
        ("c.", "mcq", "c"),
        ("Some text\n## D) because\nmore", "mcq", "d"),  # the line after a "\n##" heading mark
        ("Some text\n## Answer\nD", "mcq", "a"),  # ... even when it says "Answer" (the board's reading)
        ("Yes.", "boolean", "yes"),
        ("yesyes", "boolean", "yes"),
        ("maybe", "boolean", "maybe"),  # not one of a-e/yes/no: the whole output, right only if it is the gold
        ("Maybe so", "boolean", "maybe so"),
        ("Zebra", "mcq", "zebra"),
    ],
)
def test_an_answer_is_read_as_the_board_reads_it(output, kind, read):
    assert flowertune.board_answer(output, kind) == read


def test_a_multiple_choice_prompt_is_the_boards_text():
    row = {"question": "Which is a prime", "choices": ["4", "6", "7", "9"], "answer": 2, "subject": "anatomy"}
    prompt, gold, kind = flowertune.choice_example("mmlu", row)
    assert prompt == (
        "<|im_start|>question\nAnswer the following multiple choice question.\nQuestion: Which is a prime?\n\n"
        "Options:\nA. 4\nB. 6\nC. 7\nD. 9\nThe answer is:\n<|im_end|>\n<|im_start|>answer\n"
    )
    assert (gold, kind) == ("C", "mcq")


def test_careqa_counts_its_options_from_one_and_pubmedqa_is_answered_in_words(fixtures_dir):
    care = load_rows(flowertune.SOURCES["careqa"], fixtures_dir)[0]
    assert flowertune.choice_example("careqa", care)[1] == chr(64 + int(care["cop"]))
    pubmed = load_rows(flowertune.SOURCES["pubmedqa"], fixtures_dir)[0]
    prompt, gold, kind = flowertune.choice_example("pubmedqa", pubmed)
    assert kind == "boolean" and gold == pubmed["final_decision"] and pubmed["context"]["contexts"][0] in prompt


def test_mmlu_is_split_into_the_boards_three_categories():
    cats = flowertune.MMLU_CATEGORIES
    assert list(cats) == ["stem", "social_sciences", "humanities"]
    assert "anatomy" in cats["stem"]  # the board's STEM list has it; the MMLU paper's groups put it in "other"
    subjects = [s for names in cats.values() for s in names]
    assert len(subjects) == len(set(subjects)) == 44 and set(subjects) <= set(MMLU_GROUP)


def test_finance_prompts_name_news_or_tweet_as_the_board_does(fixtures_dir):
    row = {"sentence": "Shares rise", "sentiment_score": 0.5, "format": "post"}
    prompt, gold = flowertune.sentiment_example("fiqa", row)
    assert prompt == (
        "Instruction: What is the sentiment of this tweet? Please choose an answer from "
        "{negative/neutral/positive}.\nInput: Shares rise\nAnswer: "
    )
    assert gold == "positive"
    fpb = load_rows(flowertune.SOURCES["fpb"], fixtures_dir)[0]
    assert "sentiment of this news?" in flowertune.sentiment_example("fpb", fpb)[0]


def test_an_unknown_challenge_lists_the_four():
    with pytest.raises(ConfigError, match="unknown challenge 'nlp'; choose one of: general_nlp, finance, medical"):
        flowertune.challenge("nlp")


@pytest.mark.parametrize("name", ["general_nlp", "finance", "medical", "code"])
def test_every_challenge_benchmark_has_fixture_rows_the_protocol_can_read(name, fixtures_dir):
    for bench in flowertune.challenge(name).benchmarks():
        rows = load_rows(flowertune.SOURCES[bench], fixtures_dir)
        assert rows, bench
        for row in rows:
            if bench in multipl_e.TASKS:
                assert multipl_e.TASKS[bench].prompt(row).strip()
            elif bench in ("fpb", "fiqa", "tfns"):
                assert flowertune.sentiment_example(bench, row)[1] in ("negative", "neutral", "positive")
            else:
                assert flowertune.choice_example(bench, row)[1]


def run_folder(tmp_path, totals):
    ckpt = tmp_path / "run" / "checkpoints" / "round-2"
    ckpt.mkdir(parents=True)
    rows = [{"round": r, "bytes_sent_total": s, "bytes_received_total": v} for r, (s, v) in enumerate(totals, 1)]
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ckpt


def test_communication_is_both_directions_up_to_the_checkpoints_round_in_mib(tmp_path):
    ckpt = run_folder(tmp_path, [(2**20, 2**20), (3 * 2**20, 5 * 2**20), (9 * 2**20, 9 * 2**20)])
    assert flowertune.communication_mb(ckpt) == 8.0
    assert flowertune.communication_mb(tmp_path) is None  # not <run>/checkpoints/round-N


def test_the_row_averages_the_columns_and_says_why_a_run_is_not_an_entry(tmp_path):
    ckpt = run_folder(tmp_path, [(2**20, 2**20)])
    results = {b: {"accuracy": v} for b, v in (("fpb", 60.0), ("fiqa", 30.0), ("tfns", 90.0))}
    eligible = load_config({"overrides": "challenge=finance"})
    row = flowertune.leaderboard_row("finance", results, eligible, ckpt)
    assert (row["average"], row["communication_mb"], row["eligible"]) == (60.0, 2.0, True)
    assert "| mistralai/Mistral-7B-v0.3 | 2 | 60.00 | 30.00 | 90.00 | 60.00 |" in flowertune.row_markdown(row)
    changed = load_config({"overrides": "challenge=finance num_clients=10 sample_clients=2"})
    row = flowertune.leaderboard_row("finance", results, changed, ckpt)
    assert row["eligible"] is False and "num_clients=10 (the board fixes 50)" in row["not_eligible_because"][0]
    assert "Not a leaderboard entry: num_clients=10" in flowertune.row_markdown(row)
    plain = flowertune.leaderboard_row("finance", results, OmegaConf.create({"model": {"name": "m"}}), ckpt)
    assert plain["not_eligible_because"] == ["the run was not started with challenge=finance"]


def test_a_limited_local_or_unquantised_evaluation_or_a_run_past_the_budget_is_not_an_entry(tmp_path):
    results = {b: {"accuracy": 50.0} for b in ("fpb", "fiqa", "tfns")}
    cfg = load_config({"overrides": "challenge=finance"})
    board = {"eval_quantization": "4bit-fp4", "limit": None, "data_dir": None}
    assert flowertune.leaderboard_row("finance", results, cfg, run_folder(tmp_path / "ok", [(1, 1)]), board)["eligible"]
    cases = [
        ({**board, "limit": 50}, "scored on the first 50 rows of each benchmark (--limit)"),
        ({**board, "data_dir": "bench"}, "scored on local benchmark files (bench), not the board's"),
        ({**board, "eval_quantization": "4bit"}, "evaluated with model.quantization=4bit, not the board's 4-bit"),
    ]
    for i, (evaluated, reason) in enumerate(cases):
        row = flowertune.leaderboard_row("finance", results, cfg, run_folder(tmp_path / str(i), [(1, 1)]), evaluated)
        assert not row["eligible"] and reason in "; ".join(row["not_eligible_because"])
    over = run_folder(tmp_path / "big", [(150_000 * 2**20, 60_000 * 2**20)])
    row = flowertune.leaderboard_row("finance", results, cfg, over, board)
    assert row["not_eligible_because"] == ["the run used 210,000 MB, above the board's 200,000 MB budget"]


# ---------------------------------------------------------------- code


def test_a_completion_is_cut_at_the_first_stop_word():
    assert multipl_e.stop_at("  return 1\n\ndef other():\n", ["\nclass", "\ndef"]) == "  return 1\n"
    assert multipl_e.stop_at("x = 1", ["\ndef"]) == "x = 1"


def test_the_tasks_prompts_and_commands_are_bigcodes(fixtures_dir):
    mbpp = load_rows(flowertune.SOURCES["mbpp"], fixtures_dir)[0]
    assert multipl_e.TASKS["mbpp"].prompt(mbpp) == f'"""\n{mbpp["text"]}\n{mbpp["test_list"][0]}\n"""\n'
    js = load_rows(flowertune.SOURCES["multiple_js"], fixtures_dir)[0]
    assert multipl_e.TASKS["multiple_js"].stop(js) == [*js["stop_tokens"], "<file_sep>"]
    assert multipl_e.native_job("js", "x") == ({"program.js": "x"}, [["node", "program.js"]])
    files, steps = multipl_e.native_job("cpp", "y")
    assert files == {"program.cpp": "y"}
    assert steps == [["g++", "program.cpp", "-o", "program", "-std=c++17"], ["./program"]]
    assert (multipl_e.TASKS["mbpp"].max_length, multipl_e.TASKS["multiple_cpp"].max_length) == (2048, 1024)


def test_a_missing_compiler_names_the_debian_package(monkeypatch):
    monkeypatch.setitem(multipl_e.TOOLS, "multiple_cpp", ("no-such-compiler-fedllm", "g++"))
    with pytest.raises(ConfigError, match=r"multiple_cpp needs no-such-compiler-fedllm.*apt-get install -y g\+\+"):
        multipl_e.require_tools("multiple_cpp")


# What a perfect model would write after each fixture prompt (and a stop word, which is cut off).
SOLUTIONS = {
    "HumanEval_900_add": ("\n  return x + y;\n}\n", "\n    return x + y;"),
    "HumanEval_901_shout": ("\n  return text.toUpperCase();\n}\n", None),
    "HumanEval_902_twice": (None, "\n    return 2 * x;"),
}
STOP = {"humaneval": "\nprint('done')", "mbpp": "\nprint('done')", "multiple_js": "\nconsole.log('done')"}
STOP["multiple_cpp"] = "\n}\nint main() { return 1; }"


class Scripted:
    """A stand-in for the model only: it answers each prompt with the fixture's known solution."""

    def __init__(self, answers):
        self.answers = answers
        self.tokenizer = lambda text, **_: {"input_ids": text.split()}  # only its length is read

    def generate(self, prompts, **_):
        return [self.answers[p] for p in prompts]


def needs(tool):
    missing = shutil.which(tool, path="/usr/bin:/bin") is None  # where the sandbox looks
    return pytest.mark.skipif(missing, reason=f"{tool} is not installed (Debian: apt-get install -y nodejs g++)")


@pytest.mark.parametrize(
    "bench",
    [
        "humaneval",
        "mbpp",
        pytest.param("multiple_js", marks=needs("node")),
        pytest.param("multiple_cpp", marks=[needs("g++"), pytest.mark.slow]),  # g++: ~5 s a program, so one row
    ],
)
def test_right_answers_pass_and_wrong_ones_fail_in_the_sandbox(bench, fixtures_dir):
    rows = load_rows(flowertune.SOURCES[bench], fixtures_dir)[: 1 if bench == "multiple_cpp" else None]
    task = multipl_e.TASKS[bench]
    right, wrong = {}, {}
    for row in rows:
        prompt = task.prompt(row)
        if bench == "humaneval":
            solution = "\n" + row["canonical_solution"]
        elif bench == "mbpp":
            solution = row["code"] + "\n"
        else:
            solution = SOLUTIONS[row["name"]][0 if bench == "multiple_js" else 1]
        right[prompt] = solution + STOP[bench]  # what follows the stop word is not run
        wrong[prompt] = "\n    return None;\n" if bench != "multiple_cpp" else "    return -7;\n"
    assert flowertune.score_code(Scripted(right), bench, rows, 20.0)["pass@1"] == 100.0
    if bench != "multiple_cpp":  # a C++ failure costs another compile; the sandbox's tests cover failing steps
        assert flowertune.score_code(Scripted(wrong), bench, rows, 20.0)["pass@1"] == 0.0


def test_generation_ends_once_a_stop_string_is_written(gen):
    full = gen.generate(["Count: 1 2 3"], max_new_tokens=24)[0]
    assert len(full) > 2
    stop = full[1:3]  # a string the model writes early on (greedy: the same text again)
    cut = gen.generate(["Count: 1 2 3"], max_new_tokens=24, stop=[stop])[0]
    assert cut.endswith(stop) and len(cut) < len(full) and full.startswith(cut)


@pytest.mark.parametrize("name", ["medical"])  # finance generates up to 512 tokens: its parts are tested above
def test_a_challenge_scores_the_tiny_checkpoint_on_every_benchmark(name, gen, fixtures_dir):
    settings = SimpleNamespace(**{**vars(SETTINGS), "data_dir": str(fixtures_dir)})
    results = flowertune.run_challenge(gen, name, settings)
    assert list(results) == list(flowertune.challenge(name).columns)
    for bench, metrics in results.items():
        assert 0 <= metrics["accuracy"] <= 100 and metrics["n"] >= 2, bench
        assert metrics["protocol"]["challenge"] == name and metrics["data"]["kind"] == "local file"
