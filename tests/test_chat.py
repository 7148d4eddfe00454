"""The chat REPL through a pipe, and how it trims history and streams characters."""

from __future__ import annotations

import io
import random
import subprocess
import sys

import pytest

from babyllama.chat import Detokenizer, decode_stream, prompt_ids, until_stop, visible
from babyllama.chat_format import Conversation, render_prompt
from babyllama.checkpoint import save_checkpoint
from tests.conftest import favours_control_ids, run_cli, sharp_model, tiny_config
from tests.test_tokenizer import tokenizer_of


def test_repl_through_a_pipe_answers_and_exits(bpe_tokenizer, tmp_path):
    model = sharp_model(tiny_config(vocab_size=600, max_seq_len=128))
    save_checkpoint(tmp_path / "ck", model, bpe_tokenizer)
    r = subprocess.run([sys.executable, "-m", "babyllama", "chat", str(tmp_path / "ck"), "--max_new_tokens", "8"],
                       input="你好\n/reset\n再见\n/exit\n这行不会被回答\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith("chat: running on cpu\n")  # auto, on this machine; stdout holds only the answers
    lines = r.stdout.splitlines()
    first = bpe_tokenizer.decode(model.generate(render_prompt(bpe_tokenizer, Conversation([("你好", "")])),
                                                max_new_tokens=8, eos_id=2))
    assert lines[0] == first and lines[1] == "(conversation reset)" and len(lines) == 3


def test_chat_on_cpu_0_answers_as_on_cpu(bpe_tokenizer, tmp_path):
    """--device cpu:0, which torch takes for the CPU, said the good model.safetensors was damaged or cut off."""
    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=600, max_seq_len=128)), bpe_tokenizer)
    runs = [run_cli("chat", str(tmp_path / "ck"), "--max_new_tokens", "4", "--device", d, stdin="你好\n")
            for d in ("cpu", "cpu:0")]
    assert [r.returncode for r in runs] == [0, 0] and runs[1].stderr == runs[0].stderr == "chat: running on cpu\n"
    assert runs[1].stdout == runs[0].stdout != ""


def test_a_checkpoint_without_its_tokenizer_says_what_to_do_for_each_command(bpe_tokenizer, tmp_path, capsys):
    """chat (serve, eval, export) has no tokenizer option: the message asks to put the tokenizer back into the
    checkpoint; sft, whose --init lacks one, names its --tokenizer setting."""
    from babyllama.cli import main

    ck = tmp_path / "ck"
    save_checkpoint(ck, sharp_model(tiny_config(vocab_size=600, max_seq_len=128)), bpe_tokenizer)
    (ck / "tokenizer.json").unlink()
    assert main(["chat", str(ck), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (f"chat: running on cpu\nbabyllama: error: {ck} has neither tokenizer.json nor "
                                       "tokenizer.model; copy into it the tokenizer that the model was trained "
                                       "with.\n")
    (tmp_path / "sft.jsonl").write_text('{"instruction": "你好", "output": "你好！"}\n')
    assert main(["sft", "--init", str(ck), "--data", str(tmp_path / "sft.jsonl"), "--out_dir",
                 str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == (f"babyllama: error: {ck} has neither tokenizer.json nor tokenizer.model; pass "
                                       "--tokenizer, the one that --init was trained with.\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "sft.jsonl"]  # nothing written


def test_repl_refuses_unknown_commands_and_bytes_that_are_not_utf8_and_bad_sampling(bpe_tokenizer, tmp_path):
    model = sharp_model(tiny_config(vocab_size=600, max_seq_len=128))
    save_checkpoint(tmp_path / "ck", model, bpe_tokenizer)
    base = ["chat", str(tmp_path / "ck"), "--max_new_tokens", "4"]
    lines = [b"\xff\xfe" + "坏".encode(), "坏字节".encode("gbk"), b"/help", b"/foo", b"/reset extra", "你好".encode(),
             "//usr 是什么".encode()]
    r = run_cli(*base, stdin=b"\n".join(lines) + b"\n")  # a UnicodeDecodeError would end the test here
    assert r.returncode == 0, r.stderr
    bad = "this line has bytes that are not utf-8 text, so it is not asked; type it again"
    answer = bpe_tokenizer.decode(model.generate(render_prompt(bpe_tokenizer, Conversation([("你好", "")])),
                                                 max_new_tokens=4, eos_id=2))
    then = bpe_tokenizer.decode(model.generate(render_prompt(bpe_tokenizer, Conversation(
        [("你好", answer), ("/usr 是什么", "")])), max_new_tokens=4, eos_id=2))  # // asks a line that starts with /
    unknown = [f"unknown command {c}; the commands are /reset, /exit (// asks a line that starts with /)"
               for c in ("/help", "/foo", "/reset extra")]
    assert r.stdout.split("\n")[:-1] == [bad, bad, *unknown, visible(answer), visible(then)]  # no history
    for flag, value in [("--temperature", "nan"), ("--top_p", "0"), ("--repetition_penalty", "0")]:
        r = run_cli(*base, flag, value, stdin="你好\n")
        assert r.returncode == 2 and flag[2:] in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_an_unknown_command_is_echoed_with_its_control_characters_visible(bpe_tokenizer, tmp_path):
    """`/foo<ESC>[31m` was echoed raw in "unknown command ...", turning the terminal red, and a command with bytes
    that are not text echoed them, as no answer is: its controls are shown as \\xNN, and such bytes are refused as
    on any other line."""
    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=600, max_seq_len=128)), bpe_tokenizer)
    r = run_cli("chat", str(tmp_path / "ck"), "--max_new_tokens", "4", stdin=b"/foo\x1b[31m\x07\n/\xff\n")
    assert r.returncode == 0 and r.stdout.splitlines() == [
        "unknown command /foo\\x1b[31m\\x07; the commands are /reset, /exit (// asks a line that starts with /)",
        "this line has bytes that are not utf-8 text, so it is not asked; type it again"], r.stderr


def test_a_byte_order_mark_before_piped_input_is_skipped(bpe_tokenizer, tmp_path):
    """A file saved with a BOM (Windows Notepad) and piped in: the BOM was part of the first line, so its /exit was
    asked of the model; only the first line's leading BOM goes (another one is text, asked as typed)."""
    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=600, max_seq_len=128)), bpe_tokenizer)
    base = ["chat", str(tmp_path / "ck"), "--max_new_tokens", "4"]
    r = run_cli(*base, stdin=b"\xef\xbb\xbf/exit\n\xe4\xbd\xa0\xe5\xa5\xbd\n")
    assert r.returncode == 0 and r.stdout == "", r.stderr
    with_bom, plain = run_cli(*base, stdin="\ufeff你好\n\ufeff你好\n"), run_cli(*base, stdin="你好\n\ufeff你好\n")
    assert with_bom.stdout == plain.stdout and len(plain.stdout.splitlines()) == 2


def test_history_is_trimmed_oldest_first(bpe_tokenizer):
    turns = [(f"第{i}个问题，比较长的一句话", f"第{i}个回答，也比较长") for i in range(10)] + [("最后的问题", "")]
    ids = prompt_ids(bpe_tokenizer, Conversation(turns, "系统"), max_seq_len=128, max_new_tokens=32)
    assert len(ids) <= 96 and ids[-1] == bpe_tokenizer.bos_id
    text = bpe_tokenizer.decode(ids)
    assert text.startswith("系统\n") and "最后的问题" in text and "第0个问题" not in text and "第9个回答" in text


def test_a_question_is_never_cut_but_refused_with_serves_words_when_it_does_not_fit(bpe_tokenizer):
    """The last question and the system text stay whole, as serve keeps them; past half the context they take
    the answer's room, and when no token of answer is left the question is refused with serve's sentence."""
    question = "你好" * 15  # 30 ids, 31 with its <bos>
    assert len(render_prompt(bpe_tokenizer, Conversation([(question, "")]))) == 31
    turns = [("第一个问题", "第一个回答"), (question, "")]
    assert prompt_ids(bpe_tokenizer, Conversation(turns), max_seq_len=40, max_new_tokens=32) == render_prompt(
        bpe_tokenizer, Conversation(turns[1:]))  # the older turn goes, the question stays whole, 9 ids answer
    with pytest.raises(ValueError) as e:
        prompt_ids(bpe_tokenizer, Conversation(turns), max_seq_len=31, max_new_tokens=1)
    assert str(e.value) == "this question (31 tokens) does not fit the context of 31 tokens, so it is not asked"
    system = len(bpe_tokenizer.encode("系统\n"))
    with pytest.raises(ValueError) as e:
        prompt_ids(bpe_tokenizer, Conversation(turns, "系统"), max_seq_len=32, max_new_tokens=1)
    assert str(e.value) == (f"--system with this question ({system + 31} tokens) does not fit the context of 32 "
                            "tokens, so it is not asked")


def test_repl_refuses_a_question_or_a_system_text_too_long_for_the_context(bpe_tokenizer, tmp_path):
    """The tester's case: 500 characters to a model of 128 tokens were answered with no word that the model
    read only their end; now one line says so, the model is not asked, and the next question is answered as
    if the long one had not been typed. A --system that leaves no room is an error before any question."""
    model = sharp_model(tiny_config(vocab_size=600, max_seq_len=128))
    save_checkpoint(tmp_path / "ck", model, bpe_tokenizer)
    base = ["chat", str(tmp_path / "ck"), "--max_new_tokens", "3"]
    long = "好" * 500
    size = len(render_prompt(bpe_tokenizer, Conversation([(long, "")])))
    r = run_cli(*base, stdin=f"{long}\n你好\n")
    assert r.returncode == 0, r.stderr
    answer = bpe_tokenizer.decode(model.generate(render_prompt(bpe_tokenizer, Conversation([("你好", "")])),
                                                 max_new_tokens=3, eos_id=2))
    assert r.stdout.split("\n")[:-1] == [
        f"this question ({size} tokens) does not fit the context of 128 tokens, so it is not asked", answer]
    system = "系" * 300
    r = run_cli(*base, "--system", system, stdin="你好\n")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.endswith(f"babyllama: error: --system ({len(bpe_tokenizer.encode(system + chr(10)))} tokens) "
                             "does not fit the context of 128 tokens; pass a shorter one.\n")


def test_decode_stream_never_splits_a_character(bpe_tokenizer):
    text = "𠀀😀中文"
    ids = bpe_tokenizer.encode(text)
    pieces = list(decode_stream(bpe_tokenizer, iter(ids)))
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


def test_decode_stream_drops_a_character_that_the_end_cuts(bpe_tokenizer):
    ids = bpe_tokenizer.encode("中文😀")
    emoji = [bpe_tokenizer.tok.token_to_id(c) for c in "ðŁĺĢ"]  # 😀's 4 bytes, F0 9F 98 80, one id each
    assert bpe_tokenizer.decode(emoji) == "😀" and ids[-4:] == emoji
    for cut in (1, 2, 3):  # max_tokens stops inside 😀
        assert bpe_tokenizer.decode(ids[:-cut]) == "中文\ufffd"  # what the last piece used to end with
        assert list(decode_stream(bpe_tokenizer, iter(ids[:-cut])))[-1] == "文"
        assert "".join(decode_stream(bpe_tokenizer, iter(ids[:-cut]))) == "中文"
    lone = bpe_tokenizer.tok.token_to_id("Ģ")  # 0x80 alone: not UTF-8, not a cut character: shown as such
    assert "".join(decode_stream(bpe_tokenizer, iter([*ids[:-4], lone]))) == "中文\ufffd"


def test_bytes_that_are_not_utf8_show_as_u_fffd_in_chat_and_serve_alike(bpe_tokenizer):
    """A sampled answer of a small model can hold bytes that no later byte makes a character (E4 then `a`): chat
    shows them as U+FFFD, as decode does and serve's text and text_offset count them (README), where a character
    that the end cuts (E4 B8) is left out."""
    from babyllama.serve import text_offsets

    ids = [bpe_tokenizer._byte_id(0xE4), bpe_tokenizer.encode("a")[0], *map(bpe_tokenizer._byte_id, (0xE4, 0xB8))]
    assert list(decode_stream(bpe_tokenizer, iter(ids))) == ["\ufffda"] == [bpe_tokenizer.decode_complete(ids)]
    assert text_offsets(bpe_tokenizer, ids) == [0, 1, 2, 2]


def decode_each_time(tokenizer, ids):
    """decode_stream as it was: all ids decoded again for each id (the reference)."""
    out, shown, text = [], "", ""
    for i in ids:
        out.append(i)
        text = tokenizer.decode(out)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(shown):
            yield text[len(shown) :]
        shown = text
    text = tokenizer.decode_complete(out) if text.endswith("\ufffd") else text
    if len(text) > len(shown):
        yield text[len(shown) :]


@pytest.mark.parametrize("kind", ["bpe", "llama2", "metaspace", "chatglm2"])
def test_decode_stream_gives_the_pieces_of_decoding_everything_each_time(kind, bpe_tokenizer, tmp_path):
    """Any ids: text split into bytes, bytes that are not UTF-8, runs of byte pieces that Llama 2's decoder
    spoils as a whole, leading spaces that a decoder drops, control ids; and a long answer."""
    tok = tokenizer_of(kind, bpe_tokenizer, tmp_path)
    rng = random.Random(0)
    chars = ["中文", " a", "😀", "𠀀", "。", "  ", "你好 world", "é", "\n"]
    cases = [tok.encode("".join(rng.choice(chars) for _ in range(500)))]  # a long answer (~1,400 ids)
    for _ in range(60):
        raw = [tok._byte_id(b) for b in "".join(rng.choice(["中", "😀", "é", " ", "a"]) for _ in range(20)).encode()]
        cases += [[rng.randrange(tok.vocab_size) for _ in range(40)],
                  [b if rng.random() < 0.9 else rng.randrange(tok.vocab_size) for b in raw],
                  tok.encode("".join(rng.choice(chars) for _ in range(20)))]
    for ids in cases:
        assert list(decode_stream(tok, iter(ids))) == list(decode_each_time(tok, iter(ids))), ids
    assert "".join(decode_stream(tok, iter(cases[0]))) == tok.decode(cases[0])


@pytest.mark.parametrize("kind", ["bpe", "llama2", "metaspace", "chatglm2"])
def test_detokenizer_length_is_the_length_of_decoding_all_ids_after_each_id(kind, bpe_tokenizer, tmp_path):
    """Also where the ids end inside a character (U+FFFD, one per byte for SentencePiece), in a run of byte pieces
    that Llama 2's decoder spoils as a whole, or after control ids: the text_offset of serve's logprobs."""
    tok = tokenizer_of(kind, bpe_tokenizer, tmp_path)
    rng = random.Random(1)
    chars = ["中文", " a", "😀", "𠀀", "。", "  ", "你好 world", "é"]
    cases = [tok.encode("".join(rng.choice(chars) for _ in range(200)))]
    for _ in range(40):
        raw = [tok._byte_id(b) for b in "".join(rng.choice(["中", "😀", "é", " ", "a"]) for _ in range(20)).encode()]
        cases += [[rng.randrange(tok.vocab_size) for _ in range(40)],
                  [b if rng.random() < 0.9 else rng.randrange(tok.vocab_size) for b in raw]]
    for ids in cases:
        d, lengths = Detokenizer(tok), []
        for i in ids:
            d.add(i)
            lengths.append(d.length)
        assert lengths == [len(tok.decode(ids[: t + 1])) for t in range(len(ids))], ids


def test_decode_stream_decodes_a_short_window_per_id(bpe_tokenizer, monkeypatch):
    """The ids decoded per new id do not grow with the answer: one decode per id of at most the anchor
    and one character's byte ids (𠀀 is 4), where decoding all again passed n ids for the n-th."""
    lengths: list[int] = []
    decode = type(bpe_tokenizer).decode
    monkeypatch.setattr(type(bpe_tokenizer), "decode", lambda self, ids: lengths.append(len(ids)) or decode(self, ids))
    assert len(bpe_tokenizer.encode("𠀀")) == 4  # a byte an id
    for n in (100, 1000):
        rng = random.Random(n)
        ids = bpe_tokenizer.encode("".join(rng.choice(["中文", "𠀀", "好的", "a"]) for _ in range(n)))
        lengths.clear()
        assert "".join(decode_stream(bpe_tokenizer, iter(ids))) == decode(bpe_tokenizer, ids)
        assert len(lengths) == len(ids) + 1 and max(lengths) == 5  # + the anchor's own decode
        lengths.clear()
        list(decode_each_time(bpe_tokenizer, iter(ids)))
        assert max(lengths) == len(ids)  # what it used to cost


def finish(gen):
    """The pieces a generator yields, and what it returns."""
    pieces = []
    while True:
        try:
            pieces.append(next(gen))
        except StopIteration as stop:
            return pieces, stop.value


def test_until_stop_cuts_a_stop_string_split_across_pieces():
    pieces, stopped = finish(until_stop(iter(["Hel", "lo, w", "orld", "!"]), ["o, wor", "xyz"]))
    assert "".join(pieces) == "Hell" and stopped
    assert pieces == ["Hel", "l"]  # the last 5 characters (a stop string may begin there) wait
    pieces, stopped = finish(until_stop(iter(["床前", "明月", "光"]), ["明月光"]))
    assert pieces == ["床前"] and stopped
    pieces, stopped = finish(until_stop(iter(["床前", "明月", "光"]), ["月亮"]))
    assert "".join(pieces) == "床前明月光" and not stopped
    pieces, stopped = finish(until_stop(iter(["a", "b"]), []))
    assert pieces == ["a", "b"] and not stopped  # no stop strings: nothing held back


def test_chat_and_eval_never_answer_with_control_tokens(bpe_tokenizer):
    from babyllama.chat import Sampling, reply
    from babyllama.evaluate import answer, continuations

    model = favours_control_ids(sharp_model(tiny_config(vocab_size=600, max_seq_len=128)), {1: 100.0, 0: 90.0})
    text = "".join(reply(model, bpe_tokenizer, Conversation([("你好", "")]), Sampling(max_new_tokens=8)))
    assert text and answer(model, bpe_tokenizer, "你好", Sampling(max_new_tokens=8))
    assert continuations(model, bpe_tokenizer, ["床前明月光，"], Sampling(max_new_tokens=8))[0]["continuation"]


def test_a_long_piped_conversation_tokenizes_only_the_turns_that_can_still_fit(bpe_tokenizer, tmp_path, monkeypatch):
    """The tester's case: piped questions took 5.5 s for 500, 35 s for 2,000 and 193 s for 4,000, as each one
    tokenized the whole history again to keep the few turns that fit 128 ids. Now the history keeps only the turns
    that a prompt can still hold (each takes 3 ids at least: question <bos> <eos>), so the texts tokenized per
    question stay under 128 // 3 + 2 however long the conversation (all 120 of them, before), and every answer is
    the one that the whole history gives."""
    from babyllama.chat import Sampling, reply

    model = sharp_model(tiny_config(vocab_size=600, max_seq_len=128))
    save_checkpoint(tmp_path / "ck", model, bpe_tokenizer)
    questions = [f"问{i}" for i in range(120)]
    history: list[tuple[str, str]] = []
    for q in questions:
        conv = Conversation([*history, (q, "")], "系统")
        history.append((q, "".join(reply(model, bpe_tokenizer, conv, Sampling(max_new_tokens=4)))))
    assert len({a for _, a in history}) > 10  # the answers depend on the history kept
    texts: list[int] = []  # the texts of each tokenizer call
    encode_batch = type(bpe_tokenizer).encode_batch
    monkeypatch.setattr(type(bpe_tokenizer), "encode_batch",
                        lambda self, batch, *a, **k: texts.append(len(batch)) or encode_batch(self, batch, *a, **k))
    r = run_cli("chat", tmp_path / "ck", "--max_new_tokens", "4", "--system", "系统", stdin="\n".join(questions))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "".join(f"{visible(a)}\n" for _, a in history)  # the history holds the answers as sampled
    assert max(texts) <= 128 // 3 + 2, max(texts)


def test_ctrl_c_ends_the_half_written_answer_or_prompt_line_before_the_cli_says_interrupted(
        bpe_tokenizer, tmp_path, monkeypatch, capsys):
    """The tester's case: `babyllama: interrupted.` came on the line of the answer that Ctrl-C cut; stdout now ends
    that line first, and at a terminal the `用户> ` prompt's line too, where Ctrl-C comes while reading."""
    from babyllama.chat import Sampling, chat
    from babyllama.model import Transformer

    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=600, max_seq_len=128)), bpe_tokenizer)
    full = run_cli("chat", tmp_path / "ck", "--max_new_tokens", "8", stdin="你好\n").stdout
    stream = Transformer.stream

    def cut(self, *args, **kwargs):  # Ctrl-C after 4 tokens of the answer
        for n, token in enumerate(stream(self, *args, **kwargs)):
            if n == 4:
                raise KeyboardInterrupt
            yield token

    monkeypatch.setattr(Transformer, "stream", cut)
    r = run_cli("chat", tmp_path / "ck", "--max_new_tokens", "8", stdin="你好\n")
    assert r.returncode == 130 and r.stderr.endswith("\nbabyllama: interrupted.\n")
    assert r.stdout.endswith("\n") and r.stdout.count("\n") == 1 and full.startswith(r.stdout[:-1]) and r.stdout != full

    class Terminal(io.StringIO):  # the user types 你好, then Ctrl-C at the next prompt
        def isatty(self) -> bool:
            return True

        def reconfigure(self, **kwargs) -> None:
            pass

        def readline(self, *args) -> str:
            if self.tell() == len(self.getvalue()):
                raise KeyboardInterrupt
            return super().readline(*args)

    monkeypatch.setattr(sys, "stdin", Terminal("你好\n"))
    monkeypatch.setattr(Transformer, "stream", stream)
    with pytest.raises(KeyboardInterrupt):
        chat(str(tmp_path / "ck"), Sampling(max_new_tokens=8), device="cpu")
    banner = "babyllama chat: /reset to start over, /exit to leave\n"
    assert capsys.readouterr().out == f"{banner}\n用户> 助手> {full}\n用户> \n"


def test_an_answers_control_characters_are_shown_not_sent_to_the_terminal(bpe_tokenizer, monkeypatch, capsys):
    """A sampled ESC [2J cleared the tester's terminal and BEL rang it: chat shows them (C1 and DEL too) as \\xNN,
    keeping newlines and tabs."""
    from babyllama.chat import Sampling, Terminal, converse
    from babyllama.model import Transformer

    text = "清屏\x1b[2J响铃\x07\n\t尾\x85\x7f\r"
    ids = bpe_tokenizer.encode(text)
    assert bpe_tokenizer.decode(ids) == text
    monkeypatch.setattr(Transformer, "stream", lambda self, *args, **kwargs: iter(ids))
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n"))
    converse(sharp_model(tiny_config(vocab_size=600, max_seq_len=128)), bpe_tokenizer, Sampling(max_new_tokens=64),
             "", Terminal())
    assert capsys.readouterr().out == "清屏\\x1b[2J响铃\\x07\n\t尾\\x85\\x7f\\x0d\n"
