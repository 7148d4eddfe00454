"""Pretokenization: exact token counts, lossless documents, identical bytes for any worker count."""

from __future__ import annotations

import errno
import json
import re
from contextlib import suppress

import numpy as np
import pytest

from babyllama.data.pretokenize import pretokenize
from babyllama.data.shards import is_val, merge, read_manifest
from babyllama.errors import UserError
from tests.conftest import generated_corpus, refuse_writes, run_cli


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory, bpe_tokenizer):
    d = tmp_path_factory.mktemp("pt")
    docs = generated_corpus(300, seed=11)
    (d / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in docs))
    bpe_tokenizer.save(d / "tok")
    return d, docs


def documents_of(out, split="train"):
    """Split every shard of a split at its eos ids: one token array per document."""
    m = read_manifest(out)
    eos = m["tokenizer"]["eos_id"]
    docs = []
    for s in (s for s in m["shards"] if s["split"] == split):
        tokens = np.fromfile(out / s["file"], dtype=m["dtype"])
        ends = np.flatnonzero(tokens == eos)
        docs += np.split(tokens, ends + 1)[:-1]
    return docs


def test_counts_are_exact_and_documents_decode_back(corpus_and_tokenizer, bpe_tokenizer, tmp_path):
    d, docs = corpus_and_tokenizer
    m = pretokenize([str(d / "docs.jsonl")], str(d / "tok"), tmp_path, workers=1, val_fraction=0.1,
                    shard_tokens=3000)
    val_docs = [t for t in docs if is_val(t, 0.1)]
    train_docs = [t for t in docs if not is_val(t, 0.1)]
    assert 10 < len(val_docs) < 60
    expected = {
        "train": {"tokens": sum(len(bpe_tokenizer.encode(t)) + 1 for t in train_docs), "documents": len(train_docs)},
        "val": {"tokens": sum(len(bpe_tokenizer.encode(t)) + 1 for t in val_docs), "documents": len(val_docs)},
    }
    assert m["totals"] == expected
    assert m["dtype"] == "uint16" and m["tokenizer"]["fingerprint"] == bpe_tokenizer.fingerprint
    assert len([s for s in m["shards"] if s["split"] == "train"]) > 1  # shard_tokens=3000 rolls over
    for split, texts in (("train", train_docs), ("val", val_docs)):
        decoded = [bpe_tokenizer.decode(x.tolist()) for x in documents_of(tmp_path, split)]
        assert decoded == texts  # whole documents, in order, each ending in eos
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()


def test_a_long_document_is_encoded_in_pieces_of_bounded_size_with_the_ids_of_the_whole(bpe_tokenizer, monkeypatch):
    """The tokenizer was given a whole document at once, ~400 bytes a character (1.28 M characters: 534 MB). It is
    now given pieces of at most PIECE_CHARS, cut where byte-level BPE makes no token across (the ids are the whole's),
    and at most about BATCH_CHARS characters a call; a short document is encoded as before."""
    from babyllama.data import pretokenize as pt

    monkeypatch.setattr(pt, "PIECE_CHARS", 200)
    monkeypatch.setattr(pt, "BATCH_CHARS", 1000)
    long = "".join(generated_corpus(60, seed=5))  # Chinese with English words and punctuation
    pieces = list(pt.text_pieces(long, 200, bpe_tokenizer))
    assert "".join(pieces) == long and len(long) == 5258 and len(pieces) == 28
    assert all(100 <= len(p) <= 200 for p in pieces[:-1]) and len(pieces[-1]) <= 200
    # no PIECE_CUT: where tokenizations agree on a boundary (sync_cut), from 3/4 of 200 on
    assert [len(p) for p in pt.text_pieces("字" * 450, 200, bpe_tokenizer)] == [151, 151, 148]
    assert list(pt.text_pieces("短文", 200, bpe_tokenizer)) == ["短文"]
    calls = []
    encode_batch = bpe_tokenizer.encode_batch
    monkeypatch.setattr(bpe_tokenizer, "encode_batch", lambda texts, *a, **k: calls.append(
        sum(map(len, texts))) or encode_batch(texts, *a, **k))
    batches = list(pt.text_batches(pt.document_pieces(["短文", long, "又一篇"], 0.0, bpe_tokenizer),
                                   size=lambda p: len(p.text)))
    flat = [i for batch in batches for i in pt.encode_pieces(bpe_tokenizer, batch, bos=True)[0].tolist()]
    assert max(calls) <= 1000 + 200 and sum(calls) == len(long) + 5
    monkeypatch.undo()
    bos, eos = bpe_tokenizer.bos_id, bpe_tokenizer.eos_id
    whole = [[bos, *bpe_tokenizer.encode(t), eos] for t in ("短文", long, "又一篇")]
    assert flat == [i for ids in whole for i in ids]
    assert whole[1][1:-1] == [i for p in pieces for i in bpe_tokenizer.encode(p)]  # the pieces' ids joined
    assert [(p.first, p.last) for b in batches for p in b] == [(True, True), (True, False), *[(False, False)] * 26,
                                                               (False, True), (True, True)]


def test_a_long_run_without_a_place_to_cut_is_cut_where_the_ids_are_the_whole_s(monkeypatch):
    """A piece of a run of text with no punctuation or space was cut at PIECE_CHARS characters, inside a token: one
    token became two (2,000,001 characters of Chinese: 1,937,622 ids, the whole's 1,937,620). It is cut now where a
    tokenization around the place and one from it agree on a token boundary (sync_cut): the ids are the whole's."""
    import random

    from babyllama.data import pretokenize as pt
    from babyllama.tokenizer import train_bpe

    chars, rng = "的一是在不了有和人这", random.Random(0)
    tok = train_bpe(["".join(rng.choice(chars) for _ in range(300)) for _ in range(200)], vocab_size=600)
    texts = ["".join(rng.choice(chars) for _ in range(1000)) for _ in range(5)]
    monkeypatch.setattr(pt, "PIECE_CHARS", 64)
    hard = [[i for k in range(0, len(t), 64) for i in tok.encode(t[k: k + 64])] for t in texts]
    assert sum(h != tok.encode(t) for h, t in zip(hard, texts, strict=True)) >= 4  # hard cuts change ids
    pieces = list(pt.document_pieces(texts, 0.0, tok))
    assert len(pieces) > 5 * 1000 // 64 and all(len(p.text) <= 64 for p in pieces)
    flat, lengths = pt.encode_pieces(tok, pieces, bos=False)
    assert flat.tolist() == [i for t in texts for i in [*tok.encode(t), tok.eos_id]]


def test_a_cut_is_not_placed_by_ids_whose_bytes_do_not_add_up_to_the_text():
    """token_ends took the ids' bytes to fall short of the text's by a prefix ("▁") only, and moved every end by the
    difference: an unknown id (0 bytes) moved them by its character's, so the two tokenizations of sync_cut agreed on
    "boundaries" inside tokens (ab|ab|... read as a|ba|b...). Ids whose bytes do not add up now tell no boundary, and
    the cut is the hard one, at limit."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models

    from babyllama.tokenizer import HFTokenizer, sync_cut, token_ends

    pieces = ["<pad>", "<s>", "</s>", "<unk>", "a", "b", "ab"]  # no "c": it is <unk>, 0 bytes
    rust = RustTokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, [("a", "b")], unk_token="<unk>"))
    rust.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>"])
    rust.decoder = decoders.Fuse()
    tok = HFTokenizer(rust, bos_id=1, eos_id=2, pad_id=0)
    text = "ab" * 300 + "c" + "ab" * 300
    assert token_ends(tok, tok.encode(text[250:650]), text[250:650]) is None
    assert token_ends(tok, tok.encode(text[:6]), text[:6]).tolist() == [2, 4, 6]
    assert sync_cut(tok, text, 400, 500) == 500  # not 403, inside the "ab" of 402:404
    whole = tok.encode(text)
    assert tok.encode(text[:500]) + tok.encode(text[500:]) == whole


@pytest.mark.parametrize("workers", [1, 2])
def test_a_long_document_goes_to_the_workers_and_to_the_shards_in_pieces(corpus_and_tokenizer, bpe_tokenizer,
                                                                          tmp_path, monkeypatch, workers):
    """A long document went to a worker whole, and its ids came back whole and were copied twice more: ~20 bytes a
    character at once (50 M characters: 1.2 GB). Its pieces go to the workers now, in batches of about BATCH_CHARS
    characters, and to the shards as they come back: one document, whole in one shard (past shard_tokens), however
    many batches its pieces span, with the ids of the whole."""
    import babyllama.data.pretokenize as pt

    monkeypatch.setattr(pt, "PIECE_CHARS", 200)
    monkeypatch.setattr(pt, "BATCH_CHARS", 1000)
    d, docs = corpus_and_tokenizer
    long = "".join(generated_corpus(60, seed=5))  # 5,258 characters: 28 pieces, 6 batches
    texts = [*docs[:20], long, *docs[20:40], "又" + long, *docs[40:60]]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    sizes, in_workers = [], pt.in_workers
    monkeypatch.setattr(pt, "in_workers", lambda func, batches, *a: in_workers(
        func, (sizes.append(sum(len(getattr(p, "text", p)) for p in b)) or b for b in batches), *a))  # pieces, or texts
    m = pretokenize([str(tmp_path / "docs.jsonl")], str(d / "tok"), tmp_path / "out", workers=workers,
                    val_fraction=0.3, shard_tokens=500)
    assert max(sizes) <= 1000 + 200 and sum(sizes) == sum(map(len, texts))
    for split, val in (("train", False), ("val", True)):
        want = [t for t in texts if is_val(t, 0.3) == val]
        assert [bpe_tokenizer.decode(x.tolist()) for x in documents_of(tmp_path / "out", split)] == want
        assert m["totals"][split] == {"documents": len(want),
                                      "tokens": sum(len(bpe_tokenizer.encode(t)) + 1 for t in want)}
    eos = bpe_tokenizer.eos_id
    for shard in m["shards"]:  # whole documents, as many as it counts
        tokens = np.fromfile(tmp_path / "out" / shard["file"], dtype=m["dtype"])
        assert tokens[-1] == eos and (tokens == eos).sum() == shard["documents"] and len(tokens) == shard["tokens"]
    assert max(s["tokens"] for s in m["shards"]) > 1000  # a long document's shard


def write_in_spans(writer, tokens: np.ndarray, lengths: np.ndarray, cuts: list[int]) -> None:
    """Write documents (tokens back to back, lengths) as write_pieces does: a write per span of tokens between cuts,
    each document a length of the span, the last one open where a cut falls inside it."""
    ends = np.cumsum(lengths)
    for a, b in zip([0, *cuts], [*cuts, len(tokens)], strict=True):
        bounds = [a, *ends[(ends > a) & (ends < b)].tolist(), b]
        writer.write(tokens[a:b], np.diff(bounds), open_end=b not in ends)


@pytest.mark.parametrize("shard_tokens", [7, 20, 45, 1000])
def test_documents_in_parts_land_in_the_shards_where_whole_documents_would(tmp_path, shard_tokens):
    """A document in pieces went on in the shard it began in, past shard_tokens beside other documents (6,129 tokens
    in 5 documents at --shard_tokens 1000). Its parts land where the whole would: it moves to a shard of its own when
    it outgrows the room left, so that a shard of several documents holds at most shard_tokens, and the shards are
    the whole documents' byte for byte, wherever the writes cut them."""
    from babyllama.data.shards import BinShardWriter

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=80)
    tokens = rng.integers(0, 60_000, size=int(lengths.sum())).astype(np.uint32)
    written = {}
    for how in ("whole", "parts"):
        (tmp_path / how).mkdir()
        w = BinShardWriter(tmp_path / how, "shard", "train", np.dtype(np.uint16), shard_tokens)
        cuts = sorted(rng.choice(np.arange(1, len(tokens)), size=300, replace=False).tolist())
        write_in_spans(w, tokens, lengths, cuts if how == "parts" else [])
        w.close()
        written[how] = w.shards, [(tmp_path / how / s["file"]).read_bytes() for s in w.shards]
    assert written["parts"] == written["whole"]
    shards, files = written["whole"]
    assert b"".join(files) == tokens.astype(np.uint16).tobytes() and sum(s["documents"] for s in shards) == 80
    assert all(s["tokens"] <= shard_tokens or s["documents"] == 1 for s in shards)
    assert all(s["tokens"] == len(f) // 2 for s, f in zip(shards, files, strict=True))
    if shard_tokens in (20, 45):
        assert any(s["tokens"] > shard_tokens for s in shards)  # a document over shard_tokens, alone


@pytest.mark.parametrize("shard_tokens", [1000, 2000])
def test_a_document_in_pieces_takes_no_shard_past_shard_tokens_beside_other_documents(corpus_and_tokenizer,
                                                                                      tmp_path, monkeypatch,
                                                                                      shard_tokens):
    """pretokenize with long documents in pieces writes the shards it writes with them whole: a long document that
    does not fit the room left begins a shard of its own (it went on beside 4 others: 6,129 tokens at 1000)."""
    import babyllama.data.pretokenize as pt

    d, docs = corpus_and_tokenizer
    long = "".join(generated_corpus(60, seed=5))  # 5,258 characters: 28 pieces
    texts = [*docs[:20], long, *docs[20:40], "又" + long, *docs[40:60]]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    monkeypatch.setattr(pt, "BATCH_CHARS", 1000)
    manifests = {}
    for piece_chars in (200, 1 << 20):  # in pieces, and whole
        monkeypatch.setattr(pt, "PIECE_CHARS", piece_chars)
        manifests[piece_chars] = pretokenize([str(tmp_path / "docs.jsonl")], str(d / "tok"),
                                             tmp_path / str(piece_chars), val_fraction=0.3, shard_tokens=shard_tokens)
    shards = manifests[200]["shards"]
    assert shards == manifests[1 << 20]["shards"]
    for s in shards:
        assert (tmp_path / "200" / s["file"]).read_bytes() == (tmp_path / str(1 << 20) / s["file"]).read_bytes()
    assert all(s["tokens"] <= shard_tokens or s["documents"] == 1 for s in shards)
    assert sorted(s["tokens"] for s in shards if s["documents"] == 1)[-2:] == [5611, 5613]  # the long ones, alone


def test_one_and_two_workers_write_identical_bytes(corpus_and_tokenizer, tmp_path, monkeypatch):
    import babyllama.data.pretokenize as pt

    monkeypatch.setattr(pt, "BATCH_CHARS", 2000)  # many batches in flight
    d, _ = corpus_and_tokenizer
    for w in (1, 2):
        pretokenize([str(d / "docs.jsonl")], str(d / "tok"), tmp_path / f"w{w}", workers=w, bos=True)
    m1, m2 = read_manifest(tmp_path / "w1"), read_manifest(tmp_path / "w2")
    assert m1["shards"] == m2["shards"]
    for s in m1["shards"]:
        assert (tmp_path / "w1" / s["file"]).read_bytes() == (tmp_path / "w2" / s["file"]).read_bytes()
    first = documents_of(tmp_path / "w1")[0]
    assert first[0] == 1 and first[-1] == 2  # --bos puts bos first


def test_partitions_merge_to_the_whole(corpus_and_tokenizer, tmp_path):
    d, docs = corpus_and_tokenizer
    args = [str(d / "docs.jsonl")], str(d / "tok")
    whole = pretokenize(*args, tmp_path / "whole", val_fraction=0.1)
    for i in range(2):
        pretokenize(*args, tmp_path / f"p{i}", val_fraction=0.1, num_shards=2, shard_index=i)
    merged = merge([str(tmp_path / "p0"), str(tmp_path / "p1")], tmp_path / "merged")
    assert merged["totals"] == whole["totals"]
    as_bytes = lambda out: sorted(x.tobytes() for x in documents_of(out))
    assert as_bytes(tmp_path / "merged") == as_bytes(tmp_path / "whole")
    assert [s["file"] for s in merged["shards"]] == ["shard_00000.bin", "shard_00001.bin", "val_00000.bin",
                                                     "val_00001.bin"]


def test_merge_refuses_other_tokenizer(corpus_and_tokenizer, tmp_path):
    d, _ = corpus_and_tokenizer
    pretokenize([str(d / "docs.jsonl")], str(d / "tok"), tmp_path / "a")
    pretokenize([str(d / "docs.jsonl")], str(d / "tok"), tmp_path / "b", bos=True)
    with pytest.raises(UserError, match="its bos differs"):
        merge([str(tmp_path / "a"), str(tmp_path / "b")], tmp_path / "m")
    with pytest.raises(UserError, match="names a directory twice"):
        merge([str(tmp_path / "a"), str(tmp_path / "a")], tmp_path / "m")


def test_merge_refuses_parts_that_are_not_one_whole_split(corpus_and_tokenizer, tmp_path, capsys):
    """Each part of one --num_shards N once, or one sentence naming what is wrong, and nothing merged: a part alone
    (half the corpus), a part twice under another name (its documents twice), parts of two splits."""
    import shutil

    from babyllama.cli import main

    d, _ = corpus_and_tokenizer
    for n, i in ((2, 0), (2, 1), (3, 2)):
        pretokenize([str(d / "docs.jsonl")], str(d / "tok"), tmp_path / f"p{i}of{n}", num_shards=n, shard_index=i)
    shutil.copytree(tmp_path / "p0of2", tmp_path / "copy")
    p0, p1, p2of3, copy = (str(tmp_path / x) for x in ("p0of2", "p1of2", "p2of3", "copy"))
    capsys.readouterr()
    for parts, error in (
        ([p0], "cannot merge 1 of 2 parts, missing --shard_index 1: make each with pretokenize --num_shards 2 "
               "--shard_index I (the same --input and --tokenizer) and merge all of them."),
        ([p0, copy, p1], f"cannot merge {copy}: it is --shard_index 0 of 2, as is {p0}; name each part once."),
        ([p2of3, p1], f"cannot merge {p1}: it is a part of --num_shards 2, {p2of3} of --num_shards 3; merge the "
                      "parts of one split, each once."),
    ):
        assert main(["pretokenize", "--merge", *parts, "--out_dir", str(tmp_path / "m")]) == 2
        assert capsys.readouterr().err == f"babyllama: error: {error}\n"
        assert not (tmp_path / "m").exists()
    assert main(["pretokenize", "--merge", p1, p0, "--out_dir", str(tmp_path / "m")]) == 0  # in any order


def test_large_vocab_gives_uint32_shards(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(70000)} | {"<s>": 70000, "</s>": 70001}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "docs.txt").write_text("t69999 t3\nt65536 t65535\n")
    m = pretokenize([str(tmp_path / "docs.txt")], str(tmp_path / "tokenizer.json"), tmp_path / "out", val_fraction=0)
    assert m["dtype"] == "uint32"
    tokens = np.fromfile(tmp_path / "out" / "shard_00000.bin", dtype=np.uint32)
    assert tokens.tolist() == [69999, 3, 70001, 65536, 65535, 70001]


def test_one_document_and_one_token_are_said_in_the_singular(corpus_and_tokenizer, tmp_path):
    """pretokenize's bar ended with `1 docs`, and the shards' sentences said `1 tokens`."""
    from babyllama.data.shards import TokenWindows
    from babyllama.evaluate import check_lm_data

    d, docs = corpus_and_tokenizer
    (tmp_path / "one.txt").write_text(docs[0] + "\n")
    r = run_cli("pretokenize", "--input", tmp_path / "one.txt", "--tokenizer", d / "tok", "--out_dir", tmp_path / "o",
                "--val_fraction", "0")
    assert r.returncode == 0, r.stderr
    bar = [x for x in r.stderr.splitlines() if x.startswith("pretokenize: ")]
    assert re.fullmatch(r"pretokenize: 100%\|#+\| (\S+)/\1 \[[^\]]*, 1 doc, [\d,]+ tokens/s\]", bar[-1]), bar
    manifest = read_manifest(tmp_path / "o")
    shard = tmp_path / "o" / manifest["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:2])  # one uint16 token, as the manifest says now
    manifest["shards"][0]["tokens"] = 1
    with pytest.raises(UserError, match=r" split of \S+ has 1 token, fewer than one window of 33; use more data, a "
                       r"smaller max_seq_len\.$"):  # a larger --val_fraction would leave train fewer tokens
        TokenWindows(tmp_path / "o", 32, "train", manifest)
    # val shorter than one window: a larger --val_fraction is the remedy only where train has documents to give; where
    # val holds every one already (train empty), it told the user to raise a val_fraction of 0.5
    val = {**manifest, "val_fraction": 0.5, "shards": [{**manifest["shards"][0], "split": "val"}]}
    with pytest.raises(UserError, match=r"smaller max_seq_len or a larger --val_fraction \(it was 0\.5\)\.$"):
        TokenWindows(tmp_path / "o", 32, "val", {**val, "shards": [*val["shards"], {**manifest["shards"][0],
                                                                                       "file": "none.bin"}]})
    with pytest.raises(UserError, match=r"fewer than one window of 33; use more data, a smaller max_seq_len\.$"):
        TokenWindows(tmp_path / "o", 32, "val", val)
    (tmp_path / "o" / "manifest.json").write_text(json.dumps(val))  # eval's check of its --data
    with pytest.raises(UserError) as e:
        check_lm_data(tmp_path / "o", 32)
    assert str(e.value).endswith(" has 1 token, fewer than one window of 33 (the model's max_seq_len + 1) to measure "
                                 "the loss on; it holds every document (the train split is empty): the data is "
                                 "smaller than one window; pretokenize more text.")
    train = tmp_path / "o" / "train.bin"
    train.write_bytes(b"\0\0" * 40)
    (tmp_path / "o" / "manifest.json").write_text(json.dumps(
        {**val, "shards": [*val["shards"], {**manifest["shards"][0], "file": "train.bin", "tokens": 40}]}))
    with pytest.raises(UserError, match=r" to measure the loss on; run babyllama pretokenize again with a larger "
                                        r"--val_fraction \(it was 0\.5\)\.$"):
        check_lm_data(tmp_path / "o", 32)
    shard.unlink()
    with pytest.raises(UserError, match=r" is missing, though \S+ lists it \(1 token\); restore it "):
        TokenWindows(tmp_path / "o", 32, "val", val)


def test_cli_pretokenize_and_bad_input(corpus_and_tokenizer, tmp_path):
    d, _ = corpus_and_tokenizer
    r = run_cli("pretokenize", "--input", str(d / "docs.jsonl"), "--tokenizer", str(d / "tok"),
                "--out_dir", str(tmp_path / "o"), "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["train"]["documents"] + json.loads(r.stdout)["val"]["documents"] == 300
    bar = [x for x in r.stderr.splitlines() if x.startswith("pretokenize: ")]  # the input's bytes: a percentage
    assert re.fullmatch(r"pretokenize: 100%\|#+\| (\S+)/\1 \[[^\]]*, 300 docs, [\d,]+ tokens/s\]", bar[-1]), bar
    r = run_cli("pretokenize", "--input", str(tmp_path / "none"), "--tokenizer", str(d / "tok"),
                "--out_dir", str(tmp_path / "o2"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("pretokenize", "--input", str(d / "docs.jsonl"), "--tokenizer", str(tmp_path / "none"),
                "--out_dir", str(tmp_path / "o3"))
    assert r.returncode == 2 and "tokenizer" in r.stderr


def test_cli_pretokenize_says_the_records_read_and_the_bad_ones(corpus_and_tokenizer, tmp_path):
    """pretokenize's summary gave the tokens and documents written, not the records read and how many were bad, as
    prepare's does: a file of 105 bad records of 106 (one odd record had decided its schema) looked like a run of
    one short document."""
    d, docs = corpus_and_tokenizer
    f = tmp_path / "odd.jsonl"
    f.write_text("\n".join(['{"text": 5}', '{"content": "hello"}', "not json",
                            *(json.dumps({"text": t}, ensure_ascii=False) for t in docs[:20])]), encoding="utf-8")
    r = run_cli("pretokenize", "--input", f, "--tokenizer", d / "tok", "--out_dir", tmp_path / "o", "--workers", "1",
                "--val_fraction", "0")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert list(summary) == ["out_dir", "dtype", "records", "bad", "empty", "bad_records", "train", "val"]
    assert (summary["records"], summary["bad"], summary["train"]["documents"]) == (23, 2, 21)
    assert summary["bad_records"] == str(tmp_path / "o" / "bad_records.txt")


def test_inputs_of_one_record_and_nothing_to_write_say_the_one_record():
    from babyllama.data.sources import check_counts

    with pytest.raises(UserError) as e:
        check_counts(1, 1, 0, "a.jsonl:1: not valid JSON")
    assert str(e.value) == "the one record was bad (a.jsonl:1: not valid JSON); nothing was written."
    with pytest.raises(UserError) as e:
        check_counts(1, 0, 1, "")
    assert str(e.value) == "the one record has no text: 1 empty; nothing was written."


def test_empty_and_blank_records_are_skipped_and_counted(corpus_and_tokenizer, tmp_path):
    """pretokenize kept an empty or blank record as a document of a lone <eos>, where prepare drops it (too short):
    it is skipped, and counted in the summary and each source of the manifest; inputs of nothing else are refused."""
    d, docs = corpus_and_tokenizer
    f = jsonl_of(tmp_path / "e.jsonl", [{"text": ""}, {"text": "   "}, {"text": "\u200b\u3000\n"}, {"text": docs[0]},
                                        {"text": 5}, {"text": docs[1]}])
    r = run_cli("pretokenize", "--input", f, "--tokenizer", d / "tok", "--out_dir", tmp_path / "o", "--workers", "1",
                "--val_fraction", "0")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert (summary["records"], summary["bad"], summary["empty"], summary["train"]["documents"]) == (6, 1, 3, 2)
    assert read_manifest(tmp_path / "o")["sources"][str(f)] == {"schema": "text", "records": 6, "bad": 1, "empty": 3,
                                                              "bad_examples": [f"{f}:5"]}
    assert len(documents_of(tmp_path / "o")) == 2
    f = jsonl_of(tmp_path / "none.jsonl", [{"text": ""}, {"text": " "}, {"text": []}])
    r = run_cli("pretokenize", "--input", f, "--tokenizer", d / "tok", "--out_dir", tmp_path / "o2")
    assert r.returncode == 2 and r.stderr.endswith(
        "babyllama: error: none of the 3 records has text: 2 empty, 1 bad; nothing was written.\n")
    assert not (tmp_path / "o2" / "manifest.json").exists()


def jsonl_of(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_pretokenize_lists_its_bad_records_as_prepare_does(corpus_and_tokenizer, tmp_path):
    """prepare wrote each bad record to bad_records.txt and pretokenize only counted them: the file, a line a bad
    record (`file:line: why`), is in pretokenize's --out_dir too, and kept there with its shards."""
    d, docs = corpus_and_tokenizer
    f = tmp_path / "odd.jsonl"
    f.write_text("\n".join([json.dumps({"text": docs[0]}, ensure_ascii=False), '{"text": 5}', "not json",
                            json.dumps({"text": docs[1]}, ensure_ascii=False)]), encoding="utf-8")
    for args in ([], ["--workers", "2"]):
        r = run_cli("pretokenize", "--input", f, "--tokenizer", d / "tok", "--out_dir", tmp_path / "o", *args)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "o" / "bad_records.txt").read_text(encoding="utf-8") == (
            f"{f}:2: its 'text' is a number, not a string\n{f}:3: not valid JSON (Expecting value)\n")
    prepared = run_cli("prepare", "--input", f, "--out_dir", tmp_path / "clean", "--min_chars", "1")
    assert prepared.returncode == 0, prepared.stderr  # the same lines as prepare's
    assert (tmp_path / "clean" / "bad_records.txt").read_text() == (tmp_path / "o" / "bad_records.txt").read_text()
    f.write_text(json.dumps({"text": docs[0]}, ensure_ascii=False), encoding="utf-8")  # none bad: an empty file
    assert run_cli("pretokenize", "--input", f, "--tokenizer", d / "tok", "--out_dir", tmp_path / "o").returncode == 0
    assert (tmp_path / "o" / "bad_records.txt").read_text() == ""


@pytest.fixture(scope="module")
def parts(corpus_and_tokenizer, tmp_path_factory):
    """The two parts of a --num_shards 2 split (copy them before changing them)."""
    d, _ = corpus_and_tokenizer
    out = tmp_path_factory.mktemp("parts")
    for i in range(2):
        pretokenize([str(d / "docs.jsonl")], str(d / "tok"), out / f"p{i}", val_fraction=0.1, num_shards=2,
                    shard_index=i)
    return out


def files_of(folder):
    """{relative path: bytes} of every file below folder."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def refused(args, error, folder, capsys):
    """pretokenize ARGS exits 2 (returned, or argparse's SystemExit) with the one sentence error and changes no file
    below folder."""
    from babyllama.cli import main

    before = files_of(folder)
    capsys.readouterr()
    try:
        code = main(["pretokenize", *args])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    assert code == 2
    assert capsys.readouterr().err == f"babyllama: error: {error}\n"
    assert files_of(folder) == before


def test_read_manifest_reads_the_manifest_once(parts, monkeypatch):
    """output_kind read a folder's manifest.json to tell token shards from an SFT or DPO token cache, then
    read_manifest read it again, on every open of token shards."""
    from pathlib import Path

    reads, read_text = [], Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: reads.append(self.name) or read_text(self, *a, **k))
    assert read_manifest(parts / "p0")["format"] == "babyllama-tokens"
    assert reads == ["manifest.json"]


def test_merge_refuses_an_out_dir_that_is_holds_or_is_inside_a_part(parts, tmp_path, capsys):
    """Each refusal says the harm of --merge: it said --input's ("a later run may read this one's output as
    input"), though a merge reads its parts' manifests, not their folders whole."""
    import shutil

    shutil.copytree(parts, tmp_path, dirs_exist_ok=True)
    p0, p1 = str(tmp_path / "p0"), str(tmp_path / "p1")
    why = {"is": f"the --merge folder {p0}: merging into it replaces that part's shards and manifest with the merged "
                 "ones; choose an --out_dir apart from the parts.",
           "holds": f"--merge {p0}, so clearing --out_dir would delete a part being merged; choose an --out_dir that "
                    "holds none of the parts.",
           "is inside": f"the --merge folder {p1}, so deleting that part would delete the merged shards with it; "
                        "choose an --out_dir outside it."}
    for out, how in ((p0, "is"), (str(tmp_path), "holds"), (str(tmp_path / "p1" / "sub"), "is inside")):
        refused(["--merge", p0, p1, "--out_dir", out], f"--out_dir {out} {how} {why[how]}", tmp_path, capsys)
        with pytest.raises(UserError, match=f"^--out_dir {re.escape(out)} {how}"):  # merge() itself too
            merge([p0, p1], out)
    assert not (tmp_path / "p1" / "sub").exists()


def test_merge_refuses_a_damaged_part_before_writing(parts, tmp_path, capsys):
    import shutil

    for damage in ("missing", "truncated", "one token left", "no tokenizer"):
        shutil.copytree(parts, tmp_path / damage)
        p0, p1 = tmp_path / damage / "p0", tmp_path / damage / "p1"
        shard = p1 / "shard_00000.bin"
        tokens = read_manifest(p1)["shards"][0]["tokens"]
        if damage == "missing":
            shard.unlink()
            error = (f"{shard} is missing, though {p1 / 'manifest.json'} lists it ({tokens} tokens); restore it or "
                     "run `babyllama pretokenize` again.")
        elif damage == "truncated":
            shard.write_bytes(shard.read_bytes()[:-20])  # 10 uint16 tokens short
            error = f"{shard} has {tokens - 10} tokens, the manifest says {tokens}."
        elif damage == "one token left":
            shard.write_bytes(shard.read_bytes()[:2])  # uint16
            error = f"{shard} has 1 token, the manifest says {tokens}."
        else:
            shutil.rmtree(p1 / "tokenizer")
            error = f"{p1 / 'tokenizer'} is missing; run `babyllama pretokenize` for that part again."
        refused(["--merge", str(p0), str(p1), "--out_dir", str(tmp_path / damage / "m")], error, tmp_path, capsys)
        assert not (tmp_path / damage / "m").exists()


def test_merge_in_any_order_writes_identical_bytes(parts, tmp_path):
    from babyllama.cli import main

    p0, p1 = str(parts / "p0"), str(parts / "p1")
    assert main(["pretokenize", "--merge", p0, p1, "--out_dir", str(tmp_path / "a")]) == 0
    assert main(["pretokenize", "--merge", p1, p0, "--out_dir", str(tmp_path / "b")]) == 0
    a, b = files_of(tmp_path / "a"), files_of(tmp_path / "b")
    assert len(a) == 7 and a == b  # 2 train and 2 val shards, manifest.json, the tokenizer's 2 files
    assert read_manifest(tmp_path / "a")["merged_from"] == [p0, p1]
    # into an earlier merge's folder again: its shards are replaced, as pretokenize's
    assert main(["pretokenize", "--merge", p1, p0, "--out_dir", str(tmp_path / "a")]) == 0
    assert files_of(tmp_path / "a") == b


def test_a_merge_lists_each_input_once_with_the_counts_of_the_whole_input(corpus_and_tokenizer, tmp_path, caplog):
    """A merge's sources listed every input once per part (`docs.jsonl [p0]`, `docs.jsonl [p1]`), each with the whole
    input's counts, as every part reads every input: added up, each record counted twice. Each input is now listed
    once, with the counts of a run on the whole."""
    d, docs = corpus_and_tokenizer
    f = tmp_path / "in.jsonl"
    f.write_text("\n".join([*(json.dumps({"text": t}, ensure_ascii=False) for t in docs[:40]), "{bad", '{"text": ""}']))
    whole = pretokenize([str(f)], str(d / "tok"), tmp_path / "whole", val_fraction=0.1)
    for i in range(3):
        pretokenize([str(f)], str(d / "tok"), tmp_path / f"p{i}", val_fraction=0.1, num_shards=3, shard_index=i)
    merged = merge([str(tmp_path / f"p{i}") for i in range(3)], tmp_path / "m")
    assert merged["sources"] == whole["sources"] == {str(f): {"schema": "text", "records": 42, "bad": 1, "empty": 1,
                                                              "bad_examples": [f"{f}:41"]}}
    assert merged["totals"] == whole["totals"]
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "other counts" in r.getMessage()]
    f.write_text(f.read_text() + "\n" + json.dumps({"text": docs[50]}, ensure_ascii=False))  # changed after p0, p1
    pretokenize([str(f)], str(d / "tok"), tmp_path / "p2", val_fraction=0.1, num_shards=3, shard_index=2)
    caplog.clear()
    assert merge([str(tmp_path / f"p{i}") for i in range(3)], tmp_path / "m")["sources"][str(f)]["records"] == 42
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{tmp_path / 'p2'} read {f} with other counts than {tmp_path / 'p0'} (records 43, bad 1, empty 1 against "
        "records 42, bad 1, empty 1): did it change between the runs of the parts? The merged manifest keeps the "
        "first's."]


def test_merge_refuses_the_settings_of_the_parts(corpus_and_tokenizer, parts, tmp_path, capsys):
    d, _ = corpus_and_tokenizer
    merge_args = ["--merge", str(parts / "p0"), str(parts / "p1"), "--out_dir", str(tmp_path / "m")]
    for flags in (["--bos"], ["--input", str(d / "docs.jsonl"), "--tokenizer", str(d / "tok")],
                  ["--num_shards", "1", "--shard_index", "0"], ["--val_fraction", "0.1", "--shard_tokens", "10"]):
        names = " ".join(f for f in flags if f.startswith("--"))
        it = "it" if flags == ["--bos"] else "them"
        refused([*merge_args, *flags], f"{names} cannot go with --merge: the parts were made with {it}, and the "
                f"merge takes {it} from the parts; leave {it} out.", tmp_path, capsys)
    assert not (tmp_path / "m").exists()


def test_merge_refuses_workers(parts, tmp_path, capsys):
    refused(["--merge", str(parts / "p0"), str(parts / "p1"), "--out_dir", str(tmp_path / "m"), "--workers", "4"],
            "--workers cannot go with --merge: the merge links or copies the parts' files, with no tokenizing to "
            "share out; leave it out.", tmp_path, capsys)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("flags", [["--num_shards", "2", "--shard_index", "1"], ["--shard_tokens", "10"], ["--bos"],
                                   ["--format", "text"]])
def test_sft_refuses_the_settings_of_token_shards(corpus_and_tokenizer, tmp_path, capsys, flags):
    d, _ = corpus_and_tokenizer  # they were ignored: a cache of every sample, built whole on each machine
    names = " ".join(f for f in flags if f.startswith("--"))
    they, them = ("it is a setting", "it") if " " not in names else ("they are settings", "them")  # of one flag: it
    refused(["--sft", "--input", str(d / "docs.jsonl"), "--tokenizer", str(d / "tok"), "--max_seq_len", "64",
             "--out_dir", str(tmp_path / "c"), *flags],
            f"{names} cannot go with --sft: {they} of token shards, which the SFT token cache does not "
            f"use; leave {them} out.", tmp_path, capsys)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("flags", [["--max_seq_len", "64"], ["--min_prompt_chars", "0", "--max_answer_chars", "9"]])
@pytest.mark.parametrize("mode", ["input", "merge", "datatrove"])
def test_the_settings_of_the_sft_cache_need_sft(corpus_and_tokenizer, parts, tmp_path, capsys, flags, mode):
    d, _ = corpus_and_tokenizer  # they were ignored by token shards and by a merge
    args = {"input": ["--input", str(d / "docs.jsonl"), "--tokenizer", str(d / "tok")],
            "merge": ["--merge", str(parts / "p0"), str(parts / "p1")],
            "datatrove": ["--input", str(d / "docs.jsonl"), "--tokenizer", str(d / "tok"), "--engine", "datatrove"]}
    names = " ".join(f for f in flags if f.startswith("--"))
    need, they, them = ("needs", "it is a setting", "it") if " " not in names else ("need", "they are settings", "them")
    refused([*args[mode], "--out_dir", str(tmp_path / "t"), *flags], f"{names} {need} --sft: {they} of "
            f"the SFT token cache, which token shards do not use; add --sft or leave {them} out.", tmp_path, capsys)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("flags, error", [
    (["--val_fraction", "1.5"], "argument --val_fraction: 1.5 is not in [0, 1)."),
    (["--min_prompt_chars", "9", "--max_prompt_chars", "3"], "--min_prompt_chars 9 is above --max_prompt_chars 3, so "
     "no record would pass; lower the one or raise the other."),
    (["--min_answer_chars", "2", "--max_answer_chars", "1"], "--min_answer_chars 2 is above --max_answer_chars 1, so "
     "no record would pass; lower the one or raise the other.")])
def test_sft_settings_out_of_range_are_refused_before_the_records_are_read(outputs, tmp_path, capsys, flags, error):
    folder, _ = outputs  # they were taken as given: every record read, a progress bar shown, then "every SFT sample
    # landed in the validation split" or "no usable SFT records"
    refused(["--sft", "--input", str(folder / "sft.jsonl"), "--tokenizer", str(folder / "tok"), "--max_seq_len", "64",
             "--out_dir", str(tmp_path / "c"), *flags], error, tmp_path, capsys)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("value", ["1", "-0.1", "nan"])
def test_val_fraction_out_of_range_is_said_as_every_flag(corpus_and_tokenizer, tmp_path, capsys, value):
    """`--val_fraction 1` said "--val_fraction must be in [0, 1), got 1.0.", where every other flag's range is said in
    argparse's form ("argument --shard_tokens: 0 is below 1.")."""
    d, _ = corpus_and_tokenizer
    refused(["--input", str(d / "docs.jsonl"), "--tokenizer", str(d / "tok"), "--out_dir", str(tmp_path / "p"),
             "--val_fraction", value], f"argument --val_fraction: {float(value)} is not in [0, 1).", tmp_path, capsys)
    assert not (tmp_path / "p").exists()


def test_num_shards_without_shard_index_is_refused(corpus_and_tokenizer, tmp_path, capsys):
    d, _ = corpus_and_tokenizer  # it made part 0 of 2 silently
    refused(["--input", str(d / "docs.jsonl"), "--tokenizer", str(d / "tok"), "--out_dir", str(tmp_path / "p"),
             "--num_shards", "2"], "--num_shards 2 needs --shard_index (0 to 1): which part this machine makes.",
            tmp_path, capsys)
    assert not (tmp_path / "p").exists()


@pytest.fixture(scope="module")
def outputs(corpus_and_tokenizer, parts, tmp_path_factory):
    """A folder of each babyllama output kind that pretokenize or sft might be pointed at: {name: its kind}."""
    import shutil

    from babyllama.data.sft_tokens import SFTSettings, build_sft_cache

    d, _ = corpus_and_tokenizer
    out = tmp_path_factory.mktemp("outputs")
    shutil.copytree(d / "tok", out / "tok")
    (out / "ckpt").mkdir()
    (out / "ckpt" / "model.safetensors").write_bytes(b"weights")
    shutil.copytree(parts / "p0", out / "tokens")
    (out / "sft.jsonl").write_text(json.dumps({"instruction": "问题", "output": "回答"}, ensure_ascii=False))
    (out / "pairs.jsonl").write_text(json.dumps({"prompt": "问题", "chosen": "好", "rejected": "坏"},
                                                ensure_ascii=False))
    build_sft_cache([out / "sft.jsonl"], d / "tok", out / "sft_tokens", SFTSettings(max_len=64, val_fraction=0))
    build_sft_cache([out / "pairs.jsonl"], d / "tok", out / "dpo_tokens", SFTSettings(max_len=64, val_fraction=0),
                    kind="dpo")
    (out / "clean").mkdir()  # prepare's output: shards written there would delete its bad_records.txt
    for name, text in (("part_00000.jsonl", '{"text": "正文"}\n'), ("stats.json", "{}"), ("bad_records.txt", "x\n")):
        (out / "clean" / name).write_text(text)
    (out / "dt" / "datatrove").mkdir(parents=True)  # prepare --engine datatrove's, started (pretokenize's: its own)
    (out / "dt" / "datatrove" / "settings.json").write_text(json.dumps({"command": "prepare"}))
    (out / "staged" / ".incomplete" / "datatrove").mkdir(parents=True)  # the same, unfinished, local executor's:
    (out / "staged" / ".incomplete" / "datatrove" / "settings.json").write_text(json.dumps({"command": "prepare"}))
    (out / "run").mkdir()  # a training run's folder
    (out / "run" / "config.json").write_text(json.dumps({"preset": "demo", "model": {}, "train": {"out_dir": "run"}}))
    return out, {"tok": "a tokenizer", "ckpt": "a checkpoint", "tokens": "a folder of token shards",
                 "sft_tokens": "an SFT token cache", "dpo_tokens": "a DPO token cache",
                 "clean": "the output of babyllama prepare", "run": "a training run",
                 "dt": "the work folder of prepare --engine datatrove",
                 "staged": "the work folder of prepare --engine datatrove"}  # clearing its stage would lose it


@pytest.mark.parametrize("mode", ["input", "merge", "sft"])
def test_pretokenize_refuses_an_out_dir_of_another_kind(corpus_and_tokenizer, parts, outputs, tmp_path, capsys,
                                                        mode):
    import shutil

    d, _ = corpus_and_tokenizer  # an SFT cache's manifest was replaced and shards written beside its files
    shutil.copytree(outputs[0], tmp_path, dirs_exist_ok=True)
    args = {"input": ["--input", str(d / "docs.jsonl"), "--tokenizer", str(d / "tok")],
            "merge": ["--merge", str(parts / "p0"), str(parts / "p1")],
            "sft": ["--sft", "--input", str(tmp_path / "sft.jsonl"), "--tokenizer", str(d / "tok"),
                    "--max_seq_len", "63"]}[mode]
    writes, same = ("SFT samples", "sft_tokens") if mode == "sft" else ("token shards", "tokens")
    for name, kind in outputs[1].items():
        out = tmp_path / name
        if name != same:
            refused([*args, "--out_dir", str(out)], f"--out_dir {out} is {kind}, which {writes} must not be written "
                    "into; pass another --out_dir.", tmp_path, capsys)
    assert (tmp_path / "clean" / "bad_records.txt").read_text() == "x\n"
    from babyllama.cli import main  # its own kind it writes again

    assert main(["pretokenize", *args, "--out_dir", str(tmp_path / same)]) == 0


@pytest.mark.parametrize("command", ["pretrain", "merge"])
def test_commands_that_read_token_shards_refuse_a_folder_of_another_kind(outputs, tmp_path, capsys, command):
    """An SFT or DPO token cache (a manifest.json of its own beside .bin files) was read as token shards: KeyError
    'shards' in pretrain, 'bos' in pretokenize --merge; a checkpoint, a run or prepare's output got "has no
    manifest.json". A manifest.json that is not pretokenize's stopped with a traceback too."""
    from babyllama.cli import main

    folder, kinds = outputs
    flag = "--merge" if command == "merge" else "--data"
    (tmp_path / "other").mkdir()  # a folder of .bin files whose manifest.json is not a token manifest
    (tmp_path / "other" / "manifest.json").write_text("[1]")
    (tmp_path / "other" / "x.bin").write_bytes(b"")
    (tmp_path / "started" / "datatrove").mkdir(parents=True)  # pretokenize --engine datatrove's, unfinished
    (tmp_path / "started" / "datatrove" / "settings.json").write_text(json.dumps({"command": "pretokenize"}))
    cases = {**{folder / name: f"{flag} {folder / name} is {kind}, not token shards; pass the --out_dir of "
                "babyllama pretokenize." for name, kind in kinds.items() if name != "tokens"},
             tmp_path / "started": f"{tmp_path / 'started'} has no manifest.json; make one with `babyllama "
                                   "pretokenize`.",
             tmp_path / "other": f"{tmp_path / 'other' / 'manifest.json'} is not a manifest of token shards "
                                 "(damaged?); run `babyllama pretokenize` again."}
    for data, error in cases.items():
        args = (["pretokenize", "--merge", str(data), str(folder / "tokens")] if command == "merge" else
                ["pretrain", "--preset", "demo", "--model.dim", "32", "--model.n_layers", "1", "--max_steps", "1",
                 "--data", str(data)])
        assert main([*args, "--out_dir", str(tmp_path / "out")]) == 2, data
        assert capsys.readouterr().err.splitlines()[-1] == f"babyllama: error: {error}", data
        assert not (tmp_path / "out").exists()


def test_sft_refuses_a_cache_folder_of_another_kind(outputs):
    from babyllama.data.sft_tokens import SFTSettings
    from babyllama.train.distributed import Dist
    from babyllama.train.sft_data import load_sft_data

    folder, kinds = outputs  # token shards: "not an SFT token cache manifest (damaged?); delete it"
    for name, kind in kinds.items():
        for stage in ("sft", "dpo"):
            if name == f"{stage}_tokens":
                continue
            with pytest.raises(UserError) as e:
                load_sft_data([folder / "sft.jsonl"], folder / "tok", folder / name, SFTSettings(max_len=64), False,
                              Dist(), kind=stage)
            assert str(e.value) == (f"--sft_cache {folder / name} is {kind}, which {stage.upper()} samples must not "
                                    "be written into; pass another --sft_cache.")


def test_a_full_disk_is_one_sentence_and_the_same_command_then_finishes(corpus_and_tokenizer, tmp_path, capsys,
                                                                         monkeypatch):
    """ENOSPC while the second shard is written: exit 2, one sentence naming the shard, no .tmp left; the same
    command with space again writes every document."""
    from babyllama.cli import main

    d, docs = corpus_and_tokenizer
    out = tmp_path / "tokens"
    args = ["pretokenize", "--input", str(d / "docs.jsonl"), "--tokenizer", str(d / "tok"), "--out_dir", str(out),
            "--workers", "1", "--shard_tokens", "2000"]
    refuse_writes(monkeypatch, ".shard_00001.bin.tmp", errno.ENOSPC)
    assert main(args) == 2
    err = capsys.readouterr().err  # a line of its own: the bar is closed first
    assert [x for x in err.splitlines() if "babyllama:" in x] == [
        f"babyllama: error: no space left on the device of {out} while writing {out / 'shard_00001.bin'}; free "
        "space and run the same command to start again."]
    assert not out.exists()  # the shards were staged, and removed with the folder the command made
    monkeypatch.undo()
    assert main(args) == 0
    assert sum(read_manifest(out)["totals"][s]["documents"] for s in ("train", "val")) == len(docs)


def test_a_full_disk_while_a_long_document_moves_to_the_next_shard_names_that_shard_and_leaves_nothing(
        tmp_path, monkeypatch):
    """A document in parts that outgrows the room left is copied into the next shard (move_open): ENOSPC there is
    the CannotWrite of that shard, and neither temporary is left once the writer is discarded."""
    from babyllama.data.shards import BinShardWriter
    from babyllama.errors import CannotWrite

    w = BinShardWriter(tmp_path, "shard", "train", np.dtype(np.uint16), 10)
    w.write(np.arange(6), np.array([2, 4]), open_end=True)  # a document of 2, then 4 tokens of an open one
    refuse_writes(monkeypatch, ".shard_00001.bin.tmp", errno.ENOSPC)
    with pytest.raises(CannotWrite) as e:
        w.write(np.arange(5), np.array([5]), open_end=True)  # 11 tokens: the open document moves
    assert (e.value.code, e.value.path) == (errno.ENOSPC, str(tmp_path / "shard_00001.bin"))
    w.discard()
    assert list(tmp_path.iterdir()) == []


def test_pool_workers_leave_ctrl_c_to_the_main_process(corpus_and_tokenizer):
    """A terminal's Ctrl-C reaches every process of the group: each worker printed a KeyboardInterrupt traceback
    before the main process's one line; the workers ignore SIGINT, and the main process stops the pool."""
    import signal

    from babyllama.data.pretokenize import in_workers

    d, _ = corpus_and_tokenizer
    handlers = [h for _, h in in_workers(signal.getsignal, [signal.SIGINT] * 2, str(d / "tok"), workers=2)]
    assert handlers == [signal.SIG_IGN, signal.SIG_IGN]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the main process still stops


SLOW_START = """
import os, signal, sys, threading, time
from pathlib import Path

marks = Path(sys.argv[1])
if __name__ == "__mp_main__":  # a spawned worker imports its parent's main file: slowly, as numpy on a busy machine
    (marks / str(os.getpid())).touch()
    time.sleep(2)
elif __name__ == "__main__":
    from babyllama.data.pretokenize import in_workers

    def ctrl_c():  # as a terminal sends it: to every process of the group, while both workers import
        while len(list(marks.iterdir())) < 2:
            time.sleep(0.01)
        os.killpg(0, signal.SIGINT)

    came = []
    signal.signal(signal.SIGINT, lambda signum, frame: came.append(signum))  # this process goes on, to see them
    threading.Thread(target=ctrl_c, daemon=True).start()
    print([n for _, n in in_workers(len, [[1], [1, 2], [1, 2, 3]], sys.argv[2], workers=2)], came)
"""


def test_pool_workers_that_are_still_starting_leave_ctrl_c_to_the_main_process(corpus_and_tokenizer, tmp_path):
    """Ctrl-C while the SFT cache started its workers printed a traceback from each (spawn.py, import ...,
    KeyboardInterrupt) before the main process's line: a worker ignored SIGINT only once its imports were done.
    They start with it blocked now. Here in a process group of its own, as a terminal's, with workers that take
    2 s to import; the main process records the signal and goes on."""
    import subprocess
    import sys

    d, _ = corpus_and_tokenizer
    script, marks = tmp_path / "slow_start.py", tmp_path / "started"
    script.write_text(SLOW_START)
    marks.mkdir()
    r = subprocess.run([sys.executable, str(script), str(marks), str(d / "tok")], capture_output=True, text=True,
                       timeout=120, start_new_session=True)
    assert r.returncode == 0 and "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr, r.stderr
    assert r.stdout == "[1, 2, 3] [2]\n"  # every batch, by the two workers that got the Ctrl-C (no third started)
    assert len(list(marks.iterdir())) == 2


@pytest.mark.parametrize("asked, used", [(None, 2), (1, 1), (2, 2), (3, 2), (100_000, 2)])
def test_workers_are_at_most_one_per_core(corpus_and_tokenizer, tmp_path, monkeypatch, asked, used):
    """--workers 100000 started ~1,000 processes and ran the machine out of memory: a count above the cores
    (here 2) is capped to them, with a warning; pretokenize and pretokenize --sft alike."""
    import babyllama.data.pretokenize as pt
    import babyllama.data.sft_tokens as st

    d, _ = corpus_and_tokenizer
    started = []

    def spy(func, batches, tokenizer_path, workers):  # records the count, starts no process
        started.append(workers)
        return in_workers(func, batches, tokenizer_path, 1)

    in_workers = pt.in_workers
    monkeypatch.setattr(pt, "cpu_cores", lambda: 2)
    monkeypatch.setattr(pt, "in_workers", spy)
    monkeypatch.setattr(st, "in_workers", spy)
    (tmp_path / "sft.jsonl").write_text(json.dumps({"instruction": "问", "output": "答"}, ensure_ascii=False))
    flags = [] if asked is None else ["--workers", str(asked)]
    for mode in (["--input", d / "docs.jsonl"],
                 ["--sft", "--max_seq_len", "64", "--val_fraction", "0", "--input", tmp_path / "sft.jsonl"]):
        r = run_cli("pretokenize", *mode, "--tokenizer", d / "tok", "--out_dir", tmp_path / mode[0], *flags)
        assert r.returncode == 0, r.stderr
        warned = f"--workers {asked} is more than the 2 CPU cores of this machine; using 2 worker processes"
        assert (warned in r.stderr) == (asked is not None and asked > 2), r.stderr
    assert started == [used, used]


@pytest.mark.parametrize("executor, used", [("local", 2), ("ray", 64), ("slurm", 64)])
def test_datatrove_workers_on_this_machine_are_at_most_one_per_core(monkeypatch, executor, used):
    """The local executor's pool is capped as pretokenize's; Ray's and Slurm's workers run on a cluster's nodes."""
    import argparse

    import babyllama.data.pretokenize as pt
    from babyllama.cli import workers

    monkeypatch.setattr(pt, "cpu_cores", lambda: 2)
    assert workers(argparse.Namespace(engine="datatrove", executor=executor, workers=64)) == used


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_pool_workers_end_with_their_main_process(corpus_and_tokenizer, how):
    """A killed main process left its pool workers waiting for work forever; each now ends with it, even after
    SIGKILL, which no cleanup of the main process sees."""
    import os
    import signal
    import subprocess
    import sys
    import time

    d, _ = corpus_and_tokenizer
    script = ("import sys, time\nfrom babyllama.cli import terminated_as_ctrl_c\n"
              "from babyllama.data.pretokenize import in_workers\nwith terminated_as_ctrl_c():\n"
              f"    for _ in in_workers(time.sleep, [0, 0, 60, 60], {str(d / 'tok')!r}, 2):\n"
              "        print('working', flush=True)\n")
    main = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        assert main.stdout.readline() == "working\n"  # the pool is up: a worker has done a batch
        time.sleep(1)
        children = [int(p) for p in open(f"/proc/{main.pid}/task/{main.pid}/children").read().split()]
        assert len(children) >= 2  # the two workers (and multiprocessing's resource tracker)
        main.send_signal(getattr(signal, how))
        main.wait(timeout=30)
        deadline = time.monotonic() + 20
        while (alive := [p for p in children if os.path.exists(f"/proc/{p}") and not zombie(p)]) and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        assert alive == []
    finally:
        main.kill()
        for p in children if "children" in locals() else []:
            with suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


def zombie(pid: int) -> bool:
    """Whether process pid has ended, its exit status not yet collected by its parent (init, for an orphan)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
