r"""Multiple-choice knowledge and medical benchmarks: MMLU, MedQA, MedMCQA, PubMedQA and CareQA.

The headline ``accuracy`` is EleutherAI lm-evaluation-harness's ``mmlu`` protocol (:data:`PROTOCOL`): the
plain-text prompt ``<question>\nA. <option>\n...\nAnswer:`` (after MMLU's subject line and the solved
dev examples when few-shot, no chat template), and the option whose letter (`` A``, `` B``...) gets the highest
log-likelihood. ``tests/unit/evaluation/test_lm_eval_agreement.py`` checks the per-row choices against the
harness itself. Two more scores keep their own names: ``accuracy_option_text`` (and ``_norm``, per
character), the log-likelihood of each option's *text* after our templated prompt, and
``accuracy_generated_letter``, the letter the model writes. MMLU also reports each subject and the four
subject groups (STEM, humanities, social sciences, other) of the MMLU paper.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from evaluation.generation import Generator
from evaluation.pubmedqa_fold import select_pubids
from evaluation.sources import Source

LETTERS = string.ascii_uppercase
PROTOCOL = {
    "reference": "EleutherAI lm-evaluation-harness, task mmlu (output_type multiple_choice, acc)",
    "version": "lm-eval 0.4.13, mmlu task version 1.0",
    "headline": "accuracy: log-likelihood of ' A'/' B'/... after the harness's mmlu prompt",
    "other_metrics": "accuracy_option_text(_norm): option-text log-likelihood after our prompt; "
    "accuracy_generated_letter: the generated letter",
}
# The medical benchmarks are scored in the same form (without MMLU's subject line), not by lm-eval's own
# tasks of the same names, whose prompts differ.
PROTOCOLS = {
    name: {
        **PROTOCOL,
        "reference": f"EleutherAI lm-evaluation-harness mmlu form applied to {name} (not its {name} task)",
    }
    for name in ("medqa", "medmcqa", "pubmedqa", "careqa")
}

SOURCES = {
    "mmlu": Source(
        "mmlu", "cais/mmlu", "all", "test", ("question", "subject", "choices", "answer"), stratify="subject"
    ),
    "medqa": Source("medqa", "GBaker/MedQA-USMLE-4-options", None, "test", ("question", "options", "answer_idx")),
    "medmcqa": Source(
        "medmcqa", "openlifescienceai/medmcqa", None, "validation", ("question", "opa", "opb", "opc", "opd", "cop")
    ),
    "pubmedqa": Source(  # the 500 rows of the test set (bigbio's fold-0 test split), not all 1000 labelled ones
        "pubmedqa",
        "qiaojin/PubMedQA",
        "pqa_labeled",
        "train",
        ("question", "context", "final_decision"),
        select=select_pubids,
    ),
    "careqa": Source("careqa", "HPAI-BSC/CareQA", "CareQA_en", "test", ("question", "op1", "op2", "op3", "op4", "cop")),
}

# Solved examples for few-shot prompts (MMLU's dev split: 5 questions per subject); local file mmlu_dev.jsonl.
DEV_SOURCES = {"mmlu": Source("mmlu_dev", "cais/mmlu", "all", "dev", ("question", "subject", "choices", "answer"))}

_GROUPS = {
    "stem": "abstract_algebra astronomy college_biology college_chemistry college_computer_science "
    "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
    "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
    "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
    "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy prehistory "
    "professional_law world_religions",
    "social_sciences": "econometrics high_school_geography high_school_government_and_politics "
    "high_school_macroeconomics high_school_microeconomics high_school_psychology human_sexuality "
    "professional_psychology public_relations security_studies sociology us_foreign_policy",
    "other": "anatomy business_ethics clinical_knowledge college_medicine global_facts human_aging management "
    "marketing medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology",
}
MMLU_GROUP = {subject: group for group, names in _GROUPS.items() for subject in names.split()}


@dataclass(frozen=True)
class Item:
    """One question: its text (with any context), the option texts, the gold index and its subject."""

    question: str
    options: tuple[str, ...]
    gold: int
    subject: str | None = None


def to_item(bench: str, row: dict) -> Item:
    """The benchmark row as an :class:`Item`."""
    if bench == "mmlu":
        return Item(row["question"], tuple(row["choices"]), int(row["answer"]), row["subject"])
    if bench == "medqa":
        keys = sorted(row["options"])
        return Item(row["question"], tuple(row["options"][k] for k in keys), keys.index(row["answer_idx"]))
    if bench == "medmcqa":
        opts = tuple(row[k] for k in ("opa", "opb", "opc", "opd"))
        return Item(row["question"], opts, int(row["cop"]), row.get("subject_name"))
    if bench == "pubmedqa":
        context = "\n".join(row["context"]["contexts"])
        options = ("yes", "no", "maybe")
        return Item(f"{context}\n{row['question']}", options, options.index(row["final_decision"]))
    if bench == "careqa":
        opts = tuple(row[f"op{i}"] for i in range(1, 5))
        return Item(row["question"], opts, int(row["cop"]) - 1, row.get("category"))
    raise KeyError(bench)


def harness_prompt(item: Item, examples: list[Item] = (), bench: str = "mmlu") -> str:
    r"""lm-evaluation-harness's ``mmlu`` context: MMLU's subject line, the solved ``examples`` (each
    followed by `` <letter>``) and the question, each ``<question>\nA. <option>\n...\nAnswer:``.
    """
    about = f" about {item.subject.replace('_', ' ')}" if bench == "mmlu" and item.subject else ""
    head = f"The following are multiple choice questions (with answers){about}.\n\n" if bench == "mmlu" else ""
    shots = "".join(f"{_harness_question(ex)} {LETTERS[ex.gold]}\n\n" for ex in examples)
    return head + shots + _harness_question(item)


def _harness_question(item: Item) -> str:
    lines = [item.question.strip()] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(item.options)]
    return "\n".join(lines) + "\nAnswer:"


def harness_choices(gen: Generator, items: list[Item], examples: list[list[Item]], bench: str) -> list[int]:
    """Each item's chosen option under the harness protocol: the letter with the highest log-likelihood."""
    prompts = [harness_prompt(it, ex, bench) for it, ex in zip(items, examples, strict=True)]
    pairs = [(p, f" {LETTERS[i]}") for p, it in zip(prompts, items, strict=True) for i in range(len(it.options))]
    scores = gen.harness_loglikelihoods(pairs, desc=f"{bench} letters (harness)")
    out, k = [], 0
    for it in items:
        s = scores[k : k + len(it.options)]
        k += len(it.options)
        out.append(_argmax(s))
    return out


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def question_block(item: Item, examples: list[Item] = ()) -> str:
    """The question with lettered options and the answer instruction (our wording), after any solved
    ``examples`` (few-shot).
    """
    shots = "".join(_lettered(ex) + f"\nAnswer: {LETTERS[ex.gold]}\n\n" for ex in examples)
    if examples and item.subject:
        shots = f"Here are solved questions about {item.subject.replace('_', ' ')}.\n\n{shots}"
    return shots + _lettered(item) + "\nAnswer with the letter of the correct option."


def _lettered(item: Item) -> str:
    return "\n".join([f"Question: {item.question}"] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(item.options)])


def few_shot_examples(items: list[Item], dev_rows: list[dict], bench: str, shots: int) -> list[list[Item]]:
    """For each item, the first ``shots`` dev items of its subject (MMLU's dev split has 5 per subject)."""
    by_subject: dict[str | None, list[Item]] = defaultdict(list)
    for row in dev_rows:
        dev = to_item(bench, row)
        by_subject[dev.subject].append(dev)
    out = []
    for it in items:
        pool = by_subject.get(it.subject, [])
        if len(pool) < shots:
            raise ValueError(
                f"{bench}: {shots}-shot needs {shots} dev questions of subject {it.subject!r}; "
                f"the dev data has {len(pool)}"
            )
        out.append(pool[:shots])
    return out


def extract_letter(text: str, options: tuple[str, ...]) -> int | None:
    """The option index a generated answer names, or None.

    Understands ``B``, ``(b)``, ``C.``, ``**D**``, ``The answer is (A)``, ``Answer: C`` and an answer that
    repeats exactly one option's text; a capital ``A``/``I`` used as a word is not taken for a letter
    unless it stands alone or in an answer phrase.
    """
    valid = LETTERS[: len(options)]
    t = text.strip()
    phrase = re.search(rf"[Aa]nswer\s*(?:[Ii]s\s*:?|:)?\s*(?:[Oo]ption\s*)?[\(\[*]*([{valid}])\b", t)
    if phrase:
        return valid.index(phrase.group(1))
    lead = re.match(rf"^[\s*\(\[]*([{valid}{valid.lower()}])(?:[\)\].:*,]|\s*$|\s+[-–:]|\s+{_OPT_START})", t)
    if lead:
        return valid.index(lead.group(1).upper())
    marked = re.findall(rf"[\(\[]([{valid}])[\)\]]|\*\*([{valid}])\*\*", t)
    letters = {a or b for a, b in marked}
    if len(letters) == 1:
        return valid.index(letters.pop())
    said = [i for i, opt in enumerate(options) if opt.strip() and opt.strip().lower() in t.lower()]
    return said[0] if len(said) == 1 else None


_OPT_START = r"[A-Z0-9]"


def evaluate(
    gen: Generator, bench: str, rows: list[dict], shots: int = 0, dev_rows: list[dict] | None = None
) -> dict[str, Any]:
    """Harness (headline), option-text and generated-letter accuracy (MMLU: also per subject and subject
    group), zero-shot or with ``shots`` solved examples per question from ``dev_rows``.
    """
    items = [to_item(bench, r) for r in rows]
    examples = few_shot_examples(items, dev_rows or [], bench, shots) if shots else [[] for _ in items]
    chosen = harness_choices(gen, items, examples, bench)
    prompts = [gen.prompt(question_block(it, ex)) for it, ex in zip(items, examples, strict=True)]
    pairs = [(p, opt) for p, it in zip(prompts, items, strict=True) for opt in it.options]
    scores = gen.loglikelihoods(pairs, desc=f"{bench} options")
    answers = gen.generate(prompts, max_new_tokens=24, desc=f"{bench} letters")
    hits: dict[str, list[float]] = defaultdict(list)
    unparsed, k = 0, 0
    for it, pick, answer in zip(items, chosen, answers, strict=True):
        s = scores[k : k + len(it.options)]
        k += len(it.options)
        norm = [v / max(len(o), 1) for v, o in zip(s, it.options, strict=True)]
        letter = extract_letter(answer, it.options)
        unparsed += letter is None
        row = {
            "accuracy": float(pick == it.gold),
            "accuracy_option_text": float(_argmax(s) == it.gold),
            "accuracy_option_text_norm": float(_argmax(norm) == it.gold),
            "accuracy_generated_letter": float(letter == it.gold),
        }
        for key, value in row.items():
            hits[key].append(value)
            if bench == "mmlu":
                hits[f"{key}/{MMLU_GROUP.get(it.subject, 'other')}"].append(value)
                hits[f"{key}/subject/{it.subject}"].append(value)
    metrics: dict[str, Any] = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    metrics.update(unparsed_letter=unparsed, n=len(items), shots=shots)
    return metrics
