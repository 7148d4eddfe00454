"""Tokenizers: the BPE trained here, ChatGLM2's SentencePiece model, HF tokenizer files, the dtype rule."""

from __future__ import annotations

import json
import logging
import re
import sys
import tracemalloc

import numpy as np
import pytest
import torch

from babyllama.errors import UserError
from babyllama.tokenizer import MAX_RUN, load_tokenizer, token_dtype, train_bpe, training_pre_tokenizer, training_sample
from tests.conftest import CHATGLM2, ROUNDTRIP_TEXTS, generated_corpus


@pytest.mark.parametrize("text", ROUNDTRIP_TEXTS)
def test_bpe_roundtrips_any_text(bpe_tokenizer, text):
    ids = bpe_tokenizer.encode(text)
    assert bpe_tokenizer.decode(ids) == text
    assert all(i > 2 for i in ids)  # text never turns into pad/bos/eos, even when it spells "</s>"


def test_bpe_learns_merges_and_specials(bpe_tokenizer):
    assert bpe_tokenizer.vocab_size == 600
    assert (bpe_tokenizer.pad_id, bpe_tokenizer.bos_id, bpe_tokenizer.eos_id) == (0, 1, 2)
    doc = generated_corpus(1, seed=99)[0]
    ids = bpe_tokenizer.encode(doc, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert len(ids) < 0.6 * len(doc.encode())  # merges compress below one id per byte
    assert len(bpe_tokenizer.encode(" the")) == 1  # frequent words become one token
    assert bpe_tokenizer.decode(ids) == doc


def test_training_pre_tokens_are_gpt2_with_runs_of_at_most_max_run_characters(bpe_tokenizer):
    from tokenizers import pre_tokenizers

    split = training_pre_tokenizer().pre_tokenize_str
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str
    for text in [*ROUNDTRIP_TEXTS, "Hello world, don't  stop 12345!!", "  \n\n  a"]:
        assert split(text) == gpt2(text)  # runs shorter than MAX_RUN: GPT-2's split exactly
    run = "长城" * 50 + "！" * 40 + "7" * 40
    pieces = [bpe_tokenizer.tok.decoder.decode([p]) for p, _ in split(run)]
    assert "".join(pieces) == run and max(map(len, pieces)) == MAX_RUN
    assert [len(p) for p in pieces] == [16] * 6 + [4] + [16, 16, 8] + [16, 16, 8]
    assert bpe_tokenizer.tok.pre_tokenizer.pre_tokenize_str(run) == gpt2(run)  # encoding: GPT-2's, as exported


def test_bpe_trains_on_one_long_unpunctuated_run_and_stays_lossless():
    run = "".join(generated_corpus(30, seed=5)).replace("。", "").replace(" ", "")  # ~1,500 characters
    tok = train_bpe([run * 20], 400)  # one run of ~30,000 characters: seconds before, now instant
    assert tok.decode(tok.encode(run)) == run and len(tok.encode(run)) < len(run.encode())


def test_bpe_save_load_keeps_ids_and_fingerprint(bpe_tokenizer, tmp_path):
    bpe_tokenizer.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (1, 2, 0, 600)
    assert loaded.fingerprint == bpe_tokenizer.fingerprint
    assert loaded.encode_batch(ROUNDTRIP_TEXTS) == bpe_tokenizer.encode_batch(ROUNDTRIP_TEXTS)
    assert load_tokenizer(tmp_path / "tokenizer.json").fingerprint == bpe_tokenizer.fingerprint


def test_foreign_tokenizer_json_finds_specials_by_name(bpe_tokenizer, tmp_path):
    bpe_tokenizer.tok.save(str(tmp_path / "tokenizer.json"))  # no babyllama metadata
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "</s>", "eos_token": "<pad>"}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (2, 0)


def test_token_bytes_add_up_to_utf8_length(bpe_tokenizer):
    inside, first = bpe_tokenizer.token_bytes()
    for text in ROUNDTRIP_TEXTS:
        assert sum(inside[i] for i in bpe_tokenizer.encode(text)) == len(text.encode())
    assert (inside == first).all()  # a byte-level BPE adds no prefix
    assert inside[0] == inside[1] == inside[2] == 0  # special ids are no text


BPB_DOCS = ["你好 世界 hello world", "世界和平, the quick fox", "两个  空格 and rare 𠀀𪚥 😀 end", "北京，天气很好。"]


def llama_style_tokenizer(decoder: str):
    """A tiny tokenizer.json as Llama's: Metaspace pieces (▁世界), <0x00>..<0xFF> byte fallback, and a
    decoder that drops the first ▁ of a text: Llama 2's Replace/ByteFallback/Fuse/Strip or a Metaspace one."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    base = RustTokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.Metaspace()
    base.train_from_iterator(["你好 世界 hello world 北京 天气 很好 和平", "the quick brown fox 世界 和平"] * 20,
                             trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                 show_progress=False))
    model = json.loads(base.to_str())["model"]
    learned = sorted(model["vocab"], key=model["vocab"].get)[3:]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *learned])}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = RustTokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = (decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)]) if decoder == "llama2"
                   else decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first")]))
    return tok


def tokenizer_of(kind: str, bpe_tokenizer, tmp_path):
    if kind == "chatglm2":
        if not CHATGLM2.is_file():
            pytest.skip("ChatGLM2 tokenizer.model not present")
        return load_tokenizer(CHATGLM2)
    if kind == "bpe":
        return bpe_tokenizer
    llama_style_tokenizer(kind).save(str(tmp_path / "tokenizer.json"))
    return load_tokenizer(tmp_path / "tokenizer.json")


@pytest.mark.parametrize("kind", ["bpe", "llama2", "metaspace", "chatglm2"])
def test_decode_complete_drops_only_a_character_cut_at_the_end(kind, bpe_tokenizer, tmp_path):
    """Every lead byte whose next byte is restricted (E0, ED, F0, F4) and both ends of the range: the text
    before the cut character; U+FFFD itself and bytes that are not UTF-8 stay."""
    tok = tokenizer_of(kind, bpe_tokenizer, tmp_path)
    head = tok.encode("你好")
    for char in ("é", "中", "\u0800", "\ud7ff", "\uffff", "😀", "\U00010000", "\U0010ffff"):
        raw = [tok._byte_id(b) for b in char.encode()]
        assert tok.decode_complete(head + raw) == "你好" + char
        for cut in range(1, len(raw)):
            assert tok.decode(head + raw[:cut]).startswith("你好\ufffd")
            assert tok.decode_complete(head + raw[:cut]) == "你好", (char, cut)
    for tail in ("\ufffd".encode(), b"\x80", b"\xc0\x80", b"\xed\xa0\x80"):  # the last: a surrogate's bytes
        ids = head + [tok._byte_id(b) for b in tail]
        assert tok.decode_complete(ids) == tok.decode(ids) != "你好" and tok.decode(ids).endswith("\ufffd")


@pytest.mark.parametrize("kind", ["bpe", "llama2", "metaspace", "chatglm2"])
def test_bits_per_byte_count_the_bytes_of_the_text(kind, bpe_tokenizer, tmp_path):
    from babyllama.evaluate import loss_sums

    tok = tokenizer_of(kind, bpe_tokenizer, tmp_path)
    stream = [tok.eos_id] + [i for d in BPB_DOCS for i in tok.encode(d, bos=True, eos=True)]
    for doc in BPB_DOCS:
        assert tok.decode(tok.encode(doc)) == doc  # the text the tokens stand for is the document
    if kind != "bpe":  # byte-fallback tokens for the rare characters, ▁ pieces inside the text
        pieces = [tok.tok.id_to_token(i) if kind != "chatglm2" else tok.sp.id_to_piece(i) for i in stream]
        assert "<0xF0>" in pieces and "▁世界" in pieces
    ids = np.array(stream)
    assert tok.text_bytes(ids[:-1], ids[1:]).sum() == sum(len(d.encode()) for d in BPB_DOCS) == 117

    class Windows:  # the whole stream as one window of the validation split
        lengths = None

        def collate(self, indices):
            return {"idx": torch.tensor([stream[:-1]]), "targets": torch.tensor([stream[1:]])}

    _, tokens, nbytes = loss_sums(lambda batch: torch.zeros(()), Windows(), [0], 1, torch.device("cpu"), tok)
    assert (tokens, nbytes) == (len(stream) - 1, 117)


@pytest.mark.parametrize("name", ["tokenizer.model", "tokenizer.json", "babyllama_tokenizer.json",
                                  "tokenizer_config.json"])
def test_a_git_lfs_pointer_is_named_as_one(name, bpe_tokenizer, tmp_path):
    pointer = ("version https://git-lfs.github.com/spec/v1\noid sha256:"
               "4e1243bd22c66e76c2ba9eddc1f91394e57f9f83ab8a3dd29e4b5e7d1a6e5c2f\nsize 1018370\n")
    if name == "babyllama_tokenizer.json":
        bpe_tokenizer.save(tmp_path)
    if name == "tokenizer_config.json":
        bpe_tokenizer.tok.save(str(tmp_path / "tokenizer.json"))  # a foreign tokenizer.json: its config is read
    (tmp_path / name).write_text(pointer)
    with pytest.raises(UserError, match=f"{tmp_path / name} is a git-lfs pointer, not the .* itself: run `git lfs"):
        load_tokenizer(tmp_path)


def test_a_file_that_is_no_tokenizer_is_one_sentence_for_every_kind(bpe_tokenizer, tmp_path):
    from tests.conftest import run_cli

    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage")
    r = run_cli("tokenizer", "info", str(tmp_path / "tokenizer.model"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"babyllama: error: {tmp_path / 'tokenizer.model'} is not a valid SentencePiece model "
                                f"(INTERNAL: could not parse ModelProto from {tmp_path / 'tokenizer.model'}).")
    (tmp_path / "docs.jsonl").write_text('{"text": "你好"}\n')
    (tmp_path / "tokenizer.model").write_text("version https://git-lfs.github.com/spec/v1\nsize 5\n")
    r = run_cli("pretokenize", "--input", str(tmp_path / "docs.jsonl"), "--tokenizer", str(tmp_path),
                "--out_dir", str(tmp_path / "tokens"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "is a git-lfs pointer" in r.stderr
    bpe_tokenizer.save(tmp_path / "ours")
    for name, text, message in [("babyllama_tokenizer.json", "{", "is not a valid JSON file"),
                                ("babyllama_tokenizer.json", '{"bos_id": 1}', "must hold bos_id, eos_id and pad_id"),
                                ("tokenizer_config.json", "[1]", "must hold a JSON object")]:
        (tmp_path / "ours" / "babyllama_tokenizer.json").unlink(missing_ok=True)
        (tmp_path / "ours" / name).write_text(text)
        with pytest.raises(UserError, match=f"{tmp_path / 'ours' / name} {message}"):
            load_tokenizer(tmp_path / "ours")


def test_measure_encodes_a_long_line_in_pieces_with_the_whole_line_s_count(bpe_tokenizer, monkeypatch):
    """`tokenizer info --sample` encoded each line whole: a sample of one 12 MB line took 1.5 GB, the same bytes as
    50 k lines 0.3 GB. A line over PIECE_CHARS is cut as pretokenize cuts a document (text_pieces), and its pieces are
    encoded in batches of about MEASURE_BATCH characters; the counts are those of the whole line, exactly."""
    import babyllama.tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "PIECE_CHARS", 200)
    monkeypatch.setattr(tokenizer_module, "MEASURE_BATCH", 1000)
    long = "".join(generated_corpus(60, seed=5))  # 5,258 characters of Chinese, English and punctuation: one line
    run = "的一是在不了有和人这" * 45  # no punctuation or space: cut where tokenizations agree (sync_cut)
    docs = [f"短的一行\n{long}\n又一行", run]
    calls: list[list[int]] = []
    encode_batch = bpe_tokenizer.encode_batch
    monkeypatch.setattr(bpe_tokenizer, "encode_batch", lambda texts, *a, **k: calls.append(
        [len(t) for t in texts]) or encode_batch(texts, *a, **k))
    assert bpe_tokenizer.measure(iter(docs[:1]))[0] == len(docs[0]) - 2
    assert max(n for c in calls for n in c) <= 200 and max(map(sum, calls)) <= 1000 + 200 and len(calls) == 5
    assert sum(map(sum, calls)) == len(docs[0]) - 2  # every character once, newlines aside
    monkeypatch.undo()
    lines = [line for d in docs for line in d.splitlines()]
    expected = (sum(map(len, lines)), sum(len(bpe_tokenizer.encode(line)) for line in lines))
    monkeypatch.setattr(tokenizer_module, "PIECE_CHARS", 200)
    assert bpe_tokenizer.measure(iter(docs)) == expected
    assert len(list(tokenizer_module.text_pieces(run, 200, bpe_tokenizer))) == 3 and len(run) == 450


def test_token_dtype_rule():
    assert token_dtype(64793) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535
    assert token_dtype(65537) == np.uint32


def test_missing_or_wrong_tokenizer_path_is_one_sentence(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(UserError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)


@pytest.mark.skipif(not CHATGLM2.is_file(), reason="ChatGLM2 tokenizer.model not present")
def test_chatglm2_sentencepiece_matches_sentencepiece(tmp_path):
    import sentencepiece as spm

    tok = load_tokenizer(CHATGLM2)
    sp = spm.SentencePieceProcessor(model_file=str(CHATGLM2))
    sentences = ["床前明月光，疑是地上霜。", "中华人民共和国成立于1949年。", "人工智能是计算机科学的一个分支。"]
    assert tok.encode_batch(sentences) == [sp.encode(s) for s in sentences]
    assert tok.encode(sentences[0], bos=True, eos=True) == [1, *sp.encode(sentences[0]), 2]
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (64789, 1, 2, 0)
    assert tok.dtype == np.uint16
    assert tok.decode(tok.encode(sentences[1])) == sentences[1]
    inside, first = tok.token_bytes()  # ▁ is the space it stands for, except as a document's dummy prefix
    ids = tok.encode(sentences[0])
    assert first[ids[0]] + sum(inside[i] for i in ids[1:]) == len(sentences[0].encode())
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).fingerprint == tok.fingerprint


@pytest.mark.skipif(not CHATGLM2.is_file(), reason="ChatGLM2 tokenizer.model not present")
def test_chatglm2_suppresses_bos_unk_and_the_rows_beyond_its_pieces():
    tok = load_tokenizer(CHATGLM2)
    assert tok.suppress_tokens(64793) == (0, 1, 64789, 64790, 64791, 64792)  # unk = pad, bos; eos 2 stays


def test_bpe_on_a_corpus_too_small_for_its_vocab_size_warns_with_the_size_reached(caplog):
    with caplog.at_level(logging.WARNING, logger="babyllama.tokenizer"):
        tok = train_bpe(["你好，世界。"] * 3, 512)
        assert tok.vocab_size == 273
        train_bpe(generated_corpus(), 300)  # reached: no warning
    assert caplog.messages == ["the corpus has too few distinct pieces for a vocabulary of 512: the trained one "
                               "has 273."]


def utf8(texts: list[str]) -> int:
    return sum(len(t.encode()) for t in texts)


def test_training_sample_is_every_document_in_order_when_they_fit():
    """A corpus within the budget trains as before the budget: every document, in order (the demo's tokenizer is
    the same byte for byte)."""
    docs = generated_corpus(50)
    for budget in (utf8(docs), 0, 1 << 25):  # exactly, no bound, the default's order of size
        assert training_sample(iter(docs), budget) == docs
    assert training_sample(iter(docs)) == docs


def test_training_sample_over_the_budget_is_a_uniform_sample_within_it_the_same_every_run():
    """BPE training held every document (about 100 bytes of memory a byte of text: 140 GB for BaiduBaike); it sees
    a random sample of at most --max_train_bytes now, spread over the whole corpus, in its order, the same on every
    run, and at least the budget less the largest document."""
    docs = [f"{i:04d}" + "文" * (i % 50) for i in range(2000)]  # distinct, 4 to 151 bytes
    budget = utf8(docs) // 10
    sample = training_sample(iter(docs), budget)
    assert budget - 151 < utf8(sample) <= budget
    assert sample == training_sample(iter(docs), budget) != training_sample(iter(docs), budget, seed=1)
    assert sample == [d for d in docs if d in set(sample)] and len(set(sample)) == len(sample)
    tenths = [sum(int(d[:4]) // 200 == k for d in sample) for k in range(10)]
    assert all(0.5 < t / (len(sample) / 10) < 1.5 for t in tenths), tenths  # not the first tenth, nor the last


def test_a_document_over_the_budget_fills_what_the_sample_leaves_with_its_beginning(caplog):
    """A document larger than --max_train_bytes was passed over: one 16.6M-character line beside a short record trained
    on the short record alone (a vocabulary of 313 ids, exit 0), and alone it was an error. Its beginning, cut at a
    character, fills what the sample of the others leaves now, and the line says so."""
    long, short = "长" * 100, "短文档。"  # 300 and 12 bytes
    with caplog.at_level(logging.INFO, logger="babyllama.tokenizer"):
        assert training_sample(iter([long, short]), 200) == ["长" * 62, short]  # 200 - 12 bytes, less a cut 长
        assert training_sample(iter([long]), 200) == ["长" * 66]
        assert training_sample(iter([short, long]), 12) == [short]  # no room left: none of it
    assert [m.split("MiB (")[1] for m in caplog.messages] == [
        "--max_train_bytes 200 bytes (0.0 MiB)); 1 document is larger than that: its first 186 bytes are in the sample",
        "--max_train_bytes 200 bytes (0.0 MiB)); 1 document is larger than that: its first 198 bytes are in the sample",
        "--max_train_bytes 12 bytes (0.0 MiB)); 1 document is larger than that: the sample has no room left"]
    assert caplog.messages[0].startswith("training on 2 of 2 documents: ")
    assert caplog.messages[1].startswith("training on 1 of 1 document: ")
    many = [f"{i:03d}" + "长" * 100 for i in range(20)]  # each 303 bytes: one of them, the same every run
    sample = training_sample(iter(many), 100)
    assert len(sample) == 1 and sample == training_sample(iter(many), 100) and sample[0] in {m[:35] for m in many}
    assert sample != training_sample(iter(many), 100, seed=1)
    with pytest.raises(UserError, match=r"^--max_train_bytes 2 holds no whole character of the text \(the one "
                                        r"document read is larger than it\)"):
        training_sample(iter([long]), 2)
    with pytest.raises(UserError, match=r"text \(2 documents read, each larger than it\)"):
        training_sample(iter([long, long]), 2)


def test_training_sample_holds_the_sample_not_the_corpus():
    """20 MB of documents (as Python strings), each made as it is read, into a sample of 30 kB: the peak is far
    below the corpus (half a megabyte of it is the progress bar's and logging's own)."""
    import tqdm  # noqa: F401 - imported before the count: its modules are no document

    tracemalloc.start()
    try:
        sample = training_sample(("文" * 1000 + str(i) for i in range(10_000)), 30_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(sample) == 9 and peak < 2_000_000, peak


def test_an_error_of_the_texts_while_training_is_raised_to_the_caller():
    """Training runs in a thread (a stop acts at once); what its texts raise there is raised here, as before."""
    def texts():
        yield "你好，世界。"
        raise UserError("a.jsonl is cut.")

    with pytest.raises(UserError, match="a.jsonl is cut."):
        train_bpe(texts(), 300)


def test_bpe_training_off_a_terminal_says_every_interval_that_it_is_merging(monkeypatch, capsys):
    """`tokenizer train > log 2>&1` printed nothing for the minute of merges after its reading bar: the Rust trainer's
    bars are off there. A line on stderr now says every progress.LINE_EVERY_S (30 s; here 0.05 s) that it merges."""
    import time

    from babyllama import progress

    def slow_texts():  # the trainer reads them in its thread: 0.3 s of work at least
        time.sleep(0.3)
        yield from generated_corpus()

    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.05)
    train_bpe(slow_texts(), 300)  # under pytest stdout is no terminal
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 3 and all(re.fullmatch(r"tokenizer train: merging, \d+ s", line) for line in lines), lines
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # the trainer draws its own bars (on stdout): no lines
    train_bpe(slow_texts(), 300)
    assert "merging" not in capsys.readouterr().err


def test_tokenizer_train_help_names_every_format_it_reads(capsys):
    """--input's help said ".txt (a document per line) or .jsonl (text field)", though it reads what prepare reads."""
    from babyllama.cli import main

    with pytest.raises(SystemExit):
        main(["tokenizer", "train", "--help"])
    assert ("--input INPUT [INPUT ...] data files or folders, in any format and schema prepare reads (JSON lines or "
            "array, parquet, CSV, .txt a document per line; optionally .gz/.zst): prepare's output, or raw corpora "
            "--vocab_size") in " ".join(capsys.readouterr().out.split())

