"""Cleaning: normalisation, the length filter, exact and near-duplicate removal, `prepare`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from babyllama.data.clean import HashSets, NearDuplicateIndex, normalize, prepare
from babyllama.errors import UserError
from tests.conftest import generated_corpus, refuse_writes, run_cli


def test_normalize_keeps_chinese_punctuation():
    raw = "\ufeff 你好，世界！\u200b\r\n\r\n\r\n\r\n第二段：“引号”  \t 空格\x07。\u3000缩进 "
    assert normalize(raw) == "你好，世界！\n\n第二段：“引号” 空格。\u3000缩进"


def test_normalize_drops_only_invisible_format_characters_and_keeps_joiners_selectors_and_bidi_marks():
    """The zero-width joiner and non-joiner were dropped, splitting emoji families and changing Persian and Hindi
    words, while a soft hyphen passed: now only what no reader sees goes."""
    family = "\U0001F468\u200d\U0001F469\u200d\U0001F467"  # man ZWJ woman ZWJ girl: one emoji
    persian = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"  # mi ZWNJ khaham: "I want"
    hindi = "\u0915\u094d\u200d\u0937"  # ka virama ZWJ ssa: the half form of ka
    kept = [family, persian, hindi, "\u2764\ufe0f", "\u2764\ufe0e",  # variation selectors: emoji or text style
            "abc \u202edcba\u202c", "\u05d0\u200e1\u200f", "\u2067\u05d0\u2069",  # override, marks, an isolate
            "\U0001F3F4\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F"]  # the flag of Scotland (tags)
    for text in kept:
        assert normalize(text) == text
    assert normalize("零\u200b宽\u2060连\ufeff接 Inter\u00adnational") == "零宽连接 International"
    assert normalize(f"一家人{family}。") == f"一家人{family}。"


def test_normalize_makes_every_line_break_a_newline_and_glues_no_words():
    """The form feed between a PDF's pages (pdftotext), Word's vertical tab and U+0085 were dropped as control
    characters, gluing the last word of a page to the first of the next; U+2028/9 stayed in the text."""
    assert normalize("end of page.\x0cNext page") == "end of page.\nNext page"
    assert normalize("第一行\x0b第二行\x85第三行\u2028第四行\u2029第五行\x1c六\x1d七\x1e八") == \
        "第一行\n第二行\n第三行\n第四行\n第五行\n六\n七\n八"
    assert normalize("a\r\nb\rc\n\x0c\x0c\n\nd\x07e\x1ff") == "a\nb\nc\n\ndef"  # blank lines squeezed; BEL and US go


def test_near_duplicates_found_distinct_kept():
    docs = generated_corpus(40, seed=3)
    index = NearDuplicateIndex(threshold=0.8)
    assert not any(index.seen_before([d]) for d in docs)  # 40 distinct documents all kept
    edited = docs[7][:50] + "改" + docs[7][51:90] + "动" + docs[7][91:]  # two characters changed
    assert edited != docs[7] and index.seen_before([edited])
    assert not index.seen_before(generated_corpus(1, seed=4)[:1])


def test_minhash_of_a_long_document_in_pieces_equals_the_whole(monkeypatch):
    """A signature is a minimum over shingles: taken slice by slice (overlapping by ngram - 1), it is the same, and
    so it is of a text given in pieces of any length (a long document's dedup key, keyed piece by piece)."""
    from datasketch import MinHash

    from babyllama.data import clean

    index = NearDuplicateIndex()
    texts = ["", "短", "今天", "".join(generated_corpus(40, seed=3)), "中文" * 501]
    whole = []
    for text in texts:  # datasketch's signature of every shingle at once
        whole.append(MinHash(num_perm=128, seed=1, hashfunc=int))
        whole[-1].update_batch(index.shingle_hashes(text).tolist())
    whole = [m.hashvalues for m in whole]
    for piece in (1, 2, 7, 100):
        monkeypatch.setattr(clean, "MINHASH_PIECE_CHARS", piece)
        assert all((index.minhash([t]) == w).all() for t, w in zip(texts, whole, strict=True)), piece
    rng = np.random.default_rng(0)
    for text, signature in zip(texts, whole, strict=True):
        for _ in range(20):
            cuts = sorted(rng.integers(0, len(text) + 1, size=rng.integers(1, 12)))
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]  # some empty
            assert (index.minhash(pieces) == signature).all(), (text[:20], cuts)


def test_compact_index_decides_as_datasketch_minhash_lsh():
    """The kept set equals that of datasketch's MinHashLSH (the index before) on planted near duplicates."""
    import random

    from datasketch import LeanMinHash, MinHash, MinHashLSH

    rng = random.Random(0)
    base = generated_corpus(150, seed=9)
    docs = base + ["".join(c if rng.random() > rate else "变" for c in rng.choice(base))
                   for rate in (0.01, 0.03, 0.06, 0.1, 0.2) for _ in range(40)]  # a range of edit rates
    rng.shuffle(docs)
    index, lsh = NearDuplicateIndex(threshold=0.8), MinHashLSH(threshold=0.8, num_perm=128)
    ours, theirs = [], []
    for i, doc in enumerate(docs):
        ours.append(index.seen_before([doc]))
        m = MinHash(num_perm=128, seed=1, hashfunc=int)
        m.update_batch(index.shingle_hashes(doc).tolist())
        theirs.append(bool(lsh.query(LeanMinHash(m))))
        if not theirs[-1]:
            lsh.insert(str(i), LeanMinHash(m))
    assert ours == theirs and 20 < sum(ours) < 200  # the same decisions, and real ones both ways
    assert index.count == len(docs) - sum(ours)


def test_threshold_outside_what_lsh_can_do_is_refused(tmp_path):
    """...before any output: `prepare --minhash_threshold 1.5` showed `prepare: 0 docs [00:00]` first (the check
    ran as the first document was cleaned), and with --demo built the demo corpus first."""
    (tmp_path / "a.txt").write_text("一段足够长的文字。\n")
    for threshold in (1.0, 0.0, float("nan")):
        with pytest.raises(UserError, match="minhash_threshold"):
            prepare([str(tmp_path / "a.txt")], tmp_path / "out", threshold=threshold)
    for extra in ([], ["--demo"], ["--engine", "datatrove"]):
        r = run_cli("prepare", "--input", tmp_path / "a.txt", "--out_dir", tmp_path / "out", "--minhash_threshold",
                    "1.5", *extra)
        assert (r.returncode, r.stdout, r.stderr) == (2, "", "babyllama: error: --minhash_threshold is a Jaccard "
                                                             "similarity in [0.2, 0.98], got 1.5.\n"), extra
    assert list(tmp_path.iterdir()) == [tmp_path / "a.txt"]


def test_a_minhash_threshold_with_a_dedup_that_uses_none_is_refused_before_any_output(tmp_path):
    """`prepare --dedup exact --minhash_threshold 1.5` was taken silently: the threshold of a MinHash that does not
    run, and out of range at that. A threshold given with --dedup exact or none is refused, in range or not, by the
    library, the CLI and the datatrove engine, before any output; without one, stats.json records none."""
    (tmp_path / "a.txt").write_text("一段足够长的文字。\n")
    for dedup in ("exact", "none"):
        error = (f"--minhash_threshold is a setting of --dedup minhash, which --dedup {dedup} does not use; leave it "
                 "out or use --dedup minhash.")
        for threshold in (0.5, 1.5):
            with pytest.raises(UserError) as e:
                prepare([str(tmp_path / "a.txt")], tmp_path / "out", dedup=dedup, threshold=threshold)
            assert str(e.value) == error
            for extra in ([], ["--demo"], ["--engine", "datatrove"]):
                r = run_cli("prepare", "--input", tmp_path / "a.txt", "--out_dir", tmp_path / "out", "--dedup", dedup,
                            "--minhash_threshold", threshold, *extra)
                assert (r.returncode, r.stdout, r.stderr) == (2, "", f"babyllama: error: {error}\n"), (dedup, extra)
    assert list(tmp_path.iterdir()) == [tmp_path / "a.txt"]
    for dedup, recorded in (("exact", None), ("none", None), ("minhash", 0.8)):
        stats = prepare([str(tmp_path / "a.txt")], tmp_path / dedup, min_chars=1, dedup=dedup)
        assert stats["settings"]["minhash_threshold"] == recorded, dedup


def test_hash_sets_grow_and_keep_every_key():
    rng = np.random.default_rng(0)
    keys = rng.integers(1, 2**63, size=(5000, 3), dtype=np.uint64) | np.uint64(1)
    sets = HashSets(3, capacity=16)
    assert not any(sets.add_unless_any(k) for k in keys)
    assert all(sets.contains_any(k) and sets.add_unless_any(k) for k in keys[::7]) and sets.count == 5000
    assert sets.table.shape[1] == 16384 and sorted(sets.table[1][sets.table[1] != 0]) == sorted(keys[:, 1])
    assert not sets.contains_any(keys[0] + np.uint64(2))


def test_shingle_hashes_are_deterministic_and_set_like():
    index = NearDuplicateIndex()
    assert index.shingle_hashes("床前明月光").tolist() == index.shingle_hashes("床前明月光").tolist()
    assert len(index.shingle_hashes("一二三四五六")) == 2  # two 5-grams
    assert len(index.shingle_hashes("短")) == 1
    assert len(index.shingle_hashes("ababababab")) == 2  # "ababa" and "babab"


def test_prepare_dedups_and_counts_per_source(tmp_path):
    docs = generated_corpus(30, seed=5)
    near = docs[2][:40] + "变" + docs[2][41:]
    a = tmp_path / "a.jsonl"
    a.write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in [*docs, docs[0], near, "短"]))
    b = tmp_path / "b.txt"
    b.write_text(f"{docs[1]}\n{docs[1]}  \n另一份足够长的独特文档，内容与众不同。\n", encoding="utf-8")
    stats = prepare([str(a), str(b)], tmp_path / "out", min_chars=5, dedup="minhash", docs_per_shard=20)
    sa, sb = stats["sources"][str(a)], stats["sources"][str(b)]
    assert (sa["records"], sa["too_short"], sa["exact_duplicates"], sa["near_duplicates"], sa["kept"]) == (
        33, 1, 1, 1, 30)
    assert (sb["records"], sb["exact_duplicates"], sb["kept"]) == (3, 2, 1)  # docs[1] again, twice
    out = [json.loads(line)["text"] for f in stats["files"] for line in (tmp_path / "out" / f).open()]
    assert out == [*map(normalize, docs), "另一份足够长的独特文档，内容与众不同。"]
    assert stats["files"] == ["part_00000.jsonl", "part_00001.jsonl"]
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["total"]["kept"] == 31
    exact = prepare([str(a)], tmp_path / "exact", min_chars=5, dedup="exact")
    assert exact["total"]["kept"] == 31  # the near duplicate survives exact dedup


def test_prepare_all_bad_fails_and_cli_exit_codes(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n[1, 2]\n")
    with pytest.raises(UserError, match="every one of the 2 records was bad"):
        prepare([str(bad)], tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []  # nothing written: no empty output in place of an earlier one
    r = run_cli("prepare", "--input", str(bad), "--out_dir", str(tmp_path / "o2"))
    assert r.returncode == 2 and "every one" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("prepare", "--input", str(tmp_path / "nope"), "--out_dir", str(tmp_path / "o3"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "一个足够长的文档，超过十个字。"}, ensure_ascii=False) + "\n")
    r = run_cli("prepare", "--input", str(good), "--out_dir", str(tmp_path / "o4"), "--format", "baike")
    assert r.returncode == 2
    r = run_cli("prepare", "--input", str(good), "--out_dir", str(tmp_path / "o5"), "--format", "unknown")
    assert r.returncode == 2 and "unknown format" in r.stderr
    r = run_cli("prepare", "--input", str(good), "--out_dir", str(tmp_path / "o6"))
    assert r.returncode == 0 and json.loads(r.stdout)["kept"] == 1


PARAGRAPH = ("长城是中国古代的军事防御工程，是一道高大、坚固而且连绵不断的长垣，用以限隔敌骑的行动。"
             "长城不是一道单纯孤立的城墙，而是以城墙为主体，同大量的城、障、亭、标相结合的防御体系。"
             "长城修筑的历史可上溯到西周时期，发生在首都镐京的著名典故“烽火戏诸侯”就源于此，历代都有修筑过。")


@pytest.mark.parametrize("dedup", ["exact", "minhash"])
def test_copies_that_differ_in_width_punctuation_or_spacing_are_duplicates(tmp_path, dedup):
    half_width = PARAGRAPH.translate(str.maketrans("，。、“”", ",.,\"\""))
    spaced = PARAGRAPH.replace("，", "， ")
    differs = PARAGRAPH.replace("长城", "运河").replace("城墙", "河堤")  # another text: key 5-gram Jaccard 0.66
    assert len(PARAGRAPH) == 134 and differs != PARAGRAPH
    wide, narrow = "ＡＢＣ全角字母与数字１２３的一段话。", "abc全角字母与数字123的一段话."
    docs = [PARAGRAPH, half_width, spaced, wide, narrow, differs]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in docs))
    stats = prepare([str(tmp_path / "a.jsonl")], tmp_path / "out", dedup=dedup)
    kept = [json.loads(x)["text"] for x in (tmp_path / "out" / "part_00000.jsonl").read_text().splitlines()]
    assert kept == [PARAGRAPH, docs[3], differs]  # the first copy, as written
    assert stats["total"]["exact_duplicates"] == 3


def test_dedup_keys_keep_apart_what_differs_in_numbers_or_words():
    from babyllama.data.clean import dedup_key

    apart = [("商品价格是1.5元", "商品价格是15元"), ("气温是-5度", "气温是5度"), ("10:30", "1030"),
             ("555-1234", "5551-234"), ("the rapist", "therapist"), ("!!!!", "????"),
             ("아버지가 방에", "아버지가방에"), ("版本 Python 3", "版本 Python3")]  # Korean is written with spaces
    assert [a for a, b in apart if dedup_key(a) == dedup_key(b)] == []
    same = [("工程，是一道", "工程, 是一道"), ("Hello World", "hello  world!"), ("ＡＢＣ１２３", "abc123"),
            ("工程，是一道", "工程是一道"), ("今天 我们", "今天我们"), ("2024年 1月", "2024年1月"),
            ("使用 Python 编程", "使用Python编程"), ("東京、大阪", "東京大阪"), ("気温は -5度", "気温は-5度"),
            ("𠀀，𠀁", "𠀀𠀁")]  # beside a Chinese or Japanese character a run keeps nothing apart
    assert [a for a, b in same if dedup_key(a) != dedup_key(b)] == []



def test_a_long_document_is_keyed_in_pieces_to_the_key_of_the_whole(monkeypatch):
    """A 20 M-character line took ~600 MB of numpy arrays at once: a long text is keyed in pieces cut between two
    characters that stay, so no run of separators (kept as a space between words or dropped beside 今) spans a cut;
    the pieces' keys joined are the whole's, whatever the piece size."""
    from babyllama.data import clean

    rng = np.random.default_rng(0)
    alphabet = list("abX019-－., ，。\n!？") + ["今", "天", "😀", "\u3000", "Ａ", "ก", "한"]
    texts = ["".join(rng.choice(alphabet, size=rng.integers(0, 120))) for _ in range(300)]
    texts += ["a" + "." * 50 + "b", "!!?!!", "... , 今天", "5 -5 - 5"]  # a run at a cut; punctuation alone
    whole = [clean.dedup_key(t) for t in texts]
    pieces = []
    for size in (1, 2, 3, 7):
        monkeypatch.setattr(clean, "KEY_PIECE_CHARS", size)
        pieces.append([clean.dedup_key(t) for t in texts])
    assert pieces == [whole] * 4
    assert whole[-4:] == ["a b", "!!?!!", "今天", "5 5 5"]
    monkeypatch.setattr(clean, "KEY_PIECE_CHARS", 2)
    cuts = []
    monkeypatch.setattr(clean, "piece_key", lambda t, key=clean.piece_key: cuts.append(t) or key(t))
    assert clean.dedup_key("ab，cdefg") == "ab cdefg" and cuts == ["ab，c", "de", "fg"]  # none beside ，


# a line of every rule of normalize: \r\n, \r and the other line breaks, runs of spaces (\u00a0, \u2003, tabs), blank
# lines, an end of a line or of the text stripped, control and invisible characters; beside what stays: a
# zero-width joiner, \u3000, Chinese with ，。, Latin words and digits, an emoji, a minus before a digit
EVERY_RULE = ("  \ufeff开头\r\n第一行  有\u00a0\u2003空格\u200b和\u2060零宽\u00ad\r\r\n\n\n\n第二段\x07控\x00制\x9f，"
              "分页\x0c行\x0b断\x85行\u2028段\u2029组\x1c一\x1d二\x1e三\t\t尾  \r\n \t \n"
              "Hello ,  world -5 1.5\u3000缩进 👨\u200d👩。  \n\n\n\n")


def test_a_long_document_is_normalised_in_pieces_to_the_normalised_whole(monkeypatch):
    """A 50 M-character record took ~5.7 times its text beside it: each step of normalize made a copy of the whole.
    A long text is normalised in pieces cut between two characters that no step changes or looks across: joined,
    they are the whole's, and so are their dedup keys joined, wherever the cut falls near each rule (every piece size
    up to the text's length, on the document of EVERY_RULE and on random texts of its characters)."""
    from babyllama.data import clean

    rng = np.random.default_rng(0)
    texts = [EVERY_RULE * 3, *("".join(rng.choice(list(EVERY_RULE), size=rng.integers(1, 80))) for _ in range(200))]
    whole = [clean._normalize(t) for t in texts]  # at once
    assert clean.normalize(EVERY_RULE) == ("开头\n第一行 有 空格和零宽\n\n第二段控制，分页\n行\n断\n行\n段\n组\n"
                                          "一\n二\n三 尾\n\nHello , world -5 1.5\u3000缩进 👨\u200d👩。")
    for size in range(1, len(texts[0]) + 1):
        monkeypatch.setattr(clean, "CLEAN_PIECE_CHARS", size)
        for text, expected in zip(texts if size <= 8 else texts[:1], whole, strict=False):
            pieces = clean.normalized_pieces(text)
            assert "".join(pieces) == expected, (size, text)
            assert "".join(map(clean.dedup_key, pieces)) == clean.dedup_key(expected), (size, text)
        assert len(clean.normalized_pieces(texts[0])) > (size < len(texts[0]) - 10), size  # cut where it can be


def test_a_long_document_goes_through_prepare_in_pieces_to_the_same_output(tmp_path, monkeypatch):
    """prepare with pieces of 5 characters (long documents, each rule near a cut) writes the parts and statistics of
    pieces of a million: the same documents kept (exact and near duplicates found through the keys of pieces, the
    lengths summed) and the same bytes (each piece JSON-escaped alone), written a few characters at a time."""
    from babyllama.data import clean

    docs = [EVERY_RULE + NEWS, "短\r\n", EVERY_RULE + NEWS + " \u200b", NEWS[:60] + "变" + NEWS[61:] + EVERY_RULE,
            f"\"引号\"\\{EVERY_RULE}/\x01" * 3]  # an exact and a near duplicate of the first; JSON's escapes
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    outputs = []
    for size in (1 << 20, 5):
        monkeypatch.setattr(clean, "CLEAN_PIECE_CHARS", size)
        monkeypatch.setattr(clean, "WRITE_CHARS", size)
        out = tmp_path / f"out{size}"
        stats = prepare([str(tmp_path / "a.jsonl")], out, min_chars=5, dedup="minhash")
        outputs.append(((out / "part_00000.jsonl").read_bytes(), stats["total"]))
    assert outputs[0] == outputs[1]
    kept = [json.loads(line)["text"] for line in outputs[0][0].decode().splitlines()]
    assert kept == [normalize(docs[0]), normalize(docs[4])]
    assert outputs[0][0].decode().splitlines()[1] == json.dumps({"text": kept[1]}, ensure_ascii=False)
    assert {k: outputs[0][1][k] for k in ("too_short", "exact_duplicates", "near_duplicates")} == {
        "too_short": 1, "exact_duplicates": 1, "near_duplicates": 1}


def test_a_long_document_is_cleaned_and_written_without_a_copy_of_it(tmp_path, monkeypatch):
    """What prepare holds beyond a long document's text: its normalised pieces (as long as the text) and one piece's
    work, not the copies of the whole that each cleaning step, the dedup key and its UTF-8 made (tracemalloc's peak,
    pieces of 8 Ki characters: 1.2 times the text where it was 9.2), nor those of the part's JSON line (4.2)."""
    import tracemalloc

    from babyllama.data import clean

    for name in ("CLEAN_PIECE_CHARS", "KEY_PIECE_CHARS", "WRITE_CHARS"):
        monkeypatch.setattr(clean, name, 1 << 13)
    text = " " + "".join(generated_corpus(300, seed=1)) * 30 + "\r\n"  # 786 K Chinese characters with ，。
    size = len(text) * 2  # bytes: a Chinese str holds 2 a character
    stats: dict = {}
    writer, _ = clean.ShardWriter(tmp_path, 10), clean._key_table()  # the table of keys is made once, before
    tracemalloc.start()
    try:
        for pieces in clean.clean_documents([("a", text)], 10, "exact", None, stats):
            writer.write(pieces)
        writer.close()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stats["a"].kept == 1 and (tmp_path / "part_00000.jsonl").read_text() == json.dumps(
        {"text": normalize(text)}, ensure_ascii=False) + "\n"
    assert peak < 1.3 * size, peak / size


NEWS = ("会议指出，要在一期工程采取现代管理方法的基础上，加强政治思想工作和两个文明建设，发扬社会主义团结协作精神，"
        "同时坚持社会主义市场经济原则，进一步明确项目法人、设计、施工和监理单位的责任，建立严格的索赔制度，在科学管理"
        "方面做出新的成绩。")


@pytest.mark.parametrize("dedup", ["exact", "minhash"])
def test_chinese_copies_without_punctuation_or_with_spaces_are_duplicates(tmp_path, dedup):
    """A tester's file: the key kept a space for each run of punctuation, so that a copy without its ，。 or with a
    space for them was a second document (kept 2 of 3), and a news paragraph less its 10 ，。、 (5-gram Jaccard
    under 0.5) escaped near deduplication too."""
    bare = NEWS.translate(dict.fromkeys(map(ord, "，。、")))
    assert len(NEWS) == 116 and len(bare) == 106
    (tmp_path / "zh.txt").write_text(f"今天天气很好，我们一起去公园散步吧。\n今天天气很好我们一起去公园散步吧\n"
                                     f"今天天气很好 我们一起去公园散步吧\n{NEWS}\n{bare}\n", encoding="utf-8")
    stats = prepare([str(tmp_path / "zh.txt")], tmp_path / "out", dedup=dedup)
    kept = [json.loads(x)["text"] for x in (tmp_path / "out" / "part_00000.jsonl").read_text().splitlines()]
    assert kept == ["今天天气很好，我们一起去公园散步吧。", NEWS]
    assert (stats["total"]["exact_duplicates"], stats["total"]["near_duplicates"]) == (3, 0)


def test_a_read_only_folder_is_one_sentence_and_no_part_is_left(tmp_path, capsys, monkeypatch):
    """EACCES when prepare writes its shard (closing it flushes what the disk refuses): exit 2, one sentence,
    no .part_*.tmp left; the same command with the permission back finishes."""
    import errno

    from babyllama.cli import main

    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                                               for t in generated_corpus(20, seed=3)))
    out = tmp_path / "clean"
    args = ["prepare", "--input", str(tmp_path / "in.jsonl"), "--out_dir", str(out)]
    refuse_writes(monkeypatch, ".part_00000.jsonl.tmp", errno.EACCES, text=True)
    assert main(args) == 2
    err = capsys.readouterr().err  # a line of its own: the bar is closed first
    assert [x for x in err.splitlines() if "babyllama:" in x] == [
        f"babyllama: error: no permission to write in {out} while writing {out / 'part_00000.jsonl'}; make it "
        "writable and run the same command to start again."]
    assert not list(out.glob(".*.tmp"))
    monkeypatch.undo()
    assert main(args) == 0 and (out / "part_00000.jsonl").read_text().count("\n") == 20


def test_a_warning_starts_a_line_of_its_own_below_a_progress_bar(tmp_path):
    """With stderr to a file or pipe, tqdm drew each status over the one before with "\\r" and no newline, so the
    file held `prepare: 0 docs [00:00, ? docs/s]WARNING ...`: each status is now a line, and the warning its own."""
    import re

    (tmp_path / "gbk.txt").write_bytes("第一篇中文文档的正文。\n第二篇中文文档的正文。\n".encode("gbk"))
    r = run_cli("prepare", "--input", tmp_path / "gbk.txt", "--out_dir", tmp_path / "out", "--min_chars", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.split("\n")
    assert lines[-1] == "" and "\r" not in r.stderr
    bars = [x for x in lines[:-1] if x.startswith("prepare: ")]
    assert all(re.fullmatch(r"prepare: +\d+%\|[# ]+\| [\d.]+/46\.0 \[[^\]]*\]", x) for x in bars), bars  # 46 bytes
    assert bars[-1].startswith("prepare: 100%|") and bars[-1].endswith(", 2 docs]"), bars
    warning = f"WARNING babyllama.data.sources: {tmp_path / 'gbk.txt'}: not UTF-8; reading it as GB18030 (detected)."
    assert any(x.startswith(warning) for x in lines)
    assert all(x.startswith(("prepare: ", "WARNING ", "INFO ")) for x in lines[:-1]), lines


def test_prepare_that_keeps_nothing_says_why(tmp_path):
    """`prepare --min_chars 99999999999999999999999` exited 0 with "kept 0" and no part file: nothing kept is exit 2
    and one sentence counting why (too short, bad, duplicates)."""
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        {"text": "第一篇足够长的文档。"}, {"text": "第一篇足够长的文档。"}, {"title": "无正文"}])
        + "{oops\n")
    r = run_cli("prepare", "--input", mixed, "--out_dir", tmp_path / "o", "--min_chars", "99999999999999999999999")
    assert (r.returncode, r.stderr.splitlines()[-1]) == (2, (
        "babyllama: error: none of the 4 records was kept: 2 shorter than --min_chars 99999999999999999999999, 2 bad; "
        "lower --min_chars or check the inputs."))
    assert list((tmp_path / "o").glob("part_*")) == []


def test_nothing_kept_of_one_record_says_the_one_record():
    from babyllama.data.clean import nothing_kept

    total = {"records": 1, "too_short": 1, "bad": 0, "exact_duplicates": 0, "near_duplicates": 0}
    assert str(nothing_kept(total, 50)) == ("the one record was not kept: 1 shorter than --min_chars 50; lower "
                                            "--min_chars or check the inputs.")


def test_prepare_help_says_workers_need_the_datatrove_engine(capsys):
    """prepare --help showed --workers as if the embedded prepare used it; it refuses it without --engine datatrove.
    pretokenize's --workers works with either engine."""
    from babyllama.cli import main

    helps = {}
    for command in ("prepare", "pretokenize"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        words = " ".join(capsys.readouterr().out.split())  # as argparse wraps them at any width
        helps[command] = words.split("--workers WORKERS ")[1].split(" --slurm_partition")[0]
    assert helps == {"prepare": "with --engine datatrove (the embedded prepare runs in one process): processes at "
                                "once, on this machine at most one per core (default: one per core)",
                     "pretokenize": "processes at once, on this machine at most one per core (default: one per core)"}

