"""The dataset catalogue: load a Hub dataset or a local file and map it to fedllm's rows.

Every ``conf/dataset/<name>.yaml`` names a Hub id (``hub_id``, ``subset``, ``split``),
a ``format`` (how its columns map to one prompt/response form, as OpenFedLLM and
FlowerTune map them) and ``columns`` (the format's column names, overridable for a
custom file: ``dataset.columns.instruction=question``). ``dataset.path`` loads the
same data from disk instead: json, jsonl, csv, parquet, or a folder saved with
``datasets``' ``save_to_disk``.

Rows come out as plain dicts:

- SFT: ``{"instruction": str, "response": str, "domain": str, ...}``
- DPO: ``{"prompt": [{"role", "content"}, ...], "chosen": str, "rejected": str, "domain": str, ...}``

plus the source's other scalar columns (so ``partition.by=<column>`` can use them).
"""

from __future__ import annotations

import codecs
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedllm_app.config import ConfigError
from fedllm_app.data.rows import Row

log = logging.getLogger("fedllm")
Mapper = Callable[[dict[str, Any]], Row | None]
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _join(first: Any, second: Any) -> str:
    """OpenFedLLM's ``instruction + " " + input`` (just the instruction when the input is empty)."""
    a, b = _text(first), _text(second)
    return f"{a} {b}" if b else a


def _sft(instruction: str, response: str) -> Row:
    return {"instruction": instruction, "response": response}


def parse_hh(text: str) -> list[dict[str, str]]:
    """Split an Anthropic/hh-rlhf string (Human/Assistant turns, each after a blank line) into chat turns."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError("not in the '\\n\\nHuman: ...\\n\\nAssistant: ...' form")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2], strict=True)]


def hh_pair(chosen: str, rejected: str) -> Row:
    """The shared conversation prefix becomes the prompt; chosen/rejected are the diverging final replies."""
    c, r = parse_hh(chosen), parse_hh(rejected)
    if c[:-1] != r[:-1] or c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
        raise ValueError("chosen and rejected do not share the conversation up to a final Assistant reply")
    return {"prompt": c[:-1], "chosen": c[-1]["content"], "rejected": r[-1]["content"]}


def message_pair(chosen: list[dict[str, str]], rejected: list[dict[str, str]]) -> Row:
    """ultrafeedback_binarized: message lists whose last assistant message differs."""
    c = [{"role": m["role"], "content": m["content"]} for m in chosen]
    r = [{"role": m["role"], "content": m["content"]} for m in rejected]
    if c[:-1] != r[:-1] or c[-1]["role"] != "assistant":
        raise ValueError("chosen and rejected do not share the conversation up to a final assistant message")
    return {"prompt": c[:-1], "chosen": c[-1]["content"], "rejected": r[-1]["content"]}


def _custom(r: dict[str, Any]) -> Row:
    prompt = _text(r.get("prompt"))
    if r.get("chosen") is not None or r.get("rejected") is not None:
        return {
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": _text(r["chosen"]),
            "rejected": _text(r["rejected"]),
        }
    return _sft(prompt, _text(r.get("response")))


# format -> (the columns it reads, the row mapper). OpenFedLLM (utils/process_dataset.py) joins
# instruction and input for the alpaca family; FlowerTune's reformat() differs per challenge.
FORMATS: dict[str, tuple[tuple[str, ...], Mapper]] = {
    "alpaca": (
        ("instruction", "input", "output"),
        lambda r: _sft(_join(r["instruction"], r["input"]), _text(r["output"])),
    ),
    "instruction_output": (("instruction", "output"), lambda r: _sft(_text(r["instruction"]), _text(r["output"]))),
    "question_answer": (("question", "answer"), lambda r: _sft(_text(r["question"]), _text(r["answer"]))),
    "problem_solution": (("problem", "solution"), lambda r: _sft(_text(r["problem"]), _text(r["solution"]))),
    "flowertune_general": (("instruction", "output"), lambda r: _sft(_text(r["instruction"]), _text(r["output"]))),
    "flowertune_joined": (
        ("instruction", "input", "output"),
        lambda r: _sft(_join(r["instruction"], r["input"]), _text(r["output"])),
    ),
    "flowertune_medical": (("input", "output"), lambda r: _sft(_text(r["input"]), _text(r["output"]))),
    "hh_rlhf": (("chosen", "rejected"), lambda r: hh_pair(_text(r["chosen"]), _text(r["rejected"]))),
    "messages_pair": (("chosen", "rejected"), lambda r: message_pair(r["chosen"], r["rejected"])),
    "custom": (("prompt", "response", "chosen", "rejected"), _custom),
}
TASK_OF_FORMAT = {"hh_rlhf": "dpo", "messages_pair": "dpo"}


@dataclass
class LoadReport:
    """What loading kept and dropped, logged once by the process that loads."""

    source: str
    loaded: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n

    def line(self, kept: int) -> str:
        drops = "; ".join(f"{n} dropped: {why}" for why, n in self.dropped.items())
        return f"dataset {self.source}: {self.loaded} rows read, {kept} kept" + (f" ({drops})" if drops else "")


def source_name(d: DictConfig, path: str | None = None) -> str:
    where = path or d.get("path")
    return f"'{where}'" if where else f"{d.hub_id!r} (Hub)"


def read_raw(d: DictConfig, path: str | None = None) -> Any:
    """The source as a ``datasets.Dataset``: the local file/folder if given, else the Hub dataset."""
    import datasets

    where = path or d.get("path")
    if not where:
        if not d.get("hub_id"):
            raise ConfigError(f"dataset={d.name} has no hub_id; give a local file with dataset.path=<file>")
        return datasets.load_dataset(str(d.hub_id), d.get("subset"), split=str(d.split))
    p = Path(str(where)).expanduser()
    fix = "give an existing json, jsonl, csv or parquet file, or a folder saved with Dataset.save_to_disk"
    if not p.exists():
        raise ConfigError(
            f"dataset file '{where}' does not exist; {fix} (dataset.path=... or node config data-path=...)"
        )
    if p.is_dir():
        try:
            loaded = datasets.load_from_disk(str(p))
        except FileNotFoundError as err:
            raise ConfigError(f"dataset folder '{where}' is not a saved datasets folder ({err}); {fix}") from None
        if isinstance(loaded, datasets.DatasetDict):
            if str(d.split) not in loaded:
                raise ConfigError(
                    f"dataset folder '{where}' has splits {sorted(loaded)} but not dataset.split={d.split}; "
                    f"set dataset.split to one of them"
                )
            loaded = loaded[str(d.split)]
        return loaded
    builder = FILE_BUILDERS.get(p.suffix.lower())
    if builder is None:
        raise ConfigError(f"dataset file '{where}' has an unknown extension {p.suffix!r}; {fix}")
    _check_file(p, builder)
    try:
        return datasets.load_dataset(builder, data_files=str(p), split="train")
    except Exception as err:  # datasets wraps parse errors in several exception types
        cause = str(err.__cause__ or err).splitlines()[0]
        raise ConfigError(f"dataset file '{where}' could not be read as {p.suffix} ({cause}); fix the file") from None


def _check_file(p: Path, builder: str) -> None:
    """Empty, whitespace-only and non-UTF-8 text files get a clear message (read in 1 MiB chunks)."""
    if p.stat().st_size == 0:
        raise ConfigError(f"dataset file '{p}' is empty; give a file with at least one row")
    if builder not in ("json", "csv"):
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines, blank = 0, 1, True
    with p.open("rb") as f:
        while chunk := f.read(1 << 20):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as err:
                at = offset + err.start
                line = lines + chunk[: err.start].count(b"\n")
                raise ConfigError(
                    f"dataset file '{p}' is not UTF-8 (byte {at}, line {line}); re-save it as UTF-8, "
                    f"e.g. iconv -f latin1 -t utf-8"
                ) from None
            blank = blank and not text.strip()
            offset, lines = offset + len(chunk), lines + chunk.count(b"\n")
    if blank:
        raise ConfigError(f"dataset file '{p}' has no rows (only whitespace); give a file with at least one row")


def column_map(d: DictConfig) -> dict[str, str | None]:
    """The format's column -> the source column that holds it (``dataset.columns`` overrides)."""
    if d.format not in FORMATS:
        raise ConfigError(f"dataset.format={d.format!r} is not one of {', '.join(FORMATS)}")
    wanted, _ = FORMATS[d.format]
    given = OmegaConf.to_container(d.get("columns") or {}, resolve=True)
    assert isinstance(given, dict)
    unknown = sorted(set(given) - set(wanted))
    if unknown:
        raise ConfigError(
            f"dataset.columns has {unknown} but format {d.format!r} reads only {', '.join(wanted)}; "
            f"map those: dataset.columns.{wanted[0]}=<your column>"
        )
    return {k: given.get(k, k) for k in wanted}


def _required(d: DictConfig, task: str) -> set[str]:
    if d.format == "custom":
        return {"prompt", "chosen", "rejected"} if task == "dpo" else {"prompt", "response"}
    return set(FORMATS[d.format][0]) - ({"input"} if d.format in ("alpaca", "flowertune_joined") else set())


def map_rows(raw: Any, d: DictConfig, task: str, source: str) -> tuple[list[Row], LoadReport]:
    """Rename the configured columns, check they exist, map every row; count what is dropped."""
    cols = column_map(d)
    present = set(raw.column_names)
    for key in sorted(_required(d, task)):
        col = cols[key]
        if col is None or col not in present:
            raise ConfigError(
                f"dataset {source} has no column {col!r} (needed as {key!r} by format {d.format}); its columns are "
                f"{', '.join(sorted(present))}. Map yours with dataset.columns.{key}=<your column>"
            )
    _, mapper = FORMATS[d.format]
    # Other scalar columns stay (for partition.by); alpaca's "text" only repeats the mapped ones.
    extras = [c for c in raw.column_names if c not in {v for v in cols.values() if v} | {"text"}]
    report = LoadReport(source, loaded=len(raw))
    rows: list[Row] = []
    for raw_row in raw:
        named = {k: raw_row.get(v) if v else None for k, v in cols.items()}
        try:
            row = mapper(named)
        except (ValueError, KeyError, TypeError) as err:
            report.drop(f"unparsable ({err})")
            continue
        if _is_empty(row):
            report.drop("empty prompt or response")
            continue
        for c in extras:
            if isinstance(raw_row[c], str | int | float | bool) and c not in row:
                row[c] = raw_row[c]
        row.setdefault("domain", str(d.name))
        rows.append(row)
    return rows, report


def _is_empty(row: Row) -> bool:
    if "instruction" in row:
        return not row["instruction"].strip() or not row["response"].strip()
    return not row["prompt"] or not row["chosen"].strip() or not row["rejected"].strip()


def prompt_key(row: Row) -> str:
    return row["instruction"] if "instruction" in row else repr(row["prompt"])


def deduplicate(rows: list[Row], report: LoadReport) -> list[Row]:
    """Keep the first row of each prompt (OpenFedLLM deduplicates MathInstruct on its instruction)."""
    seen: set[str] = set()
    out = []
    for r in rows:
        if (k := prompt_key(r)) not in seen:
            seen.add(k)
            out.append(r)
    report.drop("duplicate instruction", len(rows) - len(out))
    return out


def sample(rows: list[Row], n: int, seed: int) -> list[Row]:
    """OpenFedLLM's ``dataset_sample``: a seeded shuffle, then the first ``n`` rows."""
    picked = list(rows)
    random.Random(seed).shuffle(picked)
    return picked[:n]


def load_rows(d: DictConfig, task: str, seed: int, path: str | None = None) -> list[Row]:
    """Read, map, deduplicate and sample one catalogue entry (or the file ``path`` in its format)."""
    fmt_task = TASK_OF_FORMAT.get(str(d.format))
    if fmt_task and fmt_task != task:
        raise ConfigError(f"dataset={d.name} holds {fmt_task.upper()} data but task={task}; use task={fmt_task}")
    if task == "dpo" and d.format not in ("custom", *TASK_OF_FORMAT):
        raise ConfigError(
            f"dataset={d.name} has no preference pairs for task=dpo; use dataset=hh_rlhf, ultrafeedback, "
            f"synthetic, or custom with prompt/chosen/rejected columns"
        )
    source = source_name(d, path)
    rows, report = map_rows(read_raw(d, path), d, task, source)
    if d.get("deduplicate"):
        rows = deduplicate(rows, report)
    if d.get("sample"):
        rows = sample(rows, int(d.sample), seed)
    log.info(report.line(len(rows)))
    if not rows:
        raise ConfigError(f"dataset {source} has no usable rows after mapping ({report.dropped}); check the file")
    return rows
