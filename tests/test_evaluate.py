"""Evaluation and the report: scores equal their definitions, on fixtures computed by hand."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil

import pytest
import torch

from babyllama.checkpoint import save_checkpoint
from babyllama.data.pretokenize import pretokenize
from babyllama.data.shards import TokenWindows
from babyllama.errors import UserError
from babyllama.evaluate import (
    char_f1,
    leakage,
    lm_metrics,
    mc_choices,
    mc_summary,
    qa_item,
    read_mc,
    read_qa,
    rouge_l,
    score_qa,
    split_continuation,
)
from babyllama.report import make_report
from babyllama.sampling import Sampling
from tests.conftest import CHATGLM2, generated_corpus, run_cli, sharp_model, tiny_config


def held_score_qa(items: list[dict]) -> dict:
    """score_qa as it was, every task's predictions and references held, BLEU by sacrebleu's corpus_bleu of them all:
    what the running sums must equal."""
    from collections import Counter, defaultdict

    import jieba
    import sacrebleu

    from babyllama.evaluate import ITEMS_PER_LABEL, MAX_LABELS

    words = lambda texts: [" ".join(jieba.cut(t)) for t in texts]
    by_task = defaultdict(lambda: ([], []))
    for it in items:
        by_task[it["task"]][0].append(it["prediction"])
        by_task[it["task"]][1].append(it["reference"])
    out = {}
    for task, (preds, refs) in by_task.items():
        n, labels = len(preds), Counter(refs)
        out[task] = {"items": n, "bleu": sacrebleu.corpus_bleu(preds, [refs], tokenize="zh").score,
                     "word_bleu": sacrebleu.corpus_bleu(words(preds), [words(refs)], tokenize="none").score,
                     "rouge_l": sum(map(rouge_l, preds, refs)) / n, "char_f1": sum(map(char_f1, preds, refs)) / n,
                     "exact_match": sum(p == r for p, r in zip(preds, refs, strict=True)) / n,
                     "majority_baseline": labels.most_common(1)[0][1] / n}
        if len(labels) <= MAX_LABELS and n >= ITEMS_PER_LABEL * len(labels):
            out[task] |= {"accuracy": out[task]["exact_match"], "labels": dict(labels)}
    return out


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_qa_scores_from_running_sums_equal_those_of_the_held_items(monkeypatch, chunk):
    """score_qa held every prediction and reference, and sacrebleu's n-gram counts of them all (200k items: 1.1 GB).
    It keeps running sums now, BLEU's statistics counted BLEU_CHUNK items at a time: every score, corpus BLEU's too,
    equals the held items' to the last bit, sacrebleu's (tokenize zh) and over jieba words."""
    import random

    from sacrebleu.metrics import BLEU

    import babyllama.evaluate

    monkeypatch.setattr(babyllama.evaluate, "BLEU_CHUNK", chunk, raising=False)
    rng, text = random.Random(0), "今天天气很好我们去公园散步他在北京大学读书学习，。"
    said = lambda n: "".join(rng.choices(text, k=n))
    items = [{"task": "free", "prediction": said(rng.randint(0, 12)), "reference": said(rng.randint(1, 12))}
             for _ in range(60)]
    items += [{"task": "labels", "prediction": rng.choice(["正面", "负面", "正"]),
               "reference": rng.choice(["正面", "负面"])} for _ in range(30)]
    rng.shuffle(items)
    counted, corpus_score = [], BLEU.corpus_score
    monkeypatch.setattr(BLEU, "corpus_score", lambda self, hyps, refs: counted.append(len(hyps)) or
                        corpus_score(self, hyps, refs))
    got = score_qa(items)
    assert max(counted) == min(chunk, 60)  # the free task's 60 items: BLEU_CHUNK at a time
    monkeypatch.undo()
    held = held_score_qa(items)
    assert got == held and list(got) == list(held)
    assert 0 < got["free"]["bleu"] < 100 and 0 < got["free"]["word_bleu"] < 100 and "labels" in got["labels"]


def test_qa_scores_strip_the_whitespace_around_the_reference_as_around_the_answer():
    """A reference "  JJJJ\\n" against the answer "JJJJ" (answers are stripped) scored exact match 0 and char F1 below
    1: every score compares both with the whitespace around them stripped (SQuAD's normalization strips it too)."""
    got = score_qa([{"task": "t", "prediction": "JJJJ", "reference": "  JJJJ\n"},
                    {"task": "t", "prediction": "a b", "reference": "\ta b "}])["t"]
    assert (got["exact_match"], got["char_f1"], got["rouge_l"]) == (1.0, 1.0, 1.0)


def test_rouge_l_and_char_f1_by_hand():
    # LCS("我爱北京天安门", "我爱上海") = "我爱": P = 2/7, R = 2/4, F = 2PR / (P + R) = 4/11
    assert rouge_l("我爱北京天安门", "我爱上海") == pytest.approx(4 / 11)
    assert rouge_l("abc", "xyz") == 0.0 and rouge_l("江泽民", "江泽民") == 1.0
    # common characters of "江泽民、李鹏" and "李鹏": 2; P = 2/6, R = 2/2
    assert char_f1("江泽民、李鹏", "李鹏") == pytest.approx(2 * (2 / 6) * 1 / (2 / 6 + 1))


def test_qa_reads_every_field_name_and_scores_labels(tmp_path):
    records = [
        {"question": "q1", "answer": "正面"}, {"prompt": "q2", "std_answer": "负面"},
        {"instruction": "判断：", "input": "q3", "target": "正面"}, {"instruction": "q4", "output": "正面"},
    ]
    f = tmp_path / "qa.jsonl"
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records))
    items, skipped, bad = read_qa(f)
    items = list(items)
    assert skipped == 0 and bad == []
    assert [(i["question"], i["reference"]) for i in items] == [
        ("q1", "正面"), ("q2", "负面"), ("判断：q3", "正面"), ("q4", "正面")]
    for it, pred in zip(items, ["正面", "正面", "正面", "负面"], strict=True):
        it["prediction"] = pred
    # with 4 items and 2 labels it is not yet a classification task (needs 3 items per label)
    scores = score_qa(items * 2)["qa"]
    assert scores["accuracy"] == 0.5 and scores["majority_baseline"] == 0.75 and scores["items"] == 8
    assert "accuracy" not in score_qa(items)["qa"]


def test_the_readme_says_which_qa_tasks_get_accuracy():
    """A task of 12 person names among 6 names got majority_baseline and no accuracy, while the README said a task of
    labels gets both: every task gets the baseline, and the README says which tasks are of labels."""
    from pathlib import Path

    from babyllama.evaluate import ITEMS_PER_LABEL, MAX_LABELS

    names = [{"task": "person", "prediction": "张三", "reference": n} for n in "甲乙丙丁戊己" for _ in range(2)]
    scores = score_qa(names)["person"]
    assert scores["majority_baseline"] == 2 / 12 and "accuracy" not in scores and "labels" not in scores
    scores = score_qa(names + names[::2])["person"]  # 3 items a label
    assert scores["accuracy"] == scores["exact_match"] == 0 and scores["labels"] == dict.fromkeys("甲乙丙丁戊己", 3)
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert (f"A task whose references are a few labels, at most {MAX_LABELS} different ones with {ITEMS_PER_LABEL} "
            "items or more for each on average") in readme
    assert "Every task gets `majority_baseline`" in readme


@pytest.mark.parametrize("text", ["", "\n\n"])
def test_an_empty_qa_file_says_it_is_empty(tmp_path, text):
    """An empty --qa file said it "holds no QA records with a reference ...; 0 had none or an empty one"."""
    f = tmp_path / "qa.jsonl"
    f.write_text(text)
    with pytest.raises(UserError) as e:
        read_qa(f)
    assert str(e.value).startswith(f"{f} is empty: it holds no QA records; pass a file of them (")


def test_qa_items_without_a_reference_are_skipped_and_counted(tmp_path):
    # BELLE's eval set: std_answer "" on some items; they must not be scored against ""
    records = [{"question": "q1", "std_answer": "正面"}, {"question": "q2", "std_answer": ""},
               {"question": "q3", "std_answer": "   "}, {"question": "q4"}, {"question": "q5", "answer": "负面"}]
    f = tmp_path / "qa.jsonl"
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records))
    items, skipped, bad = read_qa(f)
    assert [i["question"] for i in items] == ["q1", "q5"] and skipped == 3 and bad == []
    f.write_text(json.dumps({"question": "q", "std_answer": ""}))
    with pytest.raises(UserError, match="no QA records with a reference"):
        read_qa(f)


def test_bad_qa_records_are_counted_and_skipped_and_say_where_and_why(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_bytes("\n".join([json.dumps({"question": "q1", "answer": "正面"}, ensure_ascii=False),
                              '{"question": "q2", "answer": ',  # not valid JSON
                              json.dumps({"answer": "负面"}, ensure_ascii=False),  # no question
                              '["q4", "正面"]',
                              json.dumps({"question": "q5", "answer": "负面"}, ensure_ascii=False),
                              json.dumps({"question": " ", "answer": "负面"}, ensure_ascii=False)]).encode())
    items, skipped, bad = read_qa(f)
    assert [i["question"] for i in items] == ["q1", "q5"] and skipped == 0
    assert bad == [f"{f}:2: not valid JSON (Expecting value)",
                   f"{f}:3: a QA record needs a question (question, prompt or instruction+input)",
                   f"{f}:4: not a JSON object",
                   f"{f}:6: a QA record needs a question (question, prompt or instruction+input)"]
    f.write_text('{"question": "q2", "answer": \n' + json.dumps({"question": "q", "std_answer": ""}))
    with pytest.raises(UserError) as e:  # nothing good is left
        read_qa(f)
    assert str(e.value) == (f"{f} holds no QA records with a reference (answer, std_answer, target, output, "
                            f"completion, or a conversation's last answer); 1 had none or an empty one, 1 was bad (the "
                            f"first: {f}:1: not valid JSON (Expecting value)).")


def test_qa_fields_are_text_and_one_of_another_type_makes_a_bad_record_that_names_it(tmp_path):
    """A question field is a string (as SFT reads it), a reference or task a string or a number (its text), a
    reference also a list of strings (test_qa_references_of_several_strings_are_joined); a field of another type
    was read four ways (joined, str()-ed, "needs a question", no reference): now one."""
    records = [{"question": "q1", "answer": 5, "task": 7}, {"question": "q2", "answer": 0.5, "task": None},
               {"instruction": "q3", "input": None, "output": "好"},
               {"question": ["a"], "answer": "正面"}, {"question": "q5", "answer": ["正面", 1]},
               {"question": "q6", "answer": "正面", "task": 0.55}, {"question": "q7", "answer": "正面", "task": ["t"]},
               {"prompt": 3, "answer": "正面"}, {"instruction": "q9", "input": {"x": 1}, "output": "正面"},
               {"question": "q10", "std_answer": True}, {"question": None, "prompt": "q11", "target": {"a": "b"}},
               {"instruction": False, "output": "正面"}]
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    items, skipped, bad = read_qa(f)
    assert list(items) == [{"question": "q1", "reference": "5", "task": "7"}, {"question": "q2", "reference": "0.5",
                      "task": "qa"}, {"question": "q3", "reference": "好", "task": "qa"},
                     {"question": "q6", "reference": "正面", "task": "0.55"}] and skipped == 0
    assert bad == [f"{f}:4: its 'question' is a list, not a string",
                   f"{f}:5: its 'answer' is a list, not a string or a number",  # not all strings
                   f"{f}:7: its 'task' is a list, not a string or a number",
                   f"{f}:8: its 'prompt' is a number, not a string",
                   f"{f}:9: its 'input' is an object, not a string",
                   f"{f}:10: its 'std_answer' is true or false, not a string or a number",
                   f"{f}:11: its 'target' is an object, not a string or a number",
                   f"{f}:12: its 'instruction' is true or false, not a string"]




def test_qa_and_mc_rows_with_bad_bytes_or_a_lone_surrogate_say_which(tmp_path):
    """A JSON escape \\ud800 was "bytes that are not text in the file's encoding", which the file does not hold."""
    row = b', "answer": "A", "A": "a", "B": "b", "C": "c", "D": "d"}'
    good = json.dumps({"question": "问甲"}, ensure_ascii=False).encode()[:-1] + row  # 2 of 3 lines UTF-8: UTF-8
    f = tmp_path / "law_val.jsonl"
    f.write_bytes(b"\n".join([good, good, b'{"question": "q\xff"' + row, b'{"question": "q\\ud800"' + row]))
    why = [f"{f}:3: {{}} holds bytes that are not text in the file's encoding (\\xff)",
           f"{f}:4: {{}} holds a lone surrogate (\\ud800-\\udfff), which no tokenizer can encode"]
    assert read_qa(f)[2] == [w.format("the record") for w in why]
    assert read_mc([f])[1] == [w.format("the row") for w in why]


def test_qa_asks_after_a_records_system_and_history_as_sft_trains_on_them(tmp_path, tiny_run, bpe_tokenizer,
                                                                         monkeypatch):
    """An alpaca QA record's `system` and `history` were dropped: eval asked its question alone, where SFT (and
    the chat REPL) put the system text and the earlier turns before it. The prompt is now SFT's ids up to the
    answer, token for token; counted as cut to the context by that prompt; a field of another type is bad."""
    import babyllama.evaluate
    from babyllama.chat_format import Conversation, conversation_from_record, render_conversation
    from babyllama.evaluate import evaluate, qa_prompt

    long_history = {"instruction": "短", "output": "正面", "history": [["你好" * 15, "好"]]}
    alpaca = {"system": "你是助手", "instruction": "问四", "input": "", "output": "答四",
              "history": [["早先的问", "早先的答"]]}
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        alpaca, long_history, {"question": "问五", "answer": "答五", "system": "", "history": []},
        {"question": "问", "answer": "答", "system": 1}, {"question": "问", "answer": "答", "history": [["只有问"]]}]))
    items, _, bad = read_qa(f)
    items = list(items)
    assert items[0] == {"question": "问四", "reference": "答四", "task": "qa", "system": "你是助手",
                        "history": [["早先的问", "早先的答"]]}
    assert items[2] == {"question": "问五", "reference": "答五", "task": "qa"}  # empty: none, as before
    assert bad == [f"{f}:4: its 'system' is a number, not a string",
                   f"{f}:5: its 'history' is not a list of [question, answer] pairs of strings"]
    asked = []
    monkeypatch.setattr(babyllama.evaluate, "answer", lambda model, tok, conv, *a: asked.append(conv) or "正面")
    result = evaluate(tiny_run / "run" / "final", tmp_path / "out", qa=str(f), sampling=Sampling(max_new_tokens=1))
    assert asked == [Conversation([("早先的问", "早先的答"), ("问四", "")], "你是助手"),
                     Conversation([("你好" * 15, "好"), ("短", "")]), Conversation([("问五", "")])]
    sft_ids, sft_mask = render_conversation(bpe_tokenizer, conversation_from_record(alpaca))
    last_answer = len(sft_mask) - sft_mask[::-1].index(0)  # after the last question's <bos>
    assert qa_prompt(bpe_tokenizer, asked[0]) == sft_ids[:last_answer] and 1 in sft_mask[:last_answer]
    assert result["qa_cut_to_context"] == 1 and result["qa_bad_records"] == 2  # the long history's, of 32 ids


def test_a_huge_question_is_counted_cut_without_being_tokenized_whole(bpe_tokenizer, monkeypatch):
    """eval --qa with a 2,000,000-character question took 1.25 GB: counting the questions cut to the context
    rendered each whole. It now asks the cut (chat_format.cut_conversation), which tokenizes no text from more
    characters than the cut can keep; a question that fits whole is not counted."""
    from babyllama.chat_format import CUT_MARGIN, longest_piece
    from babyllama.evaluate import cut_to_context
    from tests.test_chat_format import encoded_lengths

    huge = "".join(random.Random(0).choices("天地玄黄宇宙洪荒日月", k=50_000))
    items = [{"question": huge, "reference": "答", "task": "qa"}, {"question": "短", "reference": "答", "task": "qa"},
             {"question": "问", "reference": "答", "task": "qa", "history": [[huge, "答"]]}]
    lengths = encoded_lengths(monkeypatch, bpe_tokenizer)
    assert cut_to_context(bpe_tokenizer, 64, 16, [], items, []) == {"prompts": 0, "qa": 2, "mc": 0}
    assert max(lengths) == (48 + CUT_MARGIN) * longest_piece(bpe_tokenizer)  # 48: the prompt's budget


def test_qa_reads_messages_and_prompt_completion_records_as_sft_does(tmp_path, tiny_run, bpe_tokenizer):
    """`eval --qa` on OpenAI's `messages` records said "holds no QA records with a reference" (each "needs a
    question"), and a {"prompt", "completion"} record had no reference: a conversation's last answer is the
    reference, asked after the messages before it as SFT renders them, and `completion` is an answer."""
    from babyllama.chat_format import conversation_from_record, render_conversation
    from babyllama.evaluate import evaluate, qa_conversation, qa_prompt

    def says(role, content):
        return {"role": role, "content": content}

    records = [{"messages": [says("user", "问一"), says("assistant", "答一")]},
               {"messages": [says("system", "你是助手"), says("user", "早先的问"), says("assistant", "早先的答"),
                             says("user", "问二"), says("assistant", [{"type": "text", "text": "答二"}])]},
               {"messages": [says("developer", "简洁"), says("user", "问三"), says("assistant", "答三")], "task": "t"}]
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    result = evaluate(tiny_run / "run" / "final", tmp_path / "out", qa=str(f), sampling=Sampling(max_new_tokens=1))
    items = [json.loads(line) for line in (tmp_path / "out" / "items.jsonl").read_text().splitlines()]
    assert [{k: it[k] for k in it if k != "prediction"} for it in items] == [
        {"kind": "qa", "question": "问一", "reference": "答一", "task": "qa"},
        {"kind": "qa", "question": "问二", "reference": "答二", "task": "qa", "system": "你是助手",
         "history": [["早先的问", "早先的答"]]},
        {"kind": "qa", "question": "问三", "reference": "答三", "task": "t", "system": "简洁"}]
    assert result["qa_bad_records"] == 0 and result["qa"]["qa"]["items"] == 2
    for record, item in zip(records, items, strict=True):  # asked with SFT's ids up to the answer
        ids, mask = render_conversation(bpe_tokenizer, conversation_from_record(record))
        assert qa_prompt(bpe_tokenizer, qa_conversation(item)) == ids[: len(mask) - mask[::-1].index(0)]
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        {"prompt": "问四", "completion": "答四"},
        {"prompt": [says("user", "问五")], "completion": [says("assistant", "答五")]},
        {"messages": [says("user", "问六"), says("assistant", "答六"), says("user", "没有答")]}]))
    items, *counts = read_qa(f)
    assert list(items) == [{"question": "问四", "reference": "答四", "task": "qa"},
                           {"question": "问五", "reference": "答五", "task": "qa"}]
    assert counts == [0, [f"{f}:3: the last message must come from the assistant"]]


def test_qa_reads_the_system_and_history_of_a_prompt_completion_record_once():
    """The top-level `system` and `history` of TRL's conversational prompt / completion were read twice: the item
    asked after 'TOP\nTOP' and the history's turn twice."""
    record = {"prompt": [{"role": "user", "content": "P"}], "completion": [{"role": "assistant", "content": "C"}],
              "system": "TOP", "history": [["h", "a"]]}
    assert qa_item(record, "") == {"question": "P", "reference": "C", "task": "qa", "system": "TOP",
                                   "history": [["h", "a"]]}


def test_qa_asks_the_last_answer_with_loss_as_sft_trains_on_it():
    """A conversation's last answer was the reference, though it had "weight": 0 (SFT does not train on it): the
    reference is the last answer that carries loss, asked after the turns before it; one with none is bad."""
    messages = [{"role": "user", "content": "问一"}, {"role": "assistant", "content": "答一"},
                {"role": "user", "content": "问二"}, {"role": "assistant", "content": "答二", "weight": 0}]
    assert qa_item({"messages": messages}, "") == {"question": "问一", "reference": "答一", "task": "qa"}
    with pytest.raises(ValueError, match="^no answer carries loss"):
        qa_item({"messages": [*messages[:1], {**messages[1], "weight": 0}]}, "")


def test_a_null_messages_field_is_an_absent_one():
    """A parquet export's null `messages` beside a question and answer made the QA record bad."""
    assert qa_item({"messages": None, "question": "q", "answer": "a"}, "") == {"question": "q", "reference": "a",
                                                                                "task": "qa"}


def test_qa_counts_a_preference_record_bad_whatever_the_shape_of_its_prompt(tmp_path, capsys):
    """`eval --qa` on a DPO file counted a {prompt, chosen, rejected} of strings as an item without a reference
    ("had none or an empty one") and the same pair with a list prompt bad, "it is a preference record": one rule, as
    SFT's, makes every preference record bad, with that reason, and none is said to lack a reference."""
    user, answer = {"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        {"question": "问", "answer": "答"}, {"prompt": "问", "chosen": "答", "rejected": "错"},
        {"prompt": [user], "chosen": [answer], "rejected": [answer]},
        {"question": "问", "response_chosen": "答", "response_rejected": "错"},
        {"input": {"messages": [user]}, "preferred_output": [answer], "non_preferred_output": [answer]},
        {"question": "问", "answer": "答", "chosen": "答"},
        {"prompt": "问", "chosen": "答", "rejected": "错", "answer": "答"}]))  # no reference 答: SFT trains on nothing
    items, no_reference, bad = read_qa(f)
    assert (list(items), no_reference) == ([{"question": "问", "reference": "答", "task": "qa"}], 0)
    assert bad == [f"{f}:{i}: it is a preference record ({fields}), which `babyllama dpo` reads" for i, fields in [
        (2, "'chosen' and 'rejected'"), (3, "'chosen' and 'rejected'"),
        (4, "'response_chosen' and 'response_rejected'"), (5, "'preferred_output' and 'non_preferred_output'")]] + [
        f"{f}:6: it is a preference record ('chosen'), bad for `babyllama dpo` too: its 'rejected' is missing",
        f"{f}:7: it is a preference record ('chosen' and 'rejected'), which `babyllama dpo` reads"]
    assert capsys.readouterr().out == ""  # no fields of a pair said left out


def test_qa_names_the_fields_a_record_of_two_shapes_leaves_out_once_a_file(tmp_path, capsys):
    """A QA record with a question and answer and messages, or messages and an answer, dropped the fields of one
    without a word: they are named once a file, as SFT and prepare name them."""
    says = [{"role": "user", "content": "U"}, {"role": "assistant", "content": "M"}]
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "Q", "answer": "A", "messages": says}, {"messages": says, "answer": "A"},
        {"question": "Q", "answer": "A", "task": "t"}, {"prompt": "P", "completion": "C", "instruction": "I"}]))
    items, *counts = read_qa(f)
    assert (list(items), *counts) == ([{"question": "U", "reference": "M", "task": "qa"}] * 2 + [
        {"question": "Q", "reference": "A", "task": "t"}, {"question": "P", "reference": "C", "task": "qa"}], 0, [])
    assert capsys.readouterr().out == (
        f"note: {f}: records with the fields of more than one shape are read in the first of conversations, messages, "
        "prompt with answer (else completion), instruction with output (as SFT reads them), else a question "
        "(question, prompt, instruction with input) and a reference (answer, std_answer, target, output, completion), "
        f"leaving out the 'answer' of 2 records (the first at {f}:1), the 'question' of 1 record (the first at {f}:1), "
        f"the 'instruction' of 1 record (the first at {f}:4)\n")


def test_qa_scores_the_answer_sft_trains_on(tmp_path, capsys):
    """A record with several answer fields was scored against the first of answer, std_answer, target, output,
    completion: {prompt, completion, output} against its output, where SFT trains on the completion, and an
    instruction with an output and an answer against the answer, where SFT trains on the output. A record that SFT
    reads is read as SFT reads it (chat_format.read_fields), the other fields named as left out."""
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "P", "completion": "C", "output": "O"},
        {"instruction": "I", "input": "X", "output": "O", "answer": "A"},
        {"question": "Q", "prompt": "P", "answer": "A"},
        {"question": "Q", "target": "T", "output": "O"}]))  # no SFT shape: eval's own, the first reference
    items, *counts = read_qa(f)
    assert (list(items), *counts) == ([
        {"question": "P", "reference": "C", "task": "qa"}, {"question": "IX", "reference": "O", "task": "qa"},
        {"question": "P", "reference": "A", "task": "qa"}, {"question": "Q", "reference": "T", "task": "qa"}], 0, [])
    assert capsys.readouterr().out.endswith(
        f"leaving out the 'output' of 2 records (the first at {f}:1), the 'answer' of 1 record (the first at {f}:2), "
        f"the 'question' of 1 record (the first at {f}:3)\n")


def test_qa_references_of_several_strings_are_joined(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text(json.dumps({"question": "谁？", "answer": ["江泽民", "李鹏"]}, ensure_ascii=False) + "\n")
    items, *counts = read_qa(f)
    assert list(items) == [{"question": "谁？", "reference": "江泽民、李鹏", "task": "qa"}] and counts == [0, []]

def test_qa_items_are_read_at_each_pass_and_the_readers_warnings_said_once(tmp_path, caplog):
    """The items are not held but read from the file at each pass (its count, the settings' digest, the answers
    so far, the answering): a GBK file's "not UTF-8" warning was said at each of them."""
    import logging

    f = tmp_path / "qa.jsonl"
    f.write_bytes("".join(json.dumps({"question": f"问题{i}", "answer": "答案"}, ensure_ascii=False) + "\n"
                          for i in range(5)).encode("gbk"))
    with caplog.at_level(logging.WARNING):
        items, _, _ = read_qa(f, limit=3)
        first, again = list(items), list(items)
    assert len(items) == 3 and first == again == [{"question": f"问题{i}", "reference": "答案", "task": "qa"}
                                                  for i in range(3)]
    assert [r.getMessage() for r in caplog.records] == [
        f"{f}: not UTF-8; reading it as GB18030 (detected). To convert it: iconv -f GB18030 -t UTF-8 {f} > {f}.utf8 "
        f"&& mv {f}.utf8 {f}"]
    f.write_bytes(b"")  # read again: the file as it is now
    assert list(items) == []


def test_qa_folder_reads_its_data_files_not_the_token_cache_built_from_them(tmp_path, bpe_tokenizer):
    from babyllama.data.sft_tokens import SFTSettings, build_sft_cache

    qa = tmp_path / "qa"
    qa.mkdir()
    records = [{"instruction": f"问题{i}", "output": ["正面", "负面"][i % 2]} for i in range(20)]
    (qa / "eval.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records))
    bpe_tokenizer.save(tmp_path / "tok")
    build_sft_cache([qa / "eval.jsonl"], tmp_path / "tok", qa / "sft_tokens", SFTSettings(max_len=64))
    assert {f.name for f in (qa / "sft_tokens").iterdir()} >= {"manifest.json", "bad_records.txt", "train.ids.bin"}
    (qa / "blob.bin").write_bytes(bytes(range(256)))
    (qa / ".eval.jsonl.tmp.jsonl").write_text("{cut")  # a hidden temporary
    alone, folder = read_qa(qa / "eval.jsonl"), read_qa(qa)
    assert list(folder[0]) == list(alone[0]) and len(alone[0]) == 20
    assert folder[1:] == alone[1:] == (0, [])  # the cache's JSON: 34 bad records


def test_qa_and_mc_folders_skip_their_text_files_and_say_so(tmp_path, capsys):
    """`--qa DIR` read every data file of DIR: a readme.txt beside the QA files made a bad QA record of each of its
    lines. A folder's .txt files, which hold lines of text and no records, are skipped with a note; a .txt named
    itself is read (its lines are bad records, as before)."""
    qa, mc = tmp_path / "qa", tmp_path / "mc"
    qa.mkdir()
    mc.mkdir()
    (qa / "a.jsonl").write_text(json.dumps({"question": "问", "answer": "答"}, ensure_ascii=False) + "\n")
    (qa / "readme.txt").write_text("这些是评测题\n")
    (mc / "law_val.csv").write_text("question,A,B,C,D,answer\n问,甲,乙,丙,丁,A\n", encoding="utf-8")
    for name in ("readme.txt", "notes.txt.gz"):
        (mc / name).write_bytes(b"")
    items, *counts = read_qa(qa)
    assert list(items) == [{"question": "问", "reference": "答", "task": "qa"}] and counts == [0, []]
    assert [it["question"] for it in read_mc([mc])[0]] == ["问"]
    assert capsys.readouterr().out == (
        f"note: --qa reads records from .jsonl, .json, .csv, .parquet files; {qa / 'readme.txt'} is skipped.\n"
        f"note: --mc reads records from .jsonl, .json, .csv, .parquet files; {mc / 'notes.txt.gz'}, "
        f"{mc / 'readme.txt'} are skipped.\n")
    with pytest.raises(UserError) as e:
        read_qa(qa / "readme.txt")
    assert str(e.value) == (f"{qa / 'readme.txt'} holds no QA records with a reference (answer, std_answer, target, "
                            f"output, completion, or a conversation's last answer); 0 had none or an empty one, 1 was "
                            f"bad (the first: {qa / 'readme.txt'}:1: a QA record needs a question (question, prompt or "
                            "instruction+input)).")
    (qa / "more.txt").write_text("x\n")  # two bad: "were"
    with pytest.raises(UserError, match=r", 2 were bad \(the first"):
        read_mc([qa / "readme.txt", qa / "more.txt"])


def test_a_folder_of_many_text_files_names_three_and_counts_the_others(tmp_path, capsys):
    for name in ("a.txt", "b.txt", "c.txt", "d.txt", "e.txt"):
        (tmp_path / name).write_text("x\n")
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "问", "answer": "答"}, ensure_ascii=False) + "\n")
    assert list(read_qa(tmp_path)[0]) == [{"question": "问", "reference": "答", "task": "qa"}]
    assert capsys.readouterr().out == (f"note: --qa reads records from .jsonl, .json, .csv, .parquet files; "
                                       f"{tmp_path / 'a.txt'}, {tmp_path / 'b.txt'}, {tmp_path / 'c.txt'} and 2 more "
                                       "are skipped.\n")


def test_qa_or_mc_pointed_at_a_checkpoint_says_it_is_one(tmp_path, bpe_tokenizer):
    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    for flag in ("--qa", "--mc"):
        r = run_cli("eval", str(tmp_path / "ck"), flag, str(tmp_path / "ck"), "--out_dir", str(tmp_path / "out"))
        assert (r.returncode, r.stderr.strip().splitlines()[-1]) == (2, (
            f"babyllama: error: {tmp_path / 'ck'} is a checkpoint, not a folder of data files; name the data files "
            "or their folder."))
    assert not (tmp_path / "out").exists()


def test_bad_multiple_choice_rows_are_counted_and_skipped(tmp_path):
    f = tmp_path / "law_val.jsonl"
    f.write_text("\n".join([json.dumps({"question": "一", "A": "甲", "B": "乙", "C": "丙", "D": "丁", "answer": "A"}),
                             "{not json", json.dumps({"question": "三", "A": "甲", "B": "乙", "answer": "B"})]))
    items, bad = read_mc([f])
    assert [i["question"] for i in items] == ["一"]
    assert bad == [f"{f}:2: not valid JSON (Expecting property name enclosed in double quotes)",
                   f"{f}:3: a multiple-choice row needs question, A-D, answer; missing C, D"]
    csv = tmp_path / "law_dev.csv"
    csv.write_text("question,A,B,C,D\n问,甲,乙,丙,丁\n", encoding="utf-8")
    with pytest.raises(UserError) as e:  # nothing good is left
        read_mc([csv])
    assert str(e.value) == (f"no multiple-choice items with an answer in {csv}, 1 was bad (the first: {csv}:2: "
                            "a multiple-choice row needs question, A-D, answer; missing answer).")


def test_every_multiple_choice_row_is_an_item_or_a_bad_record(tmp_path):
    f = tmp_path / "law_val.csv"  # the tester's file: 2 of its 6 rows were scored, none counted as bad
    f.write_text("question,A,B,C,D,answer\n一,甲,乙,丙,丁,B\n二,甲,乙,丙,丁, B \n三,,,,,E\n四,甲,乙,丙,丁,b\n"
                 "五,甲,乙,丙,丁,\n六,甲,乙,丙,丁,AB\n,甲,乙,丙,丁,A\n八, , ,,,C\n", encoding="utf-8")
    items, bad = read_mc([f])
    assert [(i["question"], i["answer"]) for i in items] == [("一", "B"), ("二", "B"), ("四", "B")]
    assert bad == [f"{f}:4: the answer 'E' is not one of A, B, C, D", f"{f}:6: the answer '' is not one of A, B, C, D",
                   f"{f}:7: the answer 'AB' is not one of A, B, C, D",
                   f"{f}:8: a multiple-choice row needs a question; it is empty",
                   f"{f}:9: a multiple-choice row needs options; A-D are all empty"]
    j = tmp_path / "law_dev.jsonl"  # a JSON null is no option text "None", and no answer
    j.write_text(json.dumps({"question": "一", "A": None, "B": "乙", "C": "丙", "D": "丁", "answer": "b"}) + "\n"
                 + json.dumps({"question": "二", "A": "甲", "B": "乙", "C": "丙", "D": "丁", "answer": None}))
    items, bad = read_mc([j])
    assert [(i["options"]["A"], i["answer"]) for i in items] == [("", "B")]
    assert bad == [f"{j}:2: the answer '' is not one of A, B, C, D"]
    j.write_text("\n".join(json.dumps(r) for r in [  # numbers are their text; a list or an object is a bad row
        {"question": "一", "A": 1, "B": 2.5, "C": 3, "D": 4, "answer": "B"},
        {"question": "二", "A": ["甲", "乙"], "B": "乙", "C": "丙", "D": "丁", "answer": "A"},
        {"question": {"text": "三"}, "A": "甲", "B": "乙", "C": "丙", "D": "丁", "answer": "A"}]))
    items, bad = read_mc([j])
    assert [(i["question"], i["options"]) for i in items] == [("一", {"A": "1", "B": "2.5", "C": "3", "D": "4"})]
    assert bad == [f"{j}:2: its 'A' is a list, not a string or a number",
                   f"{j}:3: its 'question' is an object, not a string or a number"]


def test_answers_and_continuations_cut_inside_a_character_drop_it(bpe_tokenizer):
    from babyllama.evaluate import answer, continuations

    class Cut:  # a model whose max_new_tokens ran out inside 😀
        cfg = tiny_config(vocab_size=600)

        def generate(self, prompt, **kwargs):
            return bpe_tokenizer.encode("正面😀")[:-1]

    assert bpe_tokenizer.decode(Cut().generate([])) == "正面\ufffd"
    assert answer(Cut(), bpe_tokenizer, "问") == "正面"
    assert continuations(Cut(), bpe_tokenizer, ["问"])[0]["continuation"] == "正面"


def test_questions_and_prompts_are_cut_to_leave_room_for_max_new_tokens(bpe_tokenizer):
    """A question longer than the context less max_new_tokens was cut by the model to its last max_seq_len - 1 ids,
    leaving one token for the answer: the tester's long reviews were answered '正' or '' (1 of 13 right, 5 of 13
    cut by hand), and a record with a long history the same. The prompt now leaves max_new_tokens (at most half the
    context), cut as SFT cuts: the history's oldest turns first, then the beginning of the question."""
    from babyllama.chat_format import Conversation, render_prompt, text_prompt
    from babyllama.evaluate import answer, continuations

    class Asked:  # a model of 32 tokens that records the prompts it is given
        cfg = tiny_config(vocab_size=600, max_seq_len=32)
        prompts: list[tuple[list[int], int]] = []

        def generate(self, prompt, max_new_tokens, **kwargs):
            self.prompts.append((prompt, max_new_tokens))
            return bpe_tokenizer.encode("正面")

    tok, model = bpe_tokenizer, Asked()
    question = "你好" * 15 + "你"  # 31 ids, 32 with <bos>
    whole = render_prompt(tok, Conversation([(question, "")]))
    short = render_prompt(tok, Conversation([("短", "")]))
    assert (len(whole), len(short)) == (32, 3)
    assert answer(model, tok, question, Sampling(max_new_tokens=8)) == "正面"
    assert answer(model, tok, Conversation([(question, "好"), ("短", "")]), Sampling(max_new_tokens=8)) == "正面"
    answer(model, tok, question, Sampling(max_new_tokens=100))  # at most half the context for the answer
    answer(model, tok, "短", Sampling(max_new_tokens=8))
    assert model.prompts == [(whole[-24:], 8), (short, 8), (whole[-16:], 100), (short, 8)]
    assert whole[-1] == tok.bos_id
    model.prompts.clear()
    continuations(model, tok, [question], Sampling(max_new_tokens=4))
    continuations(model, tok, [question])  # CONTINUATION_TOKENS (64), at most half the context
    assert model.prompts == [(text_prompt(tok, question)[-28:], 4), (text_prompt(tok, question)[-16:], 64)]


def test_eval_prompts_cut_on_the_left_begin_with_a_whole_character(bpe_tokenizer):
    """A continuation prompt, and the text before a multiple-choice option, too long for the context kept their last
    ids, the first of which could be the tail of a 4-byte character: the model read '\ufffd\ufffd题...'. The cut
    now begins with a whole character (chat_format.last_whole_characters), as a cut QA question does (render_prompt,
    test_chat_format), at each offset into the character."""
    from babyllama.chat_format import text_prompt
    from babyllama.evaluate import ModelScorer, continuations
    from tests.test_chat_format import FOUR_BYTES, assert_longest_whole_end

    class Asked:  # a model of 32 tokens that records the prompts it is given
        cfg = tiny_config(vocab_size=600, max_seq_len=32)
        prompts: list[list[int]] = []

        def generate(self, prompt, **kwargs):
            self.prompts.append(prompt)
            return bpe_tokenizer.encode("好")

    tok, model, full = bpe_tokenizer, Asked(), text_prompt(bpe_tokenizer, FOUR_BYTES)
    assert len(full) > 32
    for n in range(1, 17):  # prompts of 31 ids down to 16: cuts at 16 offsets, 4 in each 4-byte character
        continuations(model, tok, [FOUR_BYTES], Sampling(max_new_tokens=n))
        assert_longest_whole_end(tok, full, model.prompts[-1], 32 - n, FOUR_BYTES)

    class Window:  # a model that records the ids it reads and gives every id the same logit
        def __init__(self, max_seq_len):
            self.cfg, self.rope_cos = tiny_config(vocab_size=600, max_seq_len=max_seq_len), torch.zeros(1)
            self.read = []

        def __call__(self, x):
            self.read.append(x[0].tolist())
            return torch.zeros(1, x.shape[1], 600), None

    context, continuation = split_continuation(tok, FOUR_BYTES, "好")
    assert len(continuation) == 1
    for max_seq_len in range(8, 24):  # a window of 9 to 24 ids
        window = Window(max_seq_len)
        assert ModelScorer(window, tok).logprob(context, continuation) == pytest.approx(-math.log(600))
        assert_longest_whole_end(tok, context + continuation, window.read[0] + continuation, max_seq_len + 1,
                                 FOUR_BYTES + "好")


class Recorder:
    """A scorer that remembers what it was asked to score."""

    def __init__(self):
        self.calls = []

    def logprob(self, context, continuation):
        self.calls.append((context, continuation))
        return -float(len(self.calls))


MC_ITEM = {"subject": "net", "question": "哪一个是网络协议", "answer": "A",
           "options": {"A": "IP", "B": "“北京”", "C": "（1）正确", "D": "GPU"}}  # “ and （ merge with ：


def assert_scored_as_in_the_full_text(tok):
    rec = Recorder()
    mc_choices(MC_ITEM, rec, tok)
    options = "".join(f"\n{c}. {MC_ITEM['options'][c]}" for c in "ABCD")
    fulls = [f"{MC_ITEM['question']}{options}\n答案：{c}" for c in "ABCD"]
    fulls += [f"{MC_ITEM['question']}\n答案：{MC_ITEM['options'][c]}" for c in "ABCD"]
    for (context, continuation), full in zip(rec.calls, fulls, strict=True):
        assert context + continuation == tok.encode(full)
    return rec.calls


def test_mc_continuation_is_tokenized_in_its_context_bpe(bpe_tokenizer):
    assert_scored_as_in_the_full_text(bpe_tokenizer)
    ctx, cont = split_continuation(bpe_tokenizer, "答案： ", "A")  # a trailing space goes with the answer
    assert bpe_tokenizer.decode(cont) == " A" and bpe_tokenizer.decode(ctx) == "答案："


@pytest.mark.skipif(not CHATGLM2.is_file(), reason="ChatGLM2 tokenizer.model not present")
def test_mc_continuation_is_tokenized_in_its_context_chatglm2():
    from babyllama.tokenizer import load_tokenizer

    tok = load_tokenizer(CHATGLM2)
    calls = assert_scored_as_in_the_full_text(tok)
    sp = tok.sp
    assert calls[0][1] == [sp.piece_to_id("A")] != tok.encode("A") == [sp.piece_to_id("▁A")]
    assert calls[4][1] == tok.encode("答案：IP")[len(tok.encode("答案：")):] != tok.encode("IP")


def test_multiple_choice_with_a_stub_of_known_log_probs(tmp_path, bpe_tokenizer):
    (tmp_path / "physics_val.csv").write_text(
        "id,question,A,B,C,D,answer\n1,光速是多少,甲,乙,丙,丁,A\n2,重力是什么,甲,乙,丙,丁,B\n", encoding="utf-8")
    (tmp_path / "history.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"Question": "秦朝何时建立", "A": "甲", "B": "乙", "C": "丙", "D": "丁", "Answer": "C"}]))
    items, bad = read_mc([tmp_path / "physics_val.csv", tmp_path / "history.jsonl"])
    assert bad == []
    assert [i["subject"] for i in items] == ["physics", "physics", "history"]
    tok = bpe_tokenizer

    class Stub:
        """Prefers letter A and option text 乙 whatever the question."""

        def logprob(self, context, continuation):
            text = tok.decode(continuation)
            return {"A": -0.1, "乙": -0.2}.get(text, -5.0) * len(continuation)

    results = [mc_choices(it, Stub(), tok) for it in items]
    summary = mc_summary(iter(results))  # read once
    assert [r["letter_choice"] for r in results] == ["A", "A", "A"]
    assert [r["text_choice"] for r in results] == ["B", "B", "B"]
    assert summary["subjects"]["physics"] == {"items": 2, "letter_accuracy": 0.5, "text_accuracy": 0.5}
    assert summary["subjects"]["history"] == {"items": 1, "letter_accuracy": 0.0, "text_accuracy": 0.0}
    assert summary["overall"]["letter_accuracy"] == pytest.approx(1 / 3)


def test_an_empty_option_is_never_chosen_and_a_row_whose_answer_is_empty_is_bad(tmp_path, bpe_tokenizer):
    """An empty option (an empty CSV cell, a null) was scored as <eos> after the question, one token, and won
    text_accuracy on each of the tester's rows; its letter was scored too. It is no choice now, by letter or by
    text, and a row whose answer is an empty option (no choice can be right) is bad."""
    f = tmp_path / "geo_val.csv"  # the tester's rows, and one whose answer's option is blank
    f.write_text("question,A,B,C,D,answer\n中国的首都是哪里？,北京,上海,广州,,A\n水的化学式是？,H2O,CO2,,,A\n"
                 "一年有几个月？,12,,11,13,A\n空,甲,乙,丙, ,D\n", encoding="utf-8")
    items, bad = read_mc([f])
    assert [it["question"] for it in items] == ["中国的首都是哪里？", "水的化学式是？", "一年有几个月？"]
    assert bad == [f"{f}:5: the answer D is an empty option"]
    tok, scored = bpe_tokenizer, []

    class Short:
        """Prefers the later letter and the shorter option text: an empty option's would be best."""

        def logprob(self, context, continuation):
            text = tok.decode(continuation)
            scored.append(text)
            return ord(text) / 100 if text in ("A", "B", "C", "D") else -len(text) * len(continuation)

    picks = [mc_choices(it, Short(), tok) for it in items]
    assert [(p["letter_choice"], p["text_choice"]) for p in picks] == [("C", "A"), ("B", "A"), ("D", "A")]
    assert scored == ["A", "B", "C", "北京", "上海", "广州", "A", "B", "H2O", "CO2", "A", "C", "D", "12", "11", "13"]


def test_nan_or_infinity_in_a_qa_or_mc_record_makes_it_bad(tmp_path):
    """Python's json writes NaN and Infinity (json.dumps(float('nan'))) and reads them back, though JSON has
    neither: a QA reference NaN was scored against the text 'nan', an option NaN was the option 'nan'."""
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        {"question": "问", "answer": "答"}, {"question": "问", "answer": float("nan")},
        {"question": "问", "target": float("-inf")}, {"question": "问", "answer": "答", "task": float("inf")}]))
    items, no_reference, bad = read_qa(qa)
    assert (len(items), no_reference) == (1, 0)
    assert bad == [f"{qa}:2: its 'answer' is NaN, not a string or a number",
                   f"{qa}:3: its 'target' is -Infinity, not a string or a number",
                   f"{qa}:4: its 'task' is Infinity, not a string or a number"]
    assert '"answer": NaN' in qa.read_text()  # as Python writes it
    mc = tmp_path / "law_val.jsonl"
    mc.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        {"question": "一", "A": 1.5, "B": "乙", "C": "丙", "D": "丁", "answer": "A"},
        {"question": "二", "A": "甲", "B": float("nan"), "C": "丙", "D": "丁", "answer": "A"}]))
    items, bad = read_mc([mc])
    assert [it["options"]["A"] for it in items] == ["1.5"]
    assert bad == [f"{mc}:2: its 'B' is NaN, not a string or a number"]


def test_leakage_finds_planted_question_only(tmp_path):
    clean = generated_corpus(50, seed=1)
    questions = ["这是一道被泄露到训练数据里的题目", "这一道题目没有出现在训练数据中"]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in clean))
    assert leakage(questions, [tmp_path / "train.jsonl"])["leaked"] == 0
    planted = clean + ["前文" + questions[0] + "后文"]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in planted))
    found = leakage(questions, [tmp_path / "train.jsonl"])
    assert (found["leaked"], found["examples"]) == (1, [questions[0]])


def test_leakage_in_a_folder_searches_the_files_beside_a_prepare_output(tmp_path, bpe_tokenizer, capsys):
    from babyllama.data.clean import prepare
    from babyllama.evaluate import evaluate
    from babyllama.sampling import Sampling

    questions = [f"第{i}道评测题目的完整题干文字" for i in range(5)]
    raw = tmp_path / "pretrain.jsonl"
    raw.write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in [*generated_corpus(20, seed=2),
                                                                                   "前文" + questions[0] + "后文"]))
    prepare([str(raw)], tmp_path / "data", min_chars=1, dedup="none")
    sft = [{"instruction": q, "output": "答案"} for q in questions[1:4]]  # the tester's sft.jsonl of eval questions
    (tmp_path / "data" / "sft.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in sft))
    found = leakage(questions, [tmp_path / "data"])
    assert (found["leaked"], found["examples"]) == (4, questions[:4])
    qa = [{"instruction": q, "input": "", "output": "答案"} for q in questions]  # the demo's eval.jsonl shape
    (tmp_path / "data" / "eval.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in qa))
    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    result = evaluate(tmp_path / "ck", tmp_path / "out", qa=str(tmp_path / "data" / "eval.jsonl"),
                      train_data=[str(tmp_path / "data")], sampling=Sampling(max_new_tokens=2))
    # training on the folder does not read eval.jsonl (a held-out split by its name), nor does the check
    assert result["leakage"] == {"checked": 5, "too_short": 0, "min_chars": 8, "leaked": 4, "leaked_in_eval_files": 0,
                                 "searched_documents": 24, "examples": questions[:4]}
    named = [str(tmp_path / "data"), str(tmp_path / "data" / "eval.jsonl")]  # a model trained on eval.jsonl too
    result = evaluate(tmp_path / "ck", tmp_path / "out", qa=str(tmp_path / "data" / "eval.jsonl"),
                      train_data=named, sampling=Sampling(max_new_tokens=2))
    assert result["leakage"] == {"checked": 5, "too_short": 0, "min_chars": 8, "leaked": 5, "leaked_in_eval_files": 1,
                                 "searched_documents": 29, "examples": questions}
    assert (f"note: {tmp_path / 'data' / 'eval.jsonl'} is in --train_data, so its own questions count as leaked; "
            "if the model did not train on it, pass the training files alone as --train_data."
            ) in capsys.readouterr().out.splitlines()


def test_leakage_finds_instruction_and_input_items_copied_into_training_data(tmp_path):
    """eval asks an {instruction, input, output} item as instruction + input (the demo's, alpaca-zh's, BELLE's
    shape); the same items in --train_data (the eval file itself, a copy, inside a larger SFT file) are leaked."""
    items = [{"instruction": "判断下面这句话的情感：", "input": f"第{i}句评论说这家店的菜很好吃", "output": "正面"}
             for i in range(5)]
    lines = [json.dumps(r, ensure_ascii=False) for r in items]
    (tmp_path / "q.jsonl").write_text("\n".join(lines))
    (tmp_path / "copy.jsonl").write_text("\n".join(lines))
    other = [{"instruction": "翻译：", "input": t, "output": "略"} for t in generated_corpus(20, seed=3)]
    (tmp_path / "sft.jsonl").write_text("\n".join([*map(json.dumps, other[:10]), *lines, *map(json.dumps, other[10:])]))
    questions = [q["question"] for q in read_qa(tmp_path / "q.jsonl")[0]]
    assert questions == [r["instruction"] + r["input"] for r in items]
    same = leakage(questions, [tmp_path / "q.jsonl"], eval_files=[tmp_path / "q.jsonl"])
    assert (same["leaked"], same["leaked_in_eval_files"], same["examples"]) == (5, 5, questions)
    for train in ("copy.jsonl", "sft.jsonl"):
        found = leakage(questions, [tmp_path / train])
        assert (found["leaked"], found["leaked_in_eval_files"], found["examples"]) == (5, 0, questions), train
    assert leakage(questions, [tmp_path / "sft.jsonl"])["searched_documents"] == 25


def test_leakage_searches_every_field_of_every_sft_and_dpo_shape(tmp_path):
    questions = [f"第{i}道只出现在训练数据某个字段里的题目" for i in range(9)]
    q = iter(questions)
    shapes = {  # one file per shape that sft and dpo read, each question in another field
        "alpaca.jsonl": [{"instruction": "翻译：", "input": next(q), "output": "略"},
                         {"instruction": "问", "input": "", "output": "答：" + next(q)}],
        "prompt_answer.csv": [{"prompt": "问", "answer": next(q)}],
        "sharegpt.jsonl": [{"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "好"},
                                              {"from": "human", "value": next(q)}, {"from": "gpt", "value": "嗯"}]}],
        "trl.jsonl": [{"prompt": next(q), "chosen": "好", "rejected": "坏"},
                      {"prompt": "问", "chosen": next(q), "rejected": "坏"}],
        "llama_factory.json": [{"conversations": [{"from": "human", "value": "问"}], "system": next(q),
                                "chosen": {"from": "gpt", "value": "好"}, "rejected": {"from": "gpt", "value": "坏"}}],
        "medical_reward.jsonl": [{"question": "问", "history": [[next(q), "答"]], "response_chosen": "好",
                                  "response_rejected": next(q)}],
    }
    for name, records in shapes.items():
        if name.endswith(".csv"):
            (tmp_path / name).write_text("prompt,answer\n" + "".join(f"{r['prompt']},{r['answer']}\n" for r in records))
        elif name.endswith(".json"):
            (tmp_path / name).write_text(json.dumps(records, ensure_ascii=False))
        else:
            (tmp_path / name).write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records))
    found = leakage([*questions, "这道题目没有出现在训练数据的任何地方"], [tmp_path])
    assert (found["leaked"], found["examples"], found["searched_documents"]) == (9, sorted(questions), 8)


def test_leakage_says_how_many_questions_were_too_short_to_check(tmp_path, bpe_tokenizer, capsys):
    """A tester's 11 questions, 8 of them under 8 characters, gave `checked: 3, leaked: 2` and not a word of the 8,
    which the check passes over (a text so short occurs by chance): a note counts them, as eval.json does."""
    from babyllama.evaluate import evaluate
    from babyllama.sampling import Sampling

    short = ["天空？", "p13", "hq", "pq问3", "问题二\n第二行", "p22", "好😀", "中文问题"]
    long = ["csv问2\n多行", "问题二\r\n第二行的字", "绝对没有出现过的问题"]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"question": q, "answer": "x"}, ensure_ascii=False) + "\n"
                                               for q in [*short, *long, short[0]]))  # a question twice counts once
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"instruction": q, "output": "答"}, ensure_ascii=False)
                                                  + "\n" for q in [*short, *long[:2]]))
    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    result = evaluate(tmp_path / "ck", tmp_path / "out", qa=str(tmp_path / "qa.jsonl"),
                      train_data=[str(tmp_path / "train.jsonl")], sampling=Sampling(max_new_tokens=1))
    assert result["leakage"] == {"checked": 3, "too_short": 8, "min_chars": 8, "leaked": 2, "leaked_in_eval_files": 0,
                                 "searched_documents": 10, "examples": ["csv问2\n多行", "问题二\n第二行的字"]}
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == ["note: 8 eval questions under 8 characters were not checked for leakage: text so short "
                        "occurs in training data by chance.",
                        "WARNING: 2 eval questions occur verbatim in the training data; their scores are inflated."]


def test_leakage_train_data_without_questions_or_documents_says_so(tmp_path, bpe_tokenizer, capsys):
    from babyllama.evaluate import evaluate
    from babyllama.sampling import Sampling

    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError) as e:
        evaluate(tmp_path / "ck", tmp_path / "out", train_data=[str(tmp_path / "empty.jsonl")])
    assert str(e.value) == "--train_data is for the leakage check of --qa or --mc questions; pass --qa or --mc too."
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "一道足够长的评测题目", "answer": "是"},
                                                  ensure_ascii=False))
    result = evaluate(tmp_path / "ck", tmp_path / "out", qa=str(tmp_path / "qa.jsonl"),
                      train_data=[str(tmp_path / "empty.jsonl")], sampling=Sampling(max_new_tokens=2))
    assert result["leakage"] == {"checked": 1, "too_short": 0, "min_chars": 8,
                                 "leaked": 0, "leaked_in_eval_files": 0, "searched_documents": 0,
                                 "examples": []}
    assert (f"note: --train_data {tmp_path / 'empty.jsonl'} holds no documents, so the leakage check searched "
            "nothing.") in capsys.readouterr().out.splitlines()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, bpe_tokenizer):
    d = tmp_path_factory.mktemp("eval")
    words = "the of and to in is was for on are with as by at from that this have which one".split()
    ascii_docs = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(40)) + "." for i in range(120)]
    (d / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ascii_docs))  # ASCII: no split chars
    bpe_tokenizer.save(d / "tok")
    pretokenize([str(d / "docs.jsonl")], str(d / "tok"), d / "tokens", val_fraction=0.3)
    save_checkpoint(d / "run" / "final", sharp_model(tiny_config(vocab_size=600, max_seq_len=32)), bpe_tokenizer)
    return d


def test_bits_per_byte_by_hand(tiny_run, bpe_tokenizer):
    from babyllama.checkpoint import load_model

    model = load_model(tiny_run / "run" / "final")
    got = lm_metrics(model, tiny_run / "tokens", bpe_tokenizer, batch_size=3)
    data = TokenWindows(tiny_run / "tokens", 32, "val")
    nats, nbytes = 0.0, 0
    for i in range(len(data)):
        w = torch.from_numpy(data.window(i).astype("int64"))
        logits, _ = model(w[None, :-1])
        nats -= torch.log_softmax(logits[0].double(), -1).gather(1, w[1:, None]).sum().item()
        nbytes += sum(len(bpe_tokenizer.decode([t]).encode()) for t in w[1:].tolist())  # ASCII: exact per id
    assert got["tokens"] == len(data) * 32
    assert got["bytes"] == nbytes
    assert got["bits_per_byte"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nats / got["tokens"]), rel=1e-5)


def test_the_device_is_said_once_a_process(tiny_run, tmp_path, capsys):
    """`make demo` said `eval: running on cpu` for each checkpoint it evaluated (three with --dpo), in one process:
    once now, as `babyllama eval`, one evaluation a process, says it."""
    from babyllama import evaluate as ev

    ev.say_device.cache_clear()  # none said yet in this process
    for i in range(3):
        ev.evaluate(tiny_run / "run" / "final", tmp_path / str(i), sampling=Sampling(max_new_tokens=2), device="cpu")
    assert [line for line in capsys.readouterr().err.splitlines() if "running on" in line] == ["eval: running on cpu"]


def test_eval_reads_the_shards_manifest_once(tiny_run, tmp_path, monkeypatch):
    """eval --data read manifest.json twice: to check the shards, then again for the loss's windows."""
    from babyllama import evaluate as ev
    from babyllama.data import shards

    paths = []
    monkeypatch.setattr(shards, "read_manifest", lambda d, read=shards.read_manifest: paths.append(d) or read(d))
    monkeypatch.setattr(ev, "read_manifest", shards.read_manifest)
    result = ev.evaluate(tiny_run / "run" / "final", tmp_path / "out", data=str(tiny_run / "tokens"),
                         sampling=Sampling(max_new_tokens=1), device="cpu")
    assert paths == [str(tiny_run / "tokens")] and result["lm"]["tokens"] > 0


def test_eval_cli_and_report(tiny_run, tmp_path):
    qa = tmp_path / "qa.jsonl"
    questions = [f"这是第{i}个评测问题，请回答" for i in range(8)]
    qa.write_text("\n".join(json.dumps({"question": q, "answer": "正面" if i % 2 else "负面", "task": "sentiment"},
                                       ensure_ascii=False) for i, q in enumerate(questions))
                  + "\n" + json.dumps({"question": "没有参考答案的题", "std_answer": ""}, ensure_ascii=False)
                  + '\n{"question": "坏行"')  # a bad record: counted and skipped
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"text": "训练文本里混进了" + questions[3] + "这道题"}, ensure_ascii=False))
    (tmp_path / "mc.csv").write_text("question,A,B,C,D,answer\n问,甲,乙,丙,丁,A\n问二,甲,乙,丙,丁,b\n"
                                     "问三,甲,乙,丙,丁,E\n", encoding="utf-8")
    r = run_cli("eval", str(tiny_run / "run" / "final"), "--data", str(tiny_run / "tokens"), "--qa", str(qa),
                "--mc", str(tmp_path / "mc.csv"), "--train_data", str(train), "--max_new_tokens", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("note: 2 eval questions under 8 characters were not checked for leakage: text so short occurs in "
            "training data by chance.\nWARNING: 1 eval question occurs verbatim in the training data; its score is "
            "inflated.\n") in r.stdout
    result = json.loads((tiny_run / "run" / "eval" / "eval.json").read_text())
    assert set(result) >= {"lm", "qa", "mc", "leakage", "continuations"}
    assert result["qa"]["sentiment"]["majority_baseline"] == 0.5  # the item without a reference is not in it
    scales = ("bleu and word_bleu: 0-100, as sacrebleu gives them; rouge_l, char_f1, exact_match, majority_baseline "
              "and accuracy: fractions, 0-1")  # word_bleu 0.351 was read as 35%
    assert result["qa_scales"] == scales and f'  "qa_scales": "{scales}",' in r.stdout.splitlines()
    assert result["qa_skipped_no_reference"] == 1
    assert "note: 1 QA item has no reference (missing or empty) and is not scored.\n" in r.stdout  # not "1 items have"
    assert (result["qa_bad_records"], result["mc_bad_records"], result["mc"]["overall"]["items"]) == (1, 1, 2)
    assert f"note: 1 bad QA record is skipped; the first: {qa}:10: not valid JSON (Expecting" in r.stdout
    assert (f"note: 1 bad multiple-choice record is skipped; the first: {tmp_path / 'mc.csv'}:4: the answer 'E' "
            "is not one of A, B, C, D") in r.stdout
    lines = (tiny_run / "run" / "eval" / "items.jsonl").read_text().splitlines()
    assert len(lines) == 10
    (tiny_run / "run" / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in [
        {"step": 1, "tokens": 100, "loss": 6.0, "lr": 1e-4}, {"step": 2, "tokens": 200, "loss": 5.0, "lr": 2e-4},
        {"step": 2, "tokens": 200, "val_loss": 5.5, "final": True}]))
    report = make_report(tiny_run)
    text = report.read_text()
    assert ("Question answering (greedy, at most 4 new tokens, chat format; bleu and word_bleu on sacrebleu's 0-100 "
            "scale, the other scores fractions, 0-1):") in text
    assert ("Leakage: 1 of 8 eval questions occurs verbatim in the training data. 2 more, under 8 characters, were "
            "not checked.\n") in text  # not "1 of 10 ... occur"; the 2 multiple-choice questions are too short
    for section in ("## Data", "### Token shards", "## Training", "### Run `run`", "## Evaluation",
                    "Language modelling", "Question answering", "Multiple choice", "Leakage", "Continuations",
                    "Sample answers"):
        assert section in text, section
    import matplotlib.image

    pngs = sorted((tiny_run / "plots").glob("*.png"))
    assert len(pngs) == 2
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(png).shape[2] == 4


def test_report_says_a_run_is_lora_or_dpo_with_its_settings_and_rewards(tmp_path):
    """sft-lora and dpo-lora looked like full runs in the report: nothing said LoRA (rank, alpha, targets) or DPO
    (beta, reference), and no DPO reward metrics were shown."""
    pytest.importorskip("matplotlib")
    model = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 600, "max_seq_len": 64}
    train = {"batch_size": 8, "grad_accum": 1, "lr": 0.001, "optimizer": "adamw", "init": "runs/sft/final",
             "lora_rank": 0, "lora_alpha": 32.0, "lora_targets": "wqkv,wo,w13,w2", "beta": 0.1,
             "precompute_ref_log_probs": False, "label_smoothing": 0.0, "rpo_alpha": 0.0}
    lines = [{"step": 1, "tokens": 100, "loss": 0.69, "lr": 1e-3}, {"step": 2, "tokens": 200, "loss": 0.6, "lr": 1e-3}]
    rewards = [{"rewards/accuracies": 0.5, "rewards/margins": 0.01}, {"rewards/accuracies": None, "rewards/margins":
                                                                     None}]  # a skipped step: the one before counts
    val = {"step": 2, "tokens": 200, "val_loss": 0.65, "val_rewards/accuracies": 0.75, "val_rewards/margins": 0.02,
           "final": True}
    runs = {"sft": (train, lines + [{"step": 2, "tokens": 200, "val_loss": 0.7, "final": True}]),
            "sft-lora": (train | {"lora_rank": 8, "lora_alpha": 16.0, "lora_targets": "wqkv,wo"}, lines),
            "dpo-lora": (train | {"lora_rank": 16, "beta": 0.5, "precompute_ref_log_probs": True, "rpo_alpha": 1.0},
                         [line | r for line, r in zip(lines, rewards, strict=True)] + [val])}
    for name, (settings, metrics) in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"model": model, "train": settings}))
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    text = make_report(tmp_path).read_text()
    sections = {x.split("`")[1]: x.split("\n\n")[:3] for x in text.split("### Run ")[1:]}
    common = "| 64 | 2 | 4 | 2 | 600 | 64 | 8 | 1 | 0.001 | adamw |"
    assert sections["sft"][0] == "`sft`" and sections["sft"][1].endswith(f"\n{common}")
    assert sections["sft-lora"][0] == "`sft-lora` (LoRA)"
    assert sections["sft-lora"][1].endswith(f"| lora_rank | lora_alpha | lora_targets |\n|{'---|' * 13}\n{common} 8 "
                                            "| 16 | wqkv,wo |")
    assert sections["dpo-lora"][0] == "`dpo-lora` (DPO, LoRA)"
    assert sections["dpo-lora"][1].endswith(f"| lora_rank | lora_alpha | lora_targets | beta | reference | rpo_alpha |"
                                            f"\n|{'---|' * 16}\n{common} 16 | 32 | wqkv,wo,w13,w2 | 0.5 | "
                                            "runs/sft/final, not found (log-probs precomputed) | 1 |")
    assert sections["dpo-lora"][2] == (
        "| steps | tokens | final train loss | final val loss | tokens/s | rewards/accuracies | rewards/margins | "
        f"val_rewards/accuracies | val_rewards/margins |\n|{'---|' * 9}\n| 2 | 200 | 0.6 | 0.65 |  | 0.5 | 0.01 | "
        "0.75 | 0.02 |")
    assert "rewards" not in sections["sft-lora"][2] + sections["sft"][2]


QA_ANSWERED = [{"kind": "qa", "task": "sentiment", "question": f"问{i}", "prediction": "正面", "reference": "正面"}
               for i in range(2)]
MC_ANSWERED = {"kind": "mc", "question": "选", "answer": "A", "letter_choice": "A", "text_choice": "A"}
ITEMS_NOW = {  # how items.jsonl was damaged -> its text, and what it holds by the report's count
    "whole": ([*QA_ANSWERED, MC_ANSWERED], None),
    "lines cut": ([QA_ANSWERED[0], MC_ANSWERED], "1 QA (sentiment), 1 multiple-choice items"),
    "one left": ([QA_ANSWERED[0]], "1 QA (sentiment) item"),
    "another eval's": ([{**x, "task": "law"} for x in QA_ANSWERED], "2 QA (law) items"),
    "emptied": ([], "no items"),
    "a line cut": ([*QA_ANSWERED, MC_ANSWERED], "cut"),
    "removed": ([], "removed"),
}


@pytest.mark.parametrize("damage", ITEMS_NOW)
def test_report_says_when_items_jsonl_is_not_the_one_eval_wrote_with_eval_json(tmp_path, capsys, damage):
    """eval writes eval.json and items.jsonl together; an items.jsonl cut or replaced since gave the report sample
    answers of other items than eval.json scored, or none, without a word, and a line cut short a traceback: the
    report leaves the samples out and says why, once in report.md and once on stdout."""
    out = tmp_path / "eval"
    out.mkdir()
    (out / "eval.json").write_text(json.dumps({
        "checkpoint": "ck", "continuations": [], "qa": {"sentiment": {"items": 2, "exact_match": 1.0, "char_f1": 1.0}},
        "mc": {"overall": {"items": 1, "letter_accuracy": 1.0, "text_accuracy": 1.0}, "subjects": {}}}))
    records, held = ITEMS_NOW[damage]
    text = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in records)
    if damage != "removed":
        (out / "items.jsonl").write_text(text[:-9] if damage == "a line cut" else text)
    capsys.readouterr()
    report = make_report(tmp_path).read_text()
    counts = f"{out / 'eval.json'} counts 2 QA (sentiment), 1 multiple-choice items; run the eval again."
    note = {None: None, "removed": f"{out / 'items.jsonl'} is missing but {counts}",
            "cut": f"{out / 'items.jsonl'} holds a line that is not an item of eval (cut short?), and {counts}"}.get(
        held, f"{out / 'items.jsonl'} holds {held} (cut or replaced since eval wrote it) but {counts}")
    if note is None:
        assert "| sentiment | 问1 | 正面 | 正面 |" in report and capsys.readouterr().out == ""
    else:
        assert f"Sample answers: none; {note}" in report and "| task | question |" not in report
        assert capsys.readouterr().out == f"note: {note}\n"


def test_eval_bad_inputs(tmp_path, tiny_run):
    r = run_cli("eval", str(tmp_path / "nope"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    (tmp_path / "bad.jsonl").write_text(json.dumps({"answer": "a"}))
    r = run_cli("eval", str(tiny_run / "run" / "final"), "--qa", str(tmp_path / "bad.jsonl"),
                "--out_dir", str(tmp_path))
    assert r.returncode == 2 and "continuations" not in r.stderr  # at once
    assert r.stderr.strip().endswith(f"1 was bad (the first: {tmp_path / 'bad.jsonl'}:1: a QA record needs a "
                                     "question (question, prompt or instruction+input)).")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q"}))
    r = run_cli("eval", str(tiny_run / "run" / "final"), "--qa", str(tmp_path / "bad.jsonl"),
                "--out_dir", str(tmp_path))
    assert r.returncode == 2 and "no QA records with a reference" in r.stderr
    r = run_cli("eval", str(tiny_run / "run" / "final"), "--prompts", "/dev/null", "--out_dir", str(tmp_path))
    assert r.returncode == 2 and r.stderr.splitlines()[-1] == ("babyllama: error: prompts file /dev/null is not a "
                                                               "regular file; pass a text file, one prompt a line.")
    (tmp_path / "empty").mkdir()
    r = run_cli("report", str(tmp_path / "empty"))
    assert r.returncode == 2 and not (tmp_path / "empty" / "plots").exists()


def test_eval_of_shards_without_a_val_split_says_why(tmp_path, bpe_tokenizer):
    """`eval --data` of one document pretokenized at the default --val_fraction 0.005 (hashed into train) told the
    user to pretokenize with a --val_fraction above 0, which it was: it says what the hash did, and what to do."""
    from babyllama.data.shards import is_val
    from babyllama.evaluate import check_lm_data

    bpe_tokenizer.save(tmp_path / "tok")
    (tmp_path / "doc.txt").write_text(generated_corpus(1, seed=3)[0] + "\n")
    assert not is_val(generated_corpus(1, seed=3)[0], 0.005)
    for fraction, why in ((0.005, ": pretokenize --val_fraction 0.005 put none of its 1 document there (a hash of each "
                                  "one's text decides); pretokenize more documents, or with a larger --val_fraction."),
                          (0, "; pretokenize with a --val_fraction above 0.")):
        pretokenize([str(tmp_path / "doc.txt")], str(tmp_path / "tok"), tmp_path / "tokens", val_fraction=fraction)
        with pytest.raises(UserError) as e:
            check_lm_data(tmp_path / "tokens", 32)
        assert str(e.value) == f"--data {tmp_path / 'tokens'} has no val split to measure the loss on{why}"


def test_eval_counts_and_says_what_it_cut_to_the_context(tmp_path, tiny_run, bpe_tokenizer):
    """A question or prompt longer than the context was scored on its end with no word of it. The model (32
    tokens) generates after at most 31 prompt ids and scores options in at most 33 ids: one id more is cut."""
    fits, cut = "你好" * 15, "你好" * 15 + "你"  # 30 and 31 ids: with <bos> (or <eos> before) 31 and 32
    assert [len(bpe_tokenizer.encode(t)) for t in (fits, cut)] == [30, 31]
    qa, prompts, mc = tmp_path / "qa.jsonl", tmp_path / "prompts.txt", tmp_path / "mc.csv"
    qa.write_text("".join(json.dumps({"question": q, "answer": "正面"}, ensure_ascii=False) + "\n"
                          for q in (fits, cut, "短")))
    prompts.write_text(f"{fits}\n{cut}\n")
    letter = "{}\nA. a\nB. b\nC. c\nD. d\n答案：A"  # the longest text scored of an item with options a-d
    assert [len(bpe_tokenizer.encode(letter.format(q))) for q in ("你好你", "你好你好")] == [33, 34]
    mc.write_text("question,A,B,C,D,answer\n你好你,a,b,c,d,A\n你好你好,a,b,c,d,B\n", encoding="utf-8")
    r = run_cli("eval", str(tiny_run / "run" / "final"), "--qa", str(qa), "--prompts", str(prompts), "--mc", str(mc),
                "--max_new_tokens", "1", "--out_dir", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-2000:]
    warnings = [line for line in r.stdout.splitlines() if line.startswith("WARNING")]
    assert warnings == [
        "WARNING: 1 of 2 continuation prompts does not fit the context of 32 tokens with 1 token left for the "
        "continuation, so the model reads only its end; eval.json counts it (prompts_cut_to_context).",
        "WARNING: 1 of 3 QA questions does not fit the context of 32 tokens with 1 token left for the answer "
        "(--max_new_tokens, at most half the context), so eval cuts it as SFT does: its oldest history turns "
        "first, then the beginning of the rest; eval.json counts it (qa_cut_to_context).",
        "WARNING: 1 of 2 multiple-choice items does not fit the context of 32 tokens, so the model reads only its "
        "end; eval.json counts it (mc_cut_to_context)."]
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert [result[f"{k}_cut_to_context"] for k in ("prompts", "qa", "mc")] == [1, 1, 1]


def test_eval_checks_every_input_and_its_out_dir_before_the_model_loads(tmp_path, tiny_run, capsys, monkeypatch):
    """`--train_data` missing, a checkpoint or only held-out splits, `--prompts` missing after `--data` or empty, an
    --out_dir that is a checkpoint, a val split shorter than the model's window: each said so only after every answer
    was generated (or the loss measured). Each sentence alone: `eval: running on cpu` came first."""
    import babyllama.checkpoint
    from babyllama.cli import main

    monkeypatch.setattr(babyllama.checkpoint, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    ck, out = tiny_run / "run" / "final", tmp_path / "out"
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "这是一个问题吗", "answer": "是"}, ensure_ascii=False))
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "test.jsonl").write_text(json.dumps({"text": "测试集"}, ensure_ascii=False))
    (tmp_path / "empty.jsonl").write_bytes(b"")  # `eval --prompts EMPTY` scored 0 prompts and exited 0
    (tmp_path / "blank.txt").write_text("\n  \n\t\n")
    for args, error in (
            *((["--prompts", str(tmp_path / name)], f"prompts file {tmp_path / name} has no prompts (a line of text "
                                                    "each); pass a file that has some.")
              for name in ("empty.jsonl", "blank.txt")),
            (["--qa", str(qa), "--train_data", str(tmp_path / "nonexist.jsonl")],
             f"input {tmp_path / 'nonexist.jsonl'} does not exist."),
            (["--qa", str(qa), "--train_data", str(ck)],
             f"{ck} is a checkpoint, not a folder of data files; name the data files or their folder."),
            (["--qa", str(qa), "--train_data", str(tmp_path / "held")],
             f"every data file in {tmp_path / 'held'} is a held-out split by its name (test.jsonl), which a folder "
             "does not give for training; name the files themselves to train on them."),
            (["--data", str(tiny_run / "tokens"), "--prompts", str(tmp_path / "nope.txt")],
             f"prompts file {tmp_path / 'nope.txt'} does not exist; pass a text file, one prompt a line."),
            (["--data", str(ck)], f"--data {ck} is a checkpoint, not token shards; pass the --out_dir of babyllama "
                                  "pretokenize."),
            (["--data", str(tmp_path / "held")], f"{tmp_path / 'held'} has no manifest.json; make one with `babyllama "
                                                 "pretokenize`."),
            (["--data", str(qa)], f"{qa} is a file, not a folder; pass a folder of token shards, the --out_dir of "
                                  "babyllama pretokenize (with manifest.json)."),
            (["--data", str(tiny_run / "tokens" / "manifest.json")],
             f"{tiny_run / 'tokens' / 'manifest.json'} is a file, not a folder; pass a folder of token shards, the "
             "--out_dir of babyllama pretokenize (with manifest.json)."),
            (["--data", str(tmp_path / "nonexist")], f"{tmp_path / 'nonexist'} does not exist.")):
        assert main(["eval", str(ck), *args, "--out_dir", str(out)]) == 2, args
        assert capsys.readouterr().err == f"babyllama: error: {error}\n", args  # alone: not after "running on cpu"
        assert not out.exists()  # made only after the checks
    long = tmp_path / "long"  # a model whose window is longer than the whole val split
    shutil.copytree(ck, long)
    config = json.loads((long / "config.json").read_text())
    config["model"]["max_seq_len"] = 2000
    (long / "config.json").write_text(json.dumps(config))
    val = [s["tokens"] for s in json.loads((tiny_run / "tokens" / "manifest.json").read_text())["shards"]
           if s["split"] == "val"]
    assert val == [1026]
    assert main(["eval", str(long), "--data", str(tiny_run / "tokens"), "--out_dir", str(out)]) == 2
    assert capsys.readouterr().err == (  # eval has no max_seq_len or --val_fraction of its own to change
        f"babyllama: error: the val split of --data {tiny_run / 'tokens'} has 1026 tokens, fewer than one window of "
        "2001 (the model's max_seq_len + 1) to measure the loss on; run babyllama pretokenize again with a larger "
        "--val_fraction (it was 0.3).\n")
    for command in ("eval", "chat", "serve"):  # "eval: running on cpu" (chat:, serve:) came first
        assert main([command, str(tmp_path / "nock")]) == 2
        assert capsys.readouterr().err == f"babyllama: error: checkpoint {tmp_path / 'nock'} does not exist.\n"
    assert main(["eval", str(ck), "--out_dir", str(ck)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"babyllama: error: --out_dir {ck} is a checkpoint, which eval.json and items.jsonl must not be written "
        f"into; pass another --out_dir, e.g. {ck.parent / 'eval'}.")
    assert not (ck / "eval.json").exists()


def test_eval_of_another_checkpoint_does_not_overwrite_a_result(tmp_path, bpe_tokenizer):
    from babyllama.evaluate import evaluate
    from babyllama.sampling import Sampling

    ckpts = tmp_path / "sft" / "checkpoints"
    for step in ("step_7", "step_8"):
        save_checkpoint(ckpts / step, sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    first = evaluate(ckpts / "step_7", ckpts / "eval", sampling=Sampling(max_new_tokens=2))  # eval's default out_dir
    assert first["checkpoint_path"] == str((ckpts / "step_7").resolve())
    evaluate(ckpts / "step_7", ckpts / "eval", sampling=Sampling(max_new_tokens=2))  # the same checkpoint again
    moved = tmp_path / "moved"
    (tmp_path / "sft").rename(moved)  # a run folder moved with its eval: still the same checkpoint
    again = evaluate(moved / "checkpoints" / "step_7", moved / "checkpoints" / "eval",
                     sampling=Sampling(max_new_tokens=2))
    assert again["checkpoint_relative"] == "../step_7"
    moved.rename(tmp_path / "sft")  # and back: its record names the moved path, its relative path matches
    evaluate(ckpts / "step_7", ckpts / "eval", sampling=Sampling(max_new_tokens=2))
    r = run_cli("eval", str(ckpts / "step_8"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].endswith(
        f"{ckpts / 'eval'} holds the eval of another checkpoint ({(ckpts / 'step_7').resolve()}); pass another "
        f"--out_dir (or delete {ckpts / 'eval' / 'eval.json'}) to keep both results.")
    assert json.loads((ckpts / "eval" / "eval.json").read_text())["checkpoint"] == str(ckpts / "step_7")


def test_eval_does_not_overwrite_an_eval_json_or_items_jsonl_of_another_tool(tmp_path, bpe_tokenizer):
    from babyllama.evaluate import evaluate
    from babyllama.sampling import Sampling

    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    theirs = {"eval.json": '{"results": {"ceval": {"acc": 0.31}}, "checkpoint": "their-model"}\n',  # lm-eval-like
              "items.jsonl": '{"doc_id": 0, "acc": 1}\n'}
    for name, text in theirs.items():
        out = tmp_path / name.split(".")[0]
        out.mkdir()
        (out / name).write_text(text)
        r = run_cli("eval", str(tmp_path / "ck"), "--out_dir", str(out), "--max_new_tokens", "2")
        assert r.returncode == 2
        assert r.stderr.strip().splitlines()[-1] == (
            f"babyllama: error: {out / name} was not written by babyllama eval, which would overwrite it; pass "
            "another --out_dir (or move that file away).")
        assert (out / name).read_text() == text
    ours = tmp_path / "ours"
    evaluate(tmp_path / "ck", ours, sampling=Sampling(max_new_tokens=2))  # no --qa: an empty items.jsonl
    assert (ours / "items.jsonl").read_text() == ""
    again = evaluate(tmp_path / "ck", ours, sampling=Sampling(max_new_tokens=2))  # its own: overwritten
    assert json.loads((ours / "eval.json").read_text()) == again


KILLED_AT = """
import os, signal, sys
import babyllama.evaluate as evaluate
real, calls = evaluate.answer, [0]
def answer(*args, **kwargs):  # kill -9 before the {n}th answer
    calls[0] += 1
    if calls[0] == {n}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
evaluate.answer = answer
from babyllama.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def qa_and_mc(tmp_path, bpe_tokenizer) -> dict:
    """A checkpoint, 40 QA items and 5 multiple-choice rows."""
    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"第{i}句话的情感是什么", "answer": "正面" if i % 3 else "负面",
                                      "task": "sentiment"}, ensure_ascii=False) + "\n" for i in range(40)))
    (tmp_path / "law_val.csv").write_text("question,A,B,C,D,answer\n" + "".join(
        f"问题{i},甲,乙,丙,丁,{'ABCD'[i % 4]}\n" for i in range(5)), encoding="utf-8")
    return {"ck": tmp_path / "ck", "qa": str(qa), "mc": [str(tmp_path / "law_val.csv")]}


def stopping_after(monkeypatch, function: str, n: int) -> list:
    """evaluate's function recording its first argument of interest, with Ctrl-C on the call after the n-th."""
    import babyllama.evaluate

    real, calls = getattr(babyllama.evaluate, function), []

    def stopped(*args, **kwargs):
        if len(calls) == n:
            raise KeyboardInterrupt
        calls.append(args[2].turns[-1][0] if function == "answer" else args[0]["question"])  # the question
        return real(*args, **kwargs)

    monkeypatch.setattr(babyllama.evaluate, function, stopped)
    return calls


def test_eval_killed_midway_goes_on_to_the_result_of_a_run_never_stopped(tmp_path, qa_and_mc, monkeypatch):
    """kill -9 while answering: the answers flushed before it are kept, a line cut by the kill is dropped, and
    the rerun answers the rest alone; eval.json and items.jsonl are those of a run never stopped, byte for byte."""
    import subprocess
    import sys

    from babyllama.evaluate import FLUSH_EVERY, PARTIAL

    args = ["eval", str(qa_and_mc["ck"]), "--qa", qa_and_mc["qa"], "--mc", *qa_and_mc["mc"], "--max_new_tokens", "4"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_cli(*args, "--out_dir", whole).returncode == 0
    proc = subprocess.run([sys.executable, "-c", KILLED_AT.format(n=FLUSH_EVERY + 5), *args, "--out_dir", killed],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    partial = killed / PARTIAL
    lines = partial.read_text().splitlines()
    assert len(lines) == 1 + FLUSH_EVERY and json.loads(lines[0])["kind"] == "settings"
    assert lines[1:] == (whole / "items.jsonl").read_text().splitlines()[:FLUSH_EVERY]
    with partial.open("a") as f:
        f.write('{"kind": "qa", "question": "第')  # a line that a kill cut
    asked = stopping_after(monkeypatch, "answer", 40)
    r = run_cli(*args, "--out_dir", killed)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming: {FLUSH_EVERY} of 40 QA and 0 of 5 multiple-choice items are answered in {partial}." in r.stdout
    assert asked == [f"第{i}句话的情感是什么" for i in range(FLUSH_EVERY, 40)]
    for name in ("eval.json", "items.jsonl"):
        assert (killed / name).read_bytes() == (whole / name).read_bytes(), name
    assert sorted(p.name for p in killed.iterdir()) == ["eval.json", "items.jsonl"]


def test_eval_stopped_by_ctrl_c_keeps_every_answer_and_sampled_answers_resume_alike(tmp_path, qa_and_mc, monkeypatch):
    """Ctrl-C in the multiple choice: every answer and pick so far is written, not only whole batches; with
    temperature 1 each item's draws are seeded by its number, so the resumed run samples what an unstopped one does."""
    from babyllama.evaluate import PARTIAL, evaluate
    from babyllama.sampling import Sampling

    kw = {"qa": qa_and_mc["qa"], "mc": qa_and_mc["mc"], "sampling": Sampling(max_new_tokens=4, temperature=1.0)}
    whole = evaluate(qa_and_mc["ck"], tmp_path / "whole", **kw)
    picked = stopping_after(monkeypatch, "mc_choices", 2)
    with pytest.raises(KeyboardInterrupt):
        evaluate(qa_and_mc["ck"], tmp_path / "stopped", **kw)
    lines = (tmp_path / "stopped" / PARTIAL).read_text().splitlines()
    assert [json.loads(x)["kind"] for x in lines] == ["settings"] + ["qa"] * 40 + ["mc"] * 2
    monkeypatch.undo()
    asked, picked = stopping_after(monkeypatch, "answer", 40), stopping_after(monkeypatch, "mc_choices", 5)
    assert evaluate(qa_and_mc["ck"], tmp_path / "stopped", **kw) == whole
    assert asked == [] and picked == ["问题2", "问题3", "问题4"]
    assert (tmp_path / "stopped" / "items.jsonl").read_text() == (tmp_path / "whole" / "items.jsonl").read_text()


def test_eval_with_another_checkpoint_or_other_settings_starts_over_and_says_so(tmp_path, qa_and_mc, monkeypatch,
                                                                                bpe_tokenizer, capsys):
    from babyllama.evaluate import PARTIAL, evaluate
    from babyllama.sampling import Sampling

    save_checkpoint(tmp_path / "ck2", sharp_model(tiny_config(vocab_size=600), seed=1), bpe_tokenizer)
    out, first = tmp_path / "out", "第0句话的情感是什么"
    for checkpoint, tokens, limit, differ, asked in (
            (qa_and_mc["ck"], 4, 0, None, first), (qa_and_mc["ck"], 4, 0, None, "第5句话的情感是什么"),  # resumed
            (qa_and_mc["ck"], 3, 0, "sampling", first), (tmp_path / "ck2", 3, 0, "weights_sha256", first),
            (tmp_path / "ck2", 3, 10, "qa_items", first)):
        calls = stopping_after(monkeypatch, "answer", 5)
        with pytest.raises(KeyboardInterrupt):
            evaluate(checkpoint, out, qa=qa_and_mc["qa"], sampling=Sampling(max_new_tokens=tokens), limit=limit)
        notes = [x for x in capsys.readouterr().out.splitlines() if "starts over" in x]
        assert notes == ([f"note: {out / PARTIAL} holds the answers of another checkpoint or other settings "
                          f"({differ}), so eval starts over."] if differ else [])
        assert calls[0] == asked
        monkeypatch.undo()
    (out / PARTIAL).write_text('{"kind": "sett')  # a settings line cut by a kill
    evaluate(qa_and_mc["ck"], out, qa=qa_and_mc["qa"], sampling=Sampling(max_new_tokens=2), limit=3)
    assert (f"note: {out / PARTIAL} holds the answers of another checkpoint or other settings (its first line is "
            "cut), so eval starts over.") in capsys.readouterr().out
    assert len((out / "items.jsonl").read_text().splitlines()) == 3 and not (out / PARTIAL).exists()


def test_eval_reads_an_earlier_eval_json_once(tmp_path, bpe_tokenizer, monkeypatch):
    from babyllama.evaluate import evaluate, refuse_to_overwrite
    from babyllama.sampling import Sampling

    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    evaluate(tmp_path / "ck", tmp_path / "out", sampling=Sampling(max_new_tokens=2))
    reads, real = [], type(tmp_path).read_text

    def read_text(self, *args, **kwargs):
        reads.append(self.name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(tmp_path), "read_text", read_text)
    refuse_to_overwrite(tmp_path / "out", tmp_path / "ck")
    assert reads == ["eval.json"]


def test_eval_with_nothing_to_answer_hashes_no_weights(tmp_path, bpe_tokenizer, monkeypatch):
    """The weights' SHA-256 says whose answers items.jsonl.partial holds (a second per 370 MB): an eval of
    continuations alone (or of --data) has none to resume, and reads the weights once, to load them."""
    import babyllama.checkpoint
    from babyllama.evaluate import evaluate
    from babyllama.sampling import Sampling

    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)

    def hashed(checkpoint):
        raise AssertionError("hashed")

    monkeypatch.setattr(babyllama.checkpoint, "weights_sha256", hashed)
    result = evaluate(tmp_path / "ck", tmp_path / "out", sampling=Sampling(max_new_tokens=2))
    assert len(result["continuations"]) > 0 and (tmp_path / "out" / "items.jsonl").read_text() == ""


def test_eval_stopped_between_items_jsonl_and_eval_json_leaves_no_mismatched_pair(tmp_path, qa_and_mc, monkeypatch):
    """Ctrl-C while the results are renamed in waits for both, then says they are complete; a kill -9 between
    items.jsonl and eval.json leaves no eval.json (an earlier one would not match the new items), and the rerun
    writes those of a run never stopped."""
    import os
    import signal
    import subprocess
    import sys

    import babyllama.evaluate
    from babyllama.errors import Completed
    from babyllama.evaluate import PARTIAL, evaluate
    from babyllama.sampling import Sampling

    kw = {"qa": qa_and_mc["qa"], "mc": qa_and_mc["mc"], "sampling": Sampling(max_new_tokens=4), "limit": 6}
    whole = evaluate(qa_and_mc["ck"], tmp_path / "whole", **kw)
    stopped = tmp_path / "stopped"
    evaluate(qa_and_mc["ck"], stopped, **{**kw, "limit": 2})  # an earlier result of the same checkpoint
    real = babyllama.evaluate.write_items

    def write_items(*args):
        real(*args)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C between the two renames

    monkeypatch.setattr(babyllama.evaluate, "write_items", write_items)
    with pytest.raises(Completed) as e:  # the CLI says the results are complete, not "run the same command"
        evaluate(qa_and_mc["ck"], stopped, **kw)
    assert (e.value.output, e.value.signum) == (str(stopped), signal.SIGINT)
    assert json.loads((stopped / "eval.json").read_text()) == whole and not (stopped / PARTIAL).exists()
    monkeypatch.undo()

    killed = tmp_path / "killed"
    args = ["eval", str(qa_and_mc["ck"]), "--qa", qa_and_mc["qa"], "--mc", *qa_and_mc["mc"], "--max_new_tokens", "4"]
    assert run_cli(*args, "--limit", "2", "--out_dir", killed).returncode == 0
    proc = subprocess.run([sys.executable, "-c", KILLED_IN_WRITE_WHOLE, *args, "--limit", "6", "--out_dir", killed],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert sorted(p.name for p in killed.iterdir()) == [".lock", "items.jsonl", PARTIAL]  # the lock: a kill -9's
    assert (killed / "items.jsonl").read_text() == (tmp_path / "whole" / "items.jsonl").read_text()
    asked = stopping_after(monkeypatch, "answer", 0)  # the rerun answers nothing again
    r = run_cli(*args, "--limit", "6", "--out_dir", killed)
    assert r.returncode == 0, r.stderr[-2000:]
    assert asked == [] and "resuming: 6 of 6 QA and 5 of 5 multiple-choice items" in r.stdout
    assert json.loads((killed / "eval.json").read_text()) == whole
    assert (killed / "items.jsonl").read_text() == (tmp_path / "whole" / "items.jsonl").read_text()
    assert sorted(p.name for p in killed.iterdir()) == ["eval.json", "items.jsonl"]


KILLED_IN_WRITE_WHOLE = """
import os, signal, sys
import babyllama.evaluate as evaluate
def write_whole(path, text):  # kill -9 after items.jsonl, before eval.json
    os.kill(os.getpid(), signal.SIGKILL)
evaluate.write_whole = write_whole
from babyllama.cli import main
sys.exit(main(sys.argv[1:]))
"""


def damaged(line: str, **changes) -> str:
    """line (a JSON object) with the fields of changes set, or deleted where their value is ...; its newline kept."""
    item = json.loads(line)
    for k, v in changes.items():
        item.pop(k) if v is ... else item.__setitem__(k, v)
    return json.dumps(item, ensure_ascii=False) + "\n"


def test_eval_goes_on_from_the_first_damaged_line_of_its_answers_so_far(tmp_path, qa_and_mc, monkeypatch, capsys):
    """items.jsonl.partial edited by hand: a prediction that is not text or is missing, a choice not of A-D, two
    lines swapped, lines written twice: the answers before the first such line are kept, the rest asked again, and
    the result is that of a run never stopped; a folder in its place is a UserError."""
    from babyllama.evaluate import PARTIAL, evaluate
    from babyllama.sampling import Sampling

    kw = {"qa": qa_and_mc["qa"], "mc": qa_and_mc["mc"], "sampling": Sampling(max_new_tokens=4), "limit": 6}
    whole = evaluate(qa_and_mc["ck"], tmp_path / "whole", **kw)
    stopping_after(monkeypatch, "mc_choices", 4)
    with pytest.raises(KeyboardInterrupt):
        evaluate(qa_and_mc["ck"], tmp_path / "base", **kw)
    monkeypatch.undo()
    lines = (tmp_path / "base" / PARTIAL).read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(lines) == 1 + 6 + 4  # the settings, 6 QA answers, 4 multiple-choice picks
    qa = [f"第{i}句话的情感是什么" for i in range(6)]
    mc = [f"问题{i}" for i in range(5)]
    for n, (edited, first_asked, first_picked) in enumerate((
            (lines[:3] + [damaged(lines[3], prediction=5)] + lines[4:], 2, 0),  # sacrebleu's traceback before
            (lines[:2] + [damaged(lines[2], prediction=...)] + lines[3:], 1, 0),
            (lines[:2] + [damaged(lines[2], question="第9句话的情感是什么")] + lines[3:], 1, 0),
            (lines[:8] + [damaged(lines[8], letter_choice="E")] + lines[9:], 6, 1),
            (lines[:8] + [damaged(lines[8], text_choice=["A"])] + lines[9:], 6, 1),
            (lines[:2] + [lines[3], lines[2]] + lines[4:], 1, 0),  # swapped: exit 0 with wrong scores before
            (lines[:4] + lines[1:4] + lines[4:], 3, 0),  # written twice
            (lines + lines[7:9], 6, 4))):  # picks written twice after the last one so far
        out = tmp_path / f"edited{n}"
        out.mkdir()
        (out / PARTIAL).write_text("".join(edited), encoding="utf-8")
        asked, picked = stopping_after(monkeypatch, "answer", 99), stopping_after(monkeypatch, "mc_choices", 99)
        assert evaluate(qa_and_mc["ck"], out, **kw) == whole, n
        assert (asked, picked) == (qa[first_asked:], mc[first_picked:]), n
        line = 2 + first_asked + first_picked
        assert (f"note: line {line} of {out / PARTIAL} is not the answer to item {line - 1} of 11, so eval drops it "
                "and what follows it.") in capsys.readouterr().out, n
        assert (out / "items.jsonl").read_text() == (tmp_path / "whole" / "items.jsonl").read_text(), n
        monkeypatch.undo()
    (tmp_path / "folder" / PARTIAL).mkdir(parents=True)
    with pytest.raises(UserError) as e:
        evaluate(qa_and_mc["ck"], tmp_path / "folder", **kw)
    assert str(e.value) == (f"{tmp_path / 'folder' / PARTIAL}, where eval keeps its answers so far, is not a file; "
                            "move it away or pass another --out_dir.")


def test_a_continuation_longer_than_the_context_scores_its_end(bpe_tokenizer):
    """eval --mc with an option longer than the context: a RuntimeError traceback (300 ids scored against the 256
    rows of one window). Its last max_seq_len ids are scored, each after the ids before it in the window."""
    from babyllama.evaluate import ModelScorer

    model = sharp_model(tiny_config(vocab_size=600, max_seq_len=32)).eval()
    context, continuation = list(range(10, 15)), [(7 * i) % 590 + 5 for i in range(40)]
    ids = (context + continuation)[-33:]  # the window: 32 positions, and the id each one predicts
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0][0].float(), dim=-1)
    expected = sum(logp[t, ids[t + 1]].item() for t in range(32))
    assert ModelScorer(model, bpe_tokenizer).logprob(context, continuation) == pytest.approx(expected, abs=1e-4)


def test_eval_prompts_lines_that_are_not_text_are_bad_records_said_and_counted(tmp_path, tiny_run, monkeypatch):
    """`eval --prompts` dropped a line with bytes that are not text without a word, where chat refuses such a line
    and the QA reader counts it as a bad record."""
    from babyllama.data import sources
    from babyllama.evaluate import read_prompts

    prompts = tmp_path / "p.txt"
    prompts.write_bytes("第一行提示\n\n".encode() + b"\xff" + "坏的字节\n第三行提示\n".encode())
    out = tmp_path / "out"
    r = run_cli("eval", str(tiny_run / "run" / "final"), "--prompts", str(prompts), "--max_new_tokens", "1",
                "--out_dir", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (f"note: 1 bad prompt record is skipped; the first: {prompts}:3: the line holds bytes that are not text "
            "in the file's encoding (\\xff)") in r.stdout.splitlines()
    assert r.stdout.splitlines()[-4:] == [f"2 continuations in {out / 'eval.json'} (its continuations)", "{",
                                          f'  "out_dir": "{out}"', "}"]  # not the out_dir alone
    result = json.loads((out / "eval.json").read_text())
    assert [c["prompt"] for c in result["continuations"]] == ["第一行提示", "第三行提示"]
    assert result["prompts_bad_records"] == 1
    monkeypatch.setattr(sources, "MAX_RECORD_CHARS", 4)  # a line too long is bad too; none good is an error
    prompts.write_text("第一行提示\n")
    with pytest.raises(UserError) as e:
        read_prompts(prompts)
    assert str(e.value) == (f"prompts file {prompts} has no prompts (a line of text each), 1 was bad (the first: "
                            f"{prompts}:1: a line over 4 characters); pass a file that has some.")


def test_eval_prompts_a_utf16_mark_before_bytes_that_are_not_utf16_is_a_bad_record_not_a_traceback(tmp_path):
    """A prompts file that starts with a UTF-16 byte-order mark is read as UTF-16; bytes after it that UTF-16 cannot
    decode (a lone surrogate) raised UnicodeDecodeError out of read_prompts. It is now the reader's bad record "the
    file cannot be read from here on", as for data files (sources.to_the_end)."""
    from babyllama.evaluate import read_prompts

    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"\xff\xfe" + "提示\n".encode("utf-16-le") + b"\x00\xd8a\x00\n\x00")
    with pytest.raises(UserError) as e:
        read_prompts(prompts)
    assert str(e.value).startswith(f"prompts file {prompts} has no prompts (a line of text each), 1 was bad (the "
                                   f"first: {prompts}:after start: the file cannot be read from here on ('utf-16-le' "
                                   "codec can't decode bytes")


def test_report_finds_runs_and_evals_at_any_depth_in_sorted_order(tmp_path):
    """`report t` on t/a/b/run said "t has no training run (metrics.jsonl) and no evaluation (eval.json) to report":
    runs were looked for one folder down and evals two. The README says every eval.json below it: the whole tree is
    searched, but not a run's checkpoints/."""
    model = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 600, "max_seq_len": 64}
    train = {"batch_size": 8, "grad_accum": 1, "lr": 0.001, "optimizer": "adamw"}
    metrics = "".join(json.dumps(m) + "\n" for m in ({"step": 1, "tokens": 100, "loss": 0.69, "lr": 1e-3},
                                                      {"step": 1, "tokens": 100, "val_loss": 0.7, "final": True}))
    for run in ("a/b/run", "a/b/c/d/run2", "a/early", "a/b/run/checkpoints/step_000001", "a/b/run/deeper/run",
                "x/b/run"):
        (tmp_path / run).mkdir(parents=True)
        (tmp_path / run / "config.json").write_text(json.dumps({"model": model, "train": train}))
        (tmp_path / run / "metrics.jsonl").write_text(metrics)
    text = make_report(tmp_path).read_text()
    runs = ["a/b/c/d/run2", "a/b/run", "a/b/run/deeper/run", "a/early", "x/b/run"]  # a run before the runs below it
    assert [x.split("`")[1] for x in text.split("### Run ")[1:]] == runs
    curves = [f"{r.replace('/', '_')}_curves.png" for r in runs]  # a/b/run and x/b/run drew one run_curves.png
    assert re.findall(r"!\[curves\]\(plots/(\S+)\)", text) == curves
    assert sorted(p.name for p in (tmp_path / "plots").glob("*_curves.png")) == sorted(curves)


def write_run(folder, metrics=({"step": 1, "tokens": 100, "loss": 0.69, "lr": 1e-3},)):
    """A training run's metrics.jsonl in folder (made), without config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


CORPUS_STATS = {"total": {"records": 5, "bad": 1, "too_short": 1, "exact_duplicates": 0, "near_duplicates": 0,
                          "kept": 3, "characters": 30}}


def test_report_leaves_out_datatrove_logs_and_foreign_stats_or_manifest_files(tmp_path, capsys):
    """report on a folder above a `prepare --engine datatrove` output died with "TypeError: list indices must be
    integers or slices, not str": searching at any depth, it read datatrove's own datatrove/logs/<stage>/stats.json
    (a JSON list) as a prepare stats.json. The work folder is not searched, and a stats.json or manifest.json of
    another shape is left out with a note instead of a traceback."""
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "pretrain")
    (tmp_path / "data" / "datatrove" / "logs" / "1_read").mkdir(parents=True)
    (tmp_path / "data" / "stats.json").write_text(json.dumps(CORPUS_STATS))
    (tmp_path / "data" / "datatrove" / "settings.json").write_text("{}")
    (tmp_path / "data" / "datatrove" / "logs" / "1_read" / "stats.json").write_text('[{"name": "READER"}]')
    for folder, name, text in (("list", "stats.json", "[1]"), ("other", "stats.json", '{"total": {"kept": 2}}'),
                               ("cut", "stats.json", '{"total": {'), ("list", "manifest.json", "[]")):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).write_text(text)
    capsys.readouterr()
    text = make_report(tmp_path).read_text()
    assert re.findall(r"### Corpus: `(\S+)`", text) == ["data"] and "### Run `pretrain`" in text
    stats = "is not a prepare stats.json (a total with the counts of documents); the report leaves it out."
    assert capsys.readouterr().out.splitlines() == [
        f"note: {tmp_path / 'cut' / 'stats.json'} {stats}", f"note: {tmp_path / 'list' / 'stats.json'} {stats}",
        f"note: {tmp_path / 'other' / 'stats.json'} {stats}",
        f"note: {tmp_path / 'list' / 'manifest.json'} is not a token folder's or an SFT token cache's manifest.json; "
        "the report leaves it out."]


def test_report_names_each_plot_by_its_folder_and_two_folders_never_share_one(tmp_path):
    """Every corpus drew plots/corpus.png, so two corpora showed the one drawn last; and a run's or an eval's path
    with "/" as "_" made one name of a_b/sft and a/b_sft (and of the root's eval and eval/'s): one plot for two.
    Each plot is named by its folder's path, with a short hash of the path where two paths give one name."""
    pytest.importorskip("matplotlib")
    for corpus in ("a", "b"):
        (tmp_path / corpus).mkdir()
        (tmp_path / corpus / "stats.json").write_text(json.dumps(CORPUS_STATS))
    for run in ("a_b/sft", "a/b_sft", "c/sft"):
        write_run(tmp_path / run)
    scores = {"checkpoint": "ck", "qa": {"sentiment": {"items": 2, "accuracy": 0.5, "majority_baseline": 0.5}}}
    for folder in (tmp_path, tmp_path / "eval"):
        folder.mkdir(exist_ok=True)
        (folder / "eval.json").write_text(json.dumps(scores))
    text = make_report(tmp_path).read_text()

    def hashed(path):
        return hashlib.sha1(path.encode()).hexdigest()[:6]

    names = ["a_corpus.png", "b_corpus.png", f"a_b_sft_{hashed('a/b_sft')}_curves.png",
             f"a_b_sft_{hashed('a_b/sft')}_curves.png", "c_sft_curves.png", f"eval_{hashed('.')}_qa.png",
             f"eval_{hashed('eval')}_qa.png"]
    assert re.findall(r"!\[\w+\]\(plots/(\S+)\)", text) == names
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(names)


@pytest.mark.parametrize("text", ["", '{"checkpoint": "ck", "qa": {', '{"results": {"ceval": {"acc": 0.25}}}', "[]",
                                  '{"checkpoint": "ck", "qa": {"t": {"items": 2, "accuracy": null, '
                                  '"majority_baseline": 0.5}}}',
                                  '{"checkpoint": "ck", "mc": {"overall": null}}'])
def test_report_leaves_out_an_eval_json_that_is_not_evals_with_a_note(tmp_path, capsys, text):
    """An eval.json empty, cut, lm-evaluation-harness's, a list, or with a null for a number stopped the report with
    a JSONDecodeError, KeyError 'checkpoint' or TypeError, and no report.md: it is left out with one note."""
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "run")
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "eval.json").write_text(text)
    capsys.readouterr()
    report = make_report(tmp_path).read_text()
    assert "### Run `run`" in report and "### Evaluation" not in report
    assert capsys.readouterr().out.splitlines() == [
        f"note: {tmp_path / 'ev' / 'eval.json'} is not an eval.json of babyllama eval (a checkpoint and its scores); "
        "the report leaves it out."]


@pytest.mark.parametrize("text", ['{"step": 1, "tok', "[1, 2]\n", "null\n", '{"epoch": 1, "acc": 0.5}\n', "{}\n",
                                  '{"step": 3, "resumed": true}\n', '{"step": 1, "loss": "n/a", "lr": [0.1]}\n'])
def test_report_leaves_out_a_metrics_jsonl_that_is_not_a_runs_with_a_note(tmp_path, capsys, text):
    """A metrics.jsonl of another tool (or cut) is left out with one note, as a foreign eval.json is; so is one whose
    records hold no step with a number to plot, which drew a section of empty plots and a row of None."""
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.jsonl").write_text(text)
    capsys.readouterr()
    report = make_report(tmp_path).read_text()
    assert "### Run `a`" in report and "### Run `b`" not in report
    assert capsys.readouterr().out.splitlines() == [
        f"note: {tmp_path / 'b' / 'metrics.jsonl'} is not a training run's metrics.jsonl; the report leaves it out."]


def test_report_shows_a_run_whose_last_metrics_line_was_cut_by_a_kill(tmp_path, capsys):
    """A run killed while it wrote a line of metrics.jsonl (a normal crash) was left out whole as "not a training
    run's metrics.jsonl": the cut last line is skipped with a note, and the run shown of its whole lines."""
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "run", [{"step": 1, "tokens": 100, "loss": 0.69, "lr": 1e-3},
                                 {"step": 2, "tokens": 200, "loss": 0.6, "lr": 1e-3}])
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "tokens": 3')
    capsys.readouterr()
    text = make_report(tmp_path).read_text()
    assert "### Run `run`" in text and "| 2 | 200 | 0.6 |" in text
    assert capsys.readouterr().out == (f"note: the last line of {tmp_path / 'run' / 'metrics.jsonl'} was cut off (a "
                                       "run killed while writing it?); the report shows the lines before it.\n")


@pytest.mark.parametrize("loss", [{"a": 1}, "n/a", [1.5], True])
def test_report_leaves_out_a_metrics_value_that_is_not_a_number_with_a_note(tmp_path, capsys, loss):
    """A loss that is not a number reached plot_run: an object stopped the report with a TypeError traceback, a
    string was drawn on an axis of categories. Only numbers are drawn; the others are left out, said in a note."""
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "run", [{"step": 1, "tokens": 10, "loss": loss, "lr": 0.1},
                                 {"step": 2, "tokens": 20, "loss": 2.5, "lr": 0.1, "final": True}])
    capsys.readouterr()
    text = make_report(tmp_path).read_text()
    assert "| 2 | 20 | 2.5 |  |  |" in text and "![curves](plots/run_curves.png)" in text
    assert capsys.readouterr().out == (f"note: {tmp_path / 'run' / 'metrics.jsonl'} holds values that are not "
                                       "numbers (loss); the report leaves them out.\n")
    from babyllama.report import run_metrics

    assert run_metrics(tmp_path / "run" / "metrics.jsonl")[0] == {"step": 1, "tokens": 10, "lr": 0.1}


def test_report_shows_a_run_whose_metrics_hold_a_bad_line_within_as_the_trainer_reads_it(tmp_path, capsys):
    """The report and a resumed run read metrics.jsonl by different rules: a line that is not a record (not JSON, or
    without an int step) anywhere but last left the whole run out of the report, while the trainer skips it. Both
    now read it with progress.read_metrics: the line is skipped, and the report says which."""
    pytest.importorskip("matplotlib")
    import babyllama.progress
    import babyllama.report
    import babyllama.train.trainer

    assert babyllama.report.read_metrics is babyllama.train.trainer.read_metrics is babyllama.progress.read_metrics
    write_run(tmp_path / "run", [{"step": 1, "tokens": 100, "loss": 0.69, "lr": 1e-3}])
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "tok\n{"step": true, "loss": 1}\n\n{"step": 3, "tokens": 300, "loss": 0.6, "lr": 1e-3}\n')
    capsys.readouterr()
    text = make_report(tmp_path).read_text()
    assert "### Run `run`" in text and "| 3 | 300 | 0.6 |" in text
    assert capsys.readouterr().out == (f"note: lines 2, 3 of {tmp_path / 'run' / 'metrics.jsonl'} are not a run's "
                                       "record (a JSON object with an integer step); the report leaves them out.\n")


@pytest.mark.parametrize("drawing", ["plot_run", "plot_bars"])
def test_report_does_not_hide_a_fault_of_its_own_as_a_foreign_file(tmp_path, monkeypatch, drawing):
    """A fault in the report's own code (here its drawing) was caught with the files it read, and the run or eval
    left out as "not a training run's metrics.jsonl": only reading a file of another shape is caught."""
    pytest.importorskip("matplotlib")
    import babyllama.report as report

    write_run(tmp_path / "run")
    (tmp_path / "eval.json").write_text(json.dumps({"checkpoint": "ck", "continuations": [], "qa": {
        "t": {"items": 5, "accuracy": 0.4, "majority_baseline": 0.6}}}))

    def fault(*args):
        raise KeyError("a fault of the report's")

    monkeypatch.setattr(report, drawing, fault)
    with pytest.raises(KeyError, match="a fault of the report's"):
        make_report(tmp_path)


def test_report_leaves_out_a_foreign_config_or_preferences_json_alone_with_a_note(tmp_path, capsys):
    """Only the reading of a file is caught, so a run's config.json or an eval's preferences.json of another shape is
    read on its own: that part is left out with a note, and the run's curves and the eval's scores stay."""
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "run")
    (tmp_path / "run" / "config.json").write_text("[1]")
    (tmp_path / "eval.json").write_text(json.dumps({"checkpoint": "ck", "continuations": [], "lm": {"loss": 2.0}}))
    (tmp_path / "preferences.json").write_text('{"pairs": 2')
    capsys.readouterr()
    text = make_report(tmp_path).read_text()
    assert "![curves](plots/run_curves.png)" in text and "| 2 |" in text and "preference pairs" not in text
    assert capsys.readouterr().out.splitlines() == [
        f"note: {tmp_path / 'run' / 'config.json'} is not a training run's config.json; the report leaves it out.",
        f"note: {tmp_path / 'preferences.json'} is not the demo's preferences.json (held-out pairs, before and after "
        "DPO); the report leaves it out."]


def test_report_leaves_out_a_token_manifest_without_totals_or_dtype_and_shows_a_whole_one(tmp_path, capsys):
    """A manifest.json with format babyllama-tokens but no totals (or no dtype, or totals of another shape) stopped
    the report with a KeyError: it is left out with a note, as a foreign manifest is, and a whole one is shown."""
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "run")
    whole = {"format": "babyllama-tokens", "dtype": "uint16",
             "totals": {"train": {"tokens": 90, "documents": 3}, "val": {"tokens": 10, "documents": 1}}}
    bad = {"no-totals": {"format": "babyllama-tokens", "dtype": "uint16"},
           "no-dtype": {k: v for k, v in whole.items() if k != "dtype"},
           "list-totals": whole | {"totals": [90, 10]}, "number-totals": whole | {"totals": {"train": 90}}}
    for folder, manifest in {"tokens": whole, **bad}.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    text = make_report(tmp_path).read_text()
    assert re.findall(r"### Token shards: `(\S+)` \((\w+)\)", text) == [("tokens", "uint16")]
    assert "| train | 90 | 3 |\n| val | 10 | 1 |" in text and "### Run `run`" in text
    assert capsys.readouterr().out.splitlines() == [
        f"note: {tmp_path / folder / 'manifest.json'} is not a token folder's or an SFT token cache's manifest.json; "
        "the report leaves it out." for folder in sorted(bad)]


def test_report_shows_a_setting_missing_from_a_runs_config_blank_not_none(tmp_path):
    """The settings table showed "None" for each key that a run's config.json lacks (or for all, without one): it is
    blank, as the runs table shows a missing number. So is the optimizer of a run without a config.json or with no
    train settings (it was "adamw", a default filled in); a run's from before Muon, whose config has train settings
    but no optimizer, trained with AdamW."""
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "bare")
    write_run(tmp_path / "some")
    (tmp_path / "some" / "config.json").write_text(json.dumps({"model": {"dim": 64, "n_layers": 2}, "train": {}}))
    write_run(tmp_path / "old")  # a run from before Muon: its train settings without an optimizer, which was AdamW
    (tmp_path / "old" / "config.json").write_text(json.dumps({"model": {}, "train": {"grad_accum": 4}}))
    text = make_report(tmp_path).read_text()
    settings = {x.split("`")[1]: x.split("\n\n")[1].splitlines()[2] for x in text.split("### Run ")[1:]}
    assert settings == {"bare": "|  |  |  |  |  |  |  |  |  |  |", "some": "| 64 | 2 |  |  |  |  |  |  |  |  |",
                        "old": "|  |  |  |  |  |  |  | 4 |  | adamw |"}
    assert "None" not in text


def test_report_names_the_checkpoint_by_its_path_from_the_reports_folder_not_evals(tmp_path, monkeypatch):
    """The report named an eval's checkpoint as written on eval's command line (`../demo/sft/final`), which reads
    wrong from the report's folder: it is named by its real path (checkpoint_path), below the report's folder relative
    to it, else whole; an eval.json from before checkpoint_path keeps its path as written."""
    pytest.importorskip("matplotlib")
    from babyllama.evaluate import checkpoint_record

    runs, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    (runs / "sft" / "final").mkdir(parents=True)
    (elsewhere / "ck").mkdir(parents=True)
    monkeypatch.chdir(runs / "sft")
    for folder, checkpoint in (("a", "final"), ("b", str(elsewhere / "ck"))):
        (runs / folder).mkdir()
        (runs / folder / "eval.json").write_text(json.dumps({**checkpoint_record(checkpoint, runs / folder),
                                                             "continuations": []}))
    (runs / "c").mkdir()
    (runs / "c" / "eval.json").write_text(json.dumps({"checkpoint": "../old/final", "continuations": []}))
    monkeypatch.chdir(tmp_path)
    text = make_report("runs").read_text()
    assert re.findall(r"### Evaluation: `(\w)` \(checkpoint `(\S+)`\)", text) == [
        ("a", "sft/final"), ("b", str(elsewhere / "ck")), ("c", "../old/final")]


def test_report_names_the_checkpoint_of_a_moved_run_folder_from_its_new_place(tmp_path):
    """A run folder copied elsewhere named each eval's checkpoint by its old absolute path (checkpoint_path, as eval
    ran): the report reads checkpoint_relative, which eval records so that a moved folder still matches, where it
    lands below the report's folder; a checkpoint outside it is still named by its real path."""
    pytest.importorskip("matplotlib")
    from babyllama.evaluate import checkpoint_record

    old, new, elsewhere = tmp_path / "old", tmp_path / "new", tmp_path / "elsewhere" / "ck"
    for run in ("sft", "dpo"):
        (old / run / "final").mkdir(parents=True)
        (old / run / "eval").mkdir()
        (old / run / "eval" / "eval.json").write_text(json.dumps(
            {**checkpoint_record(old / run / "final", old / run / "eval"), "continuations": []}))
    elsewhere.mkdir(parents=True)
    (old / "x").mkdir()
    (old / "x" / "eval.json").write_text(json.dumps({**checkpoint_record(elsewhere, old / "x"), "continuations": []}))
    shutil.copytree(old, new)
    text = make_report(new).read_text()
    assert re.findall(r"### Evaluation: `(\S+)` \(checkpoint `(\S+)`\)", text) == [
        ("dpo/eval", "dpo/final"), ("sft/eval", "sft/final"), ("x", str(elsewhere))]


def test_report_names_the_checkpoint_that_exists_after_an_eval_folder_moved_alone(tmp_path):
    """checkpoint_relative was used without checking that it exists, so after `mv R/sft/eval R/archive/sft_eval` the
    report named archive/final, which does not exist, over checkpoint_path's sft/final, still right. The first of the
    two that exists is named; where neither does, the real path, said not to be found."""
    pytest.importorskip("matplotlib")
    from babyllama.evaluate import checkpoint_record

    root = tmp_path / "R"
    for run in ("sft", "gone"):
        (root / run / "final").mkdir(parents=True)
        (root / run / "eval").mkdir()
        (root / run / "eval" / "eval.json").write_text(json.dumps(
            {**checkpoint_record(root / run / "final", root / run / "eval"), "continuations": []}))
    (root / "archive").mkdir()
    (root / "sft" / "eval").rename(root / "archive" / "sft_eval")
    (root / "gone" / "final").rmdir()
    text = make_report(root).read_text()
    assert re.findall(r"### Evaluation: `(\S+)` \((.*)\)", text) == [
        ("archive/sft_eval", "checkpoint `sft/final`"), ("gone/eval", "checkpoint `gone/final`, not found")]


@pytest.mark.parametrize(("parts", "said"), [
    (("lm",), None), (("lm", "qa"), "the first 5 QA items"), (("mc",), "the first 5 multiple-choice items"),
    (("qa", "mc"), "the first 5 QA items and the first 5 multiple-choice items")])
def test_report_says_what_limit_scored_only_of_the_parts_that_ran(tmp_path, parts, said):
    """The report said "--limit 5: the first 5 QA and multiple-choice items are scored." of every eval with a limit,
    one of --data alone too, and as if 5 items in all: QA and multiple choice each take their own first 5. It says
    it of the parts that ran, each, and nothing where neither ran."""
    pytest.importorskip("matplotlib")
    scores = {"lm": {"loss": 2.0}, "qa": {"t": {"items": 5, "accuracy": 0.4, "majority_baseline": 0.6}},
              "mc": {"overall": {"items": 5, "letter_accuracy": 0.2, "text_accuracy": 0.2}, "subjects": {}}}
    (tmp_path / "eval.json").write_text(json.dumps({"checkpoint": "ck", "continuations": [], "limit": 5}
                                                   | {k: scores[k] for k in parts}))
    text = make_report(tmp_path).read_text()
    assert re.findall(r"^--limit.*$", text, re.M) == ([f"--limit 5: {said} are scored."] if said else [])


def test_eval_records_its_sampling_and_limit_and_the_subjects_the_limit_left_out(tiny_run, tmp_path, capsys):
    """eval.json recorded no sampling settings nor --limit, and the report said QA was "greedy" of a sampled eval;
    with --mc files of several subjects, --limit left the later ones out without a word. eval.json records both
    (sampling, limit), the report says them, and the subjects --limit does not reach are said and recorded."""
    pytest.importorskip("matplotlib")
    import babyllama.evaluate as ev

    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"问题{i}", "answer": "是"}, ensure_ascii=False) + "\n"
                          for i in range(4)))
    for name, rows in (("accountant_val.csv", 3), ("agronomy_val.csv", 2), ("zoology_val.csv", 1)):
        (tmp_path / name).write_text("question,A,B,C,D,answer\n" + "问,甲,乙,丙,丁,A\n" * rows, encoding="utf-8")
    sampling = Sampling(max_new_tokens=2, temperature=0.7, top_p=0.9)
    capsys.readouterr()
    result = ev.evaluate(tiny_run / "run" / "final", tmp_path / "out", qa=str(qa), sampling=sampling, limit=3,
                         mc=[str(tmp_path / f) for f in ("accountant_val.csv", "agronomy_val.csv", "zoology_val.csv")],
                         device="cpu")
    assert ("note: --limit 3 scored multiple-choice items of accountant only; agronomy, zoology were not reached.\n"
            in capsys.readouterr().out)
    written = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert written == result and result["limit"] == 3 and result["mc_not_reached"] == ["agronomy", "zoology"]
    assert result["sampling"] == {"max_new_tokens": 2, "temperature": 0.7, "top_k": 0, "top_p": 0.9,
                                  "repetition_penalty": 1.0}
    assert result["qa"]["qa"]["items"] == 3 and list(result["mc"]["subjects"]) == ["accountant"]
    text = make_report(tmp_path / "out").read_text()
    assert "--limit 3: the first 3 QA items and the first 3 multiple-choice items are scored.\n" in text
    assert "Question answering (sampled: temperature 0.7, top_p 0.9, at most 2 new tokens, chat format;" in text
    assert "Not reached under --limit 3: agronomy, zoology.\n" in text
    old = {k: v for k, v in result.items() if k not in ("sampling", "limit", "mc_not_reached")}  # an older eval.json
    (tmp_path / "out" / "eval.json").write_text(json.dumps(old))
    text = make_report(tmp_path / "out").read_text()
    assert "Question answering (greedy, chat format;" in text and "--limit" not in text


def test_sampled_eval_seeds_each_item_by_its_task_and_number_in_it(tmp_path, bpe_tokenizer, monkeypatch):
    """Sampled QA item i was seeded with i, its number among all the run's items, as was continuation i: the i-th
    continuation and the i-th QA item drew alike, and a task's answers changed with the tasks asked before it. Each
    draw is seeded from the SHA-256 of its kind, task and number in its task (item_seed): the same each run."""
    import babyllama.evaluate as ev

    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    rows = [{"question": f"第{i}句话的情感是什么", "answer": "正面", "task": t} for t in ("a", "b") for i in range(3)]
    for name, tasks in (("both", "ab"), ("b", "b")):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows
                                                        if r["task"] in tasks))
    seeds, real = [], ev.seeded
    monkeypatch.setattr(ev, "seeded", lambda model, s, seed: seeds.append(seed) or real(model, s, seed))
    kw = {"sampling": Sampling(max_new_tokens=4, temperature=1.0), "device": "cpu"}
    for out, qa in (("alone", "b"), ("one", "both"), ("two", "both")):
        seeds.clear()
        ev.evaluate(tmp_path / "ck", tmp_path / out, qa=str(tmp_path / f"{qa}.jsonl"), **kw)
    items = {out: [json.loads(x) for x in (tmp_path / out / "items.jsonl").read_text().splitlines()]
             for out in ("one", "two", "alone")}
    assert items["one"] == items["two"]
    assert [x["prediction"] for x in items["one"] if x["task"] == "b"] == [x["prediction"] for x in items["alone"]]
    qa_seeds = [ev.item_seed("qa", i, t) for t in ("a", "b") for i in range(3)]
    assert seeds[-6:] == qa_seeds and len(set(seeds)) == len(seeds) > 6  # continuations' seeds differ from all
    assert ev.item_seed("qa", 0, "a") == 4215537368122597973  # stable: not Python's salted hash()


def test_report_of_a_run_folder_given_as_dot_names_its_plot_and_heading_after_the_folder(tmp_path, monkeypatch):
    """`babyllama report .` in a run's folder drew plots/_curves.png under the heading "### Run ``": Path(".").name
    is empty. Both take the folder's own name."""
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "pretrain")
    monkeypatch.chdir(tmp_path / "pretrain")
    text = make_report(".").read_text()
    assert "### Run `pretrain`\n" in text and re.findall(r"!\[curves\]\(plots/(\S+)\)", text) == ["pretrain_curves.png"]
    assert [p.name for p in (tmp_path / "pretrain" / "plots").iterdir()] == ["pretrain_curves.png"]


def test_report_of_a_run_of_val_records_alone_shows_its_step_and_val_curve(tmp_path):
    """A metrics.jsonl of eval lines alone (no train loss) was shown with steps and tokens None and an empty plot
    beside the val points: its last step is the steps, and the loss panel is the val line alone."""
    from babyllama.report import curves

    pytest.importorskip("matplotlib")
    records = [{"step": 2, "tokens": 200, "val_loss": 5.5}, {"step": 4, "tokens": 400, "val_loss": 5.0, "final": True}]
    write_run(tmp_path / "run", records)
    assert curves(records) == {("tokens", "loss"): {"val": ([200, 400], [5.5, 5.0])}}
    text = make_report(tmp_path / "run").read_text()
    assert "| 4 | 400 |  | 5 |  |\n" in text and "![curves](plots/run_curves.png)" in text


@pytest.mark.parametrize("stray", [{"format": "babyllama-sft-tokens"}, {"format": "babyllama-tokens", "dtype":
                                   "uint16", "totals": {"train": {"tokens": 90, "documents": 3}}}])
def test_report_of_a_folder_holding_a_manifest_json_still_reports_the_runs_below(tmp_path, stray):
    """A manifest.json at the report's root (a token cache's, copied there) made the whole folder a data folder whose
    subfolders the search skipped: "has no training run". The root is searched whatever it holds; a token folder's
    manifest there is shown in the data section."""
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "sft")
    (tmp_path / "manifest.json").write_text(json.dumps(stray))
    text = make_report(tmp_path).read_text()
    assert "### Run `sft`\n" in text and ("| train | 90 | 3 |" in text) == ("totals" in stray)


@pytest.mark.parametrize("damaged", [("tokenizer.json", b"{"), ("tokenizer.model", b"garbage")])
def test_report_says_a_token_folders_damaged_tokenizer_could_not_be_read_and_reports_the_rest(tmp_path, capsys,
                                                                                             damaged):
    """A token folder whose tokenizer/tokenizer.json (or .model) is damaged stopped the whole report with the
    tokenizer's error: the data section says it could not be read, and why, and the runs are reported."""
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "run")
    (tmp_path / "tokens" / "tokenizer").mkdir(parents=True)
    (tmp_path / "tokens" / "manifest.json").write_text(json.dumps(
        {"format": "babyllama-tokens", "dtype": "uint16", "totals": {"train": {"tokens": 90, "documents": 3}}}))
    file = tmp_path / "tokens" / "tokenizer" / damaged[0]
    file.write_bytes(damaged[1])
    capsys.readouterr()
    text = make_report(tmp_path).read_text()
    why = re.findall(r"\nTokenizer: could not be read: (.+)\n", text)
    assert len(why) == 1 and why[0].startswith(f"{file} is not a valid ") and "### Run `run`\n" in text
    assert capsys.readouterr().out == (f"note: the tokenizer in {file.parent} could not be read; the report leaves it "
                                       f"out: {why[0]}\n")


@pytest.mark.parametrize(("taken", "made"), [("plots", "file"), ("report.md", "folder")])
def test_report_refuses_a_plots_file_or_a_report_md_folder_in_one_sentence(tmp_path, taken, made):
    """`report R` with R/plots a file was FileExistsError's traceback, with R/report.md a folder IsADirectoryError's
    (after the work): one sentence naming the path, before any."""
    write_run(tmp_path)
    (tmp_path / taken).mkdir() if made == "folder" else (tmp_path / taken).write_text("")
    what = {"file": "a folder", "folder": "a file"}[made]
    with pytest.raises(UserError) as e:
        make_report(tmp_path)
    assert str(e.value) == (f"{tmp_path / taken} is a {made}, but the report writes {what} there; move it away or "
                            "report another folder.")
    assert not (tmp_path / "plots").is_dir()


@pytest.mark.parametrize(("last", "shown"), [("NaN", "not finite (nan)"), ("Infinity", "not finite (inf)"),
                                             ("null", "not finite"), ("0.5", "0.5")])
def test_report_says_a_diverged_runs_final_loss_is_not_finite(tmp_path, last, shown):
    """A run whose loss became NaN, then Infinity, showed "steps 3, final train loss 1": the last finite loss, from
    before it diverged, so it looked healthy. The final loss is said not finite, as written."""
    pytest.importorskip("matplotlib")
    (tmp_path / "metrics.jsonl").write_text(f'{{"step": 1, "loss": 1.0}}\n{{"step": 2, "loss": NaN}}\n'
                                            f'{{"step": 3, "loss": {last}}}\n')
    text = make_report(tmp_path).read_text()
    assert (f"| steps | tokens | final train loss | final val loss | tokens/s |\n|{'---|' * 5}\n"
            f"| 3 |  | {shown} |  |  |") in text


def test_report_leaves_out_a_null_score_of_an_eval_with_a_note(tmp_path, capsys):
    """eval.json's `lm.bits_per_byte: null` (no bytes to count) was shown as "None"; the README says such a value
    is left out with a note."""
    (tmp_path / "eval.json").write_text(json.dumps({"checkpoint": "ck", "continuations": [],
                                                    "lm": {"loss": 1.5, "bits_per_byte": None}}))
    capsys.readouterr()
    text = make_report(tmp_path).read_text()
    assert "Language modelling on the validation split:\n\n| loss |\n|---|\n| 1.5 |\n" in text and "None" not in text
    assert capsys.readouterr().out == (f"note: {tmp_path / 'eval.json'} has null for lm.bits_per_byte; the report "
                                       "leaves it out.\n")


def test_report_says_it_leaves_out_a_manifest_of_no_known_format(tmp_path, capsys):
    """A tokens/manifest.json of {"dtype": "uint16"} (no format) dropped the token-shard section without a word."""
    write_run(tmp_path)
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / "manifest.json").write_text('{"dtype": "uint16"}')
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text('{"format": "babyllama-sft-tokens"}')  # an SFT cache: no note
    capsys.readouterr()
    make_report(tmp_path)
    assert capsys.readouterr().out == (f"note: {tmp_path / 'tokens' / 'manifest.json'} is not a token folder's "
                                       "manifest.json (its format is not babyllama-tokens); the report leaves it "
                                       "out.\n")


def test_report_reads_json_files_that_start_with_a_byte_order_mark(tmp_path, capsys):
    """An eval.json or stats.json saved with a UTF-8 BOM (Notepad) was "not an eval.json of babyllama eval"."""
    pytest.importorskip("matplotlib")
    (tmp_path / "eval.json").write_text("\ufeff" + json.dumps({"checkpoint": "ck", "continuations": []}),
                                        encoding="utf-8")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "stats.json").write_text("\ufeff" + json.dumps(CORPUS_STATS), encoding="utf-8")
    capsys.readouterr()
    text = make_report(tmp_path).read_text()
    assert "### Evaluation: `.` (checkpoint `ck`)" in text and "### Corpus: `data`" in text
    assert capsys.readouterr().out == ""


def test_report_names_a_moved_dpo_runs_reference_from_the_report_folder(tmp_path, monkeypatch):
    """After `mv p1 r2; babyllama report r2` the DPO run's reference was `p1/sft/final`, its init as given, relative
    to the folder DPO ran from: it is named as a checkpoint is, from the report's folder where it exists (seen from
    the run's folder as out_dir saw it), else as recorded with ", not found"."""
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    metrics = [{"step": 1, "loss": 0.69, "rewards/accuracies": 0.5}]
    for run, init in (("dpo", "p1/sft/final"), ("dpo2", "p1/gone/final")):
        write_run(tmp_path / "p1" / run, metrics)
        (tmp_path / "p1" / run / "config.json").write_text(json.dumps(
            {"model": {}, "train": {"init": init, "out_dir": f"p1/{run}", "beta": 0.1}}))
    (tmp_path / "p1" / "sft" / "final").mkdir(parents=True)
    (tmp_path / "p1").rename(tmp_path / "r2")
    text = make_report("r2").read_text()
    assert re.findall(r"\| 0\.1 \| ([^|]*) \|", text) == ["sft/final", "p1/gone/final, not found"]


def test_report_reads_items_jsonl_a_line_at_a_time(tmp_path):
    """The report held every item of items.jsonl to show three a task (369 MB for a file of 96 MB): it streams
    the file and keeps those it shows."""
    import tracemalloc

    from babyllama.report import sample_answers

    n = 20_000
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"kind": "qa", "task": "t", "question": f"q{i} " + "x" * 200,
                                         "prediction": "p", "reference": "r"}) + "\n" for i in range(n)))
    e = {"qa": {"t": {"items": n, "exact_match": 1.0, "char_f1": 1.0}}}
    tracemalloc.start()
    samples, note = sample_answers(items, e)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert note == "" and [x["question"][:2] for x in samples] == ["q0", "q1", "q2"]
    assert peak < 1_000_000  # the file is 5 MB


def test_report_escapes_model_and_file_text(tmp_path):
    """A model's answer `正面|负面\\n<script>alert(1)</script>` showed as `正面/负面 <script>...`: the | changed and the
    HTML raw in report.md. Tables escape | as \\|; &, < and > are entities in every text of a model or file; a folder
    name with a backtick or a newline stays one code span in its heading."""
    pytest.importorskip("matplotlib")
    folder = tmp_path / "a`b\nc"
    folder.mkdir()
    answer = "正面|负面\n<script>alert(1)</script>"
    (folder / "eval.json").write_text(json.dumps({
        "checkpoint": "ck", "continuations": [{"prompt": "<b>&", "continuation": answer}],
        "qa": {"s": {"items": 1, "exact_match": 0.0, "char_f1": 0.0}}}))
    (folder / "items.jsonl").write_text(json.dumps({"kind": "qa", "task": "s", "question": "问", "prediction": answer,
                                                    "reference": "正面"}) + "\n")
    text = make_report(tmp_path).read_text()
    assert "### Evaluation: ``a`b\\nc`` (checkpoint `ck`)\n" in text
    assert "- **&lt;b&gt;&amp;** 正面|负面<br>&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "| s | 问 | 正面\\|负面<br>&lt;script&gt;alert(1)&lt;/script&gt; | 正面 |" in text
    assert "<script>" not in text


def test_report_calls_a_whole_last_line_with_a_step_of_1e400_no_record_not_cut_off(tmp_path, capsys):
    """A step of 1e400 (a float, inf) is no record: the run shows step 1, not "steps inf" (read_metrics keeps int
    steps), and the note said the whole last line "was cut off (a run killed while writing it?)"."""
    pytest.importorskip("matplotlib")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 1e400, "loss": 2.0}\n')
    capsys.readouterr()
    text = make_report(tmp_path).read_text()
    assert f"| final val loss | tokens/s |\n|{'---|' * 5}\n| 1 |  | 1 |  |  |" in text
    assert capsys.readouterr().out.splitlines()[0] == (
        f"note: line 2 of {tmp_path / 'metrics.jsonl'} is not a run's record (a JSON object with an integer step); "
        "the report leaves it out.")
