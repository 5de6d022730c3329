"""Data sources -> canonical preference pairs.

A source is a hub id, a local dataset folder (save_to_disk or a loadable folder) or a .jsonl/.json/.parquet/.csv
file. Its rows are read in one of these formats, named in `format` or detected from the columns:

    orca           system, question, chosen, rejected (strings)             Intel/orca_dpo_pairs
    ultrafeedback  prompt, chosen/rejected message lists, score_*           HuggingFaceH4/ultrafeedback_binarized,
                                                                            allenai/ultrafeedback_binarized_cleaned
    argilla        prompt, chosen/rejected message lists, *-rating          argilla/ultrafeedback-binarized-
                                                                            preferences-cleaned
    preference     TRL's rows: prompt?/chosen/rejected, strings or message lists (explicit or implicit prompt)
    columns        any columns, mapped with `columns: {prompt, chosen, rejected, system}`

A canonical pair is {id, source, prompt (list of messages), chosen (str), rejected (str), template}. `template` is
"chat" (rendered with the chat template) or "raw" (TRL's standard text rows: prompt + completion + EOS, no template).
Rows we cannot use for content reasons (empty text, chosen == rejected, prompts that differ) are skipped and
counted; rows of the wrong shape are errors naming the file, row and key.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdpo_cli.config import SourceConfig
from sdpo_cli.errors import DataError, first_line

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class LoadedSource:
    name: str
    where: str  # file or hub id, for messages
    pairs: list[dict]
    rows_read: int
    skipped: Counter = field(default_factory=Counter)
    format: str = ""  # detected or configured; recorded in the split's meta.json


class _Skip(Exception):
    """A row we skip on purpose (counted, reported)."""


TIED = "tied scores (data.drop_ties)"  # the skip reason of a row dropped by data.drop_ties
SCORE_KEYS = (("score_chosen", "score_rejected"), ("chosen-rating", "rejected-rating"))


def load_pairs(source: SourceConfig, drop_ties: bool = False) -> LoadedSource:
    """Read one source and return its canonical pairs, in source order. `drop_ties` (data.drop_ties): skip rows whose
    chosen and rejected scores are equal (formats with scores: ultrafeedback, argilla; other rows have none)."""
    dataset, where = _load_dataset(source)
    if len(dataset) == 0:
        in_split = "" if Path(source.path).suffix in FILE_BUILDERS else f" in split '{source.split}'"
        raise DataError(f"{where}: no rows{in_split} (source '{source.name}')",
                        hint="check the source's path, split and subset")
    columns = set(dataset.column_names)
    fmt = source.format if source.format != "auto" else detect_format(columns, where)
    converter = CONVERTERS[fmt]
    _check_columns(fmt, columns, source, where)
    if source.limit is not None:
        dataset = dataset.select(range(min(source.limit, len(dataset))))
    out = LoadedSource(name=source.name, where=where, pairs=[], rows_read=len(dataset), format=fmt)
    for i, row in _rows(dataset, where):
        try:
            prompt, chosen, rejected, template = converter(row, source)
            if drop_ties and fmt in ("ultrafeedback", "argilla") and _tied(row):
                raise _Skip(TIED)
            _check_text(prompt, chosen, rejected)
        except _Skip as reason:
            out.skipped[str(reason)] += 1
            continue
        except _BadRow as e:
            raise DataError(f"{where}:{_row_ref(where, i)}: {e.key}: {e}",
                            hint=f"fix the row, or check format: {fmt} fits this source") from None
        out.pairs.append({"id": f"{source.name}-{i}", "source": source.name, "prompt": prompt, "chosen": chosen,
                          "rejected": rejected, "template": template, "pair_hash": pair_hash(prompt, chosen, rejected)})
    if not out.pairs:
        why = f" (skipped: {dict(out.skipped)})" if out.skipped else ""
        raise DataError(f"{where}: source '{source.name}' has no usable rows{why}",
                        hint="such rows are skipped on purpose (docs/reliability.md): check the source's contents"
                        if out.skipped else "check the path, split and limit of this source")
    return out


def pair_hash(prompt: list, chosen: str, rejected: str) -> str:
    return hashlib.sha1(json.dumps([prompt, chosen, rejected], sort_keys=True).encode()).hexdigest()[:16]


def prompt_hash(prompt: list) -> str:
    return hashlib.sha1(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:16]


def _rows(dataset, where: str):
    """(index, row) in order; text that is not valid UTF-8 (arrow keeps the bytes, decoding fails here) is an error
    that names the line of a JSON Lines or CSV file, else the row."""
    i = 0
    rows = iter(dataset)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except UnicodeDecodeError:
            path = Path(where)
            if path.suffix in FILE_BUILDERS and path.suffix != ".parquet":
                _raise_bad_utf8_line(path)
            raise DataError(f"{where}:{_row_ref(where, i)}: invalid UTF-8 text",
                            hint="re-encode the data as UTF-8") from None
        yield i, row
        i += 1


def _row_ref(where: str, i: int) -> str:
    # JSON Lines files have one row per line: name the line, which is what an editor shows.
    return f"{i + 1}" if where.endswith(".jsonl") else f"row {i}"


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _load_dataset(source: SourceConfig):
    import datasets

    path = Path(source.path)
    where = source.path
    try:
        if path.suffix in FILE_BUILDERS:
            if not path.is_file():
                raise DataError(f"{where}: data file not found (source '{source.name}')",
                                hint="check data.sources[].path; relative paths start at the config file's folder")
            if path.stat().st_size == 0:
                raise DataError(f"{where}: data file is empty (source '{source.name}')",
                                hint=f"fill it, or remove source '{source.name}' from data.sources")
            try:
                if FILE_BUILDERS[path.suffix] == "csv":
                    # Every cell is text: pandas' type inference would read the reply "4" as a number and "None",
                    # "NA" or an empty cell as a missing value.
                    import pandas as pd

                    frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
                    return datasets.Dataset.from_pandas(frame, preserve_index=False), where
                return datasets.load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path), split="train"), where
            except _read_errors() as e:  # pyarrow's parse errors carry no line number: find it ourselves
                if FILE_BUILDERS[path.suffix] == "json":
                    _raise_bad_json_line(path)
                if isinstance(e, UnicodeDecodeError):
                    _raise_bad_utf8_line(path)
                raise DataError(f"{where}: cannot read ({first_line(e)})", hint="check the file's format") from None
        if path.is_dir():
            if (path / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk: one folder per split
                splits = sorted(json.loads((path / "dataset_dict.json").read_text()).get("splits", []))
                if source.split not in splits:
                    raise DataError(f"{where}: no split '{source.split}' (has {splits})",
                                    hint=f"set split: one of {splits}")
                return _load_saved(path / source.split, f"{where}: split '{source.split}'"), where
            if any((path / f).is_file() for f in ("dataset_info.json", "state.json")):
                return _load_saved(path, where), where
            return datasets.load_dataset(str(path), source.subset, split=source.split), where
        if path.is_absolute() or source.path.startswith("."):
            raise DataError(f"{where}: data path not found (source '{source.name}')",
                            hint="check data.sources[].path; relative paths start at the config file's folder")
        return datasets.load_dataset(source.path, source.subset, split=source.split), where
    except DataError:
        raise
    except ValueError as e:
        message = first_line(e)
        if "split" in message.lower():
            raise DataError(f"{where}: unknown split '{source.split}' ({message})",
                            hint="set data.sources[].split to a split the dataset has") from None
        raise DataError(f"{where}: cannot load ({message})", hint="check the source's path and subset") from None
    except _load_errors() as e:  # hub unreachable, offline mode, missing repo, ...
        raise DataError(f"{where}: cannot load dataset ({type(e).__name__}: {first_line(e)})",
                        hint="a hub id needs network access (or a warm HF cache); else use a local file") from None


def _load_saved(folder: Path, what: str):
    """A Dataset.save_to_disk folder. An empty one has no data file, which load_from_disk fails on: say so."""
    import datasets

    state = folder / "state.json"
    if state.is_file() and not json.loads(state.read_text()).get("_data_files", [None]):
        raise DataError(f"{what}: no rows (an empty split)", hint="pick a split that has rows, or fill this one")
    return datasets.load_from_disk(str(folder))


def _raise_bad_utf8_line(path: Path) -> None:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start}",
                                hint="re-encode the file as UTF-8") from None


def _raise_bad_json_line(path: Path) -> None:
    rows = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start}",
                                hint="re-encode the file as UTF-8") from None
            if path.suffix == ".jsonl" and line.strip():
                try:
                    obj = json.loads(line.rstrip("\r\n"))  # the newline would make the column point past the line
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg}, column {e.colno})",
                                    hint="each line must be one JSON object") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}",
                                    hint="each line must be one JSON object") from None
                rows += 1
    if path.suffix == ".jsonl" and rows == 0:
        raise DataError(f"{path}: no rows (only blank lines)", hint="each line must be one JSON object")
    raise DataError(f"{path}: cannot parse as JSON rows", hint="rows must share the same keys and types")


def _read_errors() -> tuple[type[BaseException], ...]:
    """What reading a malformed local file raises: pyarrow / pandas parse errors (ValueError subclasses, bad UTF-8
    included), datasets' wrapper around a failed JSON or parquet build, and I/O errors."""
    from datasets.exceptions import DatasetsError

    return ValueError, OSError, DatasetsError


def _load_errors() -> tuple[type[BaseException], ...]:
    """What loading a hub id or dataset folder raises when it cannot be had: the hub unreachable or offline
    (OSError subclasses: ConnectionError, HfHubHTTPError, LocalEntryNotFoundError), a missing repo or config
    (datasets' own errors)."""
    from datasets.exceptions import DatasetsError

    return OSError, DatasetsError


# ---------------------------------------------------------------------------------------------------------------
# Formats


def detect_format(columns: set[str], where: str) -> str:
    if {"question", "chosen", "rejected"} <= columns:
        return "orca"
    if {"chosen", "rejected"} <= columns and ({"chosen-rating", "rejected-rating"} & columns):
        return "argilla"
    if {"chosen", "rejected"} <= columns and ({"score_chosen", "score_rejected", "prompt_id"} & columns):
        return "ultrafeedback"
    if {"chosen", "rejected"} <= columns:
        return "preference"
    raise DataError(f"{where}: cannot detect the format from columns {sorted(columns)}",
                    hint="set format: columns and map them, e.g. columns: {prompt: q, chosen: good, rejected: bad}")


REQUIRED = {"orca": {"question", "chosen", "rejected"}, "ultrafeedback": {"chosen", "rejected"},
            "argilla": {"chosen", "rejected"}, "preference": {"chosen", "rejected"}}


def _check_columns(fmt: str, columns: set[str], source: SourceConfig, where: str) -> None:
    if fmt == "columns":
        mapping = dict(source.columns or {})
        unknown_roles = set(mapping) - {"prompt", "chosen", "rejected", "system"}
        if unknown_roles:
            raise DataError(f"{where}: columns: unknown key(s) {sorted(unknown_roles)}",
                            hint="map only prompt, chosen, rejected and system")
        for role in ("chosen", "rejected"):
            if role not in mapping:
                raise DataError(f"{where}: columns: no mapping for '{role}'", hint=f"add columns.{role}: <column>")
        need = set(mapping.values())
    else:
        need = REQUIRED[fmt]
    missing = sorted(need - columns)
    if missing:
        raise DataError(f"{where}: missing column(s) {missing} for format '{fmt}' (has {sorted(columns)})",
                        hint="set the source's format, or map columns with format: columns")


class _BadRow(Exception):
    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise _BadRow(key, f"expected a string, got {type(value).__name__}")
    return value


def _messages(value: Any, key: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise _BadRow(key, f"expected a list of messages, got {type(value).__name__}")
    out = []
    for m in value:
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _BadRow(key, "every message needs string 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _reply(messages: list[dict], key: str) -> str:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise _BadRow(key, "the completion must be exactly one assistant message")
    return messages[0]["content"]


def _split_conversations(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], str, str]:
    """Full conversations -> (shared prompt messages, chosen reply, rejected reply)."""
    if not chosen or chosen[-1]["role"] != "assistant":
        raise _BadRow("chosen", "the conversation must end with an assistant message")
    if not rejected or rejected[-1]["role"] != "assistant":
        raise _BadRow("rejected", "the conversation must end with an assistant message")
    if chosen[:-1] != rejected[:-1]:
        raise _Skip("chosen and rejected prompts differ")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def _orca(row: dict, source: SourceConfig):
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise _BadRow("system", f"expected a string, got {type(system).__name__}")
    prompt = ([{"role": "system", "content": system}] if system and system.strip() else [])
    prompt.append({"role": "user", "content": _text(row, "question")})
    return prompt, _text(row, "chosen"), _text(row, "rejected"), "chat"


def _ultrafeedback(row: dict, source: SourceConfig):
    # chosen/rejected hold the whole conversation (user turn(s) + the assistant reply); the prompt is the shared
    # prefix. Scores are not used by DPO; a NaN score marks a broken row upstream.
    for key in ("score_chosen", "score_rejected", "chosen-rating", "rejected-rating"):
        score = row.get(key, 0.0)
        if score is None or (isinstance(score, float) and math.isnan(score)):
            raise _Skip(f"missing or NaN {key}")
    chosen_m, rejected_m = _messages(row["chosen"], "chosen"), _messages(row["rejected"], "rejected")
    if isinstance(row.get("prompt"), list):  # an explicit conversational prompt (TRL style) next to the scores
        return _messages(row["prompt"], "prompt"), _reply(chosen_m, "chosen"), _reply(rejected_m, "rejected"), "chat"
    prompt, chosen, rejected = _split_conversations(chosen_m, rejected_m)
    return prompt, chosen, rejected, "chat"


def _tied(row: dict) -> bool:
    """The row's chosen and rejected scores are both given and equal (UltraFeedback's binarisation keeps such rows:
    34 of the 300 fixture rows)."""
    for chosen, rejected in SCORE_KEYS:
        a, b = row.get(chosen), row.get(rejected)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return a == b
    return False


def _preference(row: dict, source: SourceConfig):
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is None:  # implicit prompt: TRL's extract_prompt (common prefix, minus a trailing space)
            prompt, chosen, rejected = _common_text_prefix(chosen, rejected)
        if not isinstance(prompt, str):
            raise _BadRow("prompt", f"expected a string for text rows, got {type(prompt).__name__}")
        # Raw text rows, as TRL treats them: no chat template; the tokenizer adds its BOS; EOS is appended later.
        return [{"role": "user", "content": prompt}], chosen, rejected, "raw"
    chosen_m, rejected_m = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    if isinstance(prompt, list):
        return _messages(prompt, "prompt"), _reply(chosen_m, "chosen"), _reply(rejected_m, "rejected"), "chat"
    # implicit prompt in message lists (a string `prompt` column next to full conversations is ignored, like TRL)
    p, c, r = _split_conversations(chosen_m, rejected_m)
    return p, c, r, "chat"


def _common_text_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    idx = 0
    limit = min(len(chosen), len(rejected))
    while idx < limit and chosen[idx] == rejected[idx]:
        idx += 1
    if 0 < idx < limit and chosen[idx - 1] == " ":
        idx -= 1
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _columns(row: dict, source: SourceConfig):
    mapping = dict(source.columns or {})
    mapped = {"chosen": row[mapping["chosen"]], "rejected": row[mapping["rejected"]]}
    if "prompt" in mapping:
        mapped["prompt"] = row[mapping["prompt"]]
    if isinstance(mapped.get("prompt"), str) and isinstance(mapped["chosen"], str):
        # A mapped instruction column is a user turn, like orca's question.
        system = row.get(mapping["system"]) if "system" in mapping else None
        return _orca({"system": system, "question": mapped["prompt"], "chosen": mapped["chosen"],
                      "rejected": mapped["rejected"]}, source)
    return _preference(mapped, source)


CONVERTERS = {"orca": _orca, "ultrafeedback": _ultrafeedback, "argilla": _ultrafeedback,
              "preference": _preference, "columns": _columns}


def _check_text(prompt: list[dict], chosen: str, rejected: str) -> None:
    if not chosen.strip() or not rejected.strip():
        raise _Skip("empty chosen or rejected")
    if not prompt or not any(m["content"].strip() for m in prompt):
        raise _Skip("empty prompt")
    if chosen == rejected:
        raise _Skip("chosen identical to rejected")
