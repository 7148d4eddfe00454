"""Preference pairs: the record shapes (TRL's, LLaMA-Factory's, MedicalGPT's, OpenAI's, ...), the DPO token cache,
counts of bad and equal pairs, masks."""

from __future__ import annotations

import io
import json
import random
from collections import Counter

import pytest
import torch

from babyllama.chat_format import (
    CUT_MARGIN,
    Conversation,
    conversation_from_record,
    longest_piece,
    render_conversation,
)
from babyllama.checkpoint import save_checkpoint
from babyllama.config import load_config
from babyllama.data.preferences import (
    NO_PROMPT,
    NOT_A_PAIR,
    PREFERENCE_ORDER,
    pair_samples,
    preference_from_record,
    render_pair,
)
from babyllama.data.sft_tokens import SFTSettings, build_sft_cache
from babyllama.data.sources import CorpusReader
from babyllama.errors import UserError
from babyllama.model import Transformer
from babyllama.train.distributed import Dist
from babyllama.train.dpo import dpo
from babyllama.train.sft_data import load_sft_data
from tests.conftest import tiny_config
from tests.test_chat_format import encoded_lengths, whole_texts
from tests.test_sft import samples, write

HISTORY = Conversation([("你好", "你好！"), ("1+1等于几", "")], "你是助手。")
SHAPES = [  # (record, conversation, chosen, rejected)
    ({"prompt": "1+1等于几", "chosen": "等于2。", "rejected": "等于3。"},
     Conversation([("1+1等于几", "")]), "等于2。", "等于3。"),
    ({"system": "你是助手。", "conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"},
                                             {"from": "human", "value": "1+1等于几"}],
      "chosen": {"from": "gpt", "value": "等于2。"}, "rejected": {"from": "gpt", "value": "等于3。"}},
     HISTORY, "等于2。", "等于3。"),  # LLaMA-Factory
    ({"conversations": [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"},
                        {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "1+1等于几"}],
      "chosen": "等于2。", "rejected": "等于3。"},
     HISTORY, "等于2。", "等于3。"),  # MedicalGPT
    ({"system": "你是助手。", "history": [["你好", "你好！"]], "question": "1+1等于几", "response_chosen": "等于2。",
      "response_rejected": "等于3。"},
     HISTORY, "等于2。", "等于3。"),  # MedicalGPT's reward data
    ({"prompt": [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"},
                 {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "1+1等于几"}],
      "chosen": [{"role": "assistant", "content": "等于2。"}],
      "rejected": [{"role": "assistant", "content": "等于3。"}]},
     HISTORY, "等于2。", "等于3。"),  # TRL's conversational shape
    ({"chosen": [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"},
                 {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "1+1等于几"},
                 {"role": "assistant", "content": "等于2。"}],
      "rejected": [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"},
                   {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "1+1等于几"},
                   {"role": "assistant", "content": "等于3。"}]},
     HISTORY, "等于2。", "等于3。"),  # TRL's implicit prompt: the messages both share are the prompt
    ({"messages": [{"role": "developer", "content": "你是助手。"}, {"role": "user", "content": "你好"},
                   {"role": "assistant", "content": [{"type": "text", "text": "你好！"}]},
                   {"role": "user", "content": [{"type": "text", "text": "1+1"}, {"type": "text", "text": "等于几"}]}],
      "chosen": {"role": "assistant", "content": [{"type": "text", "text": "等于2。"}]},
      "rejected": {"role": "assistant", "content": "等于3。"}},
     HISTORY, "等于2。", "等于3。"),  # LLaMA-Factory's shape with OpenAI's `messages`
    ({"system": "你是助手。", "question": "1+1等于几", "chosen": "等于2。", "rejected": "等于3。"},
     Conversation([("1+1等于几", "")], "你是助手。"), "等于2。", "等于3。"),  # Intel/orca_dpo_pairs
    ({"input": {"messages": [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"},
                             {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "1+1等于几"}],
                "tools": [], "parallel_tool_calls": True},
      "preferred_output": [{"role": "assistant", "content": "等于2。"}],
      "non_preferred_output": [{"role": "assistant", "content": "等于3。"}]},
     HISTORY, "等于2。", "等于3。"),  # OpenAI's preference fine-tuning (DPO) format
    ({"system": "你是助手。", "history": [["你好", "你好！"]], "instruction": "1+1", "input": "等于几",
      "chosen": "等于2。", "rejected": "等于3。"},
     HISTORY, "等于2。", "等于3。"),  # LLaMA-Factory's alpaca preference format: the instruction then its input
]


@pytest.mark.parametrize("record, conv, chosen, rejected", SHAPES, ids=["prompt", "llama-factory", "medicalgpt",
                                                                        "question", "trl-conversational",
                                                                        "trl-implicit-prompt", "messages", "orca",
                                                                        "openai", "alpaca"])
def test_each_shape_becomes_its_conversation_and_answers(record, conv, chosen, rejected):
    assert preference_from_record(record) == (conv, chosen, rejected)


def test_system_and_history_are_read_as_sft_reads_them_in_every_shape():
    """history was read of the `question` shape alone, and dropped from the others; a system of another type than
    a string was dropped when it was falsy (0, false)."""
    context = {"system": "你是助手。", "history": [["你好", "你好！"]]}
    assert preference_from_record({**SHAPES[0][0], **context}) == (HISTORY, "等于2。", "等于3。")
    llama_factory = {**SHAPES[1][0], "conversations": SHAPES[1][0]["conversations"][2:], **context}
    assert preference_from_record(llama_factory) == (HISTORY, "等于2。", "等于3。")
    for record, why in [({"prompt": 1, "chosen": "a", "rejected": "b"}, "its 'prompt' is a number, not a string"),
                        ({"prompt": "问", "chosen": 5, "rejected": "b"},
                         "its 'chosen' is a number, not a string or an assistant message"),
                        ({"prompt": "问", "chosen": ["a"], "rejected": "b"},
                         "chosen item 1: a string, not an object with a role and a content"),
                        ({"question": "问", "response_chosen": "a"}, "its 'response_rejected' is missing")]:
        with pytest.raises(ValueError) as e:
            preference_from_record(record)
        assert str(e.value) == why, record  # the field and its type, as prepare, SFT and eval say them
    for field, value in [("system", 0), ("system", False), ("history", {"你好": "你好！"}), ("history", [["你好"]])]:
        with pytest.raises(ValueError, match=f"its '{field}' is (a number|true or false|not a)"):
            preference_from_record({**SHAPES[3][0], field: value})


def test_trl_conversational_pairs_that_are_no_prompt_and_one_answer_say_why():
    """TRL's conversational pairs were "its 'chosen' is a list" or "not a preference record": they are read, and one
    whose lists hold no prompt and one answer each is bad with the reason."""
    user, answer = {"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}
    other = {"role": "assistant", "content": "错"}
    assert preference_from_record({"chosen": [user, answer], "rejected": [user, answer]}) == (
        Conversation([("问", "")]), "答", "答")  # equal conversations: counted as equal answers by pair_samples
    for record, why in [
            ({"prompt": [user], "chosen": [answer, answer], "rejected": [other]},
             "its 'chosen' holds 2 messages, not the one assistant answer"),
            ({"prompt": [user], "chosen": [answer], "rejected": [user]},
             "its 'rejected' is a user message, not the assistant's answer"),
            ({"chosen": [user, answer], "rejected": [user]},
             "its 'rejected' conversation ends with a user message, not the assistant's answer"),
            ({"chosen": [user, answer], "rejected": [{"role": "user", "content": "别的问题"}, other]},
             "its 'chosen' and 'rejected' conversations differ in their first message: they share no prompt"),
            ({"chosen": [user, answer, user, answer], "rejected": [user, other]},
             "its 'chosen' and 'rejected' conversations share 1 message from their start, then go on with 3 and 1: "
             "only the answer may follow the prompt they share"),
            ({"chosen": [user, answer], "rejected": "错"}, NO_PROMPT)]:
        with pytest.raises(ValueError) as e:
            preference_from_record(record)
        assert str(e.value) == why, record


def test_ultrafeedback_binarized_pairs_are_whole_conversations_beside_their_prompt():
    """HuggingFaceH4/ultrafeedback_binarized's records, a `prompt` string beside `chosen` and `rejected` that are whole
    conversations (and a `messages` list), were "its 'chosen' holds 2 messages, not the one assistant answer": they
    are TRL's implicit-prompt shape, and a prompt that is not the last user message both share is a bad record."""
    user, answer = {"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}
    other = {"role": "assistant", "content": "错"}
    record = {"prompt": "问", "prompt_id": "0f", "chosen": [user, answer], "rejected": [user, other],
              "messages": [user, answer], "score_chosen": 8.0, "score_rejected": 3.0}
    assert preference_from_record(record) == (Conversation([("问", "")]), "答", "错")
    assert preference_from_record({**record, "messages": None}) == (Conversation([("问", "")]), "答", "错")
    turns = [{"role": "system", "content": "系统"}, {"role": "user", "content": "早问"},
             {"role": "assistant", "content": "早答"}, user]
    assert preference_from_record({"prompt": "问", "chosen": [*turns, answer], "rejected": [*turns, other]}) == (
        Conversation([("早问", "早答"), ("问", "")], "系统"), "答", "错")
    with pytest.raises(ValueError) as e:
        preference_from_record({**record, "prompt": "别的问题"})
    assert str(e.value) == "its 'prompt' is not the last user message that its 'chosen' and 'rejected' conversations " \
                           "share"


def test_an_answer_of_weight_0_is_a_bad_pair():
    """OpenAI's "weight": 0 on the chosen or rejected message was accepted and the answer scored: a DPO answer always
    carries the loss, so such a record is bad, saying so."""
    user, answer = {"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}
    zero, other = {**answer, "weight": 0}, {"role": "assistant", "content": "错"}
    why = "its {!r} answer has a 'weight' of 0, but a DPO answer always carries the loss"
    for record, key in [({"prompt": [user], "chosen": [zero], "rejected": [other]}, "chosen"),
                        ({"prompt": "问", "chosen": "答", "rejected": [{**other, "weight": 0}]}, "rejected"),
                        ({"conversations": [user], "chosen": zero, "rejected": other}, "chosen"),
                        ({"chosen": [user, answer], "rejected": [user, {**other, "weight": 0}]}, "rejected")]:
        with pytest.raises(ValueError) as e:
            preference_from_record(record)
        assert str(e.value) == why.format(key), record
    assert preference_from_record({"prompt": [user], "chosen": [{**answer, "weight": 1}], "rejected": [other]}) == (
        Conversation([("问", "")]), "答", "错")


def test_a_pair_that_max_len_leaves_no_question_of_is_filtered(bpe_tokenizer):
    """max_seq_len 2 left a pair of <bos> and an answer, no question: it is counted filtered, as SFT counts it."""
    counts = Counter()
    parsed = preference_from_record({"prompt": "很长的问题" * 4, "chosen": "对的回答", "rejected": "错的回答"})
    assert pair_samples(bpe_tokenizer, parsed, SFTSettings(3, 0.0), counts) == ([], False)
    assert counts == Counter(filtered=1)


def test_a_huge_answer_or_prompt_is_cut_as_whole_without_being_tokenized_whole(bpe_tokenizer, monkeypatch):
    """dpo with a 2,000,000-character chosen answer took 1.34 GB: each answer was rendered whole before it was cut.
    No text is now tokenized from more characters than the cut can keep (chat_format.bounded_ids), and the pair's
    samples and counts are those of the whole texts."""
    tok, huge = bpe_tokenizer, "".join(random.Random(0).choices("天地玄黄宇宙洪荒日月", k=50_000))
    pairs = [preference_from_record(r) for r in ({"prompt": "问", "chosen": huge, "rejected": "短的回答"},
                                                 {"prompt": huge, "chosen": "对", "rejected": "错"})]
    lengths, counts = encoded_lengths(monkeypatch, tok), Counter()
    got = [pair_samples(tok, parsed, SFTSettings(65, 0.0), counts) for parsed in pairs]
    assert max(lengths) == (65 + CUT_MARGIN) * longest_piece(tok) and counts == Counter(truncated=2)
    whole_texts(monkeypatch)
    assert got == [pair_samples(tok, parsed, SFTSettings(65, 0.0), Counter()) for parsed in pairs]
    assert max(lengths) == len(huge)  # the reference, whole


def test_the_filters_of_characters_measure_both_answers_and_the_history_and_are_counted_apart(bpe_tokenizer):
    """A pair is filtered by characters where its prompt, chosen or rejected answer, or a question or answer of its
    history, is out of its limits (the system text is not measured), counted filtered_by_chars of filtered, apart
    from max_seq_len's (above)."""
    settings = SFTSettings(65, 0.0, min_prompt_chars=5, max_prompt_chars=20, min_answer_chars=3, max_answer_chars=10)
    pairs = [{"prompt": "ppppp", "chosen": "ccc", "rejected": "r" * 11},  # the rejected answer is too long
             {"prompt": "ppppp", "chosen": "c" * 11, "rejected": "rrr"},  # the chosen
             {"prompt": "ppppp", "chosen": "ccc", "rejected": "rrr", "history": [["h" * 21, "aaa"]]},  # a question
             {"prompt": "ppppp", "chosen": "ccc", "rejected": "rrr", "system": "s" * 50}]  # kept: no system measured
    counts = Counter()
    kept = [bool(pair_samples(bpe_tokenizer, preference_from_record(r), settings, counts)[0]) for r in pairs]
    assert (kept, counts) == ([False, False, False, True], Counter(filtered=3, filtered_by_chars=3))


def test_only_the_last_answer_carries_log_probs(bpe_tokenizer):
    tok = bpe_tokenizer
    (c_ids, c_mask), (r_ids, r_mask), cut = render_pair(tok, HISTORY, "等于2。", "等于3。", 200)
    full, _ = render_conversation(tok, Conversation([("你好", "你好！"), ("1+1等于几", "等于2。")], "你是助手。"))
    assert c_ids == full and not cut  # SFT's chat format, token for token
    assert [i for i, m in zip(c_ids, c_mask, strict=True) if m] == tok.encode("等于2。") + [tok.eos_id]
    assert [i for i, m in zip(r_ids, r_mask, strict=True) if m] == tok.encode("等于3。") + [tok.eos_id]
    long = Conversation([("很长的问题" * 40 + "？", "")])
    (c_ids, c_mask), (r_ids, r_mask), cut = render_pair(tok, long, "对。", "不对。", 30)
    assert cut and (len(c_ids), len(r_ids)) == (29, 30)  # SFT's truncation: the prompt's beginning goes, from a
    # whole character: chosen's shorter answer leaves room for 26 ids of it, whose first is the tail of 题, which goes
    assert tok.decode(c_ids).startswith("很长的问题") and tok.decode(r_ids).startswith("长的问题")
    assert c_ids[-1] == r_ids[-1] == tok.eos_id and c_mask[-1] == r_mask[-1] == 1


def test_cache_counts_bad_equal_and_empty_pairs(bpe_tokenizer, tmp_path, caplog, capsys):
    tok = bpe_tokenizer
    good = [record for record, *_ in SHAPES]
    path = write(tmp_path / "pairs.jsonl", [
        *good,
        {"prompt": "同样的回答", "chosen": "好的。", "rejected": "好的。"},  # equal: skipped and counted
        {"prompt": "空回答", "chosen": "  ", "rejected": "有内容"},  # an empty chosen answer
        {"prompt": "缺少被拒绝的回答", "chosen": "好"},  # bad: no rejected
        {"conversations": [{"from": "human", "value": "问"}], "chosen": {"from": "human", "value": "答"},
         "rejected": "错"},  # bad: the chosen message is the user's
        {"conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": "答"}], "chosen": "好",
         "rejected": "错"},  # bad: the conversation ends with the assistant
    ])
    with path.open("a", encoding="utf-8") as f:
        f.write("\n{not json\n")
    tok.save(tmp_path / "tok")
    train, _, stats = load_sft_data([path], tmp_path / "tok", tmp_path / "cache", SFTSettings(65, 0.0), False, Dist(),
                                    kind="dpo")
    assert (stats.records, stats.bad, stats.equal_pairs, stats.empty_answers) == (len(good) + 6, 4, 1, 1)
    assert stats.samples == 2 * len(good)  # a chosen and a rejected sample per pair
    expected = [s for _, conv, c, r in SHAPES for s in render_pair(tok, conv, c, r, 65)[:2]]
    assert samples(train) == [tuple(s) for s in expected]
    assert f"pairs.jsonl:{len(good) + 3}: its 'rejected' is missing" in caplog.text
    assert caplog.text.count(": skipped a preference record") == 4 and "skipped an" not in caplog.text
    assert capsys.readouterr().out == f"dpo cache: building {tmp_path / 'cache'} with 1 worker\n"
    assert f"pairs.jsonl:{len(good) + 4}: its 'chosen' is a user message, not the assistant's answer" in caplog.text
    with pytest.raises(UserError) as e:  # an SFT run is not given the DPO cache (check_output_folder)
        load_sft_data([path], tmp_path / "tok", tmp_path / "cache", SFTSettings(65, 0.0), False, Dist())
    assert str(e.value) == (f"--sft_cache {tmp_path / 'cache'} is a DPO token cache, which SFT samples must not be "
                            "written into; pass another --sft_cache.")


def test_a_pair_that_starts_with_the_assistant_or_asks_nothing_is_bad_and_a_blank_rejected_answer_counted(
        bpe_tokenizer, tmp_path):
    path = write(tmp_path / "pairs.jsonl", [
        {"conversations": [{"from": "gpt", "value": "x"}], "chosen": "好", "rejected": "错"},
        {"prompt": "", "chosen": "好", "rejected": "错"},
        {"prompt": "问", "chosen": "好", "rejected": "   "},
        SHAPES[0][0],
    ])
    bpe_tokenizer.save(tmp_path / "tok")
    _, _, stats = load_sft_data([path], tmp_path / "tok", tmp_path / "cache", SFTSettings(65, 0.0), False, Dist(),
                                kind="dpo")
    assert (stats.records, stats.bad, stats.empty_answers, stats.samples) == (4, 2, 1, 2)
    assert (tmp_path / "cache" / "bad_records.txt").read_text().splitlines() == [
        f"{path}:1: the conversation starts with the assistant; its first message (after any system messages) "
        "must come from the user",
        f"{path}:2: a question (instruction, prompt or user message) is empty, so there is nothing to answer"]


def test_a_file_with_no_usable_pair_is_one_sentence(bpe_tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "问", "chosen": "同", "rejected": "同"}, ensure_ascii=False) + "\n")
    bpe_tokenizer.save(tmp_path / "tok")
    with pytest.raises(UserError, match=r"no usable preference records .*1 with equal answers"):
        load_sft_data([path], tmp_path / "tok", tmp_path / "cache", SFTSettings(65, 0.0), False, Dist(), kind="dpo")


LONG = "张三在北京" * 40  # over 64 tokens: a pair that ends in it is cut to max_seq_len 64


def test_a_pair_equal_once_truncated_is_skipped_and_counted_and_an_empty_answer_is_empty(bpe_tokenizer, tmp_path):
    """A pair whose answers differ only after max_seq_len was trained on as two byte-identical rows (no signal,
    log 2 of loss, a wrong accuracy); an empty rejected answer was worded as an empty chosen one, and two empty
    answers were counted as equal rather than empty."""
    assert len(bpe_tokenizer.encode(LONG)) > 64
    path = write(tmp_path / "pairs.jsonl", [
        SHAPES[0][0],
        {"prompt": "q", "chosen": LONG + "好", "rejected": LONG + "坏"},  # equal once truncated
        {"prompt": "q", "chosen": "好" + LONG, "rejected": "坏" + LONG},  # truncated, still a preference: kept
        {"prompt": "q1", "chosen": "a", "rejected": ""},  # an empty rejected answer
        {"prompt": "q2", "chosen": "", "rejected": ""},  # empty, not equal
        {"prompt": "q3", "chosen": "同", "rejected": "同"},  # equal
    ])
    bpe_tokenizer.save(tmp_path / "tok")
    train, _, stats = load_sft_data([path], tmp_path / "tok", tmp_path / "cache", SFTSettings(65, 0.0), False,
                                    Dist(), kind="dpo")
    assert (stats.records, stats.bad, stats.equal_pairs, stats.equal_after_truncation, stats.empty_answers,
            stats.truncated, stats.samples) == (6, 0, 1, 1, 2, 1, 4)
    kept = [(SHAPES[0][1], "等于2。", "等于3。"), (Conversation([("q", "")]), "好" + LONG, "坏" + LONG)]
    expected = [s for conv, c, r in kept for s in render_pair(bpe_tokenizer, conv, c, r, 65)[:2]]
    assert samples(train) == [tuple(s) for s in expected]
    rows = samples(train)
    assert all(rows[i] != rows[i + 1] for i in range(0, len(rows), 2))  # no pair of identical rows


def test_a_file_of_pairs_equal_once_truncated_says_so(bpe_tokenizer, tmp_path):
    path = write(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": LONG + "好", "rejected": LONG + "坏"},
                                             {"prompt": "q", "chosen": "", "rejected": ""}])
    bpe_tokenizer.save(tmp_path / "tok")
    with pytest.raises(UserError) as e:
        load_sft_data([path], tmp_path / "tok", tmp_path / "cache", SFTSettings(65, 0.0), False, Dist(), kind="dpo")
    assert str(e.value) == (f"no usable preference records in {path} (2 read, 0 bad, 1 with an empty answer, 0 "
                            "filtered by length, 0 with equal answers, 1 equal once truncated); nothing was written.")


class Folded:
    """A tokenizer that reads text lower-cased, as one with a normalizer (NFKC, lower case) reads it."""

    def __init__(self, tok):
        self.tok, self.bos_id, self.eos_id = tok, tok.bos_id, tok.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text.lower())

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tok.encode_batch([t.lower() for t in texts])


def test_answers_of_other_text_but_the_same_tokens_are_an_equal_pair(bpe_tokenizer):
    """Equality is of the samples trained on (ids and mask), not of the strings."""
    counts = Counter()
    parsed = (Conversation([("问", "")]), "OK", "ok")
    assert pair_samples(Folded(bpe_tokenizer), parsed, SFTSettings(65, 0.0), counts) == ([], False)
    assert counts == {"equal_pairs": 1}
    samples_of, _ = pair_samples(bpe_tokenizer, parsed, SFTSettings(65, 0.0), counts)
    assert len(samples_of) == 2 and counts == {"equal_pairs": 1, "truncated": 0}  # the plain tokenizer tells them apart


def test_the_dpo_data_line_names_each_count(bpe_tokenizer, tmp_path, capsys):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "init", Transformer(tiny_config(vocab_size=600)), bpe_tokenizer)
    path = write(tmp_path / "pairs.jsonl", [
        SHAPES[0][0], {"prompt": "q", "chosen": LONG + "好", "rejected": LONG + "坏"},
        {"prompt": "q1", "chosen": "a", "rejected": ""}, {"prompt": "q3", "chosen": "同", "rejected": "同"}])
    dpo(load_config(None, ["--init", str(tmp_path / "init"), "--data", str(path), "--out_dir", str(tmp_path / "run"),
                           "--max_steps", "1", "--batch_size", "1", "--warmup_steps", "0", "--val_fraction", "0",
                           "--eval_every", "0", "--data_workers", "1"]))
    assert ("dpo data: 4 records, 0 bad, 1 with equal answers, 1 equal once truncated, 1 with an empty answer, "
            "0 filtered by length, 0 truncated; 1 train / 0 val pairs\n") in capsys.readouterr().out


def test_bad_bytes_a_lone_surrogate_and_an_empty_conversations_list_are_bad_pairs_that_say_so(bpe_tokenizer,
                                                                                               tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\n".join([b'{"prompt": "q", "chosen": "\xe5\xa5\xbd", "rejected": "\xff\xfe"}',
                                 b'{"prompt": "q\\ud800", "chosen": "a", "rejected": "b"}',
                                 b'{"conversations": [], "chosen": "a", "rejected": "b"}',
                                 *(json.dumps(SHAPES[0][0], ensure_ascii=False).encode(),) * 2]))  # mostly UTF-8
    bpe_tokenizer.save(tmp_path / "tok")
    _, _, stats = load_sft_data([path], tmp_path / "tok", tmp_path / "cache", SFTSettings(65, 0.0), False, Dist(),
                                kind="dpo")
    assert (stats.records, stats.bad, stats.samples) == (5, 3, 4)
    assert (tmp_path / "cache" / "bad_records.txt").read_text().splitlines() == [
        f"{path}:1: its text holds bytes that are not text in the file's encoding (\\xff\\xfe)",
        f"{path}:2: its text holds a lone surrogate (\\ud800-\\udfff), which no tokenizer can encode",
        f"{path}:3: its 'conversations' list is empty: there is no message"]


def test_a_null_field_is_an_absent_one():
    """A parquet export's null `messages` (or `question`) beside a prompt, chosen and rejected made the pair bad."""
    pair = (Conversation([("问", "")]), "好", "坏")
    assert preference_from_record({"messages": None, "prompt": "问", "chosen": "好", "rejected": "坏"}) == pair
    assert preference_from_record({"question": None, "prompt": "问", "chosen": "好", "rejected": "坏"}) == pair


USER, ANSWER, OTHER = ({"role": "user", "content": "问"}, {"role": "assistant", "content": "答"},
                       {"role": "assistant", "content": "错"})


def dpo_cache(tok, tmp_path, path) -> tuple[dict, list[str]]:
    """The manifest of the DPO token cache of path, and its bad_records.txt's lines."""
    tok.save(tmp_path / "tok")
    manifest = build_sft_cache([path], tmp_path / "tok", tmp_path / "cache", SFTSettings(65, 0.0), kind="dpo")
    return manifest, (tmp_path / "cache" / "bad_records.txt").read_text(encoding="utf-8").splitlines()


def test_a_pair_of_two_shapes_is_read_in_the_first_and_the_fields_left_out_named_once_a_file(
        bpe_tokenizer, tmp_path, caplog):
    """DPO read {question, messages, chosen, rejected} from its messages without a word, as it dropped the `prompt`
    of a `conversations` record and read a question with chosen and rejected as MedicalGPT's reward data
    (response_chosen missing); ultrafeedback_binarized's `messages`, a copy of its chosen conversation, was not
    compared with it. Each is read in the first shape it has, and the fields of the others named once a file, as SFT
    names them; `messages` only where it is not the chosen conversation."""
    uf = {"prompt": "问", "chosen": [USER, ANSWER], "rejected": [USER, OTHER], "messages": [USER, ANSWER]}
    path = write(tmp_path / "two.jsonl", [
        {"question": "别问", "messages": [USER], "chosen": "答", "rejected": "错"},
        {"conversations": [USER], "prompt": "别问", "chosen": "答", "rejected": "错"},
        {"question": "问", "chosen": "答", "rejected": "错", "response_chosen": "别答", "response_rejected": "别错"},
        uf, {**uf, "messages": [USER, OTHER]}, {"question": "问", "response_chosen": "答", "response_rejected": "错"}])
    manifest, bad = dpo_cache(bpe_tokenizer, tmp_path, path)
    assert (manifest["stats"]["samples"], bad) == (12, [])
    rows = samples(load_sft_data([path], tmp_path / "tok", tmp_path / "cache", SFTSettings(65, 0.0), False, Dist(),
                                 kind="dpo")[0])
    pair = render_pair(bpe_tokenizer, Conversation([("问", "")]), "答", "错", 65)[:2]
    assert rows == [tuple(s) for s in pair] * 6  # each pair read as 问, 答 and 错
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{path}: records with the fields of more than one shape are read in the first of chosen and rejected "
        "conversations (with a prompt string), conversations, messages, prompt, question, instruction (each with "
        "chosen and rejected, an instruction with its input), input with preferred_output and non_preferred_output, "
        "question with response_chosen and "
        f"response_rejected, leaving out the 'question' of 1 record (the first at {path}:1), the 'prompt' of 1 record "
        f"(the first at {path}:2), the 'response_chosen' of 1 record "
        f"(the first at {path}:3), the 'response_rejected' of 1 record (the first at {path}:3), the 'messages' of 1 "
        f"record (the first at {path}:5)"]


def test_prepare_keeps_the_pairs_dpo_reads_and_finds_the_same_bad_with_the_same_reasons(bpe_tokenizer, tmp_path):
    """prepare's preference schema read a pair its own way and kept records dpo refuses (a missing rejected answer, a
    rejected of another type, an empty prompt, a chosen user message, a prompt that ends with the assistant, a
    question without response_rejected, ...) as text: it reads each through dpo's reader, so that it keeps what dpo
    reads and counts bad what dpo counts bad, with the same reason."""
    path = write(tmp_path / "mixed.jsonl", [
        SHAPES[0][0],
        {"prompt": "问", "chosen": "答"},  # no rejected
        {"prompt": "问", "chosen": "答", "rejected": 5},
        {"prompt": "", "chosen": "答", "rejected": "错"},
        {"prompt": "问", "chosen": {"role": "user", "content": "答"}, "rejected": "错"},
        {"prompt": "问", "chosen": {"role": "assistant"}, "rejected": "错"},
        {"prompt": [USER, ANSWER], "chosen": [ANSWER], "rejected": [OTHER]},  # the prompt ends with the answer
        {"prompt": "问", "chosen": [ANSWER, OTHER], "rejected": [OTHER]},  # two answers: no shared prompt
        {"prompt": "别问", "chosen": [USER, ANSWER], "rejected": [USER, OTHER]},  # not the prompt they share
        {"chosen": "答", "rejected": "错"},  # no prompt
        {"question": "问", "response_chosen": "答"},
        {"prompt": "问", "chosen": "答", "rejected": "答"},  # equal: read by dpo (and counted), kept by prepare
        {"prompt": "问", "chosen": "答", "rejected": [OTHER]},  # a string and a message: both answers
        {"conversations": [USER, {**ANSWER, "weight": 0}, USER], "chosen": "答", "rejected": "错"}])
    reader = CorpusReader([path], bad_log=(log := io.StringIO()))
    texts = list(reader.documents())
    manifest, bad = dpo_cache(bpe_tokenizer, tmp_path, path)
    assert log.getvalue().splitlines() == bad
    assert [line.removeprefix(f"{path}:") for line in bad] == [
        "2: its 'rejected' is missing",
        "3: its 'rejected' is a number, not a string or an assistant message",
        "4: a question (instruction, prompt or user message) is empty, so there is nothing to answer",
        "5: its 'chosen' is a user message, not the assistant's answer",
        "6: its 'chosen': no 'content' (or 'value')",
        "7: the last message must come from the user",
        "8: its 'chosen' and 'rejected' conversations differ in their first message: they share no prompt",
        "9: its 'prompt' is not the last user message that its 'chosen' and 'rejected' conversations share",
        f"10: {NO_PROMPT}",
        "11: its 'response_rejected' is missing"]
    assert (manifest["stats"]["records"], manifest["stats"]["bad"], manifest["stats"]["equal_pairs"]) == (14, 10, 1)
    assert (reader.stats[str(path)].records, reader.stats[str(path)].bad) == (14, 10)
    assert texts == ["1+1等于几等于2。", "问答", "问答", "问\n答\n问\n答"]


# OpenAI's example of its preference fine-tuning format (developers.openai.com/api/docs/guides/direct-preference-
# optimization, "Data format"), one line of JSONL: an input of messages, tools and parallel_tool_calls, and two lists of
# one assistant message
OPENAI_PAIR = {
    "input": {"messages": [{"role": "user", "content": "Hello, can you tell me how cold San Francisco is today?"}],
              "tools": [], "parallel_tool_calls": True},
    "preferred_output": [{"role": "assistant", "content": "Today in San Francisco, it is not quite cold as expected. "
                          "Morning clouds will give away to sunshine, with a high near 68°F (20°C) and a low around "
                          "57°F (14°C)."}],
    "non_preferred_output": [{"role": "assistant", "content": "It is not particularly cold in San Francisco today."}]}


def test_openai_preference_records_are_read_by_dpo_and_prepare_and_their_tools_are_bad_records(bpe_tokenizer,
                                                                                              tmp_path):
    """OpenAI's preference fine-tuning format ({input: {messages, tools, parallel_tool_calls}, preferred_output,
    non_preferred_output}) was "not a preference record" in dpo and "has none of the fields of a known schema" in
    prepare: both read it, with what OpenAI documents (each output a list of one assistant message), and find the
    same records bad with the same reasons; tools, which no chat format here shows, are a bad record, as a tool call
    in SFT's messages is."""
    question, answer = OPENAI_PAIR["input"]["messages"][0]["content"], OPENAI_PAIR["preferred_output"][0]["content"]
    assert preference_from_record(OPENAI_PAIR) == (
        Conversation([(question, "")]), answer, OPENAI_PAIR["non_preferred_output"][0]["content"])
    inp, out = OPENAI_PAIR["input"], OPENAI_PAIR["preferred_output"]
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}
    records_and_reasons = [
        ({**OPENAI_PAIR, "input": {**inp, "tools": [weather]}}, "its 'input' has 'tools'; tools and tool calls are "
         "not read"),
        ({**OPENAI_PAIR, "preferred_output": [call]},
         "preferred_output item 1: a message of role 'assistant' with 'tool_calls'; tool calls are not read"),
        ({**OPENAI_PAIR, "input": {"messages": [*inp["messages"], call, {"role": "tool", "content": "20°C",
                                                                         "tool_call_id": "call_1"}]}},
         "input.messages item 2: a message of role 'assistant' with 'tool_calls'; tool calls are not read"),
        ({**OPENAI_PAIR, "preferred_output": answer},
         "its 'preferred_output' is a string, not a list of one assistant message"),
        ({**OPENAI_PAIR, "non_preferred_output": out[0]},
         "its 'non_preferred_output' is an object, not a list of one assistant message"),
        ({**OPENAI_PAIR, "preferred_output": [*out, *out]},
         "its 'preferred_output' holds 2 messages, not the one assistant answer"),
        ({**OPENAI_PAIR, "preferred_output": []}, "its 'preferred_output' list is empty: there is no message"),
        ({**OPENAI_PAIR, "preferred_output": inp["messages"]},
         "its 'preferred_output' is a user message, not the assistant's answer"),
        ({k: v for k, v in OPENAI_PAIR.items() if k != "non_preferred_output"},
         "its 'non_preferred_output' is missing"),
        ({k: v for k, v in OPENAI_PAIR.items() if k != "input"}, "its 'input' is missing"),
        ({**OPENAI_PAIR, "input": question}, "its 'input' is a string, not an object with 'messages'"),
        ({**OPENAI_PAIR, "input": {"tools": []}}, "it lacks 'input.messages', a list of messages"),
        ({**OPENAI_PAIR, "input": {"messages": [*inp["messages"], *out]}}, "the last message must come from the user")]
    for record, why in records_and_reasons:
        with pytest.raises(ValueError) as e:
            preference_from_record(record)
        assert str(e.value) == why, record
    path = write(tmp_path / "openai.jsonl", [OPENAI_PAIR, *(record for record, _ in records_and_reasons)])
    reader = CorpusReader([path], bad_log=(log := io.StringIO()))
    assert list(reader.documents()) == [f"{question}\n{answer}"]  # the prompt's messages a line each, as TRL's
    manifest, bad = dpo_cache(bpe_tokenizer, tmp_path, path)
    assert log.getvalue().splitlines() == bad == [f"{path}:{i}: {why}"
                                                  for i, (_, why) in enumerate(records_and_reasons, 2)]
    assert (manifest["stats"]["samples"], reader.stats[str(path)].schema) == (2, "preference")
    with pytest.raises(ValueError) as e:
        conversation_from_record(OPENAI_PAIR)  # SFT: a preference record, as one of chosen and rejected is
    assert str(e.value) == ("it is a preference record ('preferred_output' and 'non_preferred_output'), which "
                            "`babyllama dpo` reads")


def test_a_pair_is_told_by_its_answers_fields_in_prepare_as_in_dpo_whatever_record_comes_first(bpe_tokenizer,
                                                                                               tmp_path):
    """prepare took a record for a preference pair only with both `chosen` and `rejected`: the first record of a file,
    {prompt, chosen}, was "has none of the fields of a known schema" where dpo says "its 'rejected' is missing", and
    {prompt, chosen, completion} was kept as a prompt-completion row. Any one field of a pair's answers makes a
    preference record in prepare, dpo and SFT alike (chat_format.PREFERENCE_ANSWERS), bad for the same reason in
    prepare and dpo; and a question without the answers of MedicalGPT's reward data is no pair of it in dpo."""
    for record, why in [
            ({"prompt": "问", "chosen": "答"}, "its 'rejected' is missing"),
            ({"prompt": "问", "chosen": "答", "completion": "别答"}, "its 'rejected' is missing"),
            ({"messages": [USER], "rejected": "错"}, "its 'chosen' is missing"),
            ({"chosen": "答", "rejected": "错"}, NO_PROMPT),
            ({"question": "问", "response_rejected": "错"}, "its 'response_chosen' is missing"),
            ({"response_chosen": "答", "response_rejected": "错"}, "its 'question' is missing"),
            ({"input": {"messages": [USER]}, "preferred_output": [ANSWER]}, "its 'non_preferred_output' is missing")]:
        path = write(tmp_path / "first.jsonl", [record, SHAPES[0][0]])
        reader = CorpusReader([path], bad_log=(log := io.StringIO()))
        assert list(reader.documents()) == ["1+1等于几等于2。"]
        assert log.getvalue() == f"{path}:1: {why}\n", record
        with pytest.raises(ValueError) as e:
            preference_from_record(record)
        assert str(e.value) == why, record
        with pytest.raises(ValueError) as e:
            conversation_from_record(record)
        assert str(e.value).startswith("it is a preference record ("), record
    for record in [{"question": "问"}, {"question": "问", "answer": "答"}]:  # no answer of a pair: no pair
        with pytest.raises(ValueError) as e:
            preference_from_record(record)
        assert str(e.value) == NOT_A_PAIR
    assert NOT_A_PAIR == (  # every shape, in the order they are tried (PREFERENCE_ORDER), where it omitted two words
        "not a preference record (chosen and rejected conversations (with a prompt string), conversations, messages, "
        "prompt, question, instruction (each with chosen and rejected, an instruction with its input), input with "
        "preferred_output and non_preferred_output, or question with response_chosen and response_rejected)")


def test_alpaca_pairs_have_the_instruction_and_input_as_sft_joins_them_and_a_pair_without_a_prompt_says_so(
        bpe_tokenizer, tmp_path, caplog):
    """LLaMA-Factory's alpaca preference records ({instruction, input, chosen, rejected}, its data/README) were bad in
    dpo and prepare, "its prompt is missing (a prompt, conversations, messages or question ...)", where sft called them
    preference records, "which `babyllama dpo` reads", and prepare had kept them before: the instruction followed by
    its input is the prompt, as SFT joins them. Answers with no prompt at all are bad with one reason in dpo, prepare
    and sft, which also says it is a preference record."""
    pairs = [{"instruction": "翻译：", "input": "你好", "chosen": "Hello", "rejected": "Bye"},
             {"instruction": "问", "chosen": "答", "rejected": "错"},
             {"prompt": "问", "instruction": "别问", "input": "别的", "chosen": "答", "rejected": "错"}]
    assert [preference_from_record(r) for r in pairs] == [
        (Conversation([("翻译：你好", "")]), "Hello", "Bye"), *[(Conversation([("问", "")]), "答", "错")] * 2]
    assert conversation_from_record({"instruction": "翻译：", "input": "你好", "output": "Hello"}) == Conversation(
        [("翻译：你好", "Hello")])  # SFT's prompt of the same fields
    no_prompt = ("its prompt is missing (one of conversations, messages, prompt, question, instruction beside its "
                 "'chosen' and 'rejected', or 'chosen' and 'rejected' conversations that share it)")
    records_and_reasons = [({"chosen": "好", "rejected": "坏"}, no_prompt),
                           ({"instruction": "问", "input": 5, "chosen": "答", "rejected": "错"},
                            "its 'input' is a number, not a string"),
                           ({"instruction": ["问"], "chosen": "答", "rejected": "错"},
                            "its 'instruction' is a list, not a string")]
    for record, why in records_and_reasons:
        with pytest.raises(ValueError) as e:
            preference_from_record(record)
        assert str(e.value) == why, record
        with pytest.raises(ValueError) as e:
            conversation_from_record(record)
        sft = "it is a preference record ('chosen' and 'rejected'), bad for `babyllama dpo` too"
        assert str(e.value) == f"{sft}: {why}", record
    with pytest.raises(ValueError) as e:
        conversation_from_record(pairs[0])
    assert str(e.value) == "it is a preference record ('chosen' and 'rejected'), which `babyllama dpo` reads"
    path = write(tmp_path / "alpaca.jsonl", [*pairs, *(record for record, _ in records_and_reasons)])
    reader = CorpusReader([path], bad_log=(log := io.StringIO()))
    assert list(reader.documents()) == ["翻译：你好Hello", "问答", "问答"]
    manifest, bad = dpo_cache(bpe_tokenizer, tmp_path, path)
    assert log.getvalue().splitlines() == bad == [f"{path}:{i}: {why}"
                                                  for i, (_, why) in enumerate(records_and_reasons, 4)]
    assert (manifest["stats"]["samples"], manifest["stats"]["bad"]) == (6, 3)
    assert [r.getMessage() for r in caplog.records if "more than one shape" in r.getMessage()] == [
        f"{path}: records with the fields of more than one shape are read in the first of {PREFERENCE_ORDER}, "
        f"leaving out the 'instruction' of 1 record (the first at {path}:3), the 'input' of 1 record (the first at "
        f"{path}:3)"]  # an input is read with an instruction alone


def test_empty_answers_of_a_pair_beside_an_sft_shape_make_no_pair(bpe_tokenizer, tmp_path, caplog):
    """A CSV's empty cells made a record a preference record: a prompt / answer row of a file with chosen and
    rejected columns, {prompt, answer, chosen: "", rejected: ""}, was "it is a preference record ('chosen' and
    'rejected')" in sft, which read it at 51f0c56, and its prompt and empty chosen answer in prepare. Empty answers of
    a pair beside the fields of an SFT shape are absent, in sft, dpo and prepare alike; without them, {prompt, chosen:
    "", rejected: ""} is still a pair with empty answers, and one answer that is not empty makes a pair."""
    for record in [{"prompt": "问", "answer": "答", "chosen": ""}, {"prompt": "问", "answer": "答", "chosen": "",
                                                                    "rejected": ""}]:
        assert conversation_from_record(record) == Conversation([("问", "答")])
        with pytest.raises(ValueError) as e:
            preference_from_record(record)
        assert str(e.value) == NOT_A_PAIR
    empty = preference_from_record({"prompt": "问", "chosen": "", "rejected": ""})
    assert empty == (Conversation([("问", "")]), "", "")  # counted empty_answers by pair_samples
    with pytest.raises(ValueError) as e:
        conversation_from_record({"prompt": "问", "answer": "答", "chosen": "", "rejected": "错"})
    assert str(e.value) == "it is a preference record ('chosen' and 'rejected'), which `babyllama dpo` reads"
    path = tmp_path / "qa.csv"
    path.write_text("prompt,answer,chosen,rejected\n问,答,,\n", encoding="utf-8")
    assert list(CorpusReader([path]).documents()) == ["问答"]
    bpe_tokenizer.save(tmp_path / "tok")
    manifest = build_sft_cache([path], tmp_path / "tok", tmp_path / "cache", SFTSettings(65, 0.0))
    assert (manifest["stats"]["samples"], manifest["stats"]["bad"]) == (1, 0)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []


def test_a_null_field_of_a_pair_is_named_null_in_dpo_and_prepare_as_sft_names_a_null_answer(bpe_tokenizer, tmp_path):
    """{prompt, chosen: null, rejected} was "not a preference record (...)" in dpo (before, where a null answer decided
    the shape) and then "its 'chosen' is missing", where SFT says "its 'completion' is null, not a string" of a null
    answer (a parquet file gives null to the fields of its other rows); a null prompt beside the answers was "not a
    preference record", and so were answers without any prompt, which SFT calls a preference record. dpo and prepare
    name the null field, as SFT does, and the missing prompt."""
    answer, messages = "not a string or an assistant message", "not a string or a list of messages"
    records_and_reasons = [
        ({"prompt": "问", "chosen": None, "rejected": "错"}, f"its 'chosen' is null, {answer}"),
        ({"prompt": "问", "chosen": "答", "rejected": None}, f"its 'rejected' is null, {answer}"),
        ({"prompt": "问", "chosen": None, "rejected": None}, f"its 'chosen' is null, {answer}"),
        ({"prompt": None, "chosen": "答", "rejected": "错"}, f"its 'prompt' is null, {messages}"),
        ({"conversations": None, "chosen": "答", "rejected": "错"},
         "its 'conversations' is null, not a list of messages"),
        ({"chosen": [USER, ANSWER], "rejected": None}, f"its 'rejected' is null, {answer}"),
        ({"question": "问", "response_chosen": None, "response_rejected": "错"},
         "its 'response_chosen' is null, not a string"),
        ({"question": None, "response_chosen": "答", "response_rejected": "错"},
         "its 'question' is null, not a string"),
        ({**OPENAI_PAIR, "input": None}, "its 'input' is null, not an object with 'messages'"),
        ({**OPENAI_PAIR, "preferred_output": None},
         "its 'preferred_output' is null, not a list of one assistant message"),
        ({"chosen": "答", "rejected": "错"}, NO_PROMPT),
        ({"prompt": "问", "rejected": "错"}, "its 'chosen' is missing")]  # not there at all: missing, as before
    for record, why in records_and_reasons:
        with pytest.raises(ValueError) as e:
            preference_from_record(record)
        assert str(e.value) == why, record
    path = write(tmp_path / "nulls.jsonl", [SHAPES[0][0], *(record for record, _ in records_and_reasons)])
    reader = CorpusReader([path], bad_log=(log := io.StringIO()))
    assert list(reader.documents()) == ["1+1等于几等于2。"]
    manifest, bad = dpo_cache(bpe_tokenizer, tmp_path, path)
    assert log.getvalue().splitlines() == bad == [f"{path}:{i}: {why}"
                                                  for i, (_, why) in enumerate(records_and_reasons, 2)]
    assert (manifest["stats"]["records"], manifest["stats"]["bad"]) == (13, 12)
    with pytest.raises(ValueError) as e:
        conversation_from_record({"prompt": "问", "completion": None})
    assert str(e.value) == "its 'completion' is null, not a string"  # SFT's words, which dpo's follow


def test_a_weight_on_a_message_that_is_not_the_assistant_s_is_bad_in_sft_dpo_and_prepare_alike(
        bpe_tokenizer, tmp_path):
    """OpenAI's fine-tuning format has a `weight` (0 or 1) on assistant messages alone, in SFT's messages and in a
    DPO input's: one on a user or system message is a bad record, with the same reason in sft, dpo and prepare; on
    an assistant message of a DPO prompt, 0 or 1, it is read, that answer being context without loss either way."""
    user, system = {**USER, "weight": 0}, {"role": "system", "content": "系统", "weight": 1}
    records = [{"messages": [user, ANSWER]}, {"messages": [system, USER, ANSWER]}]
    pairs = [{"prompt": [user], "chosen": [ANSWER], "rejected": [OTHER]},
             {"conversations": [system, USER], "chosen": "答", "rejected": "错"}]
    why = ["{} item 1: a 'weight' on a message of role 'user'; only the assistant's messages have one",
           "{} item 1: a 'weight' on a message of role 'system'; only the assistant's messages have one"]
    for record, pair, reason in zip(records, pairs, why, strict=True):
        with pytest.raises(ValueError) as sft_error:
            conversation_from_record(record)
        with pytest.raises(ValueError) as dpo_error:
            preference_from_record(pair)
        assert (str(sft_error.value), str(dpo_error.value)) == (reason.format("messages"),
                                                                reason.format(next(iter(pair))))
    path = write(tmp_path / "pairs.jsonl", pairs)
    reader = CorpusReader([path], bad_log=(log := io.StringIO()))
    assert list(reader.documents()) == []
    assert log.getvalue().splitlines() == [f"{path}:1: " + why[0].format("prompt"),
                                           f"{path}:2: " + why[1].format("conversations")]
    for weight in (0, 1):
        context = [USER, {**ANSWER, "weight": weight}, {"role": "user", "content": "再问"}]
        assert preference_from_record({"prompt": context, "chosen": [ANSWER], "rejected": [OTHER]}) == (
            Conversation([("问", "答"), ("再问", "")]), "答", "错")
