"""Corpus readers: every schema, every file shape, and bad records counted, never fatal."""

from __future__ import annotations

import gzip
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from babyllama.chat_format import is_unicode
from babyllama.data.preferences import NO_PROMPT
from babyllama.data.sources import CorpusReader, expand_inputs, held_out_split, iconv_command, iter_records
from babyllama.errors import UserError


def jsonl(path, lines):
    path.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x, ensure_ascii=False).encode()) + b"\n"
                              for x in lines))
    return path


def test_jsonl_with_bad_records_keeps_every_good_one(tmp_path):
    f = jsonl(tmp_path / "c4.jsonl", [
        b"\xef\xbb\xbf" + json.dumps({"text": "第一篇"}, ensure_ascii=False).encode(),  # BOM on line 1
        {"text": "第二篇"},
        b"{not json",                                  # line 3: malformed
        {"title": "no text field"},                    # line 4: missing field
        {"text": 42},                                  # line 5: wrong type
        b"\xff\xfe bad utf-8",                         # line 6: invalid UTF-8
        b"",                                           # blank line: neither a record nor bad
        {"text": "第三篇"},
    ])
    bad = []

    class Log:
        def write(self, s):
            bad.append(s.strip())

    reader = CorpusReader([f], bad_log=Log())
    assert list(reader.documents()) == ["第一篇", "第二篇", "第三篇"]
    stats = reader.stats[str(f)]
    assert (stats.records, stats.bad, stats.schema) == (7, 4, "text")
    assert bad == [f"{f}:3: not valid JSON (Expecting property name enclosed in double quotes)",
                   f"{f}:4: lacks the fields of the text schema", f"{f}:5: its 'text' is a number, not a string",
                   f"{f}:6: not valid JSON (Expecting value)"]



def test_a_field_of_another_type_is_named_with_its_type(tmp_path):
    """`{"text": 123}` and `{"text": ["a"]}` were records that "lack the fields of the text schema", though the field
    is there: the reason names it and its type, as SFT's, DPO's and eval's do; a field that is absent or null lacks."""
    f = jsonl(tmp_path / "t.jsonl", [{"text": 123}, {"text": ["a"]}, {"text": None}, {"text": "好"}])
    g = jsonl(tmp_path / "b.jsonl", [{"title": "北京", "sections": "历史"}, {"title": 5, "sections": []},
                                     {"instruction": "问", "output": {"a": 1}}, {"title": "题", "content": 1.5}])
    for path, format, why in [
            (f, None, ["its 'text' is a number, not a string", "its 'text' is a list, not a string",
                       "lacks the fields of the text schema"]),
            (g, "baike", ["its 'sections' is a string, not a list of sections", "its 'title' is a number, not a string",
                          "lacks the fields of the baike schema", "lacks the fields of the baike schema"]),
            (g, "instruction", ["lacks the fields of the instruction schema"] * 2 + [
                "its 'output' is an object, not a string", "lacks the fields of the instruction schema"]),
            (g, "wudao", ["lacks the fields of the wudao schema"] * 3 + ["its 'content' is a number, not a string"])]:
        reader = CorpusReader([path], format, bad_log=(log := io.StringIO()))
        list(reader.documents())
        assert log.getvalue().splitlines() == [f"{path}:{i}: {w}" for i, w in enumerate(why, 1)], format


def test_bad_bytes_a_lone_surrogate_and_an_empty_conversations_list_each_say_what_they_are(tmp_path):
    """Bytes that are not UTF-8 and a JSON escape \\ud800 were both "a lone surrogate (\\ud800-\\udfff) or bytes
    that are not text"; an empty conversations list "lacks the fields of the conversation schema"."""
    f = jsonl(tmp_path / "c.jsonl", [b'{"text": "\xe5\xa5\xbd\xff"}', b'{"text": "a\\ud800b"}',
                                     {"conversations": []}, {"conversations": [{"role": "user"}]},
                                     {"text": "好"}, {"text": "第二篇"}])
    log = io.StringIO()
    reader = CorpusReader([f], bad_log=log, format="text")
    assert list(reader.documents()) == ["好", "第二篇"]
    assert log.getvalue().splitlines() == [f"{f}:1: holds bytes that are not text in the file's encoding (\\xff)",
                                           f"{f}:2: holds a lone surrogate (\\ud800-\\udfff), which no tokenizer can "
                                           "encode", f"{f}:3: lacks the fields of the text schema",
                                           f"{f}:4: lacks the fields of the text schema"]
    reader = CorpusReader([f], bad_log=(log := io.StringIO()), format="conversation")
    assert list(reader.documents()) == []
    assert log.getvalue().splitlines() == [f"{f}:{n}: lacks the fields of the conversation schema" for n in (1, 2)] + [
        f"{f}:3: its 'conversations' list is empty: there is no message",
        f"{f}:4: conversations item 1: no 'content' (or 'value')"] + [
        f"{f}:{n}: lacks the fields of the conversation schema" for n in (5, 6)]


def traced(func: Callable[[], object]) -> tuple[object, int, int]:
    """func(), and the bytes that tracemalloc traced: held when it returned, and at the peak."""
    import tracemalloc

    tracemalloc.start()
    try:
        result = func()
        return result, *tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_a_long_record_is_held_once_while_it_is_read(tmp_path, suffix):
    """pretokenize's main process held ~8 bytes a character of a long JSON line while its document was worked on: the
    line as read and without its line break (the reader's frames kept both), the text, and its UTF-8 while the
    check for lone surrogates encoded it. It holds the text alone now, and at the peak, while the line is read and
    decoded, about twice it (Python's readline and json.loads each make a second copy), with the file's buffer."""
    text = "".join(chr(0x4E00 + i * 7 % 3000) for i in range(1_000_000))  # 2 MB as a str, 3 MB as UTF-8
    path = tmp_path / f"long{suffix}"
    path.write_text((json.dumps({"text": text}, ensure_ascii=False) if suffix == ".jsonl" else text) + "\n\n")
    documents = CorpusReader([path]).documents()
    got, held, peak = traced(lambda: next(documents))
    assert got == text and list(documents) == []
    size, buffer = len(text) * 2, 1 << 21  # the file's 1 MiB buffer (open_text), and some
    assert held < size + buffer and peak < 2 * size + buffer, (held / size, peak / size)  # before: 3.6x, 5.1x
    ok, _, peak = traced(lambda: is_unicode(text))
    assert ok and peak < 1 << 12  # searched, not encoded: 3 MB before


@pytest.mark.parametrize("suffix", [".jsonl", ".txt", ".csv"])
def test_an_over_long_line_is_skipped_holding_at_most_the_limit(tmp_path, monkeypatch, suffix):
    """A line over MAX_RECORD_CHARS was read with a readline of the limit (its copy and the joined line: twice the
    limit), and its rest a limit at a time beside that: ~430 MB for a line of 64 Mi Chinese characters. It is read
    in chunks of LINE_CHUNK_CHARS, let go once past the limit: at most the limit and a chunk are held (the peak with
    the file's buffer: 1.5 times the limit, 4.5 before)."""
    import babyllama.data.sources as sources

    limit = 1 << 20
    monkeypatch.setattr(sources, "MAX_RECORD_CHARS", limit)
    monkeypatch.setattr(sources, "LINE_CHUNK_CHARS", 1 << 14)
    long = "".join(chr(0x4E00 + i * 7 % 3000) for i in range(4 * limit))
    rows = ["短的第一行", long, "短的第三行"]
    path = tmp_path / f"a{suffix}"
    path.write_text("".join((json.dumps({"text": r}, ensure_ascii=False) if suffix == ".jsonl" else r) + "\n"
                            for r in (["text"] if suffix == ".csv" else []) + rows), encoding="utf-8")
    reader = CorpusReader([path], bad_log=(log := io.StringIO()))
    got, _, peak = traced(lambda: list(reader.documents()))
    line = 3 if suffix == ".csv" else 2
    assert got == [rows[0], rows[2]] and log.getvalue() == f"{path}:{line}: a line over {limit} characters\n"
    assert peak < 2 * limit + (1 << 21), peak / (2 * limit)  # the limit (2 bytes a character) and a file buffer


@pytest.mark.parametrize("suffix", [".jsonl", ".txt", ".csv"])
def test_lines_are_read_the_same_in_chunks_of_any_size(tmp_path, monkeypatch, suffix):
    """A line is read LINE_CHUNK_CHARS at a time; a chunk that ends between the \\r and \\n of a line break does not
    make the \\n a line of its own (the lines after it were numbered one too far). Lines ending in \\r\\n, \\r and
    \\n, blank ones, and some over MAX_RECORD_CHARS (bad), read in chunks of 1 to 6 characters: the same records at
    the same lines as at once."""
    import random

    import babyllama.data.sources as sources

    monkeypatch.setattr(sources, "MAX_RECORD_CHARS", 26 if suffix == ".jsonl" else 14)  # {"text": ""} is 12
    rng = random.Random(0)
    lines = ["text" if suffix == ".csv" else ""]
    for _ in range(300):
        text = "".join(rng.choices("天地玄黄abc", k=rng.choice([0, 1, 2, 5, 6, 7, 11, 12, 13, 16])))
        lines.append((json.dumps({"text": text}, ensure_ascii=False) if suffix == ".jsonl" and text else text)
                     + rng.choice(["\r\n", "\r", "\n"]))
    (tmp_path / f"a{suffix}").write_text("".join(lines), encoding="utf-8", newline="")
    whole = list(iter_records(tmp_path / f"a{suffix}"))
    assert 200 < sum(r is not None for _, r, _ in whole) and 10 < sum(r is None for _, r, _ in whole)
    for size in range(1, 7):
        monkeypatch.setattr(sources, "LINE_CHUNK_CHARS", size)
        assert list(iter_records(tmp_path / f"a{suffix}")) == whole, size


def test_openai_messages_records_are_conversation_records(tmp_path):
    """{"messages": [...]} (OpenAI's fine-tuning format, TRL's conversational one) had "none of the fields of a known
    schema": it is the conversation schema, its messages a line each, the developer role's text as the system's and
    text parts joined; of a record with both lists, the `conversations` is read; a non-text part is a bad record."""
    f = jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "developer", "content": "简洁"}, {"role": "user", "content": "你好"},
                      {"role": "assistant",
                       "content": [{"type": "text", "text": "你"}, {"type": "text", "text": "好！"}]}]},
        {"conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": "答"}],
         "messages": [{"role": "user", "content": "不读"}, {"role": "assistant", "content": "不读"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                      {"role": "assistant", "content": "一只猫"}]}])
    reader = CorpusReader([f], bad_log=(log := io.StringIO()))
    assert list(reader.documents()) == ["简洁\n你好\n你好！", "问\n答"]
    assert (reader.stats[str(f)].schema, reader.stats[str(f)].bad) == ("conversation", 1)
    assert log.getvalue() == f"{f}:3: messages item 1: a content part of type 'image_url'; only text parts are read\n"


def test_prompt_completion_records_are_instructions_not_wiki_articles(tmp_path, caplog):
    """{"prompt": ..., "completion": ...} (OpenAI's legacy fine-tuning format, TRL's prompt-completion type) was read
    as a wikipedia-cn article, its completion alone, its prompt dropped with a warning, and TRL's conversational one
    was bad ("its 'completion' is a list, not a string"): both are instructions, the prompt then the completion."""
    user, answer = {"role": "user", "content": "问一"}, {"role": "assistant", "content": "答一"}
    f = jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "判断情感：好吃", "completion": "正面"},
        {"prompt": [{"role": "system", "content": "系统"}, user, answer, {"role": "user", "content": "问二"}],
         "completion": [{"role": "assistant", "content": "答二"}]},
        {"prompt": "问", "completion": 5}])
    reader = CorpusReader([f], bad_log=(log := io.StringIO()))
    assert list(reader.documents()) == ["判断情感：好吃正面", "系统\n问一\n答一\n问二\n答二"]
    assert (reader.stats[str(f)].schema, reader.stats[str(f)].bad) == ("instruction", 1)
    assert log.getvalue() == f"{f}:3: its 'completion' is a number, not a string\n"
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [  # no field left out
        f"{f}:3: skipped a bad record: its 'completion' is a number, not a string"]
    wiki = jsonl(tmp_path / "wiki.jsonl", [{"completion": "维基百科文本", "source": "wiki"}])
    assert list(CorpusReader([wiki]).documents()) == ["维基百科文本"]


def test_prepare_finds_bad_the_conversational_prompt_completion_records_sft_finds_bad(tmp_path):
    """prepare read TRL's conversational prompt / completion by its own rules: a completion holding a user message, or
    a prompt ending with the assistant's, was text to learn, though sft refuses it; both now read it one way."""
    user, answer = {"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}
    f = jsonl(tmp_path / "pc.jsonl", [{"prompt": [user], "completion": [answer, user]},
                                      {"prompt": [user, answer], "completion": [answer]}])
    reader = CorpusReader([f], bad_log=(log := io.StringIO()))
    assert list(reader.documents()) == []
    assert log.getvalue().splitlines() == [
        f"{f}:1: its 'completion' holds a user message; a completion is the assistant's answer alone",
        f"{f}:2: its 'prompt' ends with the assistant's message, not the user's that the completion answers"]


def test_preference_pairs_are_their_prompt_then_their_chosen_answer(tmp_path, caplog):
    """prepare read LLaMA-Factory's and MedicalGPT's DPO records as their conversation alone, the prompt, without a
    word, and TRL's {prompt, chosen, rejected} as "has none of the fields of a known schema": each shape dpo reads is
    its prompt then its chosen answer, the text a model should learn; the rejected answer is not read."""
    user, good = {"role": "user", "content": "问"}, {"role": "assistant", "content": "好"}
    bad = {"role": "assistant", "content": "坏"}
    f = jsonl(tmp_path / "dpo.jsonl", [
        {"prompt": "问", "chosen": "好", "rejected": "坏"},
        {"prompt": [{"role": "system", "content": "系统"}, user], "chosen": [good], "rejected": [bad], "history": [
            ["早问", "早答"]]},
        {"chosen": [user, good], "rejected": [user, bad]},
        {"conversations": [{"from": "human", "value": "问"}], "chosen": {"from": "gpt", "value": "好"},
         "rejected": {"from": "gpt", "value": "坏"}},
        {"conversations": [user], "chosen": "好", "rejected": "坏", "system": "系统"},
        {"question": "问", "response_chosen": "好", "response_rejected": "坏"},
        {"prompt": "问", "chosen": 5, "rejected": "坏"}])
    reader = CorpusReader([f], bad_log=(log := io.StringIO()))
    assert list(reader.documents()) == ["问好", "早问早答\n系统\n问\n好", "问\n好", "问\n好", "系统\n问\n好", "问好"]
    assert (reader.stats[str(f)].schema, reader.stats[str(f)].bad) == ("preference", 1)
    assert log.getvalue() == f"{f}:7: its 'chosen' is a number, not a string or an assistant message\n"  # as dpo
    assert not [r for r in caplog.records if "more than one schema" in r.getMessage()]


def test_ultrafeedback_binarized_pairs_are_their_chosen_conversation_once(tmp_path, caplog):
    """HuggingFaceH4/ultrafeedback_binarized's records (a `prompt` string, `chosen` and `rejected` whole
    conversations, a `messages` list) were read as the messages then the chosen conversation: the prompt and answer
    twice. The chosen conversation holds the prompt; its `messages`, a copy of the chosen conversation, was named as
    left out in every record: it is named only where it differs from the chosen one (dpo's rule: preference_fields)."""
    user, good = {"role": "user", "content": "问"}, {"role": "assistant", "content": "好"}
    record = {"prompt": "问", "chosen": [user, good], "messages": [user, good],
              "rejected": [user, {"role": "assistant", "content": "坏"}]}
    f = jsonl(tmp_path / "uf.jsonl", [record, record, {**record, "messages": [user, user]}])
    assert list(CorpusReader([f]).documents()) == ["问\n好"] * 3
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{f}: records with the fields of more than one schema are read in the file's schema (of most of its records) "
        "where they fit it, else in the first of preference, conversation, instruction, wiki, baike, text, wudao, "
        f"leaving out the 'messages' of 1 record (the first at {f}:3); --format SCHEMA reads every record in the "
        "schema you choose"]


def test_a_pair_without_a_prompt_is_bad_and_leaves_no_field_out(tmp_path, caplog):
    """A preference record that dpo's reader reads no field of ({chosen, rejected}: no prompt) was a bad record and
    also said to leave out its 'chosen' and 'rejected' "read in the file's schema": a bad record leaves nothing out."""
    f = jsonl(tmp_path / "pairs.jsonl", [{"chosen": "好的回答", "rejected": "坏的回答"},
                                         {"chosen": [{"role": "user", "content": "问"}], "rejected": "坏"},
                                         {"prompt": "问题", "chosen": "好的回答", "rejected": "坏"}])
    assert list(CorpusReader([f]).documents()) == ["问题好的回答"]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{f}:1: skipped a bad record: {NO_PROMPT}", f"{f}:2: skipped a bad record: {NO_PROMPT}"]


def test_every_schema_of_the_recipe(tmp_path):
    files = {
        "wiki.json": json.dumps([{"completion": "维基百科文本", "source": "wiki"}, {"source": "no text"}]),
        "baike.jsonl": "\n".join(json.dumps(r, ensure_ascii=False) for r in [
            {"title": "北京", "summary": "中国首都", "sections": [{"title": "历史", "content": "很长"},
                                                           {"title": "地理", "content": "平原"}]},
            {"title": "无摘要", "summary": None, "sections": [{"title": "节", "content": "内容"}]},
            {"title": "坏", "sections": "not a list"},
        ]),
        "medical.jsonl": json.dumps({"text": "医学文本"}, ensure_ascii=False),
        "alpaca.json": json.dumps([{"instruction": "翻译：", "input": "hello", "output": "你好"},
                                   {"instruction": "问", "output": "答"}], ensure_ascii=False),
        "belle.json": json.dumps({"instruction": "写诗", "input": "", "output": "春眠不觉晓"}, ensure_ascii=False),
        "wudao.json": json.dumps([{"title": "标题", "content": "正文"}], ensure_ascii=False),
        "chat.jsonl": "\n".join(json.dumps(r, ensure_ascii=False) for r in [
            {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"}]},
            {"conversations": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]},
            {"conversations": [{"role": "robot", "content": "?"}]},
        ]),
        "notes.txt": "第一行\n\n第二行\n",
        "empty.jsonl": "",
    }
    for name, content in files.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    reader = CorpusReader([tmp_path / n for n in files])
    docs = list(reader.documents())
    assert docs == [
        "维基百科文本",
        "北京：中国首都历史：很长。地理：平原。", "节：内容。",
        "医学文本",
        "翻译：hello你好", "问答",
        "写诗春眠不觉晓",
        "标题\n正文",
        "你好\n你好！", "问\n答",
        "第一行", "第二行",
    ]
    schemas = {k.split("/")[-1]: (v.schema, v.records, v.bad) for k, v in reader.stats.items()}
    assert schemas == {
        "wiki.json": ("wiki", 2, 1), "baike.jsonl": ("baike", 3, 1), "medical.jsonl": ("text", 1, 0),
        "alpaca.json": ("instruction", 2, 0), "belle.json": ("instruction", 1, 0), "wudao.json": ("wudao", 1, 0),
        "chat.jsonl": ("conversation", 3, 1), "notes.txt": ("text", 2, 0), "empty.jsonl": ("", 0, 0),
    }


def test_json_array_with_a_syntax_error_keeps_what_came_before(tmp_path):
    f = tmp_path / "broken.json"
    f.write_text('[{"completion": "一"}, {"completion": "二"}, {"completion": ', encoding="utf-8")
    reader = CorpusReader([f])
    assert list(reader.documents()) == ["一", "二"]
    assert reader.stats[str(f)].bad == 1


def test_json_objects_over_several_lines_are_records_read_as_they_come(tmp_path):
    """A pretty-printed record (`json.dump(rec, f, indent=2)`) in a .json or .jsonl file, or several (`jq .`), was a
    bad record per line ("4 read, 4 bad ... not valid JSON (Expecting property name ...)"): the objects are records,
    each at the line where it begins, read one at a time as an array's items are, and a syntax error ends the file
    with one bad record, as in an array. JSON lines whose first record is broken stay JSON lines."""
    records = [{"instruction": f"问{i}", "output": f"答{i}"} for i in range(3)]
    one = tmp_path / "one.json"
    one.write_text(json.dumps(records[0], ensure_ascii=False, indent=2), encoding="utf-8")
    jq = tmp_path / "jq.jsonl"  # what `jq . records.jsonl` writes
    jq.write_text("".join(json.dumps(r, ensure_ascii=False, indent=2) + "\n" for r in records), encoding="utf-8")
    assert [(where, r, why) for where, r, why in iter_records(one)] == [(f"{one}:1", records[0], "")]
    assert [(where, r, why) for where, r, why in iter_records(jq)] == [
        (f"{jq}:{line}", r, "") for line, r in zip((1, 5, 9), records, strict=True)]
    reader = CorpusReader([one, jq])
    assert list(reader.documents()) == ["问0答0", "问0答0", "问1答1", "问2答2"] and reader.totals() == (4, 0)
    brace = tmp_path / "brace.json"  # the first key beside its brace, then objects that are no records and a cut one
    brace.write_text('{"text": "甲",\n "id": 1}\n[1, 2]\n\n{"text":\n "乙"}{"text": "丙"}\n{"text": "丁",\n', "utf-8")
    assert [(where, r, why) for where, r, why in iter_records(brace)] == [
        (f"{brace}:1", {"text": "甲", "id": 1}, ""), (f"{brace}:3", None, "not a JSON object"),
        (f"{brace}:5", {"text": "乙"}, ""), (f"{brace}:6", {"text": "丙"}, ""),
        (f"{brace}:7", None, "invalid JSON (Expecting property name enclosed in double quotes); the rest of the file "
                             "is skipped")]
    broken = tmp_path / "broken.jsonl"  # JSON lines with a broken first line: each line its own record
    broken.write_text('{"text": "甲",\n{"text": "乙"}\n', encoding="utf-8")
    assert [(r, why) for _, r, why in iter_records(broken)] == [
        (None, "not valid JSON (Expecting property name enclosed in double quotes)"), ({"text": "乙"}, "")]
    broken.write_text('{"text": \n{"text": "乙"}\n', encoding="utf-8")  # a cut line that the next one completes
    assert [(r, why) for _, r, why in iter_records(broken)] == [
        (None, "not valid JSON (Expecting value)"), ({"text": "乙"}, "")]


def test_a_json_error_at_a_place_says_the_place():
    """A raw NUL in a JSON line was `not valid JSON (Invalid control character at)`: json's msg without its position.
    The message that names a place ends with it: the column of a JSON line (the line is in the location), the line
    of the file in an array or objects over lines; the others are as json says them."""
    import io

    from babyllama.data.sources import records_json_array, records_jsonl

    lines = io.StringIO('{"text": "甲\x00乙"}\n{"text" "丁"}\n{"text": "ab}\n{"text": "丙')  # the last line cut
    assert [why for _, _, why in records_jsonl("f.jsonl", lines)] == [
        "not valid JSON (Invalid control character at column 12)", "not valid JSON (Expecting ':' delimiter)",
        "not valid JSON (Unterminated string: the line ends inside it at column 14)",  # not a "control character"
        "not valid JSON (Unterminated string starting at column 10)"]
    array = io.StringIO('[{"text": "甲"},\n {"text":\n  "乙\x00"}]')
    assert [(where, why) for where, _, why in records_json_array("a.json", array)] == [
        ("a.json:item 1", ""), ("a.json:item 2", "invalid JSON (Invalid control character at line 3); the rest of the "
                                                 "file is skipped")]


def test_a_raw_line_break_in_a_string_is_said_so_in_an_array_and_a_cut_string_in_a_json_line():
    """A raw line break inside a string of a JSON array (printf '[{"text": "first line\\nsecond line"}]') was
    "Unterminated string: the line ends inside it", but the string is closed on the next line: in a value over lines
    the fault is said as a line break JSON writes as \\n (or a string left open); in a JSON line, where the line ends
    the record, still as a string the line ends inside."""
    import io

    from babyllama.data.sources import records_json_array, records_json_objects, records_jsonl

    raw = ("invalid JSON (a line break inside a string at line {}, which JSON writes as \\n, or a string left open); "
           "the rest of the file is skipped")
    array = io.StringIO('[{"text": "first line\nsecond line"}]')
    assert [(where, why) for where, _, why in records_json_array("a.json", array)] == [
        ("a.json:item 1", raw.format(1))]
    objects = io.StringIO('{"text": "甲"}\n{\n  "text": "乙\r\n丙"\n}\n')
    assert [(where, why) for where, _, why in records_json_objects("o.json", objects)] == [
        ("o.json:1", ""), ("o.json:2", raw.format(3))]
    lines = io.StringIO('{"text": "first line\nsecond line"}\n')
    assert [why for _, _, why in records_jsonl("l.jsonl", lines)] == [
        "not valid JSON (Unterminated string: the line ends inside it at column 21)",
        "not valid JSON (Expecting value)"]


def test_json_objects_over_several_lines_are_read_in_memory_of_one(tmp_path):
    """Objects over lines are read as they come, not the file whole: the first is read with the first MiB (a read's
    buffer) of a file of 6 MB, and one over the first 64 KiB (the sample that tells the shape) is read whole."""
    big = {"text": "长" * 100_000}
    f = tmp_path / "big.json"
    f.write_text("".join(json.dumps(r, ensure_ascii=False, indent=2) + "\n"
                         for r in [{"text": "短"}, big, *({"text": f"第{i}条"} for i in range(200_000))]), "utf-8")
    positions = []
    records = iter_records(f, positions.append)
    assert next(records) == (f"{f}:1", {"text": "短"}, "")
    assert positions[0]() <= 1 << 20 < f.stat().st_size // 3
    assert next(records) == (f"{f}:4", big, "") and sum(1 for _ in records) == 200_000
    f.write_text(json.dumps(big, ensure_ascii=False, indent=2), "utf-8")  # the first object longer than the sample
    assert list(iter_records(f)) == [(f"{f}:1", big, "")]


def test_compressed_parquet_and_csv(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "压缩一"}, ensure_ascii=False) + "\n")
    raw = json.dumps([{"completion": "压缩二"}], ensure_ascii=False).encode()
    (tmp_path / "b.json.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    pq.write_table(pa.table({"text": ["列一", "列二"], "id": [1, 2]}), tmp_path / "c.parquet")
    (tmp_path / "d.csv").write_text("prompt,text\nx,表格\n", encoding="utf-8")
    reader = CorpusReader([tmp_path])  # a directory: its files, sorted
    assert list(reader.documents()) == ["压缩一", "压缩二", "列一", "列二", "表格"]


def test_bytes_read_follows_each_file_as_stored_to_total_bytes(tmp_path):
    """prepare's and pretokenize's bars count the bytes read of the inputs as stored, of total_bytes (their sizes), so
    that they show a percentage and an ETA: a compressed file by what was read of it, a parquet file by its rows."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rng = random.Random(0)
    docs = ["".join(chr(rng.randrange(0x4E00, 0x9FA5)) for _ in range(200)) for _ in range(2000)]  # 1.2 MB
    lines = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode()
    files = [tmp_path / n for n in ("a.jsonl.gz", "b.jsonl.zst", "c.parquet", "d.jsonl")]
    files[0].write_bytes(gzip.compress(lines))
    files[1].write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"text": docs}), files[2])
    files[3].write_bytes(lines)  # over the 1 MiB buffer: read in two
    reader = CorpusReader(files)
    assert reader.bytes_read() == 0 and reader.total_bytes == sum(f.stat().st_size for f in files)
    seen: dict[str, list[int]] = {}  # file -> bytes_read after each of its documents
    for source, _ in reader.documents_with_source():
        seen.setdefault(source, []).append(reader.bytes_read())
    before = 0
    for f in files:
        got = seen[str(f)]
        assert len(got) == 2000 and got == sorted(got) and before <= got[0] and got[-1] <= before + f.stat().st_size
        assert len(set(got)) >= (2 if f.suffix == ".jsonl" else 8), (f, sorted(set(got)))  # zstd: by its blocks
        before += f.stat().st_size
    assert reader.bytes_read() == reader.total_bytes


def test_a_folder_means_its_data_files_not_babyllama_outputs_inside_it(tmp_path, bpe_tokenizer):
    from babyllama.checkpoint import save_checkpoint
    from babyllama.data.pretokenize import pretokenize
    from tests.conftest import sharp_model, tiny_config

    for name in ("b/x.jsonl", "a.txt", "b.csv", "b/c/y.json.gz", "b/notes.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    (tmp_path / "a/clean").mkdir(parents=True)
    jsonl(tmp_path / "a/clean/part_00000.jsonl", [{"text": "清洗过的"}])  # a `prepare` output inside
    (tmp_path / "a/clean/stats.json").write_text("{}")
    (tmp_path / "a/clean/bad_records.txt").write_text("x.jsonl:1: not valid JSON\n")
    bpe_tokenizer.save(tmp_path / "tok")
    pretokenize([str(tmp_path / "a/clean/part_00000.jsonl")], str(tmp_path / "tok"), tmp_path / "a/tokens")
    save_checkpoint(tmp_path / "b/ck", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache/z.jsonl").write_text("{}")
    (tmp_path / "b/.part_00001.jsonl").write_text("{")  # a temporary
    assert [str(f.relative_to(tmp_path)) for f in expand_inputs([tmp_path])] == [
        "a/clean/part_00000.jsonl", "a.txt", "b/c/y.json.gz", "b/x.jsonl", "b.csv"]  # sorted as all paths


def test_a_prepare_output_folder_means_its_part_files_and_every_data_file_beside_them(tmp_path):
    from babyllama.data.clean import prepare

    d = tmp_path / "data"  # the demo's layout: raw/ input, prepare's output, then sft.jsonl and eval.jsonl beside it
    (d / "raw").mkdir(parents=True)
    jsonl(d / "raw" / "pretrain.jsonl", [{"text": f"第{i}篇文章的正文"} for i in range(3)] + [b"{cut"])
    prepare([str(d / "raw" / "pretrain.jsonl")], d, min_chars=1, dedup="none", docs_per_shard=2)
    assert sorted(f.name for f in d.iterdir()) == ["bad_records.txt", "part_00000.jsonl", "part_00001.jsonl",
                                                   "raw", "stats.json"]
    jsonl(d / "sft.jsonl", [{"instruction": "问", "output": "答"}])
    jsonl(d / "eval.jsonl.gz", [])
    (d / "datatrove" / "read").mkdir(parents=True)  # the work folder of --engine datatrove
    (d / "datatrove" / "settings.json").write_text("{}")
    jsonl(d / "datatrove" / "read" / "00000.jsonl", [{"text": "工作文件"}])
    assert [str(f.relative_to(d)) for f in expand_inputs([d])] == [  # eval.jsonl.gz is held out (its name)
        "part_00000.jsonl", "part_00001.jsonl", "raw/pretrain.jsonl", "sft.jsonl"]


def test_eval_outputs_and_training_runs_inside_a_data_folder_are_not_read_as_data(tmp_path, bpe_tokenizer):
    from babyllama.checkpoint import save_checkpoint
    from babyllama.config import load_config
    from babyllama.evaluate import evaluate
    from babyllama.sampling import Sampling
    from tests.conftest import sharp_model, tiny_config

    d = tmp_path / "data"
    (d / "mine").mkdir(parents=True)
    jsonl(d / "qa.jsonl", [{"question": "问题一", "answer": "答"}, {"question": "问题二", "answer": "答"}])
    jsonl(d / "mine" / "eval.json", [{"question": "用户自己的评测集", "answer": "答"}])  # a user file of that name
    run = d / "run"  # what a training run leaves: its config and metrics, checkpoints, final, an eval of it
    save_checkpoint(run / "final", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    save_checkpoint(run / "checkpoints" / "step_00000010", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    (run / "config.json").write_text(json.dumps(load_config(None, []).to_dict()))
    jsonl(run / "metrics.jsonl", [{"step": 10, "loss": 5.0}])
    evaluate(run / "final", run / "eval", qa=str(d / "qa.jsonl"), sampling=Sampling(max_new_tokens=2))
    (run / "eval" / "preferences.json").write_text('{"pairs": 2}\n')  # the demo's DPO eval writes it there
    for folder, kind in ((run, "a training run"), (run / "eval", "the output of babyllama eval")):
        with pytest.raises(UserError) as e:  # eval --qa runs/demo/sft/eval, prepare --input runs/demo/sft
            expand_inputs([folder])
        assert str(e.value) == f"{folder} is {kind}, not a folder of data files; name the data files or their folder."
    jsonl(run / "notes.jsonl", [{"text": "用户放在运行目录里的数据"}])
    assert sorted(f.name for f in (run / "eval").iterdir()) == ["eval.json", "items.jsonl", "preferences.json"]
    expected = ["mine/eval.json", "qa.jsonl", "run/notes.jsonl"]  # eval's folder: mine/eval.json is an eval file
    assert [str(f.relative_to(d)) for f in expand_inputs([d], held_out=True)] == expected
    (d / "timings.json").write_text('{"data": 1.0}\n')  # the demo's out_dir
    (d / "demo.json").write_text('{"smoke": true}\n')
    assert [str(f.relative_to(d)) for f in expand_inputs([d], held_out=True)] == expected


def test_a_run_that_stopped_before_its_first_log_is_a_training_run_by_its_config(tmp_path):
    from babyllama.config import load_config

    d = tmp_path / "data"
    run = d / "run"  # what a run leaves that stopped before its first log: config.json and checkpoints/, no metrics
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(load_config(None, ["--out_dir", str(run)]).to_dict(), indent=2) + "\n")
    jsonl(d / "a.jsonl", [{"text": "数据"}])
    jsonl(d / "config.json", [{"text": "用户的数据文件，名叫 config.json"}])  # no run's config: data
    assert [str(f.relative_to(d)) for f in expand_inputs([d])] == ["a.jsonl", "config.json"]
    with pytest.raises(UserError) as e:
        expand_inputs([run])
    assert str(e.value) == f"{run} is a training run, not a folder of data files; name the data files or their folder."


@pytest.mark.parametrize("name, split", [
    ("eval.jsonl", "eval"), ("test.jsonl", "test"), ("dev.json", "dev"), ("validation.csv", "validation"),
    ("val.jsonl", "val"), ("valid.parquet", "valid"), ("belle_test.json", "test"), ("dev-00001.jsonl", "dev"),
    ("x.testing.jsonl.gz", "testing"), ("evaluation_notes.txt", "evaluation"), ("test1.json", "test"),
    ("test/part_0.jsonl", "test"), ("ceval_val/a.csv", "val"), ("train.jsonl", None), ("contest.jsonl", None),
    ("device.jsonl", None), ("testdata.jsonl", None), ("evals/a.jsonl", None), ("Eval.jsonl", "eval"),
    ("EVAL.json", "eval"), ("Test.jsonl", "test"), ("BELLE_TEST.json", "test"), ("Dev/a.jsonl", "dev"),
    ("CONTEST.jsonl", None)])
def test_held_out_split_names_are_those_of_hugging_face_datasets(name, split):
    assert held_out_split(Path(name)) == split


def test_a_folder_leaves_out_its_held_out_splits_with_one_note_and_a_named_one_is_read(tmp_path, caplog):
    d = tmp_path / "data"
    for name in ("train.jsonl", "eval.jsonl", "test.jsonl", "contest.jsonl", "device.jsonl", "dev/more.jsonl"):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        jsonl(d / name, [{"text": name}])
    assert list(CorpusReader([d]).documents()) == ["contest.jsonl", "device.jsonl", "train.jsonl"]
    assert [f.name for f in expand_inputs([d])] == ["contest.jsonl", "device.jsonl", "train.jsonl"]  # noted once
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{d}: not reading dev/more.jsonl, eval.jsonl, test.jsonl: their names mark held-out splits (dev/eval/test, "
        f"as in Hugging Face datasets); to train on one, name the file itself, e.g. {d / 'dev' / 'more.jsonl'}"]
    assert expand_inputs([d / "eval.jsonl"]) == [d / "eval.jsonl"]
    assert [f.name for f in expand_inputs([d, d / "test.jsonl"])] == ["contest.jsonl", "device.jsonl", "train.jsonl",
                                                                       "test.jsonl"]
    assert len(expand_inputs([d], held_out=True)) == 6  # eval --qa/--mc of a folder: its eval files
    assert expand_inputs([d / "dev"]) == [d / "dev" / "more.jsonl"]  # named: only the names below it count
    for name in ("train.jsonl", "contest.jsonl", "device.jsonl"):
        (d / name).unlink()
    with pytest.raises(UserError) as e:
        expand_inputs([d])
    assert str(e.value) == f"every data file in {d} is a held-out split by its name (dev/more.jsonl, eval.jsonl, " \
                           "test.jsonl), which a folder does not give for training; name the files themselves to " \
                           "train on them."


def test_held_out_names_in_any_case_are_left_out_and_a_folder_reached_twice_notes_them_once(tmp_path, caplog):
    """Test.jsonl and EVAL.json were trained on (only lower case counted), and `--data d ./x/../d` or a link to d
    noted d's held-out files once per spelling."""
    d = tmp_path / "d"
    for name in ("train.jsonl", "Test.jsonl", "EVAL.json", "Dev/a.jsonl"):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        jsonl(d / name, [{"text": name}])
    (tmp_path / "x").mkdir()
    (tmp_path / "link").symlink_to(d)
    files = expand_inputs([d, tmp_path / "x" / ".." / "d", tmp_path / "link"])
    assert files == [d / "train.jsonl"]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{d}: not reading Dev/a.jsonl, EVAL.json, Test.jsonl: their names mark held-out splits (dev/eval/test, as "
        f"in Hugging Face datasets); to train on one, name the file itself, e.g. {d / 'Dev' / 'a.jsonl'}",
        f"inputs name these files more than once; each is read once: {tmp_path / 'link' / 'train.jsonl'}, "
        f"{tmp_path / 'x' / '..' / 'd' / 'train.jsonl'}"]


def test_a_held_out_file_named_too_is_read_and_not_warned_about_and_each_warning_comes_once(tmp_path, caplog,
                                                                                             monkeypatch):
    """`sft --data d6 d6/test.jsonl` warned "not reading test.jsonl ... name the file itself", which the user did,
    and a file named twice was warned about twice (sft and eval expand their inputs twice)."""
    d = tmp_path / "d6"
    d.mkdir()
    for name in ("train.jsonl", "test.jsonl", "eval.jsonl"):
        jsonl(d / name, [{"text": name}])
    for _ in range(2):
        files = expand_inputs([d, d / "test.jsonl", d / "train.jsonl"])
    assert files == [d / "train.jsonl", d / "test.jsonl"]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{d}: not reading eval.jsonl: its name marks a held-out split (eval, as in Hugging Face datasets); to train "
        f"on it, name the file itself, e.g. {d / 'eval.jsonl'}",
        f"inputs name these files more than once; each is read once: {d / 'train.jsonl'}"]
    (d / "train.jsonl").unlink()
    caplog.clear()
    assert expand_inputs([d, d / "test.jsonl", d / "eval.jsonl"]) == [d / "test.jsonl", d / "eval.jsonl"]
    assert not caplog.records  # every held-out file is named: none is left unread, no folder without data
    (d / "test").mkdir()  # `sft --data d6 d6/test`: the folder d6/test named too is read, its files not warned about
    jsonl(d / "test" / "a.jsonl", [{"text": "a"}])
    jsonl(d / "test" / "dev.jsonl", [{"text": "dev"}])
    assert expand_inputs([d, d / "test"]) == [d / "test" / "a.jsonl"]
    assert [r.getMessage() for r in caplog.records] == [
        f"{d}: not reading eval.jsonl, test/dev.jsonl, test.jsonl: their names mark held-out splits "
        f"(eval/test, as in Hugging Face datasets); to train on one, name the file itself, e.g. {d / 'eval.jsonl'}",
        f"{d / 'test'}: not reading dev.jsonl: its name marks a held-out split (dev, as in Hugging Face datasets); "
        f"to train on it, name the file itself, e.g. {d / 'test' / 'dev.jsonl'}"]
    shutil.rmtree(d / "test")
    caplog.clear()
    jsonl(d / "train.jsonl", [{"text": "train"}])
    monkeypatch.setenv("RANK", "1")  # another process of a torchrun job: the first one warns for all
    assert expand_inputs([tmp_path]) == [d / "train.jsonl"]
    assert not caplog.records


def test_prepare_of_a_folder_says_which_held_out_files_it_does_not_read(tmp_path):
    from tests.conftest import run_cli

    (tmp_path / "data").mkdir()
    jsonl(tmp_path / "data" / "train.jsonl", [{"text": "训练用的一篇文档"}])
    jsonl(tmp_path / "data" / "belle_test.json", [{"text": "测试集的一篇文档"}])
    r = run_cli("prepare", "--input", str(tmp_path / "data"), "--out_dir", str(tmp_path / "out"), "--min_chars", "1")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("not reading belle_test.json: its name marks a held-out split (test, as in Hugging Face "
                          "datasets); to train on it, name the file itself") == 1
    docs = [json.loads(line)["text"] for line in (tmp_path / "out" / "part_00000.jsonl").read_text().splitlines()]
    assert docs == ["训练用的一篇文档"]


def test_a_checkpoint_tokenizer_token_folder_or_cache_given_as_data_is_named_for_what_it_is(tmp_path, bpe_tokenizer):
    from babyllama.checkpoint import save_checkpoint
    from babyllama.data.pretokenize import pretokenize
    from babyllama.data.sft_tokens import SFTSettings, build_sft_cache
    from tests.conftest import sharp_model, tiny_config

    jsonl(tmp_path / "a.jsonl", [{"text": "一篇文档"}])
    jsonl(tmp_path / "sft.jsonl", [{"instruction": "问题", "output": "回答"}])
    jsonl(tmp_path / "pairs.jsonl", [{"prompt": "问题", "chosen": "好", "rejected": "坏"}])
    bpe_tokenizer.save(tmp_path / "tok")
    pretokenize([str(tmp_path / "a.jsonl")], str(tmp_path / "tok"), tmp_path / "tokens")
    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    build_sft_cache([tmp_path / "sft.jsonl"], tmp_path / "tok", tmp_path / "sft_tokens", SFTSettings(max_len=64))
    build_sft_cache([tmp_path / "pairs.jsonl"], tmp_path / "tok", tmp_path / "dpo_tokens", SFTSettings(max_len=64),
                    kind="dpo")
    for name, kind in (("ck", "a checkpoint"), ("tok", "a tokenizer"), ("tokens", "a folder of token shards"),
                       ("sft_tokens", "an SFT token cache"), ("dpo_tokens", "a DPO token cache")):
        with pytest.raises(UserError) as e:
            expand_inputs([tmp_path / "a.jsonl", tmp_path / name])
        assert str(e.value) == f"{tmp_path / name} is {kind}, not a folder of data files; name the data files " \
                               "or their folder."


def test_a_folder_is_walked_once_however_links_reach_it_and_skipped_entries_are_named(tmp_path, caplog):
    """A link to its own folder was walked ~40 levels deep (12,000 paths in one warning), and a broken link or a
    FIFO in a folder was passed over without a word."""
    import os

    d, e = tmp_path / "d", tmp_path / "e"
    for folder in (d, e):
        (folder / "sub").mkdir(parents=True)
        jsonl(folder / "a.jsonl", [{"text": "甲"}])
        jsonl(folder / "sub" / "b.jsonl", [{"text": "乙"}])
    (d / "again").symlink_to("../d")  # a loop
    (d / "z_sub").symlink_to("sub")  # a second way to a folder read already
    (d / "broken.jsonl").symlink_to(tmp_path / "nonexistent")
    os.mkfifo(d / "fifo.jsonl")
    os.mkfifo(d / "notes")  # no data file's name: nothing to say
    (e / "sub" / "up").symlink_to("..")  # a loop through a parent
    assert expand_inputs([d]) == [d / "a.jsonl", d / "sub" / "b.jsonl"]
    assert list(CorpusReader([d]).documents()) == ["甲", "乙"]
    assert expand_inputs([e]) == [e / "a.jsonl", e / "sub" / "b.jsonl"]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{d}: skipped 4 entries without data to read: {d / 'again'} (a link to {d}, a folder read already), "
        f"{d / 'broken.jsonl'} (a broken link), {d / 'fifo.jsonl'} (a FIFO, not a regular file), {d / 'z_sub'} (a "
        f"link to {d / 'sub'}, a folder read already)",  # once: the second expansion (CorpusReader's) says nothing
        f"{e}: skipped 1 entry without data to read: {e / 'sub' / 'up'} (a link to {e}, a folder read already)"]


def test_a_file_named_twice_is_read_once_in_its_first_place(tmp_path, caplog):
    d = tmp_path / "in"
    d.mkdir()
    jsonl(d / "corpus.jsonl", [{"text": f"第{i}篇"} for i in range(5)])
    jsonl(d / "b.jsonl", [{"text": "另一篇"}])
    jsonl(tmp_path / "f.jsonl", [{"text": "单独一篇"}])
    twice = tmp_path / "x" / ".." / "f.jsonl"
    (tmp_path / "x").mkdir()
    files = expand_inputs([tmp_path / "f.jsonl", d, d / "corpus.jsonl", twice])
    assert files == [tmp_path / "f.jsonl", d / "b.jsonl", d / "corpus.jsonl"]
    assert len(list(CorpusReader([d, d / "corpus.jsonl"]).documents())) == 6
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"inputs name these files more than once; each is read once: {d / 'corpus.jsonl'}, {twice}",
        f"inputs name these files more than once; each is read once: {d / 'corpus.jsonl'}"]


def test_forced_format_and_bad_inputs(tmp_path):
    f = jsonl(tmp_path / "x.jsonl", [{"content": "正文", "text": "别的"}])
    assert list(CorpusReader([f]).documents()) == ["别的"]  # text before content
    assert list(CorpusReader([f], format="wudao").documents()) == ["正文"]
    with pytest.raises(UserError, match="unknown format 'nope'"):
        CorpusReader([f], format="nope")
    with pytest.raises(UserError, match="does not exist"):
        expand_inputs([tmp_path / "missing.jsonl"])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match="has no"):
        expand_inputs([tmp_path / "empty_dir"])
    (tmp_path / "x.docx").write_text("?")
    with pytest.raises(UserError, match="unknown file type .docx"):
        list(CorpusReader([tmp_path / "x.docx"]).documents())


# --- encodings, any record size, and a fuzz test over every reader ---

GOOD = [f"第{i}篇：长城始建于春秋战国时期，“秦时明月汉时关”。" for i in range(1000)]


def test_a_gbk_csv_is_read_as_gbk_with_a_note(tmp_path, caplog):
    rows = "prompt,answer\n请介绍一下长城的历史。,长城始建于春秋战国时期。\n黄河有多长？,约五千四百六十四公里。\n"
    (tmp_path / "sft_data.csv").write_bytes(rows.encode("gbk"))  # what Excel writes on a Chinese Windows
    reader = CorpusReader([tmp_path / "sft_data.csv"])
    assert list(reader.documents()) == ["请介绍一下长城的历史。长城始建于春秋战国时期。",
                                        "黄河有多长？约五千四百六十四公里。"]
    assert reader.totals() == (2, 0)
    assert "not UTF-8; reading it as GB18030" in caplog.text and "iconv -f GB18030 -t UTF-8" in caplog.text


@pytest.mark.skipif(not all(shutil.which(t) for t in ("iconv", "gzip", "zstd")), reason="needs iconv, gzip, zstd")
def test_the_iconv_command_of_a_file_not_utf8_names_it_and_converts_it_in_its_place(tmp_path, caplog):
    """After a file not UTF-8 the warning said "To convert it: iconv -f GB18030 -t UTF-8", naming no file. It names
    the file, and run as said (a name with a space, a .gz, a .zst too), leaves the file UTF-8 in its place."""
    import logging
    import subprocess

    import zstandard

    rows = "prompt,answer\n请介绍一下长城的历史。,长城始建于春秋战国时期。\n"
    files = {tmp_path / "my data.csv": rows.encode("gbk"), tmp_path / "b.csv.gz": gzip.compress(rows.encode("gbk")),
             tmp_path / "c.csv.zst": zstandard.ZstdCompressor().compress(rows.encode("gbk"))}
    for path, data in files.items():
        path.write_bytes(data)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert list(CorpusReader([path]).documents()) == ["请介绍一下长城的历史。长城始建于春秋战国时期。"]
        said = caplog.records[0].getMessage()
        assert said.startswith(f"{path}: not UTF-8; reading it as GB18030 (detected). To convert it: "), said
        command = said.partition("To convert it: ")[2]
        subprocess.run(["bash", "-c", command], check=True, cwd=tmp_path)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert list(CorpusReader([path]).documents()) == ["请介绍一下长城的历史。长城始建于春秋战国时期。"]
        assert caplog.records == [] and sorted(p.name for p in tmp_path.iterdir()) == sorted(
            p.name for p in files if p.exists())  # UTF-8 now, and no temporary left
    assert iconv_command(tmp_path / "my data.csv", "GB18030") == (
        f"iconv -f GB18030 -t UTF-8 '{tmp_path}/my data.csv' > '{tmp_path}/my data.csv.utf8' && mv "
        f"'{tmp_path}/my data.csv.utf8' '{tmp_path}/my data.csv'")


def test_gbk_json_lines_and_array_and_utf16_are_read_right(tmp_path):
    texts = GOOD[:20]
    lines = "\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts)
    (tmp_path / "a.jsonl").write_bytes(lines.encode("gbk"))
    (tmp_path / "b.json").write_bytes(json.dumps([{"text": t} for t in texts], ensure_ascii=False).encode("gb18030"))
    (tmp_path / "c.txt").write_bytes("\r\n".join(texts).encode("utf-16"))  # Excel's "Unicode text": BOM, CRLF
    for name in ("a.jsonl", "b.json", "c.txt"):
        reader = CorpusReader([tmp_path / name])
        assert list(reader.documents()) == texts and reader.totals() == (20, 0), name


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_utf16_without_a_byte_order_mark_over_64_kib_is_read(tmp_path, caplog, encoding):
    """The 64 KiB sample was cut after its last \\n byte, the first half of UTF-16-LE's \\n\\0: charset-normalizer,
    given half a character, found no encoding ("not text in any encoding charset-normalizer knows"), though it
    finds the same text under 64 KiB. The cut now falls after a whole two-byte newline."""
    texts = [f"第{i}行：今天天气很好，我们一起去公园散步吧。" for i in range(3000)]  # 144 KB in UTF-16
    (tmp_path / "a.txt").write_bytes("\n".join(texts).encode(encoding))
    reader = CorpusReader([tmp_path / "a.txt"])
    assert list(reader.documents()) == texts and reader.totals() == (3000, 0)
    assert f"reading it as {encoding.upper()} (detected)" in caplog.text


@pytest.mark.parametrize("text, encoding, name", [
    ("Le garçon a mangé une crème brûlée à l'hôtel, près de la forêt.", "latin-1", "CP1252"),
    ("Grüße aus München: Der Fußball ist rund, und wir genießen das Wetter.", "latin-1", "CP1252"),
    ("Flygande bäckasiner söka hwila på mjuka tuvor. Stockholm är Sveriges största stad.", "latin-1", "CP1252"),
    ("Árvíztűrő tükörfúrógép: a kőműves fűrészel, és a hűtő üres.", "cp1250", "CP1250"),
], ids=["French", "German", "Swedish", "Hungarian"])
def test_single_byte_text_is_read_in_its_own_code_page(tmp_path, caplog, text, encoding, name):
    """charset-normalizer rates other code pages about as good as Latin-1 on a short text and took the first it
    tried: French came out "crčme brűlée ŕ l'hôtel" (cp1250), Swedish "bðckasiner" (hp_roman8). The reading whose
    letters fit one language's alphabet wins, and Central European text stays cp1250."""
    (tmp_path / "a.txt").write_bytes(text.encode(encoding))
    assert list(CorpusReader([tmp_path / "a.txt"]).documents()) == [text]
    assert f"not UTF-8; reading it as {name} (detected)" in caplog.text


def test_latin1_text_is_read_right_past_the_64_kib_its_encoding_is_decided_on(tmp_path):
    """German with ä ö ü ß alone decodes alike in cp1250 and cp1252, and cp1250 was taken for the whole file: a
    French loanword after the first 64 KiB came out "Crčme brűlée ŕ la carte"."""
    lines = ["Grüße aus München: Der Fußball ist rund."] * 2000 + ["Zum Nachtisch gab es Crème brûlée à la carte."]
    (tmp_path / "a.txt").write_bytes("\n".join(lines).encode("latin-1"))
    assert list(CorpusReader([tmp_path / "a.txt"]).documents()) == lines


def test_sft_reads_a_gbk_csv_as_gbk(tmp_path, bpe_tokenizer):
    from babyllama.data.sft_tokens import SFTSettings, build_sft_cache
    from babyllama.train.distributed import Dist
    from babyllama.train.sft_data import load_sft_data

    rows = "prompt,answer\n" + "".join(f"问题{i}：长城有多长？,长城约两万一千公里。\n" for i in range(10))
    (tmp_path / "sft.csv").write_bytes(rows.encode("gbk"))
    bpe_tokenizer.save(tmp_path / "tok")
    settings = SFTSettings(max_len=64, val_fraction=0.0)
    build_sft_cache([tmp_path / "sft.csv"], tmp_path / "tok", tmp_path / "c", settings)
    train, _, stats = load_sft_data([tmp_path / "sft.csv"], tmp_path / "tok", tmp_path / "c", settings, False, Dist())
    ids, mask = train.sample(0)
    assert stats.samples == 10 and bpe_tokenizer.decode(ids[mask == 1].tolist()[:-1]) == "长城约两万一千公里。"


def test_a_file_of_bytes_that_are_no_text_is_one_bad_record(tmp_path):
    import io
    import random

    rng = random.Random(1)
    (tmp_path / "x.jsonl").write_bytes(bytes(rng.randrange(128, 256) for _ in range(5000)))
    jsonl(tmp_path / "y.jsonl", [{"text": "好"}])
    log = io.StringIO()
    reader = CorpusReader([tmp_path], bad_log=log)
    assert list(reader.documents()) == ["好"] and reader.totals() == (2, 1)
    assert log.getvalue() == (f"{tmp_path / 'x.jsonl'}:start: not text in any encoding charset-normalizer knows "
                              "(convert it to UTF-8)\n")


def bad_jsonl_lines(rng):
    """Malformed JSON-lines records of many shapes, each a bad record."""
    good = json.dumps({"text": "好"}, ensure_ascii=False).encode()
    return [good[: rng.randrange(1, len(good) - 1)], b'{"text": 5}', b"[1, 2]", b'"a string"', b"null",
            b'{"txt": "missing field"}', b'{"text": "a\x00b"}', b'{"text": "\xff\xfe\xfd"}', b'{"text": "a\\ud800b"}',
            b"[" * 100_000, b'{"text": "' + b"x" * 3000 + b'"}', b'{"text": ["list"]}', b"\x00\x00\x00"]


def fuzz_file(rng, n: int, good: list[str], shapes) -> tuple[bytes, list[str], list[int]]:
    """n lines, good ones and bad shapes mixed, some CRLF, some blank: (bytes, good texts, bad line numbers)."""
    lines, texts, bad = [], [], []
    for lineno in range(1, n + 1):
        if rng.random() < 0.05:
            lines.append(b"")  # blank: not a record
        elif rng.random() < 0.3:
            lines.append(rng.choice(shapes))
            bad.append(lineno)
        else:
            texts.append(good[len(texts)])
            lines.append(json.dumps({"text": texts[-1]}, ensure_ascii=rng.random() < 0.2).encode())
    data = b"".join(line + rng.choice([b"\n", b"\r\n"]) for line in lines)
    return b"\xef\xbb\xbf" + data, texts, bad


def test_fuzz_every_reader_counts_every_bad_record_and_loses_no_good_one(tmp_path, monkeypatch):
    import io
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    import babyllama.data.sources as sources

    monkeypatch.setattr(sources, "MAX_RECORD_CHARS", 2000)  # so that a "huge" line is cheap to make
    rng = random.Random(0)
    expected: dict[str, tuple[list[str], list[str]]] = {}  # file -> (good texts, bad locations)
    shapes = bad_jsonl_lines(rng)
    for name, compress in (("a.jsonl", bytes), ("b.jsonl.gz", gzip.compress),
                           ("c.jsonl.zst", zstandard.ZstdCompressor().compress)):
        data, texts, bad = fuzz_file(rng, 300, GOOD[len(expected) * 300:], shapes)
        (tmp_path / name).write_bytes(compress(data))
        expected[name] = texts, [f"{tmp_path / name}:{n}" for n in bad]
    lines, texts, bad = [], [], []  # text lines: bad are undecodable or too long
    for lineno in range(1, 201):
        if rng.random() < 0.2:
            lines.append(rng.choice([b"\xff\xfe\xfa broken", b"y" * 2500]))
            bad.append(f"{tmp_path / 'd.txt'}:{lineno}")
        else:
            texts.append(GOOD[900 - lineno])
            lines.append(texts[-1].encode())
    (tmp_path / "d.txt").write_bytes(b"\r\n".join(lines) + b"\r\n")
    expected["d.txt"] = texts, bad
    out = io.StringIO()  # CSV: quoted commas, newlines and quotes in cells, ragged rows, unclosed quotes
    out.write("id,text\n")
    texts, bad, lineno = [], [], 2
    for row in range(1, 101):
        kind = rng.random()
        if kind < 0.15 or kind > 0.9 or row == 60:  # too few or too many cells, a line over MAX_RECORD_CHARS
            out.write(f'{row},"{"字" * 2500}"\n' if row == 60 else f"{row}\n" if kind < 0.15 else
                      f"{row},{GOOD[row]},extra\n")
            bad.append(f"{tmp_path / 'e.csv'}:{lineno}")
        elif kind > 0.85:
            out.write(f'{row},"{GOOD[row]}\n')  # a quote never closed: the rows after it are read again
            bad.append(f"{tmp_path / 'e.csv'}:{lineno}")
        else:
            text = GOOD[row] + ("，又及\n“引号”" if kind < 0.3 else "") + ("字" * 1500 if row == 50 else "")
            out.write(f'{row},"{text.replace(chr(34), chr(34) * 2)}"\n')
            texts.append(text)
            lineno += text.count("\n")
        lineno += 1
    (tmp_path / "e.csv").write_text(out.getvalue(), encoding="utf-8")
    expected["e.csv"] = texts, bad
    items = [{"text": t} for t in GOOD[:40]]  # a JSON array with wrong items, cut at the end
    body = json.dumps(items[:20] + [5, {"text": None}, ["x"]] + items[20:], ensure_ascii=False)
    (tmp_path / "f.json").write_text(body[: body.rindex("{")] + '{"text": "cut', encoding="utf-8")
    expected["f.json"] = GOOD[:39], [f"{tmp_path / 'f.json'}:item {i}" for i in (21, 22, 23, 43)]
    pq.write_table(pa.table({"text": [GOOD[i] if i % 7 else None for i in range(50)]}), tmp_path / "g.parquet")
    expected["g.parquet"] = [GOOD[i] for i in range(50) if i % 7], [
        f"{tmp_path / 'g.parquet'}:row {i + 1}" for i in range(0, 50, 7)]

    log = io.StringIO()
    reader = CorpusReader([tmp_path], bad_log=log)
    docs = list(reader.documents_with_source())
    for name, (texts, bad) in expected.items():
        path = str(tmp_path / name)
        assert [t for src, t in docs if src == path] == texts, name  # every good record, in order
        assert reader.stats[path].bad == len(bad), name
        logged = [w.split(": ", 1) for w in log.getvalue().splitlines() if w.startswith(path + ":")]
        assert [where for where, _ in logged] == bad and all(why for _, why in logged), name  # file:line: why


def test_a_cut_gz_keeps_what_came_before_and_counts_one_bad_record(tmp_path):
    data = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in GOOD).encode()
    blob = gzip.compress(data)
    (tmp_path / "x.jsonl.gz").write_bytes(blob[: len(blob) // 2])  # a download cut half way
    reader = CorpusReader([tmp_path / "x.jsonl.gz"])
    docs = list(reader.documents())
    assert docs == GOOD[: len(docs)] and 0 < len(docs) < len(GOOD)
    assert reader.stats[str(tmp_path / "x.jsonl.gz")].bad == 1


def test_gbk_is_read_whatever_its_length_or_a_bad_byte(tmp_path):
    short = "今天天气很好。"  # one short line: charset-normalizer alone took it for Korean
    (tmp_path / "short.txt").write_bytes(short.encode("gbk"))
    lines = [f"第{i}行：今天天气很好，我们去公园散步吧。" for i in range(5000)]  # the 64 KiB sample cuts a character
    (tmp_path / "long.txt").write_bytes("\n".join(lines).encode("gbk")[:-1] + b"\n\x80\xff\n" + "末行".encode("gbk"))
    assert list(CorpusReader([tmp_path / "short.txt"]).documents()) == [short]
    reader = CorpusReader([tmp_path / "long.txt"])
    docs = list(reader.documents())
    assert docs == [*lines[:-1], "末行"] and reader.totals() == (5002, 2)  # the cut line and \x80\xff are bad


@pytest.mark.parametrize("pad", [0, 1, 2, 3])
def test_utf8_is_read_whatever_character_its_64_kib_sample_cuts(tmp_path, pad):
    """A tester's files: a one-line JSON array, and a first record over 64 KiB, of which 2 in 3 were one bad
    record (the whole file), as byte 65,536 fell inside a character: pad moves it by one byte at a time."""
    items = [{"completion": "x" * pad + "维基百科条目正文" * 50 + str(i)} for i in range(2000)]
    (tmp_path / "wiki.json").write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
    reader = CorpusReader([tmp_path / "wiki.json"])
    assert list(reader.documents()) == [x["completion"] for x in items] and reader.totals() == (2000, 0)
    first, second = "x" * pad + "中文" * 40000, "第二条记录的正文内容"
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": first}, ensure_ascii=False) + "\n" +
                                         json.dumps({"text": second}, ensure_ascii=False) + "\n", encoding="utf-8")
    reader = CorpusReader([tmp_path / "long.jsonl"])
    assert list(reader.documents()) == [first, second] and reader.totals() == (2, 0)


def test_a_folder_of_many_files_names_each_schema_once_and_shows_at_most_20_bad_records(tmp_path, caplog):
    """A tester's folder of 1,000 files logged 1,000 `read as ... records` lines, burying the warnings."""
    import logging

    for i in range(30):
        (tmp_path / f"f{i:02}.jsonl").write_text(json.dumps({"text": f"第{i}篇"}, ensure_ascii=False) + "\n{bad\n")
    (tmp_path / "z.jsonl").write_text(json.dumps({"instruction": "问", "output": "答"}, ensure_ascii=False) + "\n")
    caplog.set_level(logging.INFO, logger="babyllama")
    reader = CorpusReader([tmp_path])
    assert len(list(reader.documents())) == 31 and reader.totals() == (61, 30)
    infos = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert infos == [f"{tmp_path / 'f00.jsonl'}: read as text records (detected at {tmp_path / 'f00.jsonl'}:1); "
                     "other files in this schema are not named",
                     f"{tmp_path / 'z.jsonl'}: read as instruction records (detected at {tmp_path / 'z.jsonl'}:1); "
                     "other files in this schema are not named"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 21 and warnings[-1] == "... and 10 more bad records (30 in all)"  # no list: not named
    assert all(len(s.bad_examples) == 1 for s in reader.stats.values() if s.bad)  # every file keeps its own


def test_prepare_and_pretokenize_end_their_list_of_bad_records_with_the_count_not_shown(tmp_path, caplog,
                                                                                         bpe_tokenizer):
    """prepare stopped listing bad records after 20, and after 5 of a file, without a word; it ends the list as
    pretokenize --sft does, with the count of those not shown and where they are all listed."""
    from babyllama.data.clean import prepare
    from babyllama.data.pretokenize import pretokenize

    d = tmp_path / "in"
    d.mkdir()
    for i in range(22):
        jsonl(d / f"f{i:02}.jsonl", [{"text": f"第{i}篇文档的正文，足够长了。"}, b"{bad"])
    jsonl(d / "many.jsonl", [{"text": "另一篇文档的正文，也足够长了。"}, *[b"{bad"] * 8])  # 5 of a file are shown
    bpe_tokenizer.save(tmp_path / "tok")
    for out, run in ((tmp_path / "clean", lambda out: prepare([d], out)),
                     (tmp_path / "tokens", lambda out: pretokenize([str(d)], str(tmp_path / "tok"), out))):
        caplog.clear()
        run(out)
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 21 and all("skipped a bad record" in w for w in warnings[:20])
        assert warnings[-1] == f"... and 10 more bad records (30 in all), each listed in {out / 'bad_records.txt'}"
        assert len((out / "bad_records.txt").read_text().splitlines()) == 30
    caplog.clear()
    prepare([d / "f00.jsonl", d / "f01.jsonl"], tmp_path / "two")  # every bad record shown: nothing more to say
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{d / f'f0{i}.jsonl'}:2: skipped a bad record: not valid JSON (Expecting property name enclosed in double "
        "quotes)" for i in range(2)]


def test_bad_records_txt_lists_the_first_max_listed_then_counts_the_rest(tmp_path, caplog, bpe_tokenizer,
                                                                        monkeypatch):
    """prepare's and pretokenize's bad_records.txt held a line per bad record without bound: a corpus of millions of
    bad lines wrote gigabytes. It lists the first MAX_LISTED (here 3), then a line that counts the rest in the words
    that end the console's list, and the console says that the first ones are listed there."""
    from babyllama.data import sources
    from babyllama.data.clean import prepare
    from babyllama.data.pretokenize import pretokenize

    monkeypatch.setattr(sources, "MAX_LISTED", 3)
    d = tmp_path / "in"
    d.mkdir()
    for i in range(12):  # 24 bad records: 20 shown on the console
        jsonl(d / f"f{i:02}.jsonl", [{"text": f"第{i}篇文档的正文，足够长了。"}, b"{bad", {"x": 1}])
    bpe_tokenizer.save(tmp_path / "tok")
    for out, run in ((tmp_path / "clean", lambda out: prepare([d], out)),
                     (tmp_path / "tokens", lambda out: pretokenize([str(d)], str(tmp_path / "tok"), out))):
        caplog.clear()
        run(out)
        assert (out / "bad_records.txt").read_text().splitlines() == [
            f"{d / 'f00.jsonl'}:2: not valid JSON (Expecting property name enclosed in double quotes)",
            f"{d / 'f00.jsonl'}:3: lacks the fields of the text schema",
            f"{d / 'f01.jsonl'}:2: not valid JSON (Expecting property name enclosed in double quotes)",
            "... and 21 more bad records (24 in all)"]
        assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"][-1] == (
            f"... and 4 more bad records (24 in all), the first 3 listed in {out / 'bad_records.txt'}")


def test_a_lone_surrogate_in_a_json_array_is_one_bad_item(tmp_path):
    items = [{"text": f"第{i}篇"} for i in range(100)]
    body = json.dumps(items, ensure_ascii=False).replace('"第2篇"', '"a\\udc00"')
    (tmp_path / "s.json").write_text(body, encoding="utf-8")
    reader = CorpusReader([tmp_path / "s.json"])
    assert len(list(reader.documents())) == 99 and reader.totals() == (100, 1)


def test_a_damaged_zst_keeps_what_came_before(tmp_path):
    import zstandard

    data = "".join(json.dumps({"text": f"{t}{i}"}, ensure_ascii=False) + "\n" for i, t in enumerate(GOOD * 20))
    blob = bytearray(zstandard.ZstdCompressor().compress(data.encode()))
    blob[len(blob) * 3 // 4 :] = bytes(len(blob) - len(blob) * 3 // 4)
    (tmp_path / "x.jsonl.zst").write_bytes(bytes(blob))
    reader = CorpusReader([tmp_path / "x.jsonl.zst"])
    docs = list(reader.documents())
    assert len(docs) > 1000 and reader.stats[str(tmp_path / "x.jsonl.zst")].bad == 1


def test_a_cut_zst_is_one_bad_record_that_says_so(tmp_path):
    import io

    import zstandard

    lines = [json.dumps({"text": f"第{i}行"}, ensure_ascii=False) + "\n" for i in range(50_000)]
    blob = zstandard.ZstdCompressor().compress("".join(lines).encode())
    (tmp_path / "x.jsonl.zst").write_bytes(blob[: len(blob) // 2])  # half a download: it used to end without a word
    log = io.StringIO()
    reader = CorpusReader([tmp_path / "x.jsonl.zst"], bad_log=log)
    docs = list(reader.documents())
    assert docs == [f"第{i}行" for i in range(len(docs))] and 0 < len(docs) < 50_000
    assert reader.totals() == (len(docs) + 1, 1)
    assert log.getvalue() == (f"{tmp_path / 'x.jsonl.zst'}:after {len(docs)}: the file cannot be read from here on "
                              "(the file ends inside a zstd frame (cut short?))\n")


def test_a_bad_first_record_does_not_decide_the_schema(tmp_path, caplog):
    import logging

    records = [{"text": None}] + [{"instruction": f"问{i}", "output": f"答{i}"} for i in range(5)]
    f = jsonl(tmp_path / "x.jsonl", records)
    with caplog.at_level(logging.INFO):
        reader = CorpusReader([f])
        assert list(reader.documents()) == [f"问{i}答{i}" for i in range(5)]
    assert (reader.stats[str(f)].schema, reader.totals()) == ("instruction", (6, 1))
    assert f"{f}: read as instruction records (detected at {f}:2)" in caplog.text


def test_one_odd_record_decides_the_schema_of_no_other(tmp_path, caplog):
    """A tester's file: bad records, then `{"content": "hello"}`, then 100 `text` records. The first good record
    decided the file's schema, wudao, so the 100 were bad ("lacks the fields of the wudao schema": records 106, bad
    105). Each record is now read in the schema its own fields say, a warning counts the schemas of a mixed file, and
    --format still reads every record in one."""
    import logging

    good = [{"text": f"第{i}篇"} for i in range(100)]
    f = jsonl(tmp_path / "odd.jsonl", [{"text": 5}, {"content": "hello"}, {"text": None}, b"not json",
                                       b'{"text": "\\ud800 x"}', [1, 2], *good])
    with caplog.at_level(logging.INFO):
        reader = CorpusReader([f], bad_log=(log := io.StringIO()))
        assert list(reader.documents()) == ["hello", *(r["text"] for r in good)]
    assert (reader.stats[str(f)].schema, reader.totals()) == ("text", (106, 5))
    assert log.getvalue().splitlines() == [
        f"{f}:1: its 'text' is a number, not a string", f"{f}:3: lacks the fields of the text schema",
        f"{f}:4: not valid JSON (Expecting value)",
        f"{f}:5: holds a lone surrogate (\\ud800-\\udfff), which no tokenizer can encode", f"{f}:6: not a JSON object"]
    assert f"{f}: read as text records (detected at {f}:7)" in caplog.text
    assert (f"{f}: its records are of 2 schemas, each read as its fields say: 100 text (the first at {f}:7), 1 wudao "
            f"(the first at {f}:2); --format SCHEMA reads every record as one schema and counts the others bad"
            ) in caplog.text
    reader = CorpusReader([f], "text", bad_log=(log := io.StringIO()))
    assert list(reader.documents()) == [r["text"] for r in good]
    assert reader.totals() == (106, 6) and f"{f}:2: lacks the fields of the text schema" in log.getvalue()


def test_a_record_with_the_fields_of_several_schemas_is_read_in_its_files_schema_and_the_rest_named(tmp_path,
                                                                                                      caplog):
    """{"text": ..., "content": ...} was read as WuDao, its text dropped without a word (among text records it was
    counted too short, from its short content). It is read in its file's schema where it fits, else text before
    content; the fields left out are named once a file."""
    text = jsonl(tmp_path / "text.jsonl", [{"text": "第一篇"}, {"text": "第二篇", "content": "短"},
                                           {"text": "第三篇", "title": "题", "content": "短"}, {"text": "第四篇"}])
    wudao = jsonl(tmp_path / "wudao.jsonl", [{"title": "题", "content": "悟道"}, {"content": "又一篇", "text": "x"}])
    first = jsonl(tmp_path / "first.jsonl", [{"content": "内容", "text": "文本"}])
    alpaca = jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "问", "output": "答", "text": "模板"}] * 2)
    reader = CorpusReader([text, wudao, first, alpaca])
    assert list(reader.documents()) == ["第一篇", "第二篇", "第三篇", "第四篇", "题\n悟道", "又一篇", "文本", "问答",
                                       "问答"]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{f}: records with the fields of more than one schema are read in the file's schema (of most of its records) "
        "where they fit it, else in the first of preference, conversation, instruction, wiki, baike, text, wudao, "
        f"leaving out {fields}; --format SCHEMA reads every record in the schema you choose" for f, fields in (
            (text, f"the 'content' of 2 records (the first at {text}:2)"),
            (wudao, f"the 'text' of 1 record (the first at {wudao}:2)"),
            (first, f"the 'content' of 1 record (the first at {first}:1)"),
            (alpaca, f"the 'text' of 2 records (the first at {alpaca}:1)"))]
    caplog.clear()  # within a schema, the shapes that SFT does not read either, as SFT names them
    pair = jsonl(tmp_path / "pair.jsonl", [{"prompt": "问", "completion": "答", "instruction": "指令", "output": "输出",
                                            "text": None}, {"messages": [{"role": "user", "content": "问"}],
                                                            "conversations": [{"role": "user", "content": "对话"}]}])
    assert list(CorpusReader([pair]).documents()) == ["问答", "对话"]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"][:1] == [
        f"{pair}: records with the fields of more than one schema are read in the file's schema (of most of its "
        "records) where they fit it, else in the first of preference, conversation, instruction, wiki, baike, text, "
        f"wudao, leaving out the 'instruction' of 1 record (the first at {pair}:1), the 'output' of 1 record (the "
        f"first at {pair}:1), the 'messages' of 1 record (the first at {pair}:2); --format SCHEMA reads every record "
        "in the schema you choose"]
    caplog.clear()
    assert list(CorpusReader([text], "wudao").documents()) == ["短", "题\n短"]  # a forced format: no warning
    assert not [r for r in caplog.records if "more than one schema" in r.getMessage()]


def test_csv_ragged_rows_are_bad_and_an_unclosed_quote_swallows_nothing(tmp_path):
    import io

    f = tmp_path / "sft_data.csv"
    f.write_text('prompt,answer\n问一,答一\n问二,答二,多余\n问三\n"问四,答四\n问五,答五\n问六,"答""六"""\n',
                 encoding="utf-8")
    log = io.StringIO()
    reader = CorpusReader([f], bad_log=log)
    assert list(reader.documents()) == ["问一答一", "问五答五", '问六答"六"']
    assert log.getvalue().splitlines() == [
        f"{f}:3: 3 cells where the header has 2", f"{f}:4: 1 cells where the header has 2",
        f"{f}:5: ',' expected after '\"' in a cell that runs from line 5 to 7 (an unclosed quote?); the lines "
        "after its first are read again"]


def broken_corpus(d) -> tuple[list[str], dict[str, list[str]], dict[str, str]]:
    """A directory of good and broken instruction files: (the texts of the good records of the whole files,
    those of the files cut half way, {bad location: a part of why it is bad})."""
    import random

    import zstandard

    rng = random.Random(0)
    good: list[str] = []

    def records(n: int, tag: str, out: list[str]) -> list[dict]:
        rs = [{"instruction": f"{tag}问题{i}{rng.choice(GOOD)}", "input": "", "output": f"{tag}回答{i}"}
              for i in range(n)]
        out += [r["instruction"] + r["output"] for r in rs]
        return rs

    jsonl(d / "a.jsonl", records(30, "a", good))
    (d / "b.jsonl.gz").write_bytes(b"not gzip at all\n")
    (d / "c.parquet").write_bytes(b"PAR1 but not parquet")
    (d / "d.jsonl").write_bytes(bytes(rng.randrange(128, 256) for _ in range(3000)))  # no text encoding
    jsonl(d / "e.jsonl", [b'{"instruction": "a\\ud800", "output": "x"}', *records(5, "e", good),
                          b'{"instruction": "q", "output": "\\udfff"}'])
    jsonl(d / "f.jsonl", [{"text": None}, *records(5, "f", good)])  # a bad first record
    (d / "g.csv").write_text("prompt,answer\n" + "".join(f"g问{i},g答{i}\n" for i in range(3)) + "坏行\n"
                             + '"没有闭合的引号,x\n' + "g问9,g答9,多余\n" + "g问8,g答8\n", encoding="utf-8")
    good += [f"g问{i}g答{i}" for i in range(3)] + ["g问8g答8"]
    cut: dict[str, list[str]] = {"h.jsonl.gz": [], "i.jsonl.zst": []}
    for name, compress in (("h.jsonl.gz", gzip.compress), ("i.jsonl.zst", zstandard.ZstdCompressor().compress)):
        blob = compress(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n"
                                 for r in records(3000, name[0], cut[name])))
        (d / name).write_bytes(blob[: len(blob) // 2])  # a download cut half way
    bad = {f"{d / 'b.jsonl.gz'}:after start": "cannot be read", f"{d / 'c.parquet'}:after start": "cannot be read",
           f"{d / 'd.jsonl'}:start": "not text", f"{d / 'e.jsonl'}:1": "surrogate", f"{d / 'e.jsonl'}:7": "surrogate",
           f"{d / 'f.jsonl'}:1": "", f"{d / 'g.csv'}:5": "1 cells", f"{d / 'g.csv'}:6": "unclosed quote",
           f"{d / 'g.csv'}:7": "3 cells"}
    return good, cut, bad


def check_losses(d, kept: list[str], bad_lines: list[str], good: list[str], cut: dict[str, list[str]],
                 bad: dict[str, str]) -> None:
    """Every good record kept, and of a cut file those before the cut, which is one bad record; every bad
    record listed with its reason."""
    listed = dict(line.split(": ", 1) for line in bad_lines)
    for name, texts in cut.items():
        stops = [where for where in listed if where.startswith(f"{d / name}:after ")]
        assert len(stops) == 1 and "cannot be read" in listed.pop(stops[0])
        n = int(stops[0].rsplit(" ", 1)[1])  # records read before the cut
        assert 0 < n < len(texts) and [t for t in kept if t in set(texts)] == texts[:n], name
    assert [t for t in kept if t[0] not in "hi"] == good
    assert listed.keys() == bad.keys()
    assert all(why in listed[where] for where, why in bad.items()), listed


def test_prepare_and_sft_lose_no_good_record_of_a_directory_with_broken_files(tmp_path, bpe_tokenizer):
    from babyllama.data.clean import prepare
    from babyllama.data.sft_tokens import SFTSettings, build_sft_cache
    from babyllama.train.distributed import Dist
    from babyllama.train.sft_data import load_sft_data

    d = tmp_path / "in"
    d.mkdir()
    good, cut, bad = broken_corpus(d)
    stats = prepare([d], tmp_path / "clean", min_chars=1, dedup="none")
    kept = [json.loads(x)["text"] for x in (tmp_path / "clean" / "part_00000.jsonl").open(encoding="utf-8")]
    check_losses(d, kept, (tmp_path / "clean" / "bad_records.txt").read_text().splitlines(), good, cut, bad)
    assert stats["total"]["bad"] == len(bad) + 2

    bpe_tokenizer.save(tmp_path / "tok")
    settings = SFTSettings(max_len=512, val_fraction=0.0)
    build_sft_cache([d], tmp_path / "tok", tmp_path / "sft", settings)
    train, _, sft_stats = load_sft_data([d], tmp_path / "tok", tmp_path / "sft", settings, False, Dist())
    samples = [bpe_tokenizer.decode(train.sample(i)[0].tolist()) for i in range(sft_stats.samples)]  # prompt+answer
    check_losses(d, samples, (tmp_path / "sft" / "bad_records.txt").read_text().splitlines(), good, cut, bad)
    assert sft_stats.bad == len(bad) + 2


def test_records_after_a_json_array_are_read_or_counted_never_lost(tmp_path):
    lines = tmp_path / "a.jsonl"  # JSON lines whose first line is an array: the records after it are read
    lines.write_text('[1, 2]\n{"text": "第一号文档"}\n{"text": "第二号文档"}\n', encoding="utf-8")
    assert [(r, why) for _, r, why in iter_records(lines)] == [
        (None, "not a JSON object"), ({"text": "第一号文档"}, ""), ({"text": "第二号文档"}, "")]
    array = tmp_path / "b.json"  # an array over lines, then another record: that one is counted, with the reason
    array.write_text('[\n{"text": "数组里的文档"}\n]\n{"text": "数组后的文档"}\n', encoding="utf-8")
    items = list(iter_records(array))
    assert items[0][1] == {"text": "数组里的文档"}
    assert items[1][1] is None and "more data after the array's closing ]" in items[1][2] and len(items) == 2
    one_line = tmp_path / "c.json"  # a whole array on one line is still an array
    one_line.write_text('[{"text": "甲"}, {"text": "乙"}]\n', encoding="utf-8")
    assert [r for _, r, _ in iter_records(one_line)] == [{"text": "甲"}, {"text": "乙"}]


def test_sft_records_read_as_text_keep_their_system_and_history(tmp_path):
    """prepare took an alpaca record's `history` and a record's top-level `system` out of its text (SFT reads them
    since they were found dropped there too); a field of the wrong type is a bad record that names it."""
    f = tmp_path / "sft.jsonl"
    records = [{"system": "你是助手", "instruction": "问四", "input": "", "output": "答四",
                "history": [["早先的问", "早先的答"]]},
               {"instruction": "问五", "output": "答五", "history": "oops"},
               {"instruction": "问六", "output": "答六"}]
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    bad = []

    class Log:
        def write(self, s):
            bad.append(s.strip())

    assert list(CorpusReader([f], bad_log=Log()).documents()) == ["你是助手\n早先的问早先的答\n问四答四", "问六答六"]
    assert bad == [f"{f}:2: its 'history' is not a list of [question, answer] pairs of strings"]
    g = tmp_path / "chat.jsonl"
    g.write_text(json.dumps({"system": "系统", "conversations": [{"from": "human", "value": "问"},
                                                                 {"from": "gpt", "value": "答"}]},
                            ensure_ascii=False) + "\n")
    assert list(CorpusReader([g]).documents()) == ["系统\n问\n答"]


def test_a_null_field_is_an_absent_one_in_schema_detection(tmp_path, caplog):
    """A parquet or Hugging Face datasets export keeps the columns a row lacks as null: `{"text": ..., "messages":
    null}` was a conversation record, bad ("its 'messages' is null"), and a null `completion` made a text record a wiki
    article's or left the `text` out."""
    f = jsonl(tmp_path / "n.jsonl", [{"text": "hello world document", "messages": None},
                                     {"text": "第二篇", "completion": None},
                                     {"text": "第三篇", "chosen": None, "rejected": None}])
    reader = CorpusReader([f], bad_log=(log := io.StringIO()))
    assert list(reader.documents()) == ["hello world document", "第二篇", "第三篇"]
    assert log.getvalue() == "" and dict(reader.stats[str(f)].read_as) == {"text": 3}
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []  # no field left out


@pytest.mark.parametrize("indent", [None, 2])
def test_records_in_an_object_under_one_key_are_read_as_an_array(tmp_path, indent):
    """{"data": [record, ...]} (SQuAD's, with its "version", and Chinese dataset dumps) was read as one record of
    no schema: its list is read as an array's items, streamed, and its other keys let go."""
    path = tmp_path / "squad.json"
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]
    path.write_text(json.dumps({"version": "1.1", "data": rows, "source": "x"}, indent=indent) + "\n")
    assert list(iter_records(path)) == [(f"{path}:item {i + 1}", r, "") for i, r in enumerate(rows)]
    one = tmp_path / "one.json"  # one conversation written as an object: a record, not a list of them
    one.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"}]}, indent=indent))
    assert [r for _, r, _ in iter_records(one)] == [json.loads(one.read_text())]


def test_an_object_with_two_lists_of_records_is_said_so_in_one_sentence(tmp_path):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": [{"text": "a"}], "test": [{"text": "b"}]}))
    assert list(iter_records(path)) == [(f"{path}:start", None, (
        "one JSON object with lists of records under 2 keys ('train', 'test'); a file of records holds one list "
        "(an array, or an object with one list under a key such as 'data')"))]
    late = tmp_path / "late.json"  # the second list past the sample: read as far as the first goes
    late.write_text(json.dumps({"train": [{"text": "a" * 5000}] * 20, "test": [{"text": "b"}]}))
    got = list(iter_records(late))
    assert len(got) == 21 and got[-1] == (f"{late}:item 21", None, "a second list of records, under 'test', after "
                                          "the one under 'train'; the rest of the file is skipped")


def test_a_list_of_records_under_a_key_is_streamed(tmp_path):
    """Memory is an item's, not the file's, as for an array (the whole object was one record before: ~the file)."""
    path = tmp_path / "big.json"
    rows = [{"text": f"{i} " + "x" * 1000} for i in range(8000)]  # 8 MB; the file's buffer is 1 MiB
    path.write_text(json.dumps({"data": rows}))
    count, _, peak = traced(lambda: sum(1 for _ in iter_records(path)))
    assert count == 8000 and peak < 3 << 20, peak
