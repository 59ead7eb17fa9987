"""The headline multiple-choice score agrees with EleutherAI's lm-evaluation-harness, row by row.

The same merged checkpoint (a local model folder) is scored by ``lm_eval`` (its ``HFLM`` on a custom task
in the ``mmlu`` form, reading local JSON-lines files, offline) and by :func:`harness_choices`; every row's
chosen option must be the same, zero-shot and 5-shot (where the tiny model's 256-token context cuts the
prompt from the left, as the harness does). Zero-shot also covers the medical benchmarks' fixture rows
(MedQA, MedMCQA, PubMedQA with three options, CareQA), in the same form without MMLU's subject line.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

SUBJECTS = ("elementary_mathematics", "high_school_geography", "formal_logic")
MEDICAL = ("medqa", "medmcqa", "pubmedqa", "careqa")
MMLU_TEXT = "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"
ANY_TEXT = "{{question.strip()}}\n{% for c in choices %}{{ 'ABCDE'[loop.index0] }}. {{c}}\n{% endfor %}Answer:"


def invented_rows(subject: str, n: int, rng: random.Random) -> list[dict]:
    """``n`` invented MMLU-shaped questions of ``subject`` (sums with four close choices)."""
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 40), rng.randint(1, 40)
        choices = [str(a + b + d) for d in rng.sample(range(-3, 4), 4)]
        gold = rng.randrange(4)
        choices[gold] = str(a + b)
        rows.append({"question": f"What is {a} + {b}?", "subject": subject, "choices": choices, "answer": gold})
    return rows


def harness_task(folder: Path, name: str, test: list[dict], dev: list[dict], description: str = "") -> str:
    """A task yaml in the harness's ``mmlu`` form over local files (rows shaped like cais/mmlu: question,
    choices, answer); MMLU's own template for four options, the same lines for any number otherwise.
    """
    files = {}
    for split, rows in (("test", test), ("dev", dev)):
        files[split] = str(folder / f"{name}_{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    four = all(len(r["choices"]) == 4 for r in test + dev)
    task = {
        "task": f"xcheck_{name}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files},
        "test_split": "test",
        "fewshot_split": "dev",
        "fewshot_config": {"sampler": "first_n"},
        "output_type": "multiple_choice",
        "doc_to_text": MMLU_TEXT if four else ANY_TEXT,
        "doc_to_choice": ["A", "B", "C", "D"] if four else "{{ ['A', 'B', 'C', 'D', 'E'][:choices|length] }}",
        "doc_to_target": "answer",
        "description": description,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    (folder / f"xcheck_{name}.yaml").write_text(yaml.safe_dump(task))
    return task["task"]


def mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def harness_run(model_dir: Path, tasks_dir: Path, tasks: list[str], shots: int) -> dict[str, list[int]]:
    """``{task: each row's chosen option}`` from lm-eval's own evaluation of the local model folder."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(model_dir), device="cpu", batch_size=8, dtype="float32")
    out = simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=shots,
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
        log_samples=True,
    )
    chosen = {}
    for task in tasks:
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        chosen[task] = [
            max(range(len(s["filtered_resps"])), key=lambda i, s=s: s["filtered_resps"][i][0]) for s in samples
        ]
    return chosen


@pytest.fixture(scope="module")
def merged(checkpoint, tmp_path_factory):
    from evaluation.checkpoint import merge

    return merge(checkpoint, tmp_path_factory.mktemp("merged"))


@pytest.mark.parametrize("shots", [0, 5])
def test_harness_choices_agree_with_lm_eval_row_by_row(merged, rows, tmp_path, monkeypatch, shots):
    from evaluation.checkpoint import checkpoint_config, load_for_eval
    from evaluation.generation import Generator
    from evaluation.multiple_choice import few_shot_examples, harness_choices, to_item

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rng = random.Random(0)
    fixture = rows("mmlu")
    test = {s: [r for r in fixture if r["subject"] == s] + invented_rows(s, 12, rng) for s in SUBJECTS}
    dev = {s: invented_rows(s, 5, rng) for s in SUBJECTS}
    tasks = {s: harness_task(tmp_path, s, test[s], dev[s], mmlu_description(s)) for s in SUBJECTS}
    items = {s: [to_item("mmlu", r) for r in test[s]] for s in SUBJECTS}
    examples = {s: few_shot_examples(items[s], dev[s], "mmlu", shots) if shots else None for s in SUBJECTS}
    if not shots:  # the medical benchmarks are zero-shot
        for bench in MEDICAL:
            items[bench] = [to_item(bench, r) for r in rows(bench)]
            shaped = [{"question": it.question, "choices": list(it.options), "answer": it.gold} for it in items[bench]]
            tasks[bench] = harness_task(tmp_path, bench, shaped, shaped)
    theirs = harness_run(merged, tmp_path, list(tasks.values()), shots)

    model, tok = load_for_eval(merged, checkpoint_config(merged))
    gen = Generator(model, tok, "chat", batch_size=8, progress=False)
    agree = total = 0
    picked: set[int] = set()
    for name, task in tasks.items():
        shots_of = examples.get(name) or [[] for _ in items[name]]
        ours = harness_choices(gen, items[name], shots_of, "mmlu" if name in SUBJECTS else name)
        assert ours == theirs[task], name
        picked.update(ours)
        agree += sum(a == b for a, b in zip(ours, theirs[task], strict=True))
        total += len(ours)
    assert len(picked) > 1, "the model picks one letter everywhere: agreement would prove little"
    print(f"lm-eval agreement ({shots}-shot): {agree}/{total} rows")
