"""Open-ended chat: MT-Bench (two turns) and the Vicuna benchmark, graded 1-10 by an LLM judge.

Answers are generated at each question category's temperature (MT-Bench's table; other categories 0.7),
turn by turn for MT-Bench, saved to ``<bench>_answers.jsonl`` and, when a judge is configured, graded through
:class:`evaluation.judge.JudgeClient`. Malformed judgements are counted and listed, not scored.
"""

from __future__ import annotations

import json
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from evaluation.generation import Generator
from evaluation.judge import PROTOCOL as JUDGE_PROTOCOL
from evaluation.judge import REFERENCE_CATEGORIES, JudgeClient
from evaluation.sources import Source

VICUNA_URL = (
    "https://raw.githubusercontent.com/lm-sys/FastChat/main/fastchat/llm_judge/data/vicuna_bench/question.jsonl"
)
SOURCES = {
    "mt_bench": Source("mt_bench", "HuggingFaceH4/mt_bench_prompts", None, "train", ("prompt", "category")),
    "vicuna": Source("vicuna", VICUNA_URL, None, "train", ("question_id", "category", "turns")),
}
TEMPERATURES = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
}
DEFAULT_TEMPERATURE = 0.7
PROTOCOL = JUDGE_PROTOCOL


def to_item(bench: str, row: dict) -> dict[str, Any]:
    """``{"id", "category", "turns", "reference"}`` from a row of either benchmark."""
    if bench == "mt_bench":
        ref = row.get("reference") or []
        return {
            "id": row.get("prompt_id"),
            "category": row["category"],
            "turns": list(row["prompt"]),
            "reference": list(ref) if any(ref) else None,  # per turn; "" where a turn has none
        }
    return {"id": row["question_id"], "category": row["category"], "turns": list(row["turns"]), "reference": None}


def generate_answers(gen: Generator, items: list[dict], max_new_tokens: int, turns: int) -> list[list[str]]:
    """Each item's answers, turn by turn; items of one category share a batch and a temperature."""
    answers: list[list[str]] = [[] for _ in items]
    by_category: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        by_category[it["category"]].append(i)
    for category, idx in sorted(by_category.items()):
        temp = TEMPERATURES.get(category, DEFAULT_TEMPERATURE)
        for t in range(turns):
            live = [i for i in idx if t < len(items[i]["turns"])]
            prompts = [gen.conversation(items[i]["turns"][: t + 1], answers[i]) for i in live]
            outs = gen.generate(prompts, max_new_tokens=max_new_tokens, temperature=temp, desc=f"{category} t{t + 1}")
            for i, out in zip(live, outs, strict=True):
                answers[i].append(out.strip())
    return answers


def _judge(judge: JudgeClient, it: dict, ans: list[str], turn: int) -> tuple[float | None, str]:
    """FastChat's grading of answer ``turn``: against the reference answers in the categories that have them."""
    refs = it["reference"] if it["category"] in REFERENCE_CATEGORIES and it["reference"] else None
    if turn == 0:
        return judge.grade(it["turns"][0], ans[0], refs[0] if refs else None)
    return judge.grade_second_turn(it["turns"][:2], ans[:2], refs)


def evaluate(
    gen: Generator,
    bench: str,
    rows: list[dict],
    judge: JudgeClient | None,
    out_dir: Path,
    max_new_tokens: int = 512,
) -> dict[str, Any]:
    """Generate, save and (with a judge) grade; mean score overall, per turn and per category."""
    items = [to_item(bench, r) for r in rows]
    turns = 2 if bench == "mt_bench" else 1
    answers = generate_answers(gen, items, max_new_tokens, turns)
    jobs = [(i, t) for i, ans in enumerate(answers) for t in range(len(ans))] if judge else []
    with ThreadPoolExecutor(max_workers=judge.cfg.workers if judge else 1) as pool:
        graded = dict(zip(jobs, pool.map(lambda j: _judge(judge, items[j[0]], answers[j[0]], j[1]), jobs), strict=True))
    records, scores = [], defaultdict(list)
    malformed = []
    for i, (it, ans) in enumerate(zip(items, answers, strict=True)):
        rec = {**it, "answers": ans, "scores": [], "judgements": []}
        for t in range(len(ans) if judge else 0):
            score, text = graded[(i, t)]
            rec["scores"].append(score)
            rec["judgements"].append(text)
            if score is None:
                malformed.append({"id": it["id"], "turn": t + 1, "judgement": text[-300:]})
                continue
            for key in ("score", f"score_turn{t + 1}", f"score/{it['category']}"):
                scores[key].append(score)
        records.append(rec)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{bench}_answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    metrics: dict[str, Any] = {k: sum(v) / len(v) for k, v in sorted(scores.items())}
    metrics.update(n=len(items), answers_file=str(path), judged=len(scores.get("score", [])))
    if judge is None:
        metrics["note"] = "answers only: set judge.base_url and judge.model to grade them"
    else:
        metrics.update(malformed=len(malformed), malformed_judgements=malformed)
    return metrics
