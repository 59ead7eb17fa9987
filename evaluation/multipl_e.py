"""The FlowerTune Code challenge's four tasks as bigcode-evaluation-harness poses them: MBPP, HumanEval and
MultiPL-E's HumanEval in JavaScript and C++.

Each task is a completion prompt, the stop words its completion is cut at, a total generation length, and
how the program and its tests are put together and run. Python runs in the sandbox's Python runner
(:func:`evaluation.sandbox.run_program`); JavaScript and C++ run in the same sandbox as native programs
(:func:`evaluation.sandbox.run_native`): ``node program.js``; ``g++ program.cpp -o program -std=c++17`` then
``./program``. A program passes when every step exits 0 (MultiPL-E's tests are assertions). ``node`` and
``g++`` come from Debian's packages ``nodejs`` and ``g++`` (the sandbox sees ``/usr`` only).

Rows: ``nuprl/MultiPL-E`` at the Hub's main revision, not the one the board reads. The board runs a fork of
bigcode-evaluation-harness under ``datasets`` 2.20; the harness pins :data:`BIGCODE_REVISION`, a revision of
the dataset that is only a loading script (it downloads the prompts from the MultiPL-E GitHub repository), which
``datasets`` >= 4 does not run, and no readable copy of that revision exists on the Hub. Since MultiPL-E 3.0
(July 2024) main holds the rows as Parquet. What may differ: the prompts' doctest variant (3.0 keeps one per
language, where the script also offered ``-keep``/``-remove``/``-transform``) and problems fixed since; the
columns, the stop tokens and the test harness are the same. docs/flowertune.md says so beside the scores.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass

from evaluation.sandbox import SandboxResult, run_native
from evaluation.sources import Source
from fedllm_app.config import ConfigError

_MULTIPLE_COLUMNS = ("name", "prompt", "tests", "stop_tokens")
# The nuprl/MultiPL-E revision bigcode-evaluation-harness (hence the board) loads; a loading script only (above).
BIGCODE_REVISION = "8a4cb75204eb3d5855a81778db6b95bfc80c9136"
SOURCES = {
    "multiple_js": Source("multiple_js", "nuprl/MultiPL-E", "humaneval-js", "test", _MULTIPLE_COLUMNS),
    "multiple_cpp": Source("multiple_cpp", "nuprl/MultiPL-E", "humaneval-cpp", "test", _MULTIPLE_COLUMNS),
}
# Where a missing compiler or interpreter comes from (Debian package names).
TOOLS = {"multiple_js": ("node", "nodejs"), "multiple_cpp": ("g++", "g++")}
FILE_SEPARATOR = "<file_sep>"  # bigcode adds it to every task's stop words


@dataclass(frozen=True)
class CodeTask:
    """One code benchmark as bigcode poses it.

    Attributes
    ----------
    language : str
        ``python``, ``js`` or ``cpp``.
    max_length : int
        Prompt and completion together, in tokens (bigcode's ``--max_length_generation``: the board's README
        asks 1024, 2048 for MBPP).
    prompt : Callable[[dict], str]
        The text the model continues.
    stop_words : tuple[str, ...]
        The task's fixed stop words; MultiPL-E rows carry their own (``stop_tokens``) as well.
    """

    language: str
    max_length: int
    prompt: Callable[[dict], str]
    stop_words: tuple[str, ...] = ()

    def stop(self, row: dict) -> list[str]:
        """The stop words of ``row``: the task's, the row's own ``stop_tokens``, and the file separator."""
        return [*self.stop_words, *(row.get("stop_tokens") or []), FILE_SEPARATOR]

    def program(self, row: dict, prompt: str, completion: str) -> tuple[str, str]:
        """``(code, tests)`` of a Python task: the prompt and its completion, then the task's tests."""
        code = prompt + completion
        if "entry_point" in row:  # HumanEval
            return code + "\n", f"{row['test']}\ncheck({row['entry_point']})\n"
        return code + "\n", "\n".join(row["test_list"]) + "\n"  # MBPP


def mbpp_prompt(row: dict) -> str:
    """The MBPP prompt of bigcode: the description and the first test in a docstring."""
    return f'"""\n{row["text"]}\n{row["test_list"][0]}\n"""\n'


TASKS: dict[str, CodeTask] = {
    "mbpp": CodeTask(
        "python", 2048, mbpp_prompt, ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```")
    ),
    "humaneval": CodeTask(
        "python",
        1024,
        lambda row: row["prompt"].strip(),
        ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```"),
    ),
    "multiple_js": CodeTask("js", 1024, lambda row: row["prompt"].strip()),
    "multiple_cpp": CodeTask("cpp", 1024, lambda row: row["prompt"].strip()),
}


def stop_at(text: str, stop_words: list[str]) -> str:
    """``text`` up to the first of ``stop_words`` in it (all of it if none occurs)."""
    cut = min((i for i in (text.find(w) for w in stop_words if w) if i != -1), default=len(text))
    return text[:cut]


def native_job(language: str, source: str) -> tuple[dict[str, str], list[list[str]]]:
    """``(files, steps)`` that build and run a JavaScript or C++ program in the sandbox."""
    if language == "js":
        return {"program.js": source}, [["node", "program.js"]]
    if language == "cpp":
        return {"program.cpp": source}, [["g++", "program.cpp", "-o", "program", "-std=c++17"], ["./program"]]
    raise KeyError(language)


def require_tools(bench: str) -> None:
    """Fail with the Debian package to install when ``bench`` needs a compiler or interpreter not on /usr/bin."""
    if bench not in TOOLS:
        return
    tool, package = TOOLS[bench]
    if shutil.which(tool, path="/usr/bin:/bin") is None:
        raise ConfigError(f"{bench} needs {tool}, which is not installed: apt-get install -y {package}")


def run(task: CodeTask, row: dict, program: str, timeout: float, backend: str) -> SandboxResult:
    """The program (prompt and completion) followed by the row's tests, built and run in the sandbox."""
    files, steps = native_job(task.language, f"{program}\n{row['tests']}")
    return run_native(files, steps, timeout=timeout, backend=backend, allow_weak=True)
