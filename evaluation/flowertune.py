r"""The FlowerTune LLM leaderboard's evaluation: each challenge's benchmarks scored as the board scores them.

``fedllm-eval CHECKPOINT --challenge general_nlp|finance|medical|code`` runs the challenge's benchmarks with
the protocol of the board's evaluation code (Flower's ``benchmarks/flowertune-llm/evaluation``, and for code
the bigcode-evaluation-harness fork its README names): its prompts, its generation lengths, its answer
parsing, its averaging. The numbers are percentages, the average is the plain mean of the benchmark columns.

- **General NLP, Medical** (:func:`score_choice`): the question in the board's ``Question: ...\n\nOptions:``
  form after the benchmark's instruction, wrapped in ``<|im_start|>question ... <|im_start|>answer``; greedy
  generation of as many tokens as the first gold answer of each batch of 16 has (usually one letter); the
  answer lower-cased, stripped of punctuation and cut to its first character (``mcq``) or kept (``boolean``,
  PubMedQA), and correct when it equals the gold. MMLU is split into the board's STEM, Social Sciences and
  Humanities subject lists (:data:`MMLU_CATEGORIES`: its STEM includes anatomy, unlike the MMLU paper's).
- **Finance** (:func:`score_sentiment`): ``Instruction: ...\nInput: ...\nAnswer: `` with the board's
  instruction per benchmark; greedy generation up to 512 tokens in all (prompt batch included, batches of
  32); the answer mapped by FinGPT's rule (:func:`evaluation.finance.fingpt_label`); accuracy.
- **Code** (:mod:`evaluation.multipl_e` and :func:`score_code`): bigcode's completion prompts (HumanEval's
  prompt, MBPP's docstring with its first test, MultiPL-E's JavaScript and C++ prompts), one sample at
  temperature 0.2, top-p 0.95, cut at the task's stop words, up to 1024 tokens in all (MBPP 2048); pass@1
  of the program and its tests run in the sandbox (Python, ``node``, ``g++ -std=c++17``).

Where the rows come from: the same Hub datasets as :mod:`evaluation.runner` (or ``--data-dir`` files in their
shapes). The board's copies differ in hosting for MMLU (``lukaemon/mmlu``; here ``cais/mmlu``, the same
questions), MedQA and PubMedQA (``bigbio`` loading scripts, which ``datasets`` 4 no longer runs; here
``GBaker/MedQA-USMLE-4-options`` and ``qiaojin/PubMedQA`` ``pqa_labeled``, of whose 1000 rows PubMedQA is scored
on the board's 500, its fold-0 test split, picked by PubMed id: :mod:`evaluation.pubmedqa_fold`); each
benchmark's JSON says which.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evaluation import finance, multipl_e
from evaluation.coding import SOURCES as CODE_SOURCES
from evaluation.generation import Generator
from evaluation.multiple_choice import SOURCES as CHOICE_SOURCES
from evaluation.sandbox import resolve_backend, run_program
from evaluation.sources import Source, load_benchmark
from fedllm_app.config import CHALLENGES, ConfigError, challenge_deviations

log = logging.getLogger("fedllm")

REFERENCE = "Flower FlowerTune LLM leaderboard evaluation (benchmarks/flowertune-llm/evaluation)"
BOARD_SEED = 2024  # torch.manual_seed in the board's general-nlp, medical and finance eval.py
CODE_SEED = 0  # bigcode-evaluation-harness's default seed
# The board's eval.py loads the base with BitsAndBytesConfig(load_in_4bit=True) (FP4, no double quantisation)
# and torch_dtype float32: fedllm's model.quantization=4bit-fp4 with model.dtype=float32.
BOARD_QUANTIZATION = "4bit-fp4"
BOARD_BUDGET_MB = 200_000
CHOICE_BATCH = 16  # the board's default --batch-size (general-nlp, medical): sets each batch's answer length
SENTIMENT_BATCH = 32  # the board's finance --batch-size
SENTIMENT_LENGTH = 512  # the board's finance generate(max_length=512): prompt batch and answer together

# The board's MMLU subject lists (general-nlp/benchmarks.py MMLU_CATEGORY); "other" is not on the board.
MMLU_CATEGORIES: dict[str, tuple[str, ...]] = {
    "stem": tuple(
        "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
        "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
        "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
        "high_school_mathematics high_school_physics high_school_statistics machine_learning".split()
    ),
    "social_sciences": tuple(
        "econometrics high_school_geography high_school_government_and_politics high_school_macroeconomics "
        "high_school_microeconomics high_school_psychology human_sexuality professional_psychology "
        "public_relations security_studies sociology us_foreign_policy".split()
    ),
    "humanities": tuple(
        "formal_logic high_school_european_history high_school_us_history high_school_world_history "
        "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy prehistory "
        "professional_law world_religions".split()
    ),
}

# The instructions are the protocol's (the board takes the medical ones from Meditron's evaluation); a
# score is only comparable with the board's under these exact words.
_MEDICAL_MCQ = (
    "You are a medical doctor answering realworld medical entrance exam questions. Based on your understanding "
    "of basic and clinical science, medical knowledge, and mechanisms underlying health, disease, patient care, "
    "and modes of therapy, answer the following multiple-choice question. Select one correct answer from A to D. "
    "Base your answer on the current and standard practices referenced in medical guidelines."
)
INSTRUCTIONS = {
    "mmlu": "Answer the following multiple choice question.",
    "pubmedqa": "As an expert doctor in clinical science and medical knowledge, can you tell me if the following "
    "statement is correct? Answer yes, no, or maybe.",
    "medqa": "You are a medical doctor taking the US Medical Licensing Examination. You need to demonstrate your "
    "understanding of basic and clinical science, medical knowledge, and mechanisms underlying health, disease, "
    "patient care, and modes of therapy. Show your ability to apply the knowledge essential for medical practice. "
    "For the following multiple-choice question, select one correct answer from A to E. Base your answer on the "
    "current and standard practices referenced in medical guidelines.",
    "medmcqa": _MEDICAL_MCQ,
    "careqa": _MEDICAL_MCQ,
}
SENTIMENT_QUESTION = "What is the sentiment of this {}? Please choose an answer from {{negative/neutral/positive}}."


def _board_fiqa(ds: Any) -> Any:
    """The board's FiQA rows: the three splits pooled, then a seeded 25% test split (FinGPT's own is 22.6%)."""
    return ds.train_test_split(test_size=0.25, seed=42)["test"]


SOURCES: dict[str, Source] = {
    "mmlu": CHOICE_SOURCES["mmlu"],
    **{name: CHOICE_SOURCES[name] for name in ("pubmedqa", "medmcqa", "medqa", "careqa")},
    "fpb": finance.SOURCES["fpb"],
    "fiqa": Source(
        "fiqa_sa",
        "pauri32/fiqa-2018",
        None,
        "train+validation+test",
        ("sentence", "sentiment_score", "format"),
        _board_fiqa,
    ),  # fmt: skip
    "tfns": finance.SOURCES["tfns"],
    "mbpp": CODE_SOURCES["mbpp"],
    "humaneval": CODE_SOURCES["humaneval"],
    **multipl_e.SOURCES,
}


@dataclass(frozen=True)
class Challenge:
    """A challenge's table columns (in the board's order), the benchmark each column comes from, its metric."""

    title: str
    columns: tuple[str, ...]
    metric: str

    def benchmarks(self) -> list[str]:
        """The benchmarks to load (MMLU once for its three columns)."""
        return list(dict.fromkeys("mmlu" if c in MMLU_CATEGORIES else c for c in self.columns))


BOARD: dict[str, Challenge] = {
    "general_nlp": Challenge("General NLP", ("stem", "social_sciences", "humanities"), "accuracy %"),
    "finance": Challenge("Finance", ("fpb", "fiqa", "tfns"), "accuracy %"),
    "medical": Challenge("Medical", ("pubmedqa", "medmcqa", "medqa", "careqa"), "accuracy %"),
    "code": Challenge("Code", ("mbpp", "humaneval", "multiple_js", "multiple_cpp"), "pass@1 %"),
}
assert tuple(BOARD) == CHALLENGES


def challenge(name: str) -> Challenge:
    """The challenge called ``name``; an unknown name is an error listing the four."""
    if name not in BOARD:
        raise ConfigError(f"unknown challenge {name!r}; choose one of: {', '.join(BOARD)}")
    return BOARD[name]


# ---------------------------------------------------------------- multiple choice (General NLP, Medical)


def board_question(question: str, options: list[str]) -> str:
    """The board's question block: a ``?`` added unless it ends in ``?`` or ``.``, then lettered options."""
    if not question.endswith(("?", ".")):
        question += "?"
    lettered = "\n".join(f"{chr(65 + i)}. {opt}" for i, opt in enumerate(options))
    return f"Question: {question}\n\nOptions:\n{lettered}"


def board_prompt(instruction: str, body: str) -> str:
    """The text the board's model continues (instruction, body, ``The answer is:`` in its question/answer tags)."""
    return f"<|im_start|>question\n{instruction}\n{body}\nThe answer is:\n<|im_end|>\n<|im_start|>answer\n"


def choice_example(bench: str, row: dict) -> tuple[str, str, str]:
    """``(prompt, gold, answer_type)`` of one row of ``bench`` (mmlu, pubmedqa, medmcqa, medqa, careqa)."""
    if bench == "mmlu":
        body, gold = board_question(row["question"], list(row["choices"])), chr(65 + int(row["answer"]))
    elif bench == "pubmedqa":
        body, gold = "\n".join(row["context"]["contexts"]) + "\n" + row["question"], row["final_decision"]
    elif bench == "medqa":
        keys = sorted(row["options"])
        body, gold = board_question(row["question"], [row["options"][k] for k in keys]), row["answer_idx"]
    elif bench == "medmcqa":
        body = board_question(row["question"], [row[k] for k in ("opa", "opb", "opc", "opd")])
        gold = chr(65 + int(row["cop"]))
    elif bench == "careqa":
        body, gold = board_question(row["question"], [row[f"op{i}"] for i in range(1, 5)]), chr(64 + int(row["cop"]))
    else:
        raise KeyError(bench)
    return board_prompt(INSTRUCTIONS[bench], body), gold, "boolean" if bench == "pubmedqa" else "mcq"


_READABLE = ("a", "b", "c", "d", "e", "yes", "no")


def board_answer(output: str, answer_type: str) -> str:
    r"""The board's reading of a generated answer (its ``format_answer``), lower-cased.

    The text after a ``\n##`` heading if there is one; punctuation to spaces; a boolean answer with a
    doubled word undone (``yesyes``); an mcq answer cut to its first character. A reading that is not one of
    a-e, yes, no is the whole lower-cased output (right only if that equals the gold, e.g. ``maybe``).
    """
    full = output.lower()
    text = full
    if "\n##" in text:
        text = text.split("\n##")[1].split("\n")[0].strip()
    text = re.sub(" +", " ", re.sub(r"[^a-zA-Z0-9]", " ", text).strip())
    if answer_type == "boolean":
        for doubled, single in (("yesyes", "yes"), ("nono", "no"), ("yesno", "yes"), ("noyes", "no")):
            if doubled in text:
                text = text.replace(doubled, single)
                break
        text = text.encode("ascii", "ignore").decode("ascii")
    else:
        text = text.encode("ascii", "ignore").decode("ascii")[:1]
    return text if text in _READABLE else full


def score_choice(gen: Generator, bench: str, rows: list[dict]) -> dict[str, Any]:
    """Accuracy (%) of ``rows`` under the board's protocol; MMLU also per board category (``stem``...)."""
    examples = [choice_example(bench, r) for r in rows]
    answers: list[str] = []
    for start in range(0, len(examples), CHOICE_BATCH):
        batch = examples[start : start + CHOICE_BATCH]
        length = len(gen.tokenizer(batch[0][1], add_special_tokens=False)["input_ids"])
        answers += gen.generate([p for p, _, _ in batch], max_new_tokens=max(length, 1), desc=bench)
    right = [board_answer(a, kind) == gold.lower() for a, (_, gold, kind) in zip(answers, examples, strict=True)]
    metrics: dict[str, Any] = {"accuracy": _percent(right), "n": len(rows)}
    if bench == "mmlu":
        for category, subjects in MMLU_CATEGORIES.items():
            hits = [ok for ok, r in zip(right, rows, strict=True) if r["subject"] in subjects]
            metrics[category] = _percent(hits)
            metrics[f"n_{category}"] = len(hits)
    return metrics


def _percent(hits: list[bool]) -> float | None:
    return 100.0 * sum(hits) / len(hits) if hits else None


# ---------------------------------------------------------------- sentiment (Finance)


def sentiment_example(bench: str, row: dict) -> tuple[str, str]:
    """``(prompt, gold label)`` of one row of fpb, fiqa or tfns in the board's instruction form."""
    if bench == "fpb":
        kind, text, gold = "news", row["sentence"], finance.FPB_LABELS[int(row["label"])]
    elif bench == "fiqa":
        kind = "tweet" if row["format"] == "post" else "news"
        text, gold = row["sentence"], finance.fiqa_label(float(row["sentiment_score"]))
    elif bench == "tfns":
        kind, text, gold = "tweet", row["text"], finance.TFNS_LABELS[int(row["label"])]
    else:
        raise KeyError(bench)
    return f"Instruction: {SENTIMENT_QUESTION.format(kind)}\nInput: {text}\nAnswer: ", gold


def score_sentiment(gen: Generator, bench: str, rows: list[dict]) -> dict[str, Any]:
    """Accuracy (%) with FinGPT's answer mapping; each batch of 32 generates up to 512 tokens in all."""
    examples = [sentiment_example(bench, r) for r in rows]
    answers: list[str] = []
    for start in range(0, len(examples), SENTIMENT_BATCH):
        prompts = [p for p, _ in examples[start : start + SENTIMENT_BATCH]]
        width = max(len(gen.tokenizer(p)["input_ids"]) for p in prompts)
        answers += gen.generate(prompts, max_new_tokens=max(SENTIMENT_LENGTH - width, 1), desc=bench)
    # The board reads the text after the first "Answer: " up to any next one.
    labels = [finance.fingpt_label(a.split("Answer: ")[0]) for a in answers]
    right = [label == gold for label, (_, gold) in zip(labels, examples, strict=True)]
    return {"accuracy": _percent(right), "n": len(rows)}


# ---------------------------------------------------------------- code


def score_code(
    gen: Generator, bench: str, rows: list[dict], timeout: float = 10.0, allow_weak: bool = False
) -> dict[str, Any]:
    """pass@1 (%) of one sampled completion per problem (bigcode's prompt, stop words and lengths)."""
    task = multipl_e.TASKS[bench]
    backend = resolve_backend("auto", allow_weak)
    multipl_e.require_tools(bench)
    prompts = [task.prompt(r) for r in rows]
    completions: list[str] = []
    for i, prompt in enumerate(prompts):  # one at a time: each has its own length left
        width = len(gen.tokenizer(prompt)["input_ids"])
        new = max(task.max_length - width, 1)
        text = gen.generate([prompt], max_new_tokens=new, temperature=0.2, top_p=0.95, stop=task.stop(rows[i]))[0]
        completions.append(multipl_e.stop_at(text, task.stop(rows[i])))
    passed = []
    for row, prompt, completion in zip(rows, prompts, completions, strict=True):
        if task.language == "python":
            code, tests = task.program(row, prompt, completion)
            result = run_program(code, tests, timeout=timeout, backend=backend, allow_weak=True)
        else:
            result = multipl_e.run(task, row, prompt + completion, timeout, backend)
        passed.append(result.passed)
    return {"pass@1": _percent(passed), "n": len(rows), "sandbox": backend}


# ---------------------------------------------------------------- the table row


def score(gen: Generator, bench: str, rows: list[dict], settings: Any) -> dict[str, Any]:
    """The board's metrics of ``bench`` on ``rows``."""
    if bench in multipl_e.TASKS:
        return score_code(gen, bench, rows, settings.code_timeout, settings.allow_weak_sandbox)
    if bench in ("fpb", "fiqa", "tfns"):
        return score_sentiment(gen, bench, rows)
    return score_choice(gen, bench, rows)


def run_challenge(gen: Generator, name: str, settings: Any) -> dict[str, Any]:
    """``{benchmark: metrics}`` of challenge ``name``, each with the board's protocol and where its rows came from."""
    import torch

    results: dict[str, Any] = {}
    for bench in challenge(name).benchmarks():
        torch.manual_seed(CODE_SEED if name == "code" else BOARD_SEED)
        rows, origin = load_benchmark(SOURCES[bench], settings.data_dir, settings.limit, settings.seed)
        metrics = score(gen, bench, rows, settings)
        results[bench] = {**metrics, "protocol": {"reference": REFERENCE, "challenge": name}, "data": origin}
        log.info("%s: %s", bench, {k: v for k, v in metrics.items() if k != "sandbox"})
    return results


def columns(name: str, results: dict[str, Any]) -> dict[str, float | None]:
    """The challenge's table cells: each column's score (MMLU's categories from its one run)."""
    key = "pass@1" if name == "code" else "accuracy"
    return {c: results["mmlu"][c] if c in MMLU_CATEGORIES else results[c][key] for c in challenge(name).columns}


def communication_mb(checkpoint: Path) -> float | None:
    """MB (2**20 bytes, as the board's tracker counts) sent and received up to the checkpoint's round, from
    its run's ``metrics.jsonl``; None when the checkpoint is not ``<run>/checkpoints/round-N`` of a run.
    """
    match = re.fullmatch(r"round-(\d+)", checkpoint.name)
    metrics = checkpoint.parent.parent / "metrics.jsonl"
    if not match or checkpoint.parent.name != "checkpoints" or not metrics.is_file():
        return None
    upto = int(match.group(1))
    total = None
    for line in metrics.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if "bytes_sent_total" in row and int(row.get("round", 0)) <= upto:
            total = row["bytes_sent_total"] + row.get("bytes_received_total", 0)
    return None if total is None else total / 2**20


def leaderboard_row(
    name: str, results: dict[str, Any], cfg: Any, checkpoint: Path, evaluated: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The board's row: base model, each column, their mean, communication, and whether it may be an entry
    (trained as the board fixes, within its budget, and ``evaluated`` as it evaluates: every row of the board's
    benchmarks, the base model in its 4-bit).
    """
    cells = columns(name, results)
    scored = [v for v in cells.values() if v is not None]
    comm = communication_mb(checkpoint)
    void = challenge_deviations(cfg) if cfg.get("challenge") else ["the run was not started with challenge=" + name]
    if cfg.get("challenge") and cfg.challenge.name != name:
        void = [f"the run was trained for challenge={cfg.challenge.name}"]
    if comm is not None and comm > BOARD_BUDGET_MB:
        void.append(f"the run used {comm:,.0f} MB, above the board's {BOARD_BUDGET_MB:,} MB budget")
    void += evaluation_deviations(evaluated or {})
    return {
        "challenge": name,
        "base_model": str(cfg.model.name),
        "columns": cells,
        "average": sum(scored) / len(scored) if len(scored) == len(cells) else None,
        "communication_mb": comm,
        "eligible": not void,
        "not_eligible_because": void,
        "metric": challenge(name).metric,
    }


def evaluation_deviations(evaluated: dict[str, Any]) -> list[str]:
    """Why an evaluation is not the board's: a row limit, local benchmark files, another quantisation."""
    out = []
    if evaluated.get("limit"):
        out.append(f"scored on the first {evaluated['limit']} rows of each benchmark (--limit)")
    if evaluated.get("data_dir"):
        out.append(f"scored on local benchmark files ({evaluated['data_dir']}), not the board's")
    if "eval_quantization" in evaluated and evaluated["eval_quantization"] != BOARD_QUANTIZATION:
        out.append(
            f"the base model was evaluated with model.quantization={evaluated['eval_quantization']}, not the board's "
            f"4-bit ({BOARD_QUANTIZATION}, a CUDA GPU)"
        )
    return out


def row_markdown(row: dict[str, Any]) -> str:
    """The row as a one-line Markdown table, in the board's column order."""

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    names = {"stem": "STEM", "social_sciences": "Social Sciences", "humanities": "Humanities", "fpb": "FPB"}
    names |= {"fiqa": "FiQA", "tfns": "TFNS", "pubmedqa": "PubMedQA", "medmcqa": "MedMCQA", "medqa": "MedQA"}
    names |= {"careqa": "CareQA", "mbpp": "MBPP", "humaneval": "HumanEval", "multiple_js": "MultiPL-E (JS)"}
    names |= {"multiple_cpp": "MultiPL-E (C++)"}
    head = ["Base model", "Comm. costs (MB)", *(names[c] for c in row["columns"]), "Average"]
    comm = "-" if row["communication_mb"] is None else f"{row['communication_mb']:,.0f}"
    values = [row["base_model"], comm, *(cell(v) for v in row["columns"].values()), cell(row["average"])]
    table = f"| {' | '.join(head)} |\n|{'---|' * len(head)}\n| {' | '.join(values)} |\n"
    why = "" if row["eligible"] else f"\nNot a leaderboard entry: {'; '.join(row['not_eligible_because'])}.\n"
    return f"FlowerTune LLM leaderboard, {BOARD[row['challenge']].title} ({row['metric']}):\n\n{table}{why}"


def write_row(out_dir: Path, row: dict[str, Any], results: dict[str, Any], meta: dict[str, Any]) -> Path:
    """``<out_dir>/leaderboard-<challenge>.md`` (the row) and ``.json`` (the row, every metric, provenance)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"leaderboard-{row['challenge']}"
    stem.with_suffix(".json").write_text(json.dumps({**meta, "row": row, "benchmarks": results}, indent=2))
    md = stem.with_suffix(".md")
    md.write_text(row_markdown(row))
    return md
