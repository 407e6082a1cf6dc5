"""Every record loader, fed any JSON values or any bytes, returns records or raises one located DataError: nothing
else (no other exception, no hang), so a bad data file is always one line naming the file (and line)."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tristage.data.chat import load_conversations
from tristage.data.preference import load_preferences
from tristage.data.records import load_records, prompt_messages
from tristage.io import DataError, read_jsonl

LOADERS = {
    "conversations": lambda path, on_error: load_conversations(path, on_error=on_error),
    "preferences": lambda path, on_error: load_preferences(path, on_error=on_error),
    "prompts": lambda path, on_error: load_records(path, lambda obj, line: prompt_messages(obj.get("prompt"))
                                                   if isinstance(obj, dict) else prompt_messages(obj), on_error),
    "read_jsonl": lambda path, on_error: (list(read_jsonl(path)), []),
}
KEYS = ["messages", "conversations", "prompt", "chosen", "rejected", "role", "content", "from", "value",
        "instruction", "input", "output", "system", "ratings", "meta", "question", "answer_a", "answer_b",
        "overall_preference", "response1", "response2", "annotator1", "annotator2", "annotator3", "rationale"]
# JSON values biased toward the shapes the loaders look for, so the parsers are exercised past their first check
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) \
    | st.sampled_from(["user", "assistant", "system", "human", "gpt", "\n\nHuman: a\n\nAssistant: b", " "])
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=5), max_leaves=24)
hsettings = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def check(path: Path, loader: str, on_error: str) -> None:
    try:
        records, errors = LOADERS[loader](path, on_error)
    except DataError as e:
        assert e.path == str(path) and str(e).startswith(f"{path}:"), str(e)
        return
    assert records or errors
    for e in errors:
        assert isinstance(e, DataError) and e.path == str(path) and e.line is not None


def dumps(value) -> str:
    return json.dumps(value, allow_nan=True)


@pytest.mark.parametrize("loader", sorted(LOADERS))
@hsettings
@given(rows=st.lists(values, max_size=6), as_list=st.booleans(), on_error=st.sampled_from(["raise", "skip"]))
@example(rows=[{"prompt": "a", "chosen": "b", "rejected": "c", "ratings": {"chosen": {"x": math.nan},
                                                                         "rejected": {"x": 1}}}],
         as_list=False, on_error="raise")
@example(rows=[{"prompt": "a", "chosen": "b", "rejected": "c", "ratings": {"chosen": {"x": 10 ** 400},
                                                                         "rejected": {"x": 1}}}],
         as_list=True, on_error="skip")
def test_any_json_gives_records_or_a_located_error(tmp_path, loader, rows, as_list, on_error):
    path = tmp_path / ("r.json" if as_list else "r.jsonl")
    path.write_text(dumps(rows) if as_list else "".join(dumps(r) + "\n" for r in rows), encoding="utf-8")
    check(path, loader, on_error)


@pytest.mark.parametrize("loader", sorted(LOADERS))
@hsettings
@given(data=st.binary(max_size=300), gz=st.sampled_from(["no", "whole", "cut"]),
       on_error=st.sampled_from(["raise", "skip"]))
@example(data=b"\xef\xbb\xbf" + b'{"messages": [{"role": "user", "content": "a"}]}\n', gz="no", on_error="raise")
@example(data=b'{"prompt": "a\\ud800"}\n', gz="no", on_error="skip")
@example(data=b"[" * 5000, gz="no", on_error="raise")
@example(data=b'{"a": ' + b"9" * 5000 + b"}", gz="whole", on_error="skip")
@example(data=b'{"prompt": "a"}\n' * 50, gz="cut", on_error="raise")
def test_any_bytes_give_records_or_a_located_error(tmp_path, loader, data, gz, on_error):
    """Arbitrary bytes as a file, plain, gzipped, or gzipped and cut short (a truncated download)."""
    path = tmp_path / ("r.jsonl" if gz == "no" else "r.jsonl.gz")
    packed = gzip.compress(data, mtime=0)
    path.write_bytes(data if gz == "no" else packed if gz == "whole" else packed[:len(packed) // 2])
    check(path, loader, on_error)


def test_ratings_must_be_finite(tmp_path):
    row = {"prompt": "a", "chosen": "b", "rejected": "c", "ratings": {"chosen": {"x": 1}, "rejected": {"x": 2}}}
    for bad in ("NaN", "Infinity", "-Infinity", "1e999", "1" + "0" * 400):
        text = dumps(row).replace('"x": 2', f'"x": {bad}')
        path = tmp_path / "p.jsonl"
        path.write_text(dumps(row) + "\n" + text + "\n", encoding="utf-8")
        with pytest.raises(DataError, match=r"p\.jsonl:2: field 'ratings\.rejected\.x': expected a finite number"):
            load_preferences(path)


def test_file_level_errors_name_the_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "list.json").write_text("[]")
    (tmp_path / "folder").mkdir()
    for name, message in (("empty.jsonl", "no records"), ("list.json", "no records"), ("folder", "is a folder"),
                          ("missing.jsonl", "no such file")):
        for loader in LOADERS:
            if loader == "read_jsonl" and name == "list.json":  # plain JSONL of objects: a list is a bad line
                message = r"list\.json:1: expected a JSON object, got list"
            with pytest.raises(DataError, match=message) as e:
                LOADERS[loader](tmp_path / name, "skip")
            assert str(e.value).startswith(f"{tmp_path / name}:")
