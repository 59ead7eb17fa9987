"""An LLM judge over any OpenAI-compatible chat-completions endpoint, with retries and an on-disk cache.

The judge gets FastChat's MT-Bench single-answer grading prompts (:data:`PROTOCOL`): ``single-v1``, or
``single-math-v1`` with the reference answer for the categories FastChat grades against one, and their
``-multi-turn`` forms for a second turn. They are read at run time from FastChat's published
``judge_prompts.jsonl`` (:data:`PROMPTS_SOURCE`), or from ``judge_prompts.jsonl`` under ``--data-dir``, as the
questions are; nothing of their wording is stored here. The score is the rating the judgement ends with
(:func:`parse_rating`); a reply without one is reported as malformed (its text is kept), never scored as 0.
Replies are cached on disk keyed by the full request, so a rerun sends nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.documented import documented
from evaluation.sources import DataSourceError, Source, load_benchmark

PROMPTS_URL = "https://raw.githubusercontent.com/lm-sys/FastChat/main/fastchat/llm_judge/data/judge_prompts.jsonl"
PROMPTS_SOURCE = Source(
    "judge_prompts", PROMPTS_URL, None, "train", ("name", "type", "system_prompt", "prompt_template")
)
PROMPT_NAMES = ("single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn")
# MT-Bench categories FastChat grades against a reference answer (NEED_REF_CATS in its common.py).
REFERENCE_CATEGORIES = ("math", "reasoning", "coding", "arena-hard-200")
PROTOCOL = {
    "reference": "FastChat llm_judge (MT-Bench single-answer grading: single-v1, single-math-v1, -multi-turn)",
    "version": "judge_prompts.jsonl of lm-sys/FastChat main, read at run time; score = the final rating",
}
RETRY_STATUS = (408, 409, 425, 429, 500, 502, 503, 504)


class JudgeError(RuntimeError):
    """The judge endpoint failed for good (after retries, or a non-transient error)."""


@documented
@dataclass
class JudgeConfig:
    """How to reach the judge (``fedllm-eval``'s ``--judge-*`` flags)."""

    base_url: str = field(
        metadata={
            "help": "OpenAI-compatible API root, e.g. https://api.openai.com/v1 or http://localhost:8000/v1 "
            "(/chat/completions is appended)."
        }
    )
    model: str = field(metadata={"help": "Judge model name sent in each request."})
    api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata={"help": "Environment variable holding the API key; no Authorization header is sent if it is unset."},
    )
    cache_dir: str = field(
        default="~/.cache/fedllm/judge", metadata={"help": "Folder of cached replies (one JSON file per request)."}
    )
    retries: int = field(
        default=4,
        metadata={
            "help": "Extra attempts after a transient failure (HTTP 408/409/425/429/5xx, connection errors, timeouts)."
        },
    )
    backoff: float = field(default=2.0, metadata={"help": "Seconds before the first retry, doubled each time."})
    timeout: float = field(default=120.0, metadata={"help": "Seconds per HTTP request."})
    temperature: float = field(
        default=0.0, metadata={"help": "Sampling temperature of the judge (0: deterministic grading)."}
    )
    max_tokens: int = field(default=1024, metadata={"help": "Longest judgement, in tokens."})
    workers: int = field(default=8, metadata={"help": "Judge requests in flight at once."})


def load_prompts(data_dir: str | Path | None = None) -> dict[str, dict[str, str]]:
    """FastChat's judge prompts by name (from ``data_dir``'s ``judge_prompts.jsonl`` if given, else from
    FastChat's published file); the four single-answer prompts must be there.
    """
    rows, origin = load_benchmark(PROMPTS_SOURCE, data_dir)
    prompts = {r["name"]: r for r in rows}
    missing = [name for name in PROMPT_NAMES if name not in prompts]
    if missing:
        raise DataSourceError(
            f"judge prompts at {origin['location']} lack {missing}; give FastChat's judge_prompts.jsonl ({PROMPTS_URL})"
        )
    return prompts


_NUM = r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?"
_LABEL = r"\b(?:rating|score)\b\s*(?:is|of)?\s*:?\s*"
# [[x]] anywhere; "Rating: [x]" anywhere; "Rating: x" only as the judgement's last words.
_RATING = re.compile(rf"\[\[{_NUM}\]\]|{_LABEL}\[{_NUM}\]|{_LABEL}(\d+(?:\.\d+)?)\s*(?:/\s*10)?\W*$", re.I)


def parse_rating(text: str) -> float | None:
    """The 1-10 rating a judgement ends with: the last ``[[x]]`` (also ``[[x/10]]``, ``[[ 8.5 ]]``) or
    ``Rating: [x]`` / ``Rating: x`` in the text, whichever comes last, so a ``[[x]]`` the judge quotes
    earlier does not count; None if there is none or it is out of range.
    """
    found = [next(g for g in groups if g) for groups in _RATING.findall(text.strip())]
    if not found:
        return None
    value = float(found[-1])
    return value if 1 <= value <= 10 else None


class JudgeClient:
    """Sends grading prompts to the endpoint; caches every successful reply on disk."""

    def __init__(self, cfg: JudgeConfig, prompts: dict[str, dict[str, str]]) -> None:
        self.cfg = cfg
        self.prompts = prompts
        self.cache = Path(cfg.cache_dir).expanduser()
        self.requests_sent = 0
        self.cache_hits = 0
        self._lock = threading.Lock()

    def _payload(self, system: str, prompt: str) -> dict[str, Any]:
        return {
            "model": self.cfg.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
        }

    def complete(self, system: str, prompt: str) -> str:
        """The judge's reply text for ``prompt`` after ``system`` (from the cache if this exact request was
        answered).
        """
        payload = self._payload(system, prompt)
        key = hashlib.sha256(json.dumps([self.cfg.base_url, payload], sort_keys=True).encode()).hexdigest()
        path = self.cache / f"{key}.json"
        if path.is_file():
            with self._lock:
                self.cache_hits += 1
            return json.loads(path.read_text())["reply"]
        reply = self._post(payload)
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({"request": payload, "reply": reply}))
        tmp.replace(path)
        return reply

    def _post(self, payload: dict[str, Any]) -> str:
        url = self.cfg.base_url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.cfg.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        body = json.dumps(payload).encode()
        delay, last = self.cfg.backoff, ""
        for attempt in range(self.cfg.retries + 1):
            with self._lock:
                self.requests_sent += 1
            try:
                req = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.cfg.timeout) as resp:
                    data = json.loads(resp.read().decode())
                return data["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as err:
                last = f"HTTP {err.code} {err.read()[:200]!r}"
                if err.code not in RETRY_STATUS:
                    raise JudgeError(
                        f"judge at {url} refused the request: {last}; check judge.model and the key "
                        f"in ${self.cfg.api_key_env}"
                    ) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                last = f"{type(err).__name__}: {err}"
            except (KeyError, IndexError, json.JSONDecodeError) as err:
                raise JudgeError(f"judge at {url} did not answer in chat-completions format: {err!r}") from None
            if attempt < self.cfg.retries:
                time.sleep(delay)
                delay *= 2
        raise JudgeError(f"judge at {url} failed {self.cfg.retries + 1} times; last error: {last}")

    def judged(self, name: str, **fields: str) -> tuple[float | None, str]:
        """(rating or None if malformed, judgement text) with FastChat's prompt ``name`` filled with ``fields``."""
        prompt = self.prompts[name]
        text = self.complete(prompt["system_prompt"], prompt["prompt_template"].format(**fields))
        return parse_rating(text), text

    def grade(self, question: str, answer: str, reference: str | None = None) -> tuple[float | None, str]:
        """A single-turn answer, by ``single-math-v1`` when a reference answer is given, else ``single-v1``."""
        if reference:
            return self.judged("single-math-v1", question=question, answer=answer, ref_answer_1=reference)
        return self.judged("single-v1", question=question, answer=answer)

    def grade_second_turn(
        self, questions: list[str], answers: list[str], references: list[str] | None = None
    ) -> tuple[float | None, str]:
        """The second answer of a two-turn conversation, by ``single-math-v1-multi-turn`` with both turns'
        reference answers, else ``single-v1-multi-turn``.
        """
        turns = {"question_1": questions[0], "answer_1": answers[0], "question_2": questions[1], "answer_2": answers[1]}
        if references and any(references):
            refs = {"ref_answer_1": references[0], "ref_answer_2": references[1] if len(references) > 1 else ""}
            return self.judged("single-math-v1-multi-turn", **turns, **refs)
        return self.judged("single-v1-multi-turn", **turns)
