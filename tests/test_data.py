"""Data: every source format to canonical pairs, every file type, tokenisation and truncation, the split strategies
and the real fixtures. Exact values throughout; no model is run except the tiny one for the curriculum split."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import pytest

from sdpo_cli.config import ModelConfig, SourceConfig, load_config
from sdpo_cli.data.formats import detect_format, load_pairs, pair_hash
from sdpo_cli.data.tokenize import TokenizeStats, cut_prompt, tokenize_pair, tokenize_pairs, truncate
from sdpo_cli.errors import DataError
from sdpo_cli.split import run_split
from tests.conftest import build_tokenizer, write_jsonl


def load(path: Path, **kw):
    return load_pairs(SourceConfig(name="s", path=str(path), **kw))


def canon(loaded) -> list[tuple]:
    """The content of canonical pairs, without ids and hashes."""
    return [(p["prompt"], p["chosen"], p["rejected"], p["template"]) for p in loaded.pairs]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


ORCA_ROWS = [
    {"system": "You are a helpful assistant.", "question": "What is 2 plus 3?", "chosen": "5.", "rejected": "6."},
    {"system": "", "question": "Name a colour.", "chosen": "Blue.", "rejected": "Go away."},
    {"system": "Be brief.", "question": "Say hi.", "chosen": "Hi!", "rejected": "No."},
]
ORCA_CANON = [
    ([system("You are a helpful assistant."), user("What is 2 plus 3?")], "5.", "6.", "chat"),
    ([user("Name a colour.")], "Blue.", "Go away.", "chat"),
    ([system("Be brief."), user("Say hi.")], "Hi!", "No.", "chat"),
]


# ---------------------------------------------------------------------------------------------------------------
# Formats


def test_orca_system_present_and_empty(tmp_path):
    loaded = load(write_jsonl(tmp_path / "orca.jsonl", ORCA_ROWS))
    assert loaded.format == "orca"
    assert loaded.rows_read == 3 and loaded.skipped == Counter()
    assert loaded.pairs[1] == {"id": "s-1", "source": "s", "prompt": [user("Name a colour.")], "chosen": "Blue.",
                               "rejected": "Go away.", "template": "chat",
                               "pair_hash": pair_hash([user("Name a colour.")], "Blue.", "Go away.")}
    assert canon(loaded) == ORCA_CANON
    assert [p["id"] for p in loaded.pairs] == ["s-0", "s-1", "s-2"]


def test_orca_skips_unusable_rows_and_counts_them(tmp_path):
    rows = ORCA_ROWS[:1] + [
        {"system": "", "question": "Q", "chosen": "same", "rejected": "same"},
        {"system": "", "question": "Q", "chosen": "  ", "rejected": "x"},
        {"system": "", "question": " ", "chosen": "a", "rejected": "b"},
    ]
    loaded = load(write_jsonl(tmp_path / "orca.jsonl", rows))
    assert [p["id"] for p in loaded.pairs] == ["s-0"]
    assert loaded.rows_read == 4
    assert loaded.skipped == Counter({"chosen identical to rejected": 1, "empty chosen or rejected": 1,
                                      "empty prompt": 1})


def uf_row(prompt: str, chosen: str, rejected: str, score_chosen=8.0, score_rejected=3.0) -> dict:
    return {"prompt": prompt, "prompt_id": "0" * 64, "chosen": [user(prompt), assistant(chosen)],
            "rejected": [user(prompt), assistant(rejected)], "messages": [user(prompt), assistant(chosen)],
            "score_chosen": score_chosen, "score_rejected": score_rejected}


def test_ultrafeedback_synthetic(tmp_path):
    rows = [uf_row("Sky?", "Blue.", "Green."), uf_row("Same?", "Yes.", "Yes."), uf_row("Tie?", "A.", "B.", 5.0, 5.0)]
    loaded = load(write_jsonl(tmp_path / "uf.jsonl", rows))
    assert loaded.format == "ultrafeedback"
    assert canon(loaded) == [([user("Sky?")], "Blue.", "Green.", "chat"), ([user("Tie?")], "A.", "B.", "chat")]
    assert [p["id"] for p in loaded.pairs] == ["s-0", "s-2"]
    assert loaded.skipped == Counter({"chosen identical to rejected": 1})


def test_ultrafeedback_with_an_explicit_conversational_prompt(tmp_path):
    # TRL-style explicit prompt next to score columns: the prompt column is the prompt
    rows = [{"prompt": [system("Be brief."), user("Sky?")], "chosen": [assistant("Blue.")],
             "rejected": [assistant("Green.")], "score_chosen": 8.0, "score_rejected": 2.0}]
    loaded = load(write_jsonl(tmp_path / "uf.jsonl", rows))
    assert loaded.format == "ultrafeedback"
    assert canon(loaded) == [([system("Be brief."), user("Sky?")], "Blue.", "Green.", "chat")]


def argilla_row(prompt: str, chosen: str, rejected: str, chosen_rating=5.0) -> dict:
    return {"source": "evol_instruct", "prompt": prompt, "chosen": [user(prompt), assistant(chosen)],
            "chosen-rating": chosen_rating, "chosen-model": "gpt-4", "rejected": [user(prompt), assistant(rejected)],
            "rejected-rating": 2.0, "rejected-model": "falcon-40b-instruct"}


def test_argilla_schema(tmp_path):
    rows = [argilla_row("Write a haiku.", "Old pond, a frog jumps.", "No."),
            argilla_row("Add 2 and 2.", "4", "5", chosen_rating=None),
            argilla_row("Translate 'chat'.", "cat", "dog")]
    loaded = load(write_jsonl(tmp_path / "argilla.jsonl", rows))
    assert loaded.format == "argilla"
    assert canon(loaded) == [([user("Write a haiku.")], "Old pond, a frog jumps.", "No.", "chat"),
                             ([user("Translate 'chat'.")], "cat", "dog", "chat")]
    assert [p["id"] for p in loaded.pairs] == ["s-0", "s-2"]
    assert loaded.skipped == Counter({"missing or NaN chosen-rating": 1})


def test_preference_standard_explicit_prompt(tmp_path):
    rows = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
            {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"}]
    loaded = load(write_jsonl(tmp_path / "pref.jsonl", rows))
    assert loaded.format == "preference"
    assert canon(loaded) == [([user("The sky is")], " blue.", " green.", "raw"),
                             ([user("2 + 2 =")], " 4", " 5", "raw")]


def test_preference_standard_implicit_prompt_like_trl_extract_prompt(tmp_path):
    # trl.data_utils.extract_prompt: the common prefix; where the texts part right after a space, that space goes
    # to the completions.
    rows = [{"chosen": "The sky is blue.", "rejected": "The sky is green."},
            {"chosen": "2+2=4", "rejected": "2+2=5"},
            {"chosen": "Answer: yes", "rejected": "Answer: no"}]
    loaded = load(write_jsonl(tmp_path / "pref.jsonl", rows))
    assert loaded.format == "preference"
    assert canon(loaded) == [([user("The sky is")], " blue.", " green.", "raw"),
                             ([user("2+2=")], "4", "5", "raw"),
                             ([user("Answer:")], " yes", " no", "raw")]


def test_preference_conversational_explicit_prompt(tmp_path):
    rows = [{"prompt": [system("Be brief."), user("Sky colour?")], "chosen": [assistant("Blue.")],
             "rejected": [assistant("Green.")]},
            {"prompt": [user("Hi")], "chosen": [assistant("Hello!")], "rejected": [assistant("Go away.")]}]
    loaded = load(write_jsonl(tmp_path / "conv.jsonl", rows))
    assert loaded.format == "preference"
    assert canon(loaded) == [([system("Be brief."), user("Sky colour?")], "Blue.", "Green.", "chat"),
                             ([user("Hi")], "Hello!", "Go away.", "chat")]


def test_preference_conversational_implicit_prompt(tmp_path):
    turns = [user("Hi"), assistant("Hello."), user("Sky colour?")]
    rows = [{"chosen": [user("Sky?"), assistant("Blue.")], "rejected": [user("Sky?"), assistant("Green.")]},
            {"chosen": turns + [assistant("Blue.")], "rejected": turns + [assistant("Red.")]},
            {"chosen": [user("A?"), assistant("x")], "rejected": [user("B?"), assistant("y")]}]  # prompts differ
    loaded = load(write_jsonl(tmp_path / "conv.jsonl", rows))
    assert loaded.format == "preference"
    assert canon(loaded) == [([user("Sky?")], "Blue.", "Green.", "chat"), (turns, "Blue.", "Red.", "chat")]
    assert loaded.skipped == Counter({"chosen and rejected prompts differ": 1})


def test_preference_conversational_ignores_a_string_prompt_column(tmp_path):
    # Like TRL's maybe_extract_prompt: a string prompt next to full conversations is not the prompt.
    rows = [{"prompt": "ignored", "chosen": [user("Sky?"), assistant("Blue.")],
             "rejected": [user("Sky?"), assistant("Green.")]}]
    loaded = load(write_jsonl(tmp_path / "conv.jsonl", rows))
    assert canon(loaded) == [([user("Sky?")], "Blue.", "Green.", "chat")]


def test_columns_mapping(tmp_path):
    rows = [{"instruction": "Name a fruit.", "good": "Apple.", "bad": "Rock.", "sys": "Be brief.", "extra": 1},
            {"instruction": "Say hi.", "good": "Hi!", "bad": "No.", "sys": "", "extra": 2}]
    path = write_jsonl(tmp_path / "custom.jsonl", rows)
    loaded = load(path, format="columns",
                  columns={"prompt": "instruction", "chosen": "good", "rejected": "bad", "system": "sys"})
    assert loaded.format == "columns"
    assert canon(loaded) == [([system("Be brief."), user("Name a fruit.")], "Apple.", "Rock.", "chat"),
                             ([user("Say hi.")], "Hi!", "No.", "chat")]
    # without a prompt mapping, text columns are TRL standard rows with an implicit prompt
    path = write_jsonl(tmp_path / "texts.jsonl", [{"good": "Q: Sky? A: blue", "bad": "Q: Sky? A: red"}])
    implicit = load(path, format="columns", columns={"chosen": "good", "rejected": "bad"})
    assert canon(implicit) == [([user("Q: Sky? A:")], " blue", " red", "raw")]


def test_columns_mapping_errors(tmp_path):
    path = write_jsonl(tmp_path / "custom.jsonl", [{"q": "Q", "good": "A", "bad": "B"}])
    with pytest.raises(DataError, match=r"missing column\(s\) \['nope'\]"):
        load(path, format="columns", columns={"prompt": "q", "chosen": "good", "rejected": "nope"})
    with pytest.raises(DataError, match="no mapping for 'rejected'"):
        load(path, format="columns", columns={"prompt": "q", "chosen": "good"})
    with pytest.raises(DataError, match=r"cannot detect the format from columns \['bad', 'good', 'q'\]"):
        load(path)


@pytest.mark.parametrize("columns, fmt", [
    ({"system", "question", "chosen", "rejected"}, "orca"),
    ({"question", "chosen", "rejected"}, "orca"),
    ({"prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"}, "ultrafeedback"),
    ({"prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected", "source"},
     "ultrafeedback"),  # allenai/ultrafeedback_binarized_cleaned
    ({"source", "prompt", "chosen", "chosen-rating", "chosen-model", "rejected", "rejected-rating",
      "rejected-model"}, "argilla"),
    ({"prompt", "chosen", "rejected"}, "preference"),
    ({"chosen", "rejected"}, "preference"),
])
def test_detect_format(columns, fmt):
    assert detect_format(columns, "x.jsonl") == fmt


def test_named_format_overrides_detection(tmp_path):
    # An ultrafeedback file read as TRL conversational rows with an implicit prompt gives the same pairs.
    path = write_jsonl(tmp_path / "uf.jsonl", [uf_row("Sky?", "Blue.", "Green.")])
    assert canon(load(path, format="preference")) == canon(load(path)) == [([user("Sky?")], "Blue.", "Green.",
                                                                              "chat")]


# ---------------------------------------------------------------------------------------------------------------
# File types and limit


def test_file_types_give_the_same_pairs(tmp_path):
    import pandas as pd

    write_jsonl(tmp_path / "rows.jsonl", ORCA_ROWS)
    (tmp_path / "rows.json").write_text(json.dumps(ORCA_ROWS))
    pd.DataFrame(ORCA_ROWS).to_parquet(tmp_path / "rows.parquet")
    pd.DataFrame(ORCA_ROWS).to_csv(tmp_path / "rows.csv", index=False)
    for suffix in (".jsonl", ".json", ".parquet", ".csv"):
        loaded = load(tmp_path / f"rows{suffix}")
        assert (suffix, loaded.format, loaded.rows_read) == (suffix, "orca", 3)
        assert canon(loaded) == ORCA_CANON, suffix


def test_csv_cells_stay_text(tmp_path):
    import pandas as pd

    rows = [{"system": "", "question": "2 + 2?", "chosen": "4", "rejected": "5"},
            {"system": "", "question": "x = None; print(x)?", "chosen": "None", "rejected": "NA"}]
    pd.DataFrame(rows).to_csv(tmp_path / "numbers.csv", index=False)
    assert canon(load(tmp_path / "numbers.csv")) == [([user("2 + 2?")], "4", "5", "chat"),
                                                     ([user("x = None; print(x)?")], "None", "NA", "chat")]


def test_parquet_with_message_lists(tmp_path):
    rows = [uf_row("Sky?", "Blue.", "Green."), uf_row("Sea?", "Wet.", "Dry.")]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "uf.parquet"))
    loaded = load(tmp_path / "uf.parquet")
    assert loaded.format == "ultrafeedback"
    assert canon(loaded) == [([user("Sky?")], "Blue.", "Green.", "chat"), ([user("Sea?")], "Wet.", "Dry.", "chat")]


def test_save_to_disk_folder_with_split_selection(tmp_path):
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ORCA_ROWS[:1]),
                          "test": datasets.Dataset.from_list(ORCA_ROWS[1:])}).save_to_disk(str(folder))
    assert canon(load(folder)) == ORCA_CANON[:1]  # split defaults to train
    test = load(folder, split="test")
    assert (test.format, test.rows_read) == ("orca", 2)
    assert canon(test) == ORCA_CANON[1:]
    with pytest.raises(DataError, match=r"no split 'validation' \(has \['test', 'train'\]\)"):
        load(folder, split="validation")
    single = tmp_path / "single"
    datasets.Dataset.from_list(ORCA_ROWS).save_to_disk(str(single))
    assert canon(load(single)) == ORCA_CANON


def test_limit(tmp_path):
    path = write_jsonl(tmp_path / "orca.jsonl", ORCA_ROWS)
    loaded = load(path, limit=2)
    assert loaded.rows_read == 2
    assert [p["id"] for p in loaded.pairs] == ["s-0", "s-1"]
    assert canon(loaded) == ORCA_CANON[:2]
    assert load(path, limit=100).rows_read == 3


def test_missing_file_and_bad_json_line(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load(tmp_path / "absent.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ORCA_ROWS[0]) + "\n" + '{"question": "q", "chosen": \n' + json.dumps(ORCA_ROWS[1]) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON \(Expecting value, column 29\)"):
        load(bad)


def test_wrong_row_shape_names_file_row_and_key(tmp_path):
    rows = [{"prompt": [user("Hi")], "chosen": [assistant("a")], "rejected": [assistant("b")]},
            {"prompt": [user("Hi")], "chosen": [assistant("a"), assistant("b")], "rejected": [assistant("b")]}]
    with pytest.raises(DataError, match=r"conv\.jsonl:2: chosen: the completion must be exactly one assistant"):
        load(write_jsonl(tmp_path / "conv.jsonl", rows))


# ---------------------------------------------------------------------------------------------------------------
# Tokenisation and truncation


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_chat_row_prompt_shared_and_end_of_turn(tok):
    prompt = [system("You are a helpful assistant."), user("What is 2 plus 3?")]
    p, c, r = tokenize_pair(tok, prompt, "The answer is 5.", "The answer is 8.", "chat")
    assert tok.decode(p) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                             "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n")
    assert p == tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"]
    full = [tok.apply_chat_template(prompt + [assistant(x)], tokenize=True, return_dict=True)["input_ids"]
            for x in ("The answer is 5.", "The answer is 8.")]
    assert (p + c, p + r) == (full[0], full[1])  # the very same prompt tokens in chosen and rejected
    assert tok.decode(c) == "The answer is 5.<|im_end|>\n"  # ChatML's end of turn
    assert tok.decode(r) == "The answer is 8.<|im_end|>\n"
    assert tok.eos_token_id in c and tok.eos_token_id in r


def test_raw_row_gets_bos_and_eos(tok):
    p, c, r = tokenize_pair(tok, [user("The sky is")], " blue.", " green.", "raw")
    assert p == tok("The sky is")["input_ids"] and p[0] == tok.bos_token_id
    assert p + c == tok("The sky is blue.<|im_end|>")["input_ids"]
    assert p + r == tok("The sky is green.<|im_end|>")["input_ids"]
    assert c[-1] == r[-1] == tok.eos_token_id
    assert tok.decode(c) == " blue.<|im_end|>"
    # a completion that already ends with EOS gets no second one
    assert tokenize_pair(tok, [user("The sky is")], " blue.<|im_end|>", " green.", "raw")[1] == c


def test_fallback_template_ends_turn_with_eos(tmp_path):
    from sdpo_cli.models import load_tokenizer

    build_tokenizer(tmp_path / "tok", chat_template=None)
    solar = load_tokenizer(ModelConfig(base=str(tmp_path / "tok")))  # no template: the built-in SOLAR fallback
    p, c, _ = tokenize_pair(solar, [user("Hi")], "Hello.", "No.", "chat")
    assert solar.decode(p) == "<|bos|>### User:\nHi\n\n### Assistant:\n"
    assert solar.decode(c) == "Hello.<|im_end|>"
    assert c[-1] == solar.eos_token_id


def test_truncate_exact():
    prompt, chosen, rejected = list(range(1, 11)), list(range(11, 16)), list(range(21, 24))
    # ids are never cut from the left: a prompt over the cap (which encode_pair could not cut) drops the pair
    assert truncate(prompt, chosen, rejected, max_length=8, max_prompt_length=4) is None
    out = truncate(prompt[:3], chosen, rejected, max_length=8, max_prompt_length=4)
    assert (out.prompt_ids, out.chosen_ids, out.rejected_ids, out.truncated) == (
        [1, 2, 3], [11, 12, 13, 14, 15], [21, 22, 23], False)
    out = truncate(prompt[:4], chosen, rejected, max_length=8, max_prompt_length=4)
    assert (out.prompt_ids, out.chosen_ids, out.rejected_ids, out.truncated) == (
        [1, 2, 3, 4], [11, 12, 13, 14], [21, 22, 23], True)
    assert truncate(prompt, chosen, rejected, max_length=10, max_prompt_length=None) is None  # no room
    assert truncate(prompt, chosen, rejected, max_length=11, max_prompt_length=None).chosen_ids == [11]


CHATML_FRAMING = ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")


def test_tokenize_pairs_truncates_and_drops(tok):
    long_prompt = "What is 2 plus 3? " * 6
    pairs = [
        {"id": "long", "prompt": [user(long_prompt)], "chosen": "The answer is 5. " * 4,
         "rejected": "No.", "template": "chat"},
        {"id": "short", "prompt": [user("Hi")], "chosen": "Thank you!", "rejected": "No.", "template": "raw"},
    ]
    p, c, r = tokenize_pair(tok, pairs[0]["prompt"], pairs[0]["chosen"], pairs[0]["rejected"], "chat")
    assert len(p) > 20 and len(c) > 8
    stats = TokenizeStats()
    kept, dropped = tokenize_pairs(tok, pairs, max_length=28, max_prompt_length=20, stats=stats)
    assert dropped == 0 and (stats.prompt_cut, stats.prompt_not_prefix) == (1, 0)
    long, short = kept
    # the prompt keeps the template's framing and loses text from the left of its content: no longer p[-20:]
    text = tok.decode(long["prompt_ids"])
    assert len(long["prompt_ids"]) <= 20 and long["prompt_ids"] != p[-20:]
    assert text.startswith(CHATML_FRAMING[0]) and text.endswith(CHATML_FRAMING[1])
    content = text[len(CHATML_FRAMING[0]):-len(CHATML_FRAMING[1])].removesuffix("<|im_end|>\n")
    assert content.strip() and long_prompt.endswith(content.lstrip())  # the end of the question stays
    full = tok.apply_chat_template([user(content), assistant(pairs[0]["chosen"])], tokenize=True, return_dict=True)
    assert long["prompt_ids"] + c == list(full["input_ids"])  # the reply tokens are those of the uncut prompt
    assert long["chosen_ids"] == c[:8]  # cut from the right to max_length - prompt
    assert long["rejected_ids"] == r and len(r) <= 8
    assert long["truncated"] is True and short["truncated"] is False
    sp, sc, sr = tokenize_pair(tok, [user("Hi")], "Thank you!", "No.", "raw")
    assert (short["prompt_ids"], short["chosen_ids"], short["rejected_ids"]) == (sp, sc, sr)
    # a cap below the template's own framing (13 tokens here) cannot be met by cutting content: dropped
    kept, dropped = tokenize_pairs(tok, pairs, max_length=28, max_prompt_length=10)
    assert dropped == 1 and [k["id"] for k in kept] == ["short"]
    # without a prompt cap, a prompt that fills max_length leaves no room: dropped and counted
    kept, dropped = tokenize_pairs(tok, pairs, max_length=len(p), max_prompt_length=None)
    assert dropped == 1 and [k["id"] for k in kept] == ["short"]


def test_prompt_cut_takes_the_content_stream_from_the_left(tok):
    """Messages' texts are one stream cut from its start: the system message goes first, and stays as an empty
    turn; raw rows keep their BOS."""
    prompt = [system("Be brief and kind."), user("What is 2 plus 3? " * 3)]
    whole = cut_prompt(tok, prompt, "chat", 1000)
    assert whole[0] is prompt  # under the cap: untouched
    cut, ids = cut_prompt(tok, prompt, "chat", 30)
    assert len(ids) <= 30 and cut[0] == system("") and cut[1]["role"] == "user"
    assert prompt[1]["content"].endswith(cut[1]["content"].lstrip()) and cut[1]["content"].strip()
    assert tok.decode(ids).startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n")
    cut, ids = cut_prompt(tok, [user("What is 2 plus 3? " * 3)], "raw", 6)
    assert ids[0] == tok.bos_token_id and len(ids) <= 6 and ids == tok(cut[0]["content"])["input_ids"]
    assert cut_prompt(tok, [user("What is 2 plus 3?")], "chat", 13) is None  # the framing alone fills it


NOT_A_PREFIX = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:\n{% endif %}")  # the reply follows "assistant: "


def test_a_prompt_that_is_not_a_token_prefix_is_counted(tmp_path):
    tok = build_tokenizer(tmp_path / "tok", chat_template=NOT_A_PREFIX)
    pairs = [{"id": f"s-{i}", "prompt": [user(f"Hi {i}")], "chosen": "Yes.", "rejected": "No.", "template": "chat"}
             for i in range(3)]
    stats = TokenizeStats()
    kept, dropped = tokenize_pairs(tok, pairs, max_length=64, max_prompt_length=None, stats=stats)
    assert dropped == 0 and stats.prompt_not_prefix == 3
    assert stats.example[0] == "s-0" and stats.example[1].endswith("\n")  # the prompt's lost end: its newline
    prompt = tok.apply_chat_template([user("Hi 0")], add_generation_prompt=True, tokenize=True, return_dict=True)
    assert kept[0]["prompt_ids"] == list(prompt["input_ids"])[:len(kept[0]["prompt_ids"])]
    assert len(kept[0]["prompt_ids"]) < len(prompt["input_ids"])


# ---------------------------------------------------------------------------------------------------------------
# Split strategies (run_split on the tiny model)

ID_COLUMNS = {"id", "source", "prompt", "chosen", "rejected", "prompt_ids", "chosen_ids", "rejected_ids"}


def read_step(run: Path, t: int | str):
    path = run / "data" / (f"step-{t}" if isinstance(t, int) else t)
    meta = json.loads((path / "meta.json").read_text())
    return datasets.load_from_disk(str(path)), meta


def distinct_rows(prefix: str, n: int) -> list[dict]:
    return [{"system": "", "question": f"{prefix} question {i}?", "chosen": f"Yes {i}.", "rejected": f"No {i}."}
            for i in range(n)]


def test_split_natural(tiny_config):
    path, run = tiny_config()
    paths = run_split(load_config(path))
    assert paths == [run / "data" / "step-1", run / "data" / "step-2"]
    for t, name in ((1, "a"), (2, "b")):
        ds, meta = read_step(run, t)
        assert ID_COLUMNS <= set(ds.column_names)
        assert set(ds["source"]) == {name} and len(ds) == 16
        assert list(ds["id"]) == [f"{name}-{i}" for i in range(16)]  # natural keeps source order
        assert (meta["stage"], meta["step"], meta["strategy"], meta["rows"]) == ("split", t, "natural", 16)
        assert meta["rows_per_source"] == {name: 16}
        assert meta["sources"]["a"]["read"] == meta["sources"]["a"]["kept"] == 16
        assert len(ds[0]["prompt_ids"]) > 0 and len(ds[0]["chosen_ids"]) > 0


def test_split_natural_steps_list_and_overlap_report(tiny_config):
    path, run = tiny_config(**{"split.steps": [["b"], ["a", "b"]]})
    a, b = distinct_rows("alpha", 6), distinct_rows("beta", 4)
    b.append(dict(a[0]))  # the same pair in both sources
    b.append({**a[1], "chosen": "Another answer."})  # the same prompt, another pair
    write_jsonl(path.parent / "a.jsonl", a)
    write_jsonl(path.parent / "b.jsonl", b)
    run_split(load_config(path))
    s1, m1 = read_step(run, 1)
    s2, m2 = read_step(run, 2)
    assert list(s1["id"]) == [f"b-{i}" for i in range(6)]
    assert list(s2["id"]) == [f"a-{i}" for i in range(6)] + [f"b-{i}" for i in range(6)]
    # b's six pairs (and so their six prompts) are in both steps; a-0 = b-4 and a-1's prompt = b-5's add none
    assert m1["overlap"] == m2["overlap"] == {"pairs_in_several_steps": 6, "prompts_in_several_steps": 6}


def test_split_overlap_counts_a_duplicated_pair(tiny_config):
    path, run = tiny_config()
    a, b = distinct_rows("alpha", 6), distinct_rows("beta", 4)
    b.append(dict(a[2]))  # pair duplicated across the two sources, hence steps
    b.append({**a[3], "chosen": "Another answer."})  # only the prompt is shared
    write_jsonl(path.parent / "a.jsonl", a)
    write_jsonl(path.parent / "b.jsonl", b)
    run_split(load_config(path))
    _, meta = read_step(run, 1)
    assert meta["overlap"] == {"pairs_in_several_steps": 1, "prompts_in_several_steps": 2}


def test_split_stratified_keeps_proportions(tiny_config):
    path, run = tiny_config(**{"split.strategy": "stratified", "split.fractions": [0.25, 0.75]})
    write_jsonl(path.parent / "b.jsonl", distinct_rows("beta", 8))
    run_split(load_config(path))
    s1, m1 = read_step(run, 1)
    s2, m2 = read_step(run, 2)
    assert m1["rows_per_source"] == {"a": 4, "b": 2} and m2["rows_per_source"] == {"a": 12, "b": 6}
    assert Counter(list(s1["source"])) == Counter(a=4, b=2) and Counter(list(s2["source"])) == Counter(a=12, b=6)
    every = [f"a-{i}" for i in range(16)] + [f"b-{i}" for i in range(8)]
    assert sorted(list(s1["id"]) + list(s2["id"])) == sorted(every)  # each pair in exactly one step
    assert ID_COLUMNS <= set(s2.column_names) and m2["strategy"] == "stratified"


def test_split_random_seeded(tiny_config, tmp_path):
    path, run = tiny_config(**{"split.strategy": "random", "split.fractions": [0.5, 0.5]})

    def ids(*overrides):
        cfg = load_config(path, list(overrides))
        run_split(cfg)
        root = Path(cfg.run_dir)
        return [list(read_step(root, t)[0]["id"]) for t in (1, 2)]

    first = ids(f"run_dir={tmp_path / 'r1'}")
    assert [len(s) for s in first] == [16, 16]
    assert sorted(first[0] + first[1]) == sorted([f"a-{i}" for i in range(16)] + [f"b-{i}" for i in range(16)])
    assert first == ids(f"run_dir={tmp_path / 'r2'}")  # same seed, same steps
    other = ids(f"run_dir={tmp_path / 'r3'}", "seed=7")
    assert other != first
    assert sorted(other[0] + other[1]) == sorted(first[0] + first[1])


def test_split_curriculum_orders_by_base_gamma(tiny_config):
    path, run = tiny_config(**{"split.strategy": "curriculum", "split.fractions": [0.5, 0.5]})
    run_split(load_config(path))
    s1, _ = read_step(run, 1)
    s2, _ = read_step(run, 2)
    assert "gamma_base" in s1.column_names and ID_COLUMNS <= set(s1.column_names)
    gammas = list(s1["gamma_base"]) + list(s2["gamma_base"])
    assert len(gammas) == 32
    assert all(x >= y for x, y in zip(gammas, gammas[1:]))  # easy (high γ under S) first
    assert gammas[0] > gammas[-1]


def test_split_curriculum_per_token_score_and_length_correlation(tiny_config, capsys):
    """split.curriculum_score=gamma_per_token sorts by per-token γ; the split reports each score's correlation with
    the replies' length difference, in meta.json and on stderr; the default sorts by γ as before."""
    from sdpo_cli.split import pearson

    path, run = tiny_config(**{"split.strategy": "curriculum", "split.fractions": [0.5, 0.5],
                               "split.curriculum_score": "gamma_per_token"})
    run_split(load_config(path))
    (s1, m1), (s2, _) = read_step(run, 1), read_step(run, 2)
    rows = s1.to_list() + s2.to_list()
    scores = [r["gamma_base_per_token"] for r in rows]
    assert all(x >= y for x, y in zip(scores, scores[1:])) and scores[0] > scores[-1]
    diff = [len(r["chosen_ids"]) - len(r["rejected_ids"]) for r in rows]
    report = m1["curriculum"]
    assert (report["score"], report["pairs"]) == ("gamma_per_token", 32)
    gammas = [r["gamma_base"] for r in rows]
    assert report["length_correlation"]["gamma"] == pytest.approx(pearson(gammas, diff))
    assert report["length_correlation"]["gamma_per_token"] == pytest.approx(pearson(scores, diff))
    err = capsys.readouterr().err
    assert "curriculum: sorted by gamma_per_token; correlation with the length difference" in err
    path, run = tiny_config(**{"split.strategy": "curriculum", "split.fractions": [0.5, 0.5], "run_dir":
                               str(path.parent / "default")})
    run_split(load_config(path))
    s1, m1 = read_step(path.parent / "default", 1)
    assert m1["curriculum"]["score"] == "gamma" and "gamma_base_per_token" not in s1.column_names


def test_pearson():
    from sdpo_cli.split import pearson

    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) is None and pearson([1], [2]) is None


def test_split_warns_once_per_source_when_prompts_are_not_token_prefixes(tiny_config, capsys):
    path, run = tiny_config(**{"model.chat_template": NOT_A_PREFIX})
    run_split(load_config(path))
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 2, err  # one per source
    assert "source 'a': in 16 of 16 pairs the tokenized prompt is not a prefix" in warnings[0]
    assert f"(first: {path.parent / 'a.jsonl'}:1, whose prompt ends in" in warnings[0]
    assert "prompts not a token prefix 16" in err
    _, meta = read_step(run, 1)
    assert meta["sources"]["a"]["prompt_not_prefix"] == 16 == meta["sources"]["b"]["prompt_not_prefix"]


def test_split_without_the_warning_reports_no_prefix_count(tiny_config, capsys):
    path, run = tiny_config()
    run_split(load_config(path))
    assert "Warning:" not in capsys.readouterr().err
    assert "prompt_not_prefix" not in read_step(run, 1)[1]["sources"]["a"]


UF_ROWS = [{"prompt": f"Q{i}?", "chosen": [user(f"Q{i}?"), assistant(f"Good {i}.")],
            "rejected": [user(f"Q{i}?"), assistant(f"Bad {i}.")], "score_chosen": 8.0,
            "score_rejected": 8.0 if i % 3 == 0 else 5.0} for i in range(9)]


def test_drop_ties(tmp_path):
    path = write_jsonl(tmp_path / "uf.jsonl", UF_ROWS)
    assert len(load(path).pairs) == 9  # off by default: ties are kept
    loaded = load_pairs(SourceConfig(name="s", path=str(path)), drop_ties=True)
    assert [p["id"] for p in loaded.pairs] == [f"s-{i}" for i in range(9) if i % 3]
    assert loaded.skipped == Counter({"tied scores (data.drop_ties)": 3})
    argilla = [{"chosen": r["chosen"], "rejected": r["rejected"], "chosen-rating": r["score_chosen"],
                "rejected-rating": r["score_rejected"]} for r in UF_ROWS]
    loaded = load_pairs(SourceConfig(name="s", path=str(write_jsonl(tmp_path / "ar.jsonl", argilla))), drop_ties=True)
    assert loaded.format == "argilla" and len(loaded.pairs) == 6
    orca = load_pairs(SourceConfig(name="s", path=str(write_jsonl(tmp_path / "o.jsonl", ORCA_ROWS))), drop_ties=True)
    assert len(orca.pairs) == 3  # no scores, nothing to tie


def test_split_counts_dropped_ties(tiny_config, tmp_path, capsys):
    uf = write_jsonl(tmp_path / "uf.jsonl", UF_ROWS)
    path, run = tiny_config(**{"data.drop_ties": True, "data.sources": [
        {"name": "a", "path": str(tmp_path / "a.jsonl")}, {"name": "uf", "path": str(uf)}]})
    run_split(load_config(path))
    _, meta = read_step(run, 2)
    assert meta["sources"]["uf"] == {"read": 9, "kept": 6, "truncated": 0, "dropped_too_long": 0,
                                     "tied scores (data.drop_ties)": 3}
    assert "uf: read 9, kept 6, truncated 0, dropped (too long) 0, skipped {'tied scores (data.drop_ties)': 3}" \
        in capsys.readouterr().err


def test_split_warns_when_the_base_is_pretrained_only(tiny_config, capsys, monkeypatch):
    from sdpo_cli import models

    path, _ = tiny_config()
    cfg = load_config(path)
    monkeypatch.setattr(models, "PRETRAINED_ONLY", (*models.PRETRAINED_ONLY, cfg.model.base))
    monkeypatch.setattr(models, "_warned_pretrained", set())
    run_split(cfg)
    run_split(cfg)  # finished already; the process has warned once
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1 and "is a pretrained model, not a supervised fine-tune" in warnings[0]


def test_known_pretrained_ids_warn_once_and_others_not(monkeypatch):
    from sdpo_cli import models

    monkeypatch.setattr(models, "_warned_pretrained", set())
    said = []
    assert models.warn_if_pretrained(ModelConfig(base="upstage/SOLAR-10.7B-v1.0"), said.append)
    assert not models.warn_if_pretrained(ModelConfig(base="upstage/solar-10.7b-v1.0"), said.append)  # once
    assert not models.warn_if_pretrained(ModelConfig(base="upstage/SOLAR-10.7B-Instruct-v1.0"), said.append)
    assert not models.warn_if_pretrained(ModelConfig(base="/models/solar-sft"), said.append)
    assert models.warn_if_pretrained(ModelConfig(base="mistralai/Mistral-7B-v0.1"), said.append)
    assert len(said) == 2 and "model.base upstage/SOLAR-10.7B-v1.0 is a pretrained model" in said[0]


# ---------------------------------------------------------------------------------------------------------------
# The real fixtures


def test_real_orca_fixture(shared_fixtures):
    path = shared_fixtures / "orca_dpo_pairs.sample.jsonl"
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    loaded = load(path)
    assert (loaded.format, loaded.rows_read, len(loaded.pairs)) == ("orca", 284, 284)
    first = loaded.pairs[0]
    assert first["prompt"] == [system(raw[0]["system"]), user(raw[0]["question"])]
    assert (first["chosen"], first["rejected"]) == (raw[0]["chosen"], raw[0]["rejected"])


def test_real_ultrafeedback_fixture(shared_fixtures):
    path = shared_fixtures / "ultrafeedback_binarized.sample.jsonl"
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    loaded = load(path)
    assert (loaded.format, loaded.rows_read, len(loaded.pairs)) == ("ultrafeedback", 300, 299)
    assert loaded.skipped == Counter({"chosen identical to rejected": 1})
    same = [i for i, r in enumerate(raw) if r["chosen"][1]["content"] == r["rejected"][1]["content"]]
    assert len(same) == 1
    kept = {p["id"]: p for p in loaded.pairs}
    assert f"s-{same[0]}" not in kept
    for i, row in enumerate(raw):
        if i == same[0]:
            continue
        pair = kept[f"s-{i}"]
        assert pair["prompt"] == [user(row["prompt"])]  # the user message
        assert pair["chosen"] == row["chosen"][1]["content"]  # the assistant reply
        assert pair["rejected"] == row["rejected"][1]["content"]
        assert pair["template"] == "chat"


def test_real_ultrafeedback_fixture_ties(shared_fixtures):
    path = shared_fixtures / "ultrafeedback_binarized.sample.jsonl"
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    ties = {i for i, r in enumerate(raw) if r["score_chosen"] == r["score_rejected"]}
    assert len(ties) == 34
    loaded = load_pairs(SourceConfig(name="s", path=str(path)), drop_ties=True)
    # the row with identical replies is one of the ties: it is counted as a tie, the first reason that applies
    assert loaded.skipped == Counter({"tied scores (data.drop_ties)": 34}) and len(loaded.pairs) == 266
    assert not ties & {int(p["id"].split("-")[1]) for p in loaded.pairs}


def test_real_fixtures_cut_prompts_keep_bos_and_framing(shared_fixtures, stories_dir):
    """The reported case: the fixtures config (stories260K, the built-in solar template, max_prompt_length 128)
    cut Orca prompts from the left down to 'tant:\\n'. Now every prompt starts with BOS and a header and ends with
    the assistant header, within the cap."""
    from sdpo_cli.models import load_tokenizer

    tok = load_tokenizer(ModelConfig(base=str(stories_dir)))
    for name in ("orca_dpo_pairs", "ultrafeedback_binarized"):
        pairs = load(shared_fixtures / f"{name}.sample.jsonl").pairs[:40]
        stats = TokenizeStats()
        kept, dropped = tokenize_pairs(tok, pairs, max_length=256, max_prompt_length=128, stats=stats)
        assert dropped == 0 and stats.prompt_cut > 0 and stats.prompt_not_prefix == 0
        for pair in kept:
            text = tok.decode(pair["prompt_ids"])
            assert len(pair["prompt_ids"]) <= 128 and pair["prompt_ids"][0] == tok.bos_token_id
            assert text.startswith(("<s> ### System:\n", "<s> ### User:\n")), text[:40]
            assert text.endswith("\n\n### Assistant:\n") and "### User:\n" in text


def test_tokenizer_is_loaded_once_per_run_context(tiny_model_dir, tmp_path):
    """One command (one RunContext) loads the base tokenizer once for all its stages; a new command loads it anew,
    so rewritten tokenizer files are read again (there is no process-wide cache any more)."""
    import shutil

    from sdpo_cli.config import ModelConfig
    from sdpo_cli.context import RunContext

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    cfg = ModelConfig(base=str(folder))
    ctx = RunContext()
    first = ctx.tokenizer(cfg)
    assert ctx.tokenizer(cfg) is first
    assert ctx.tokenizer(ModelConfig(base=str(folder), chat_template="chatml")) is not first  # other settings
    first.save_pretrained(str(folder))  # rewritten files: the next command reads them again
    assert RunContext().tokenizer(cfg) is not first