"""Export to Hugging Face Llama: transformers loads it with no custom code and agrees with us."""

from __future__ import annotations

import json
import logging
import os
import re
from itertools import pairwise

import pytest
import torch

from babyllama.chat import reply
from babyllama.chat_format import conversation_from_messages, render_prompt
from babyllama.checkpoint import load_checkpoint, save_checkpoint
from babyllama.errors import UserError
from babyllama.export import HF_FILES, export
from babyllama.sampling import Sampling
from babyllama.tokenizer import load_tokenizer
from tests.conftest import CHATGLM2, run_cli, sharp_model, tiny_config

transformers = pytest.importorskip("transformers")
TEXTS = ["床前明月光，疑是地上霜。", "中华人民共和国成立于1949年。", "人工智能 is 计算机科学的一个分支。"]
TORTURE = ["</s> and <s> and <pad> and <unk> spelled in text", "答案：<s>A</s>", "trailing and  double  spaces  ",
           "tabs\tand\n\nnewlines\r\n", "\u3000\u3000全角空格缩进", "rare CJK Ext-B: 𠀀𠀁𪚥𡃁", "emoji 😀🚀👨‍👩‍👧 ✓",
           "mixed Ελληνικά русский 日本語 한국어 中文", "x"]
CONVERSATIONS = [
    [{"role": "user", "content": "你好"}],
    [{"role": "system", "content": "你是一个医生。"}, {"role": "user", "content": "头疼怎么办？"}],
    [{"role": "system", "content": "简短回答。"}, {"role": "user", "content": "第一问"},
     {"role": "assistant", "content": "第一答"}, {"role": "user", "content": "补充一句"},
     {"role": "user", "content": "第二问"}, {"role": "system", "content": "用中文。"}],  # joined as babyllama joins
    [{"role": "developer", "content": "你是一个医生。"},  # OpenAI's newer name for system, and text parts
     {"role": "user", "content": [{"type": "text", "text": "头疼"}, {"type": "text", "text": "怎么办？"}]}],
    [{"role": "system", "content": "第一行\r\n第二行"}, {"role": "user", "content": "问题\r\n补充\r结束"}],  # a
    # Windows file's line ends: "\n" in the template as in babyllama's chat format
]
LEADING_SPACES = ["  two leading spaces", " ", "\t tab then space", "   "]


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_heads=2), dict(n_kv_heads=1, tie_embeddings=False)],
                         ids=["mha", "gqa", "mqa-untied"])
def test_exported_model_matches_ours(bpe_tokenizer, tmp_path, kw):
    ours = sharp_model(tiny_config(vocab_size=600, **kw))
    save_checkpoint(tmp_path / "ck", ours, bpe_tokenizer)
    r = run_cli("export", str(tmp_path / "ck"), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    exported(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(hf).__name__ == "LlamaForCausalLM"
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    check_text_ids(tok, bpe_tokenizer)
    idx = torch.tensor([bpe_tokenizer.encode(TEXTS[0])])
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], atol=1e-4, rtol=0)
        out = hf.generate(idx, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out[0, idx.size(1) :].tolist() == ours.generate(idx[0].tolist(), max_new_tokens=20)
    check_chat_template(tok, bpe_tokenizer)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)
    assert "max_length" not in generation  # max_position_embeddings says the context
    assert hf.generation_config.eos_token_id == 2


@pytest.mark.skipif(not CHATGLM2.is_file(), reason="ChatGLM2 tokenizer.model not present")
def test_exported_sentencepiece_tokenizer_gives_our_ids(bpe_tokenizer, tmp_path):
    pytest.importorskip("sentencepiece")
    from babyllama.tokenizer import load_tokenizer

    sp = load_tokenizer(CHATGLM2)
    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=64793)), sp)
    export(tmp_path / "ck", tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    check_text_ids(tok, sp)  # leading spaces: transformers' own conversion differs
    check_chat_template(tok, sp)
    assert "tokenizer.model" in exported(tmp_path / "hf")
    save_checkpoint(tmp_path / "bpe", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    export(tmp_path / "bpe", tmp_path / "hf")  # the earlier export's tokenizer.model goes with it
    export(tmp_path / "bpe", tmp_path / "fresh")
    assert exported(tmp_path / "hf") == exported(tmp_path / "fresh")


def exported(out) -> list[str]:
    """The names of out's files (hidden ones aside), each one that export may write (HF_FILES)."""
    names = sorted(f.name for f in out.iterdir() if not f.name.startswith("."))
    assert set(names) <= set(HF_FILES), names
    return names


def check_text_ids(tok, ours) -> None:
    """The export's tokenizer encodes and decodes text as ours; text that spells <s> or </s> needs
    split_special_tokens=True, since by transformers' default (Llama 2's) it parses them as control ids."""
    for text in TEXTS + TORTURE + LEADING_SPACES:
        assert tok(text, split_special_tokens=True)["input_ids"] == ours.encode(text), text
        assert tok.decode(ours.encode(text)) == text, text
        if not any(s in text for s in ("<s>", "</s>", "<pad>")):
            assert tok(text)["input_ids"] == ours.encode(text), text
    assert tok("答案：<s>A</s>")["input_ids"] == [*ours.encode("答案："), ours.bos_id, *ours.encode("A"), ours.eos_id]


def check_chat_template(tok, ours) -> None:
    """apply_chat_template, with transformers' defaults, renders babyllama's chat format id for id, and raises
    where serve refuses."""
    for messages in CONVERSATIONS:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert ids == render_prompt(ours, conversation_of(messages)), messages
    for bad in ([{"role": "assistant", "content": "先答"}, {"role": "user", "content": "再问"}],
                [{"role": "tool", "content": "x"}, {"role": "user", "content": "问"}]):
        with pytest.raises(Exception, match="first message after the system text|is not one of"):
            tok.apply_chat_template(bad, add_generation_prompt=True, tokenize=False)


def conversation_of(messages: list[dict]):
    """babyllama's conversation of OpenAI-style messages (developer is system, text parts joined), as serve reads."""
    text = [m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"])
            for m in messages]
    pairs = [("system" if m["role"] == "developer" else m["role"], t) for m, t in zip(messages, text, strict=True)]
    return conversation_from_messages(pairs, add_generation_prompt=True)


@pytest.mark.parametrize("kind", ["bpe", pytest.param("sentencepiece", marks=pytest.mark.skipif(
    not CHATGLM2.is_file(), reason="ChatGLM2 tokenizer.model not present"))])
def test_pipeline_with_defaults_answers_as_babyllama_chat(bpe_tokenizer, tmp_path, caplog, kind):
    """transformers' usual chat path, pipeline("text-generation") with its defaults, renders our prompt and
    gives our greedy answer, warning nothing (no max_length beside max_new_tokens); our chat and serve keep a
    user's spelled <s> as text, with the checkpoint's tokenizer and with the export's read back."""
    ours = bpe_tokenizer if kind == "bpe" else load_tokenizer(CHATGLM2)
    model = sharp_model(tiny_config(vocab_size=600 if kind == "bpe" else 64793))
    save_checkpoint(tmp_path / "ck", model, ours)
    export(tmp_path / "ck", tmp_path / "hf")
    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "hf"))
    logging.getLogger("transformers").addHandler(caplog.handler)  # transformers' logger does not propagate
    try:
        for messages in CONVERSATIONS:
            answer = "".join(reply(model, ours, conversation_of(messages), Sampling(max_new_tokens=5)))
            assert pipe(messages, max_new_tokens=5)[0]["generated_text"][-1] == {"role": "assistant",
                                                                                 "content": answer}, messages
    finally:
        logging.getLogger("transformers").removeHandler(caplog.handler)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    spelled = conversation_from_messages([("user", "答案：<s>A</s><pad>")], add_generation_prompt=True)
    text = ours.encode("答案：<s>A</s><pad>")
    assert not {ours.bos_id, ours.eos_id, ours.pad_id} & set(text)
    for tok in (load_checkpoint(tmp_path / "ck")[1], load_tokenizer(tmp_path / "hf")):
        assert render_prompt(tok, spelled) == [*text, ours.bos_id]


def test_export_refuses_unknown_format_and_missing_checkpoint(tmp_path):
    r = run_cli("export", str(tmp_path / "none"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config()), None)
    (tmp_path / "afile").write_text("hi")
    r = run_cli("export", str(tmp_path / "ck"), "--out", str(tmp_path / "afile"))
    assert r.returncode == 2 and "is a file" in r.stderr


def test_export_never_overwrites_a_checkpoint_and_says_what_it_cannot_write(bpe_tokenizer, tmp_path):
    save_checkpoint(tmp_path / "run" / "final", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    before = (tmp_path / "run" / "final" / "config.json").read_bytes()
    final, beside = tmp_path / "run" / "final", tmp_path / "run" / "final.gguf"  # beside the checkpoint, not in it
    for out, fmt, message in [
        (tmp_path / "run" / "final", "hf", "holds a babyllama checkpoint or run, which the export would overwrite"),
        (tmp_path / "run", "hf", "holds a babyllama checkpoint or run"),
        (final, "gguf", f"^{re.escape(f'{final} is a directory; --format gguf writes one file, e.g. --out {beside}')}"
                        r"\.$"),
        *[(tmp_path / "afile" / name, fmt, "^" + re.escape(f"--out {tmp_path / 'afile' / name} is below "
                                                          f"{tmp_path / 'afile'}, which is a file, not a folder; "
                                                          "choose another --out.") + "$")
          for name, fmt in (("sub", "hf"), ("m.gguf", "gguf"))],  # found before the checkpoint is loaded
    ]:
        (tmp_path / "afile").write_text("a file where a directory would go")
        with pytest.raises(UserError, match=message):
            export(tmp_path / "run" / "final", out, fmt)
    assert (tmp_path / "run" / "final" / "config.json").read_bytes() == before  # the checkpoint is untouched


def test_gguf_refuses_an_out_that_names_a_folder(bpe_tokenizer, tmp_path):
    """`--out runs/demo/newdir/` (a trailing slash: a folder meant) wrote a file named newdir."""
    pytest.importorskip("gguf")
    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    for slash in {"/", os.sep}:
        out = f"{tmp_path / 'newdir'}{slash}"
        r = run_cli("export", str(tmp_path / "ck"), "--format", "gguf", "--out", out)
        assert (r.returncode, r.stderr) == (2, f"babyllama: error: {out} ends with a slash, so it names a folder; "
                                               "--format gguf writes one file, e.g. "
                                               f"--out {tmp_path / 'newdir.gguf'}.\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_export_writes_only_into_a_new_folder_or_an_earlier_export_of_its_format(bpe_tokenizer, tmp_path):
    from babyllama.data.clean import prepare
    from babyllama.data.sources import expand_inputs

    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    corpus = tmp_path / "corpus"  # a raw corpus folder, and a prepare output
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "一篇文档的正文"}\n')
    prepare([str(corpus)], tmp_path / "clean", min_chars=1, dedup="none")
    for folder in (corpus, tmp_path / "clean"):
        before = sorted(f.name for f in folder.iterdir())
        r = run_cli("export", str(tmp_path / "ck"), "--format", "hf", "--out", str(folder))
        assert (r.returncode, r.stderr.strip()) == (2, (
            f"babyllama: error: {folder} holds files and is not an earlier --format hf export; choose a new or empty "
            "--out (the export's model.safetensors would make that folder read as a checkpoint)."))
        assert sorted(f.name for f in folder.iterdir()) == before
    assert [f.name for f in expand_inputs([corpus])] == ["a.jsonl"]
    (tmp_path / "hf" / ".cache").mkdir(parents=True)  # hidden files do not count
    for _ in range(2):  # an earlier export of the same format is replaced
        export(tmp_path / "ck", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    with pytest.raises(UserError, match=f"^{tmp_path / 'ck'} holds a babyllama checkpoint or run"):
        export(tmp_path / "ck", tmp_path / "ck")
    pytest.importorskip("gguf")
    with pytest.raises(UserError) as e:
        export(tmp_path / "ck", corpus / "a.jsonl", "gguf")
    assert str(e.value) == (f"{corpus / 'a.jsonl'} exists and is not a GGUF file, which the export would overwrite; "
                            "choose another --out.")
    assert (corpus / "a.jsonl").read_text() == '{"text": "一篇文档的正文"}\n'
    for _ in range(2):
        export(tmp_path / "ck", tmp_path / "m.gguf", "gguf")
    assert (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"


def test_gguf_types_every_suppressed_id_as_llama_cpp_expects(bpe_tokenizer, tmp_path):
    """A tokenizer.json whose <pad>, <s>, </s> are not flagged special (the ids come from
    babyllama_tokenizer.json): they are still CONTROL in the GGUF, the model's ids beyond the tokenizer UNUSED."""
    gguf = pytest.importorskip("gguf")
    from babyllama.tokenizer import load_tokenizer

    bpe_tokenizer.save(tmp_path / "tok")
    data = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    for t in data["added_tokens"]:
        t["special"] = False
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(data))
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.control_ids() == [0, 1] and tok.suppress_tokens(604) == (0, 1, 600, 601, 602, 603)
    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=604)), tok)
    export(tmp_path / "ck", tmp_path / "m.gguf", "gguf")
    types = gguf.GGUFReader(tmp_path / "m.gguf").fields["tokenizer.ggml.token_type"].contents()
    assert types == [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * 597 + [gguf.TokenType.UNUSED] * 4


@pytest.mark.parametrize("kw", [dict(n_kv_heads=2), dict(tie_embeddings=False)], ids=["gqa", "untied"])
def test_gguf_loads_in_transformers_with_equal_logits(bpe_tokenizer, tmp_path, kw):
    """transformers' own GGUF reader undoes llama.cpp's conventions: equal logits mean we follow them."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    ours = sharp_model(tiny_config(vocab_size=600, **kw))
    save_checkpoint(tmp_path / "ck", ours, bpe_tokenizer)
    r = run_cli("export", str(tmp_path / "ck"), "--format", "gguf", "--out", str(tmp_path / "g" / "m.gguf"))
    assert r.returncode == 0, r.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file="m.gguf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "g", gguf_file="m.gguf")
    for text in TEXTS + TORTURE + LEADING_SPACES:  # GGUF has no split_special_tokens flag: readers pass it
        assert tok(text, split_special_tokens=True)["input_ids"] == bpe_tokenizer.encode(text), text
    idx = torch.tensor([bpe_tokenizer.encode(TEXTS[0])])
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], atol=1e-4, rtol=0)
    import gguf

    fields = gguf.GGUFReader(tmp_path / "g" / "m.gguf").fields
    check_chat_template(tok, bpe_tokenizer)  # the GGUF's tokenizer.chat_template, through transformers' reader
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 2
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False


def test_gguf_export_says_only_exported_and_names_the_model_as_serve_does(bpe_tokenizer, tmp_path):
    """gguf's writer logged `INFO gguf.gguf_writer: /out/.m.gguf.tmp-PID: n_tensors = ...` (a temporary file's
    name) where hf prints only `exported: OUT`; and general.name was the checkpoint's folder, "final" for every
    run, where serve names the model by its run and checkpoint (sft/final)."""
    gguf = pytest.importorskip("gguf")
    save_checkpoint(tmp_path / "sft" / "final", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    r = run_cli("export", str(tmp_path / "sft" / "final"), "--format", "gguf", "--out", str(tmp_path / "m.gguf"))
    assert (r.returncode, r.stdout, r.stderr) == (0, f"exported: {tmp_path / 'm.gguf'}\n", "")
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.name"].contents() == "sft/final"
    assert logging.getLogger("gguf").level == logging.NOTSET  # quiet for the write only


def sentencepiece_bpe(tmp_path):
    """A tiny SentencePiece BPE model with byte fallback that keeps whitespace as ChatGLM2's does, with pieces of
    several spaces (▁▁, ▁▁▁▁), trained here in a fraction of a second."""
    import io

    spm = pytest.importorskip("sentencepiece")
    from tests.conftest import generated_corpus

    texts = generated_corpus(200) + ["def f(x):\n    return  x  +  1\n\n\tpass", "  two  spaces   three    four"] * 20
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=proto, vocab_size=1000, model_type="bpe",
                                   byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
                                   split_by_whitespace=False, character_coverage=0.99, minloglevel=2, num_threads=1)
    (tmp_path / "sp.model").write_bytes(proto.getvalue())
    return load_tokenizer(tmp_path / "sp.model")


def llama_cpp_ids(fields, text: str) -> list[int]:
    """llama.cpp's SentencePiece tokenizer (llm_tokenizer_spm_session of llama-vocab.cpp, add_space_prefix as its
    default) over a GGUF's vocabulary: " " before the text, each space as ▁, the characters merged pairwise, the
    neighbours whose joined text is a token of the highest score first (the leftmost of equals), then each piece
    that is no token as the <0xXX> of its bytes."""
    tokens = fields["tokenizer.ggml.tokens"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    ids = {t: i for i, t in enumerate(tokens)}  # llama.cpp's token_to_id: the last of equal strings
    pieces = list((" " + text).replace(" ", "\u2581"))
    while True:
        joined = [(scores[ids[a + b]], -k) for k, (a, b) in enumerate(pairwise(pieces)) if a + b in ids]
        if not joined:
            break
        k = -max(joined)[1]
        pieces[k : k + 2] = [pieces[k] + pieces[k + 1]]
    return [i for p in pieces for i in ([ids[p]] if p in ids else [ids[f"<0x{b:02X}>"] for b in p.encode()])]


@pytest.mark.parametrize("kind", ["tiny", pytest.param("chatglm2", marks=pytest.mark.skipif(
    not CHATGLM2.is_file(), reason="ChatGLM2 tokenizer.model not present"))])
def test_gguf_of_a_sentencepiece_tokenizer_json_splits_text_as_babyllama(kind, tmp_path):
    """The tokenizer.json that export --format hf writes for a SentencePiece model, trained on as a tokenizer of
    its own: GGUF said tokenizer.ggml.model gpt2 with its ▁ pieces (transformers' reader: `Token ▁ out of
    vocabulary`, llama.cpp: other ids). It is now SentencePiece's vocabulary (scores, byte and control types),
    which llama.cpp's algorithm splits as babyllama does, and transformers' reader too but for a text that starts with
    a space (its Metaspace: the README's caveat)."""
    gguf = pytest.importorskip("gguf")
    sp = sentencepiece_bpe(tmp_path) if kind == "tiny" else load_tokenizer(CHATGLM2)
    model = sharp_model(tiny_config(vocab_size=sp.vocab_size + 4))
    save_checkpoint(tmp_path / "sp", model, sp)
    export(tmp_path / "sp", tmp_path / "hf")
    tok = load_tokenizer(tmp_path / "hf")  # its tokenizer.json, as a user copies it beside their data
    assert tok.kind == "hf"
    save_checkpoint(tmp_path / "ck", model, tok)
    export(tmp_path / "ck", tmp_path / "g" / "m.gguf", "gguf")
    export(tmp_path / "sp", tmp_path / "g" / "sp.gguf", "gguf")  # of the .model itself: the same ids
    fields, of_model = (gguf.GGUFReader(tmp_path / "g" / name).fields for name in ("m.gguf", "sp.gguf"))
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert "tokenizer.ggml.merges" not in fields and "tokenizer.ggml.pre" not in fields
    types = fields["tokenizer.ggml.token_type"].contents()
    T = gguf.TokenType
    assert [sum(t == k for t in types) for k in (T.CONTROL, T.BYTE, T.UNUSED)] == [3, 256, 4]
    assert types[:3] == [T.CONTROL] * 3 and all(types[sp._byte_id(b)] == T.BYTE for b in range(256))
    for text in TEXTS + TORTURE + LEADING_SPACES + ["    return  x\n\tpass", "▁already ▁escaped"]:
        assert llama_cpp_ids(fields, text) == llama_cpp_ids(of_model, text) == tok.encode(text) == sp.encode(text), text
    pytest.importorskip("accelerate")
    read = transformers.AutoTokenizer.from_pretrained(tmp_path / "g", gguf_file="m.gguf")
    for text in TEXTS + TORTURE + LEADING_SPACES:  # its Metaspace puts no ▁ before a text that starts with a space:
        same = read(text, split_special_tokens=True)["input_ids"] == tok.encode(text)  # the README's caveat, while
        assert same is not text.startswith(" "), text  # transformers' reader has it


def test_gguf_refuses_a_tokenizer_json_that_llama_cpp_would_split_otherwise(bpe_tokenizer, tmp_path):
    """A Unigram tokenizer.json crashed the export (KeyError: 'merges'); a Metaspace one (Llama 2's as transformers
    now converts it) or a byte-level BPE split otherwise than GPT-2's became a GGUF that llama.cpp reads as other
    ids. Each is one sentence, and nothing is written."""
    pytest.importorskip("gguf")
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers

    from babyllama.tokenizer import HFTokenizer, training_pre_tokenizer

    save_checkpoint(tmp_path / "sp", sharp_model(tiny_config(vocab_size=1004)), sentencepiece_bpe(tmp_path))
    export(tmp_path / "sp", tmp_path / "hf")
    unigram = RustTokenizer(models.Unigram([("<pad>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("\u2581a", -1.0)], 0))
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    metaspace = RustTokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))  # as export --format hf writes
    metaspace.normalizer, metaspace.pre_tokenizer = None, pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    regex = RustTokenizer.from_str(bpe_tokenizer.tok.to_str())
    regex.pre_tokenizer = training_pre_tokenizer()  # babyllama's own bounded runs, which it trains with
    for tok, why in [
        (unigram, "a Unigram model"),
        (metaspace, "a Metaspace pre-tokenizer, which puts no \u2581 before a text that starts with a space, where "
                    "llama.cpp always puts one"),
        (regex, "a byte-level BPE that splits text otherwise than GPT-2's pre-tokenizer"),
    ]:
        save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=1004)), HFTokenizer(tok, 1, 2, 0))
        with pytest.raises(UserError) as e:
            export(tmp_path / "ck", tmp_path / "m.gguf", "gguf")
        assert str(e.value) == (f"GGUF cannot express this checkpoint's tokenizer.json ({why}): llama.cpp would "
                                "split text into other ids; export it with --format hf, which keeps the "
                                "tokenizer.json.")
        assert not [p.name for p in tmp_path.iterdir() if "gguf" in p.name]


def test_an_export_killed_by_kill_9_leaves_its_temporary_to_the_next_export(bpe_tokenizer, tmp_path):
    """A crash tester's kill -9 of a GGUF export left X/.m.gguf.tmp-PID (gigabytes at full size) that no later
    export removed. A dead process's temporaries go; a live one's (another export running) stay."""
    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    dead = 2**22 + 12345  # above Linux's largest pid
    (tmp_path / f".m.gguf.tmp-{dead}").write_bytes(b"GGUF half")
    (tmp_path / f".hf.tmp-{dead}").mkdir()
    (tmp_path / ".hf.tmp-1").mkdir()  # pid 1 is alive
    (tmp_path / f".data.bin.tmp-{dead}").write_bytes(b"another program's, or another output's")
    export(tmp_path / "ck", tmp_path / "m.gguf", format="gguf")
    export(tmp_path / "ck", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp" in p.name) == [f".data.bin.tmp-{dead}", ".hf.tmp-1"]


def test_ctrl_c_while_an_export_moves_its_files_in_waits_until_they_are(bpe_tokenizer, tmp_path, monkeypatch, capsys):
    """A Ctrl-C between the renames that move an export into --out left half of the earlier export beside half
    of the new one: it now waits until the new one is whole, and the command says it is."""
    import signal
    from pathlib import Path

    from babyllama.cli import main

    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    export(tmp_path / "ck", tmp_path / "fresh")
    out = tmp_path / "hf"
    export(tmp_path / "ck", out)  # an earlier export, with a folder that the new one does not write
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_config.json").write_text("{}")
    real = Path.replace

    def replace(self, target):  # Ctrl-C as the first file moves in
        if Path(target).parent == out and not stopped:
            stopped.append(os.kill(os.getpid(), signal.SIGINT))
        return real(self, target)

    stopped: list = []
    monkeypatch.setattr(Path, "replace", replace)
    assert main(["export", str(tmp_path / "ck"), "--out", str(out)]) == 130
    assert capsys.readouterr().err == f"babyllama: interrupted; {out} is complete, nothing to run again.\n"
    assert {f.name: f.read_bytes() for f in out.iterdir() if not f.name.startswith(".")} == {
        f.name: f.read_bytes() for f in (tmp_path / "fresh").iterdir() if not f.name.startswith(".")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "fresh", "hf"]


def test_a_hugging_face_export_passed_as_a_checkpoint_is_named_as_one(bpe_tokenizer, tmp_path):
    """`chat runs/demo/hf` (and `sft --init` of it) said its config.json "lacks its model or tokenizer settings; the
    checkpoint is damaged": it is an HF export, and the sentence says what to pass instead. Read as data (`tokenizer
    info --sample`, `prepare`), it is named in the same words."""
    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    hf = export(tmp_path / "ck", tmp_path / "hf")
    (tmp_path / "sft.jsonl").write_text(json.dumps({"instruction": "问", "output": "答"}, ensure_ascii=False))
    sentence = (f"babyllama: error: {hf} is a Hugging Face model (its config.json is transformers'), as `babyllama "
                "export --format hf` writes, not a babyllama checkpoint; pass the checkpoint it was exported from (a "
                "run's final/ or checkpoints/step_NNNNNN/), or load this one with transformers.\n")
    for args in (["chat", hf], ["eval", hf, "--out_dir", tmp_path / "e"], ["export", hf, "--out", tmp_path / "x"],
                 ["sft", "--init", hf, "--data", tmp_path / "sft.jsonl", "--out_dir", tmp_path / "s"]):
        r = run_cli(*args)
        assert (r.returncode, r.stderr.splitlines(keepends=True)[-1]) == (2, sentence), args  # after "running on"
    for args in (["tokenizer", "info", hf, "--sample", hf], ["prepare", "--input", hf, "--out_dir", tmp_path / "p"]):
        r = run_cli(*args)  # read as data, it was "a checkpoint, not a folder of data files"
        assert (r.returncode, r.stderr) == (2, f"babyllama: error: {hf} is a Hugging Face model (its config.json is "
                                               "transformers'), not a folder of data files; name the data files or "
                                               "their folder.\n"), args


# every export of a checkpoint, and the adapter files of a LoRA checkpoint (lora.save_lora_config), in one process
EXPORT_ALL = """
import sys
from pathlib import Path
from babyllama.cli import main
from babyllama.lora import TARGETS, lora_config, save_adapter

d, out = Path(sys.argv[1]), Path(sys.argv[2])
for args in (["ck", "--out", "hf"], ["ck", "--format", "gguf", "--out", "m.gguf"],
             ["lora", "--adapter", "--out", "ad"]):
    assert main(["export", str(d / args[0]), *args[1:-1], str(out / args[-1])]) == 0
save_adapter(out / "saved", lora_config(4, 8.0, 0.0, ",".join(TARGETS)), {}, str(d / "ck"))
"""


def test_every_export_is_byte_identical_whatever_the_hash_seed(bpe_tokenizer, tmp_path):
    """export --adapter wrote adapter_config.json's target_modules in the order of peft's set, which
    PYTHONHASHSEED changes: two exports of one checkpoint differed. Two processes with other seeds now write the
    same bytes, for every format."""
    import subprocess
    import sys

    pytest.importorskip("gguf")
    pytest.importorskip("peft")
    from babyllama.checkpoint import weights_sha256
    from babyllama.lora import TARGETS, adapter_tensors, add_lora, lora_config

    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    config = lora_config(4, 8.0, 0.0, ",".join(TARGETS))
    lora = add_lora(sharp_model(tiny_config(vocab_size=600)), config)
    save_checkpoint(tmp_path / "lora", lora, tensors=adapter_tensors(lora), adapter=config, extra_config={
        "base": {"path": str((tmp_path / "ck").resolve()), "sha256": weights_sha256(tmp_path / "ck")}})
    for seed in ("1", "2"):  # seeds under which peft's set of the 7 target modules iterates in other orders
        if (tmp_path / "out").exists():
            (tmp_path / "out").rename(tmp_path / "first")  # the adapter records the path of its base, out/ad
        env = os.environ | {"PYTHONHASHSEED": seed}
        r = subprocess.run([sys.executable, "-c", EXPORT_ALL, tmp_path, tmp_path / "out"], env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    first, second = ({p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
                     for d in (tmp_path / "first", tmp_path / "out"))
    assert sorted(map(str, first)) == ["ad/adapter/adapter_config.json", "ad/adapter/adapter_model.safetensors",
                                       "ad/config.json", "ad/generation_config.json", "ad/model.safetensors",
                                       "ad/special_tokens_map.json", "ad/tokenizer.json", "ad/tokenizer_config.json",
                                       "hf/config.json", "hf/generation_config.json", "hf/model.safetensors",
                                       "hf/special_tokens_map.json", "hf/tokenizer.json", "hf/tokenizer_config.json",
                                       "m.gguf", "saved/adapter_config.json", "saved/adapter_model.safetensors"]
    assert [str(name) for name in first if first[name] != second[name]] == []
