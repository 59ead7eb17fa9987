"""An LLM judge over any OpenAI-compatible chat-completions endpoint, with retries and an on-disk cache.

The judge is asked (in our wording) for MT-Bench's single-answer grading form: a short explanation, then a
1-10 score written ``[[rating]]``. A reply without a readable score is reported as malformed (its text is
kept), never scored as 0. Replies are cached on disk keyed by the full request, so a rerun sends nothing.
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

SYSTEM = (
    "You are an impartial, careful grader of AI assistant answers. You judge helpfulness, relevance, "
    "accuracy, depth, creativity and level of detail, and you are not swayed by length or style."
)
SINGLE = (
    "Grade the assistant's answer to the user's question.{reference}\n\n"
    "[Question]\n{question}\n\n[Assistant's answer]\n{answer}\n\n"
    "First explain your assessment in a few sentences. Then give the score, an integer from 1 (useless) to "
    "10 (excellent), written in double square brackets exactly like this: [[7]]"
)
SECOND_TURN = (
    "Below is a two-turn conversation. Grade only the assistant's SECOND answer, in the light of the whole "
    "conversation.{reference}\n\n[First question]\n{q1}\n\n[Assistant's first answer]\n{a1}\n\n"
    "[Second question]\n{q2}\n\n[Assistant's second answer]\n{a2}\n\n"
    "First explain your assessment in a few sentences. Then give the score, an integer from 1 (useless) to "
    "10 (excellent), written in double square brackets exactly like this: [[7]]"
)
REFERENCE = "\nA reference answer is given; judge correctness against it.\n\n[Reference answer]\n{reference}"
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


def parse_rating(text: str) -> float | None:
    """The 1-10 score of a judgement: the last ``[[x]]`` (also ``[[x/10]]``, ``[[ 8.5 ]]``), else a lone ``[x]``;
    None if there is none or it is out of range.
    """
    found = re.findall(r"\[\[\s*(\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?\]\]", text)
    if not found:
        found = re.findall(r"(?:rating|score)[^\[\n]{0,20}\[\s*(\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?\]", text, re.I)
    if not found:
        return None
    value = float(found[-1])
    return value if 1 <= value <= 10 else None


class JudgeClient:
    """Sends grading prompts to the endpoint; caches every successful reply on disk."""

    def __init__(self, cfg: JudgeConfig) -> None:
        self.cfg = cfg
        self.cache = Path(cfg.cache_dir).expanduser()
        self.requests_sent = 0
        self.cache_hits = 0
        self._lock = threading.Lock()

    def _payload(self, prompt: str) -> dict[str, Any]:
        return {
            "model": self.cfg.model,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
        }

    def complete(self, prompt: str) -> str:
        """The judge's reply text for ``prompt`` (from the cache if this exact request was answered)."""
        payload = self._payload(prompt)
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

    def grade(self, question: str, answer: str, reference: str | None = None) -> tuple[float | None, str]:
        """(score or None if malformed, judgement text) for a single-turn answer."""
        ref = REFERENCE.format(reference=reference) if reference else ""
        text = self.complete(SINGLE.format(reference=ref, question=question, answer=answer))
        return parse_rating(text), text

    def grade_second_turn(
        self, questions: list[str], answers: list[str], reference: str | None = None
    ) -> tuple[float | None, str]:
        """(score or None, judgement text) for the second answer of a two-turn conversation."""
        ref = REFERENCE.format(reference=reference) if reference else ""
        text = self.complete(
            SECOND_TURN.format(reference=ref, q1=questions[0], a1=answers[0], q2=questions[1], a2=answers[1])
        )
        return parse_rating(text), text
