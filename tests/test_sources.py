"""Corpus readers: every schema, every file shape, and bad records counted, never fatal."""

from __future__ import annotations

import gzip
import json

import pytest

from babyllama.data.sources import CorpusReader, expand_inputs
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
    assert bad == [f"{f}:3", f"{f}:4", f"{f}:5", f"{f}:6"]


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


def test_forced_format_and_bad_inputs(tmp_path):
    f = jsonl(tmp_path / "x.jsonl", [{"content": "正文", "text": "别的"}])
    assert list(CorpusReader([f]).documents()) == ["正文"]  # detected as WuDao
    assert list(CorpusReader([f], format="text").documents()) == ["别的"]
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
