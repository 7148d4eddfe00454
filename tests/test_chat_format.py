"""The chat format: one rendering, one truncation and one mapping for SFT, chat, serve and eval."""

from __future__ import annotations

import functools
import json
import random
import re
import string

import pytest

from babyllama import chat_format
from babyllama.chat import prompt_ids
from babyllama.chat_format import (
    CUT_MARGIN,
    Conversation,
    conversation_from_messages,
    conversation_from_record,
    cut_conversation,
    longest_piece,
    messages_of_record,
    render_conversation,
    render_prompt,
    text_prompt,
    truncate_conversation,
)
from babyllama.tokenizer import HFTokenizer, Tokenizer, load_tokenizer, train_bpe
from tests.conftest import CHATGLM2, generated_corpus

LONG = Conversation([(f"第{i}个问题，比较长的一句话", f"第{i}个回答，也比较长") for i in range(10)], system="系统")


def test_render_marks_exactly_the_answers(bpe_tokenizer):
    tok = bpe_tokenizer
    conv = Conversation([("问一", "答一"), ("问二", "答二")], system="系统")
    ids, mask = render_conversation(tok, conv)
    expected = [*tok.encode("系统\n问一"), 1, *tok.encode("答一"), 2, *tok.encode("问二"), 1, *tok.encode("答二"), 2]
    assert ids == expected
    assert [i for i, m in zip(ids, mask, strict=True) if m] == [*tok.encode("答一"), 2, *tok.encode("答二"), 2]
    assert render_prompt(tok, conv) == expected[: expected.index(2) + 1 + len(tok.encode("问二")) + 1]


@pytest.mark.parametrize("max_len", [50, 60, 90, 130, 400])  # 50: SFT cuts the last question
def test_sft_truncation_and_chat_prompt_drop_the_same_turns(bpe_tokenizer, max_len):
    tok = bpe_tokenizer
    train_ids, mask = truncate_conversation(tok, LONG, max_len)
    answer = len(tok.encode(LONG.turns[-1][1])) + 1
    prompt = render_prompt(tok, LONG, max_len - answer)
    assert len(train_ids) <= max_len and train_ids[: len(prompt)] == prompt  # token for token
    assert mask[len(prompt) - 1] == 0 and mask[len(prompt)] == 1  # the answer starts right after
    # the REPL and the server leave room for the answer the same way, but never cut the last question or the
    # system text (30 ids): at 50 they keep them whole and the answer gets the other 20
    whole_last = render_prompt(tok, Conversation(LONG.turns[-1:], LONG.system))
    assert prompt_ids(tok, LONG, max_seq_len=max_len, max_new_tokens=answer) == (prompt if max_len > 50 else whole_last)
    kept = tok.decode(prompt)
    assert "第9个问题" in kept and "第0个问题" not in kept
    assert kept.startswith("系统\n") == (max_len > 50)  # the system text stays while whole turns go


def test_a_prompt_too_long_for_any_turn_keeps_its_end(bpe_tokenizer):
    tok = bpe_tokenizer
    conv = Conversation([("很长的问题" * 40 + "结尾问句？", "")])
    full = render_prompt(tok, conv)
    assert render_prompt(tok, conv, 30) == full[-30:] and full[-1] == tok.bos_id


def test_records_and_openai_messages_map_to_the_same_conversation():
    messages = [("system", "你是助手"), ("user", "你好"), ("assistant", "你好！"), ("user", "第一句"),
                ("user", "第二句"), ("assistant", "收到"), ("system", "简洁回答")]
    record = {"conversations": [{"role": r, "content": c} for r, c in messages]}
    sharegpt = {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(r, r), "value": c}
                                  for r, c in messages]}
    expected = Conversation([("你好", "你好！"), ("第一句\n第二句", "收到")], "你是助手\n简洁回答")
    assert conversation_from_record(record) == conversation_from_record(sharegpt) == expected
    asked = conversation_from_messages(messages[:-2] + messages[-1:], add_generation_prompt=True)
    assert asked == Conversation([("你好", "你好！"), ("第一句\n第二句", "")], "你是助手\n简洁回答")
    for rule, bad in [("first message", [("assistant", "先说"), ("user", "问"), ("assistant", "答")]),
                      ("last message must come from the assistant", [("user", "问")]),
                      ("only system", [("system", "系统")])]:
        with pytest.raises(ValueError, match=rule):
            conversation_from_record({"conversations": [{"role": r, "content": c} for r, c in bad]})
    with pytest.raises(ValueError, match="last message must come from the user"):
        conversation_from_messages([("user", "问"), ("assistant", "答")], add_generation_prompt=True)


def test_sharegpt_v3_assistant_roles_are_read_and_a_bad_item_says_which_and_what():
    """ShareGPT V3's "chatgpt" and "bing" items, and {"role": "user", "content": 5}, were all "a conversations item
    lacks a known role or a text content"; the assistant names are answers, and a bad item is named with its fault."""
    for name in ("gpt", "chatgpt", "bing", "bard", "assistant"):
        record = {"conversations": [{"from": "human", "value": "问"}, {"from": name, "value": "答"}]}
        assert conversation_from_record(record) == Conversation([("问", "答")])
    known = "system, developer, user, human, assistant, gpt, chatgpt, bing, bard"
    for items, why in [
        ([{"from": "human", "value": "问"}, {"from": "function_call", "value": "{}"}],
         f"conversations item 2: unknown role 'function_call' (known: {known})"),
        ([{"role": "user", "content": 5}],
         "conversations item 1: its 'content' is a number, not a string or a list of text parts"),
        ([{"from": "human", "value": None}],
         "conversations item 1: its 'value' is null, not a string or a list of text parts"),
        ([{"role": "user", "content": "问"}, {"role": None, "content": "答"}],
         "conversations item 2: its 'role' is null, not a string"),
        ([{"from": 1, "value": "问"}], "conversations item 1: its 'from' is a number, not a string"),
        ([{"content": "问"}], "conversations item 1: no 'role' (or 'from')"),
        ([{"role": "user"}], "conversations item 1: no 'content' (or 'value')"),
        ([{"role": "user", "content": "问"}, "答"], "conversations item 2: a string, not an object with a role and a "
                                                    "content")]:
        with pytest.raises(ValueError) as e:
            conversation_from_record({"conversations": items})
        assert str(e.value) == why


MESSAGES = [{"role": "developer", "content": "简洁"}, {"role": "system", "content": "你是助手"},
            {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
            {"role": "user", "content": [{"type": "text", "text": "第一"}, {"type": "text", "text": "句"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "收到"}]}]


def test_openai_messages_records_read_as_conversations_records():
    """OpenAI's fine-tuning format and TRL's conversational one, {"messages": [...]}, was "not an instruction,
    prompt/answer or conversations record": its messages are read as a `conversations` list's, the developer role as
    system and a content of text parts as their texts joined with ""."""
    assert messages_of_record({"messages": MESSAGES}) == [
        ("system", "简洁"), ("system", "你是助手"), ("user", "你好"), ("assistant", "你好！"), ("user", "第一句"),
        ("assistant", "收到")]
    expected = Conversation([("你好", "你好！"), ("第一句", "收到")], "简洁\n你是助手")
    assert conversation_from_record({"messages": MESSAGES}) == conversation_from_record(
        {"conversations": MESSAGES}) == expected
    empty_parts = [{"role": "user", "content": "问"}, {"role": "assistant", "content": []}]
    assert conversation_from_record({"messages": empty_parts}) == Conversation([("问", "")])
    # both: `conversations` is read, whatever `messages` holds
    assert conversation_from_record({"conversations": MESSAGES[2:4], "messages": "not read"}) == Conversation(
        [("你好", "你好！")])


def test_a_messages_item_that_is_no_text_message_says_which_and_why():
    """Images, audio, tool calls and tool results are not text the model can train on: the record is bad, its
    reason naming the item and what it holds."""
    user = {"role": "user", "content": "问"}
    for item, why in [
            ({"role": "user", "content": [{"type": "text", "text": "看图"},
                                          {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
             "messages item 2: a content part of type 'image_url'; only text parts are read"),
            ({"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]},
             "messages item 2: a content part of type 'input_audio'; only text parts are read"),
            ({"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
             "messages item 2: a message of role 'assistant' with 'tool_calls'; tool calls are not read"),
            ({"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}},
             "messages item 2: a message of role 'assistant' with 'function_call'; tool calls are not read"),
            ({"role": "tool", "tool_call_id": "1", "content": "42"},
             "messages item 2: unknown role 'tool' (known: system, developer, user, human, assistant, gpt, chatgpt, "
             "bing, bard)"),
            ({"role": "ipython", "content": "42"}, "messages item 2: unknown role 'ipython' (known: system, developer, "
                                                   "user, human, assistant, gpt, chatgpt, bing, bard)"),
            ({"role": "user", "content": ["看图"]},
             "messages item 2: a content part that is a string, not an object with a type"),
            ({"role": "user", "content": [{"text": "问"}]}, "messages item 2: a content part has no 'type'"),
            ({"role": "user", "content": [{"type": None, "text": "问"}]},
             "messages item 2: a content part whose 'type' is null, not a string"),
            ({"role": "user", "content": [{"type": "text"}]}, "messages item 2: a text part has no 'text'"),
            ({"role": "user", "content": [{"type": "text", "text": 5}]},
             "messages item 2: a text part whose 'text' is a number, not a string"),
            ({"role": "user", "content": {"type": "text", "text": "问"}},
             "messages item 2: its 'content' is an object, not a string or a list of text parts")]:
        with pytest.raises(ValueError) as e:
            conversation_from_record({"messages": [user, item]})
        assert str(e.value) == why, item
    for record, why in [({"messages": "你好"}, "its 'messages' is a string, not a list of messages"),
                        ({"messages": []}, "its 'messages' list is empty: there is no message")]:
        with pytest.raises(ValueError) as e:
            conversation_from_record(record)
        assert str(e.value) == why


def test_an_absent_field_is_said_to_be_absent_and_a_preference_record_to_be_one():
    """A field that is not there was "null" ("its 'completion' is null, not a list of messages" for a prompt list
    without a completion), and a preference record given to SFT was "not an instruction ... record" or that, or read
    as its prompt and completion beside a `chosen` alone: a record with a field of a pair's answers (`chosen`,
    `rejected`, MedicalGPT's `response_chosen`, OpenAI's `preferred_output`, ...) is said to be one, for `babyllama
    dpo`, as prepare and dpo tell a preference record by them."""
    user, answer = [{"role": "user", "content": "问"}], [{"role": "assistant", "content": "答"}]
    preference = "it is a preference record ('chosen' and 'rejected'), which `babyllama dpo` reads"
    for record, why in [
            ({"prompt": user}, "it lacks 'completion', a list of messages"),
            ({"prompt": user, "completion": None}, "its 'completion' is null, not a list of messages"),
            ({"prompt": user, "chosen": answer, "rejected": answer}, preference),
            ({"prompt": "问", "chosen": "好", "rejected": "坏"}, preference),
            ({"chosen": user + answer, "rejected": user + answer}, preference),
            ({"conversations": user, "chosen": answer[0], "rejected": answer[0]}, preference),
            ({"prompt": "问", "completion": "答", "chosen": "好"},  # read as its prompt and completion
             "it is a preference record ('chosen'), bad for `babyllama dpo` too: its 'rejected' is missing"),
            ({"question": "问", "response_chosen": "好", "response_rejected": "坏"},  # "not an instruction ..."
             "it is a preference record ('response_chosen' and 'response_rejected'), which `babyllama dpo` reads")]:
        with pytest.raises(ValueError) as e:
            conversation_from_record(record)
        assert str(e.value) == why, record


def test_instruction_and_prompt_answer_records():
    assert conversation_from_record({"instruction": "翻译：", "input": "你好", "output": "Hello"}) == Conversation(
        [("翻译：你好", "Hello")])
    assert conversation_from_record({"prompt": "问", "answer": "答"}) == Conversation([("问", "答")])
    assert conversation_from_record({"instruction": "问", "output": ""}) == Conversation([("问", "")])  # kept
    with pytest.raises(ValueError, match="lone surrogate"):
        conversation_from_record(json.loads('{"instruction": "q\\ud800", "output": "a"}'))
    for bad in ({"text": "x"}, {"instruction": 5, "output": "x"}, {"conversations": [{"role": "x", "content": ""}]}):
        with pytest.raises(ValueError):
            conversation_from_record(bad)


def test_a_field_of_another_type_is_named_with_its_type():
    """`{"instruction": 123, ...}`, `{"output": ["a"]}` and `{"input": {"a": 1}}` were "not an instruction,
    prompt/answer or conversations record", though they are, with a field of the wrong type: the reason names it and
    its type, as DPO's and eval's do; so does a null answer beside a question (`"completion": null`). A field of a
    shape that is not there is named missing, as the README says: `{"instruction": "q"}` was "not an instruction, ...
    record"."""
    for record, why in [
            ({"instruction": 123, "output": "x"}, "its 'instruction' is a number, not a string"),
            ({"instruction": "问", "output": ["a"]}, "its 'output' is a list, not a string"),
            ({"instruction": "问", "input": {"a": 1}, "output": "答"}, "its 'input' is an object, not a string"),
            ({"prompt": "问", "answer": True}, "its 'answer' is true or false, not a string"),
            ({"conversations": "notalist"}, "its 'conversations' is a string, not a list of messages"),
            ({"conversations": None}, "its 'conversations' is null, not a list of messages"),
            ({"instruction": "问", "input": "", "output": None}, "its 'output' is null, not a string"),
            ({"prompt": "问", "completion": None}, "its 'completion' is null, not a string"),
            ({"prompt": "问", "answer": None}, "its 'answer' is null, not a string"),
            ({"prompt": None, "completion": None, "instruction": "问", "output": None},  # a parquet row of mixed shapes
             "its 'output' is null, not a string"),
            ({"instruction": "问"}, "its 'output' is missing"),  # the README: a field not there is named missing
            ({"instruction": "问", "input": "补充"}, "its 'output' is missing"),
            ({"prompt": "问"}, "its 'answer' (or 'completion') is missing"),
            ({"output": "答"}, "its 'instruction' is missing"),
            ({"input": "补充", "output": "答"}, "its 'instruction' is missing"),
            ({"completion": "答"}, "its 'prompt' is missing"),
            ({"question": "问", "response": "答"}, "not an instruction, prompt/answer, prompt/completion, "
                                                  "conversations or messages record")]:
        with pytest.raises(ValueError) as e:
            conversation_from_record(record)
        assert str(e.value) == why, record


def test_a_records_system_and_history_come_before_its_own_turns():
    """LLaMA-Factory's alpaca (`system`, `history`) and sharegpt (`system` beside `conversations`) fields were
    dropped: the system text and the earlier turns are the conversation's, as if its messages held them."""
    turns = [{"role": "user", "content": "问二"}, {"role": "assistant", "content": "答二"}]
    in_messages = {"conversations": [{"role": "system", "content": "你是助手"}, *turns]}
    assert conversation_from_record({"system": "你是助手", "conversations": turns}) == conversation_from_record(
        in_messages) == Conversation([("问二", "答二")], "你是助手")
    alpaca = {"system": "你是助手", "instruction": "问四", "input": "", "output": "答四",
              "history": [["早先的问", "早先的答"], ["再问", "再答"]]}
    assert conversation_from_record(alpaca) == Conversation(
        [("早先的问", "早先的答"), ("再问", "再答"), ("问四", "答四")], "你是助手")
    assert conversation_from_record({"prompt": "问", "answer": "答", "system": "", "history": []}) == Conversation(
        [("问", "答")])  # empty: none, as are null and an empty CSV cell
    assert conversation_from_record({"prompt": "问", "answer": "答", "system": None, "history": ""}) == Conversation(
        [("问", "答")])
    for field, value in [("system", 5), ("system", ["你是助手"]), ("history", "早先的问"), ("history", [["只有问"]]),
                         ("history", [["问", 1]]), ("history", {"问": "答"})]:
        with pytest.raises(ValueError, match=f"its '{field}' is (a list|a number|not a)"):
            conversation_from_record({"instruction": "问", "output": "答", field: value})


def test_line_ends_are_newlines_in_sft_dpo_eval_serve_and_the_template_as_prepare_makes_them(tmp_path):
    """SFT kept a "\\r\\n" inside a prompt (a Windows file's), where prepare's cleaning makes it "\\n" and chat and
    the chat page send "\\n": the model trained on a "\\r" it is never asked with. Every text of the chat format has
    its line ends made "\\n" ("\\r" alone too), in SFT's, DPO's and eval's records, serve's messages and the Jinja
    template alike; eval's leakage check compares the texts so made."""
    import jinja2

    from babyllama.chat_format import CHAT_TEMPLATE
    from babyllama.data.preferences import preference_from_record
    from babyllama.evaluate import leakage, qa_item

    record = {"system": "系统\r\n第二行", "instruction": "问题二\r\n第二行", "output": "答\r一\r\n"}
    conv = Conversation([("问题二\n第二行", "答\n一\n")], "系统\n第二行")
    assert conversation_from_record(record) == conv
    parts = [{"type": "text", "text": "答\r"}, {"type": "text", "text": "一\r\n"}]
    assert conversation_from_record({"messages": [{"role": "system", "content": "系统\r\n第二行"},
                                                  {"role": "user", "content": "问题二\r\n第二行"},
                                                  {"role": "assistant", "content": parts}]}) == conv
    pair = {"prompt": "问题二\r\n第二行", "chosen": "答\r\n一",
            "rejected": [{"role": "assistant", "content": "答\r二"}]}
    assert preference_from_record(pair) == (Conversation([("问题二\n第二行", "")]), "答\n一", "答\n二")
    assert qa_item({"question": "问题二\r\n第二行", "answer": "答\r\n一"}, "") == {
        "question": "问题二\n第二行", "reference": "答\n一", "task": "qa"}
    messages = [{"role": "system", "content": "系统\r\n第二行"}, {"role": "user", "content": "问题二\r第二行"}]
    template = jinja2.Environment().from_string(CHAT_TEMPLATE)
    assert template.render(messages=messages, bos_token="<s>", eos_token="</s>") == "系统\n第二行\n问题二\n第二行<s>"
    assert conversation_from_messages([(m["role"], m["content"]) for m in messages], True) == Conversation(
        [("问题二\n第二行", "")], "系统\n第二行")
    (tmp_path / "train.jsonl").write_text(json.dumps({"instruction": "问题二\r\n第二行的更多文字", "output": "x"},
                                                     ensure_ascii=False) + "\n")
    assert leakage(["问题二\n第二行的更多", "问题三\r\n第二行的"], [tmp_path / "train.jsonl"])["leaked"] == 1


def test_text_prompt_starts_after_an_eos(bpe_tokenizer):
    assert text_prompt(bpe_tokenizer, "今天天气") == [bpe_tokenizer.eos_id, *bpe_tokenizer.encode("今天天气")]


def test_truncation_drops_the_turns_that_re_rendering_each_start_would(bpe_tokenizer):
    """Linear truncation keeps the oldest turn that the quadratic reference (render every suffix) keeps."""
    import random

    from tests.conftest import generated_corpus

    rng, texts = random.Random(3), generated_corpus(60, seed=4)
    for _ in range(60):
        turns = [(rng.choice(texts)[: rng.randrange(1, 60)], rng.choice(texts)[: rng.randrange(0, 40)])
                 for _ in range(rng.randrange(1, 9))]
        conv = Conversation(turns, rng.choice(["", "你是一个乐于助人的助手。", " 系统 "]))
        for generation in (False, True):
            max_len = rng.randrange(8, 300)
            reference = next((render_conversation(bpe_tokenizer, Conversation(turns[s:], conv.system), generation)
                              for s in range(len(turns)) if len(render_conversation(
                                  bpe_tokenizer, Conversation(turns[s:], conv.system), generation)[0]) <= max_len),
                             None)
            got = truncate_conversation(bpe_tokenizer, conv, max_len, generation)
            assert got == reference if reference is not None else len(got[0]) <= max_len


def test_truncation_tokenizes_each_text_about_once(bpe_tokenizer, monkeypatch):
    from tests.conftest import generated_corpus

    encoded = []
    encode = bpe_tokenizer._encode_many
    monkeypatch.setattr(bpe_tokenizer, "_encode_many", lambda texts: encoded.extend(texts) or encode(texts))
    texts = generated_corpus(126)
    conv = Conversation([(texts[i], texts[i + 1]) for i in range(0, 126, 2)] + [("你好", "")], "你是助手。")
    prompt = render_prompt(bpe_tokenizer, conv, max_len=600)
    size = lambda strings: sum(map(len, strings))
    assert size(encoded) < 1.2 * size([conv.system, *(u + a for u, a in conv.turns)])  # re-rendering: ~30x
    suffixes = (render_conversation(bpe_tokenizer, Conversation(conv.turns[s:], conv.system), True)[0]
                for s in range(len(conv.turns)))
    assert prompt == next(ids for ids in suffixes if len(ids) <= 600) and len(conv.turns) - prompt.count(1) > 50


def test_a_cut_answer_ends_with_a_whole_character_and_a_cut_without_question_or_answer_is_none(bpe_tokenizer):
    """Truncation cut the last answer inside a character whose bytes are several byte-level tokens: '答答\ufffd</s>'
    was trained on. It now ends with the last whole character. A context so small that only the question's <bos>
    (max_seq_len 2) or no whole character of the answer is left made a sample without a question or an answer:
    there is none."""
    tok, per = bpe_tokenizer, len(bpe_tokenizer.encode("龘"))
    assert per == 3 and tok.encode("龘" * 20) == tok.encode("龘") * 20  # 3 tokens each: a cut may fall inside one
    conv = Conversation([("短", "龘" * 20)])
    prompt = [*tok.encode("短"), tok.bos_id]
    for max_len in range(len(prompt) + 4, len(prompt) + 12):
        ids, mask = truncate_conversation(tok, conv, max_len)
        kept = (max_len - len(prompt) - 1) // per * per
        assert ids == prompt + tok.encode("龘") * (kept // per) + [tok.eos_id], max_len
        assert mask == [0] * len(prompt) + [1] * (kept + 1)
    assert truncate_conversation(tok, conv, len(prompt) + 3) == ([], [])  # 2 of the 3 tokens of one character
    long = Conversation([("很长的问题" * 4, "很长的回答" * 4)])
    assert truncate_conversation(tok, long, 3) == ([], [])  # <bos> alone would be left of the question
    assert truncate_conversation(tok, long, 4) == ([], [])  # one id of it, the tail of 题: none (below)
    assert truncate_conversation(tok, long, 6)[0][:3] == [*tok.encode("题"), tok.bos_id]  # 题 whole and <bos>


FOUR_BYTES = "问😀题𠀀好🚀" * 3 + "？"  # 4-byte characters (emoji, CJK Ext-B): 4 byte tokens or pieces each


@functools.cache
def chatglm2() -> Tokenizer:
    return load_tokenizer(CHATGLM2)


@pytest.fixture(params=["bpe", "chatglm2"])
def byte_tokenizer(request, bpe_tokenizer) -> Tokenizer:
    """The byte-level BPE that babyllama trains, whose 😀 is 4 byte-level tokens, and ChatGLM2's SentencePiece, whose
    𠀀 is 4 byte fallback pieces <0xF0><0xA0><0x80><0x80>."""
    if request.param == "bpe":
        return bpe_tokenizer
    if not CHATGLM2.is_file():
        pytest.skip("ChatGLM2 tokenizer.model not present")
    pytest.importorskip("sentencepiece")
    return chatglm2()


def assert_longest_whole_end(tok: Tokenizer, full: list[int], kept: list[int], n: int, text: str) -> None:
    """kept is the longest end of full of at most n ids that begins with a whole character: its text is an end of
    text, with no U+FFFD (a character's tail) at its start, and each longer end that fits begins with one."""
    assert len(kept) <= n and kept == full[len(full) - len(kept) :], n
    shown = tok.decode(kept)
    assert not shown.startswith("\ufffd") and text.endswith(shown), (n, shown)
    for start in range(max(len(full) - n, 0), len(full) - len(kept)):  # the ids it dropped: a character's tail
        assert tok.decode(full[start:]).startswith("\ufffd"), (n, start)


def test_a_prompt_cut_at_any_offset_begins_with_a_whole_character(byte_tokenizer):
    """The beginning of a prompt too long for the context was cut at an id: where it fell inside a 4-byte character,
    the prompt began with the character's last bytes, and the model was asked (and SFT trained on) '\ufffd\ufffd题...'.
    The ids of the cut character's tail now go too, for chat, serve and eval (render_prompt) as for SFT and DPO
    (truncate_conversation), at each offset into the question."""
    tok = byte_tokenizer
    conv = Conversation([(FOUR_BYTES, "")])
    full = render_prompt(tok, conv)
    for max_len in range(1, len(full) + 1):
        assert_longest_whole_end(tok, full, render_prompt(tok, conv, max_len), max_len, FOUR_BYTES)
    answer = [*tok.encode("好"), tok.eos_id]
    for max_len in range(len(answer) + 2, len(full) + len(answer)):  # the prompt keeps max_len - len(answer) ids
        ids, mask = truncate_conversation(tok, Conversation([(FOUR_BYTES, "好")]), max_len)
        prompt = ids[: len(ids) - len(answer)] if ids else [tok.bos_id]  # none: no whole character of it fits
        assert_longest_whole_end(tok, full, prompt, max_len - len(answer), FOUR_BYTES)
        assert (ids, mask) == ((prompt + answer, [0] * len(prompt) + [1] * len(answer)) if len(prompt) > 1 else
                               ([], []))


def test_a_cut_through_a_four_byte_character_drops_its_tail_exactly(bpe_tokenizer):
    tok = bpe_tokenizer
    full = render_prompt(tok, Conversation([("问😀题", "")]))
    assert full == [*tok.encode("问"), *tok.encode("😀"), *tok.encode("题"), tok.bos_id]
    assert len(tok.encode("😀")) == 4 and len(tok.encode("题")) == 2  # a cut to 5 ids keeps 2 of 😀's 4
    assert tok.decode(full[-5:]) == "\ufffd\ufffd题"
    assert render_prompt(tok, Conversation([("问😀题", "")]), 5) == [*tok.encode("题"), tok.bos_id]
    ids, mask = truncate_conversation(tok, Conversation([("问😀题", "好")]), 5 + 2)  # SFT's: 好 <eos> after
    assert (ids, mask) == ([*tok.encode("题"), tok.bos_id, *tok.encode("好"), tok.eos_id], [0, 0, 0, 1, 1])
    if CHATGLM2.is_file():  # ChatGLM2's 𠀀 is 4 byte pieces: a cut to 4 ids keeps its last 2, <0x80><0x80>
        sp = chatglm2()
        assert render_prompt(sp, Conversation([("问𠀀好", "")])) == [30910, 54761, 243, 163, 131, 131, 54591, 1]
        assert render_prompt(sp, Conversation([("问𠀀好", "")]), 4) == [54591, 1]  # 好, <s>


def test_prompt_completion_records_read_as_an_instruction_pair_or_a_conversation(bpe_tokenizer):
    """OpenAI's legacy fine-tuning format and TRL's prompt-completion type, {"prompt": ..., "completion": ...}, were
    "not an instruction, prompt/answer, conversations or messages record": strings are a prompt / answer pair, lists
    of messages a conversation whose completion alone carries loss, as TRL trains on it alone."""
    assert conversation_from_record({"prompt": "问", "completion": "答"}) == Conversation([("问", "答")])
    both = {"prompt": "问", "answer": "答", "completion": "不读"}
    assert conversation_from_record(both) == Conversation([("问", "答")])
    assert conversation_from_record({"prompt": [{"role": "user", "content": "你好"}],
                                     "completion": [{"role": "assistant", "content": "你好！"}]}) == Conversation(
        [("你好", "你好！")])
    record = {"prompt": [{"role": "system", "content": "系统"}, {"role": "user", "content": "问一"},
                         {"role": "assistant", "content": "答一"}, {"role": "user", "content": "问二"}],
              "completion": [{"role": "assistant", "content": "答二"},
                             {"role": "assistant", "content": [{"type": "text", "text": "续"}]}]}
    conv = conversation_from_record(record)
    assert conv == Conversation([("问一", "答一"), ("问二", "答二\n续")], "系统", frozenset({0}))
    tok = bpe_tokenizer
    ids, mask = render_conversation(tok, conv)
    first = [*tok.encode("系统\n问一"), 1, *tok.encode("答一"), 2, *tok.encode("问二"), 1]
    assert ids == [*first, *tok.encode("答二\n续"), 2]
    assert mask == [0] * len(first) + [1] * (len(tok.encode("答二\n续")) + 1)  # the completion and its <eos> alone
    user, answer = {"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}
    for bad, why in [
            ({"prompt": [user, answer], "completion": [answer]},
             "its 'prompt' ends with the assistant's message, not the user's that the completion answers"),
            ({"prompt": [user], "completion": [answer, user]},
             "its 'completion' holds a user message; a completion is the assistant's answer alone"),
            ({"prompt": [user], "completion": "答"}, "its 'completion' is a string, not a list of messages"),
            ({"prompt": [user], "completion": []}, "its 'completion' list is empty: there is no message"),
            ({"prompt": "问", "completion": [answer]}, "its 'completion' is a list, not a string"),
            ({"prompt": [user], "completion": [{**answer, "weight": 0}]},
             "no answer carries loss (each has a 'weight' of 0), so there is nothing to train on")]:
        with pytest.raises(ValueError) as e:
            conversation_from_record(bad)
        assert str(e.value) == why, bad


def test_an_assistant_message_of_weight_0_carries_no_loss(bpe_tokenizer):
    """OpenAI's per-message "weight": 0 (do not train on this message) was ignored: the message was trained on. Its
    answer is masked as a prompt is, the turns after the last answer with loss go, and any other weight is a bad
    record that says which message and why."""
    tok = bpe_tokenizer
    messages = [{"role": "user", "content": "问一"}, {"role": "assistant", "content": "答一", "weight": 1},
                {"role": "user", "content": "问二"}, {"role": "assistant", "content": "答二", "weight": 0},
                {"role": "user", "content": "问三"}, {"role": "assistant", "content": "答三", "weight": None}]
    conv = conversation_from_record({"messages": messages})
    assert conv == Conversation([("问一", "答一"), ("问二", "答二"), ("问三", "答三")], untrained=frozenset({1}))
    ids, mask = render_conversation(tok, conv)
    parts = [(tok.encode("问一") + [1], 0), (tok.encode("答一") + [2], 1), (tok.encode("问二") + [1], 0),
             (tok.encode("答二") + [2], 0), (tok.encode("问三") + [1], 0), (tok.encode("答三") + [2], 1)]
    assert ids == [i for part, _ in parts for i in part]
    assert mask == [m for part, m in parts for _ in part]
    cut = len(ids) - len(parts[0][0]) - len(parts[1][0])  # the first turn goes: the weight stays with its answer
    assert truncate_conversation(tok, conv, cut) == (ids[-cut:], mask[-cut:])
    long = [("很长的问题" * 8, "很长的回答" * 8)]  # cut inside its one turn: the same ids, no loss where none was
    trained = truncate_conversation(tok, Conversation(long), 16)
    untrained = truncate_conversation(tok, Conversation(long, untrained=frozenset({0})), 16)
    assert untrained == (trained[0], [0] * len(trained[0])) and 1 in trained[1]
    # the turns after the last answer with loss go; a record without one is bad
    trailing = {"messages": [*messages[:4], {**messages[4]}, {**messages[5], "weight": 0}]}
    assert conversation_from_record(trailing) == Conversation([("问一", "答一")])
    blank = {"messages": [*messages[:2], {"role": "user", "content": " "}, {**messages[5], "weight": 0}]}
    assert conversation_from_record(blank) == Conversation([("问一", "答一")])  # was bad for the turn that goes
    user = {"role": "user", "content": "问"}
    for items, why in [
            ([user, {"role": "assistant", "content": "答", "weight": 0}],
             "no answer carries loss (each has a 'weight' of 0), so there is nothing to train on"),
            ([user, {"role": "assistant", "content": "答", "weight": 0.5}],
             "messages item 2: its 'weight' is 0.5, not 0 or 1"),
            ([user, {"role": "assistant", "content": "答", "weight": "0"}],
             "messages item 2: its 'weight' is a string, not 0 or 1"),
            ([user, {"role": "assistant", "content": "答", "weight": True}],
             "messages item 2: its 'weight' is true or false, not 0 or 1"),
            ([{**user, "weight": 1}, {"role": "assistant", "content": "答"}],
             "messages item 1: a 'weight' on a message of role 'user'; only the assistant's messages have one"),
            ([user, {"role": "assistant", "content": "答", "weight": 0}, {"role": "assistant", "content": "又答"}],
             "two assistant messages in a row, joined into one answer, differ in their 'weight' (0 and 1)")]:
        with pytest.raises(ValueError) as e:
            conversation_from_record({"messages": items})
        assert str(e.value) == why, items


def test_a_null_conversation_field_is_an_absent_one():
    """A parquet or Hugging Face datasets export keeps the columns a row lacks as null: `"messages": null` beside a
    prompt and completion was read as the record's messages and made it bad ("its 'messages' is null")."""
    user, answer = {"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}
    for record in ({"messages": None, "prompt": "问", "completion": "答"},
                   {"conversations": None, "messages": [user, answer]},
                   {"chosen": None, "rejected": None, "prompt": "问", "answer": "答"}):
        assert conversation_from_record(record) == Conversation([("问", "答")]), record
    with pytest.raises(ValueError, match="^its 'messages' is null, not a list of messages$"):  # and nothing else
        conversation_from_record({"messages": None})


def mixed_text(rng: random.Random, n: int) -> str:
    """n characters in short runs of CJK, emoji (a ZWJ family too), ASCII words, digits, punctuation and whitespace."""
    kinds = [lambda: "".join(rng.choices("天地玄黄宇宙洪荒日月问题回答的是了", k=rng.randrange(1, 6))),
             lambda: rng.choice(["😀", "🚀", "👨‍👩‍👧", "✓", "𠀀"]),
             lambda: " " + "".join(rng.choices(string.ascii_letters, k=rng.randrange(1, 9))),
             lambda: "".join(rng.choices(string.digits, k=rng.randrange(1, 12))),
             lambda: rng.choice(["，", "。", "？", "!", " ", "\n", "\t", "  "])]
    out: list[str] = []
    while sum(map(len, out)) < n:
        out.append(rng.choice(kinds)())
    return "".join(out)[:n]


def whole_texts(monkeypatch) -> None:
    """Truncation as it was: every text tokenized whole (the reference of the bound)."""
    monkeypatch.setattr(chat_format, "bounded_ids", lambda tok, texts, max_len, keep_end: tok.encode_batch(texts))


def encoded_lengths(monkeypatch, tok: Tokenizer) -> list[int]:
    """The characters of each text that tok tokenizes from now on."""
    lengths: list[int] = []
    encode = tok._encode_many
    monkeypatch.setattr(tok, "_encode_many", lambda texts: lengths.extend(map(len, texts)) or encode(texts))
    return lengths


@pytest.mark.parametrize("max_len", [8, 32, 128])
def test_a_long_text_is_tokenized_from_the_characters_a_cut_keeps_alone_and_cuts_as_whole(byte_tokenizer, max_len,
                                                                                          monkeypatch):
    """Every text was tokenized whole before the cut to max_len ids: a 2,000,000-character answer took 1 GB and 21 s
    to keep 128 ids. A text longer than C = (max_len + CUT_MARGIN) * longest_piece characters is now tokenized from
    its first C characters (an answer, whose beginning a cut keeps) or its last C (a question, a system text: the
    prompt keeps its end), then from longest_piece cuts of at most C + longest_piece characters that must agree, and
    the ids, mask and cut are those of the whole texts: the turns kept, the question's end, the answer's beginning,
    for training and for generation, one turn or several."""
    tok, rng = byte_tokenizer, random.Random(max_len)
    cap = (max_len + CUT_MARGIN) * longest_piece(tok)
    size = lambda: rng.choice([rng.randrange(1, 9), rng.randrange(cap // 4, cap), rng.randrange(cap + 1, 3 * cap)])
    convs = [Conversation([(mixed_text(rng, size()), mixed_text(rng, size())) for _ in range(rng.randrange(1, 4))],
                          rng.choice(["", "系统", mixed_text(rng, 3 * cap)])) for _ in range(12)]
    convs.append(Conversation([("问", mixed_text(rng, 3 * cap))]))  # a long answer alone: its beginning stays
    convs.append(Conversation([(mixed_text(rng, 3 * cap), "答")]))  # a long question alone: its end stays
    lengths = encoded_lengths(monkeypatch, tok)
    got = [cut_conversation(tok, c, max_len, g) for c in convs for g in (False, True)]
    assert cap <= max(lengths) <= cap + longest_piece(tok)  # each long text from C characters, then from its cuts
    whole_texts(monkeypatch)
    assert got == [cut_conversation(tok, c, max_len, g) for c in convs for g in (False, True)]
    assert max(lengths) >= 3 * cap  # the reference tokenized them whole
    assert sum(cut for _, _, cut in got) > 12 and all(len(ids) <= max_len for ids, _, _ in got)


@pytest.fixture(params=["bpe", "chatglm2"])
def run_tokenizer(request) -> Tokenizer:
    """Tokenizers that pair a run of 哈 from its start, so that where a run begins changes every id of it: a BPE
    trained on such runs, and ChatGLM2's SentencePiece BPE."""
    if request.param == "bpe":
        return train_bpe(["哈" * 16 + "=" * 16] * 20 + generated_corpus(50), 400)
    if not CHATGLM2.is_file():
        pytest.skip("ChatGLM2 tokenizer.model not present")
    pytest.importorskip("sentencepiece")
    return chatglm2()


def test_a_question_that_ends_in_a_long_run_is_tokenized_whole(run_tokenizer, monkeypatch):
    """A run of one character that reaches from where a long question is shortened to the ids a cut keeps: its ids
    counted from the shortened start are other ids than the whole text's (the pairs of 哈 begin elsewhere), and
    truncation would have kept them. The shortened starts disagree there, so the question is tokenized whole."""
    tok, max_len = run_tokenizer, 32
    cap = (max_len + CUT_MARGIN) * longest_piece(tok)
    convs = [Conversation([("问" + "哈" * (2 * cap + extra) + end, "好")]) for extra in range(4) for end in ("", "？")]
    shortened = [tok.encode(c.turns[0][0][-cap:])[-max_len:] for c in convs]
    assert sum(ids != tok.encode(c.turns[0][0])[-max_len:] for ids, c in zip(shortened, convs, strict=True)) >= 4
    lengths = encoded_lengths(monkeypatch, tok)
    got = [cut_conversation(tok, c, max_len, g) for c in convs for g in (False, True)]
    assert max(lengths) == len(convs[-1].turns[0][0])  # tokenized whole
    whole_texts(monkeypatch)
    assert got == [cut_conversation(tok, c, max_len, g) for c in convs for g in (False, True)]


def merges_bpe(merges: list[tuple[str, str]], prefix: bool) -> Tokenizer:
    """A BPE of x, y, z, a, t, the given merges, ranked in their order, and their pieces; prefix: a dummy prefix `▁`
    before every text, as ChatGLM2's SentencePiece and Llama's tokenizers add."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, normalizers

    pieces = ["<pad>", "<s>", "</s>", "<unk>", "▁", *"xyzat", *(p for pair in merges for p in (*pair, "".join(pair)))]
    tok = RustTokenizer(models.BPE({p: i for i, p in enumerate(dict.fromkeys(pieces))}, merges, unk_token="<unk>"))
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>"])
    if prefix:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse()] +
                                    [decoders.Strip(" ", 1, 0)] * prefix)
    return HFTokenizer(tok, bos_id=1, eos_id=2, pad_id=0)


CHAIN = [("x", "y"), ("xy", "z"), ("z", "a"), ("a", "a"), ("aa", "aa")]  # xy takes z, else z takes a run's first a
DUMMY = [("▁", "x"), ("▁", "t"), ("a", "t"), ("▁", "at"), ("at", "a"), ("a", "a"), ("aa", "aa")]  # ChatGLM2's, below


@pytest.mark.parametrize(("merges", "prefix", "head"), [(CHAIN, False, "xyz"), (DUMMY, True, "xat")])
def test_a_run_whose_pairs_begin_two_characters_before_the_cut_is_cut_as_whole(merges, prefix, head, monkeypatch):
    """A question shortened to its last C characters was checked against its last C + 1, and tokenized whole only
    where the two disagreed on the ids kept; a character 2 before the cut that changes where the pairs of a run begin
    passed unseen. xyz + a run: xy takes z, so the run pairs from its first a, but alone z or yz leaves z to take it.
    xat + a run, behind a dummy prefix: ▁x leaves at to take the run's first a, but ▁t or ▁at takes none. The
    question is now tokenized from as many cuts as a piece has characters, one of which begins where the whole
    text's ids do, and as whole where they disagree: its ids are the whole text's, and so with more text before."""
    tok, max_len = merges_bpe(merges, prefix), 16
    cap = (max_len + CUT_MARGIN) * longest_piece(tok)
    question = head + "a" * (cap - 1)  # C + 2 characters
    whole, shortened = tok.encode(question)[-max_len:], tok.encode(question[-cap:])[-max_len:]
    assert shortened == tok.encode(question[-cap - 1 :])[-max_len:] != whole  # what the one-more check missed
    convs = [Conversation([(lead + head + "a" * (cap + extra), "ya")]) for lead in ("", "y" * 40) for extra in
             range(-1, 4)]
    got = [cut_conversation(tok, c, max_len, g) for c in convs for g in (False, True)]
    answer = [tok.bos_id, *tok.encode("ya"), tok.eos_id]
    assert got[0][0] == whole[len(answer) :] + answer  # max_len ids, the question's last first
    whole_texts(monkeypatch)
    assert got == [cut_conversation(tok, c, max_len, g) for c in convs for g in (False, True)]


def test_a_run_begun_before_the_cut_is_cut_as_whole_with_chatglm2(monkeypatch):
    """A reviewer's cases with ChatGLM2's SentencePiece: "xat" + "a" * 8703 kept [24846, 24846, 8086, 30913] of its
    question (▁t, then the run paired from its start) where the whole text has [24846, 24846, 24846, 8086] (▁x ata,
    the run paired from its second a); so with "请看：" or "=" before "at", and with "at" after a system text."""
    if not CHATGLM2.is_file():
        pytest.skip("ChatGLM2 tokenizer.model not present")
    pytest.importorskip("sentencepiece")
    tok, max_len = chatglm2(), 512
    run = "at" + "a" * ((max_len + CUT_MARGIN) * longest_piece(tok) - 1)
    convs = [Conversation([(lead + run, "好的")]) for lead in ("x", "请看：", "=")]
    convs.append(Conversation([(run, "好的")], "sys"))
    got = [truncate_conversation(tok, c, max_len) for c in convs]
    assert got[0][0][-8:] == [24846, 24846, 24846, 8086, 1, 30910, 31702, 2]  # aaaa aaaa aaaa aaa <s> ▁ 好的 </s>
    whole_texts(monkeypatch)
    assert got == [truncate_conversation(tok, c, max_len) for c in convs]


def test_a_question_cut_where_it_joins_the_anchor_is_tokenized_whole(monkeypatch):
    """bounded_ids drops the ids of ANCHOR from before each cut of a question, which leaves the cut's own ids only
    where ANCHOR joined nothing after it: with a tokenizer that merges it with a, the question is tokenized whole."""
    tok, max_len = merges_bpe([*CHAIN, (chat_format.ANCHOR, "a")], prefix=False), 8
    question = "ya" * (max_len + CUT_MARGIN) * longest_piece(tok)  # 2 C characters; half its cuts begin with a
    lengths = encoded_lengths(monkeypatch, tok)
    got = cut_conversation(tok, Conversation([(question, "ya")]), max_len)
    assert max(lengths) == len(question)
    whole_texts(monkeypatch)
    assert got == cut_conversation(tok, Conversation([(question, "ya")]), max_len)


class Collapsing:
    """A tokenizer that reads every run of whitespace as one space, as SentencePiece's remove_extra_whitespaces (its
    trainer's default) and other normalizers that join characters do."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok

    def __getattr__(self, name: str):
        return getattr(self.tok, name)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tok.encode_batch([re.sub(r"\s+", " ", t) for t in texts])


def test_a_long_text_of_fewer_ids_than_its_characters_bound_is_tokenized_whole(bpe_tokenizer, monkeypatch):
    """A normalizer that joins characters gives a text of C characters fewer ids than max_len: shortened, the question
    below would fit without its first character. Its end of C characters has fewer than max_len + CUT_MARGIN ids, so
    the question is tokenized whole, and kept whole."""
    tok, max_len = Collapsing(bpe_tokenizer), 16
    cap = (max_len + CUT_MARGIN) * longest_piece(tok)
    conv = Conversation([("x" + " " * 2 * cap + "问题", "好")])
    ids, mask, cut = cut_conversation(tok, conv, max_len)
    assert (ids, mask, cut) == render_conversation(tok, conv) + (False,)
    assert ids[: len(tok.encode("x"))] == tok.encode("x")


@pytest.mark.parametrize("max_len", [8, 128])
def test_text_as_dense_as_the_longest_pieces_is_cut_as_whole_with_the_margin(byte_tokenizer, max_len, monkeypatch):
    """The margin, tested where it is thinnest: text of the tokenizer's longest pieces alone has just about max_len +
    CUT_MARGIN ids in C characters, and a cut inside a piece leaves the ids of its part at the start. CUT_MARGIN ids
    keep them away from the max_len kept, so the shortened starts agree and no text is tokenized whole (with
    ChatGLM2's 16-character pieces, a margin of 0 did not)."""
    tok, rng = byte_tokenizer, random.Random(max_len)
    pieces = [raw.decode(errors="replace") for raw in tok.id_bytes() if raw]
    longest = [p for p in pieces if len(p) == longest_piece(tok) and "\ufffd" not in p]  # ChatGLM2's "转载此文是..."
    cap = (max_len + CUT_MARGIN) * longest_piece(tok)
    dense = lambda: "".join(rng.choices(longest, k=3 * max_len + 3 * CUT_MARGIN))  # 3 C characters
    convs = [Conversation([(dense() + "结尾问句？"[:k], "开头的话语"[:k] + dense())]) for k in range(1, 6)]
    lengths = encoded_lengths(monkeypatch, tok)
    got = [cut_conversation(tok, c, max_len, g) for c in convs for g in (False, True)]
    assert cap <= max(lengths) <= cap + longest_piece(tok)
    whole_texts(monkeypatch)
    assert got == [cut_conversation(tok, c, max_len, g) for c in convs for g in (False, True)]
