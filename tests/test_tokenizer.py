"""Tokenizers: the BPE trained here, ChatGLM2's SentencePiece model, HF tokenizer files, the dtype rule."""

from __future__ import annotations

import json

import numpy as np
import pytest

from babyllama.errors import UserError
from babyllama.tokenizer import MAX_RUN, load_tokenizer, token_dtype, train_bpe, training_pre_tokenizer
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
    table = bpe_tokenizer.token_bytes()
    for text in ROUNDTRIP_TEXTS:
        assert sum(table[i] for i in bpe_tokenizer.encode(text)) == len(text.encode())
    assert table[0] == table[1] == table[2] == 0  # special ids are no text


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
    table = tok.token_bytes()  # the word-start marker ▁ counts as the space it stands for
    assert sum(table[i] for i in tok.encode(sentences[0])) == len((" " + sentences[0]).encode())
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).fingerprint == tok.fingerprint


@pytest.mark.skipif(not CHATGLM2.is_file(), reason="ChatGLM2 tokenizer.model not present")
def test_chatglm2_suppresses_bos_unk_and_the_rows_beyond_its_pieces():
    tok = load_tokenizer(CHATGLM2)
    assert tok.suppress_tokens(64793) == (0, 1, 64789, 64790, 64791, 64792)  # unk = pad, bos; eos 2 stays
