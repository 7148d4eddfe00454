"""Evaluation: held-out loss and bits per byte, continuations, QA scores, multiple choice, leakage.

    babyllama eval runs/demo/sft/final --data runs/demo/tokens --qa runs/demo/data/eval.jsonl \
        --mc ceval/val/*.csv --train_data runs/demo/data/sft.jsonl --out_dir runs/demo/eval

Writes OUT/eval.json (every number) and OUT/items.jsonl (one line per scored item). QA answers and
multiple-choice picks are appended to OUT/items.jsonl.partial as they come, so that a stopped eval, run
again with the same checkpoint and settings, goes on from where it stopped.
  * language modelling: mean loss, perplexity and bits per byte of UTF-8 text on the val split,
    so models with different tokenizers compare (an <eos> is scored and counts 0 bytes);
  * continuations of plain-text prompts (the recipe's by default);
  * QA in the chat format, greedy: BLEU-4 (sacrebleu, tokenize zh), the recipe's word BLEU over
    jieba words (both 0-100, sacrebleu's scale), ROUGE-L and F1 over characters, exact match (fractions, 0-1:
    QA_SCALES); every task reports the majority baseline,
    the exact match of always giving the commonest reference (for the demo's entities: 无); tasks whose
    references are a few labels (the demo's 正面 / 负面: MAX_LABELS, ITEMS_PER_LABEL) also report accuracy;
  * multiple choice in the C-Eval / CMMLU shape, by the log-likelihood of the option letter and,
    separately, of the option text per token; accuracy overall and per subject;
  * leakage: eval questions found verbatim in the training data.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, replace
from itertools import chain, islice
from pathlib import Path
from typing import IO

import torch

from babyllama.chat_format import (
    SHAPE_FIELDS,
    SHAPE_ORDER,
    Conversation,
    context_messages,
    conversation_from_messages,
    conversation_from_record,
    cut_conversation,
    field_text,
    instruction_prompt,
    last_whole_characters,
    line_ends,
    messages_key,
    not_a_pair,
    not_unicode,
    prompt_budget,
    read_fields,
    render_prompt,
    text_prompt,
    unread_fields,
)
from babyllama.data.shards import (
    TokenWindows,
    check_shard_files,
    larger_val_fraction,
    read_manifest,
    shard_windows,
    split_shards,
    val_missed,
)
from babyllama.data.sources import (
    MAX_RECORD_CHARS,
    RECORD_SUFFIXES,
    LeftOut,
    check_output_folder,
    expand_inputs,
    file_encoding,
    files_of_records,
    iter_records,
    open_text,
    records_text,
    to_the_end,
)
from babyllama.errors import (
    UserError,
    agree,
    cannot_write,
    first_few,
    not_a_file,
    require,
    signals_held,
    write_whole,
    writing,
)
from babyllama.progress import progress
from babyllama.sampling import DEVICE, Sampling
from babyllama.tokenizer import Tokenizer

DEFAULT_PROMPTS = [
    "床前明月光，疑是地上霜。举头望明月，",
    "《小王子》是一本畅销童话书，它讲述了：",
    "中华人民共和国成立于",
    "人工智能是",
    "今天天气很好，",
]
QUESTION_KEYS = ("question", "prompt")
REFERENCE_KEYS = ("answer", "std_answer", "target", "output", "completion")
# The fields of a QA record's shapes, read in this order: SFT's shapes first, read as SFT reads them, so that the
# reference is the answer SFT trains on; a record with the fields of several leaves the others out (qa_fields)
QA_FIELDS = tuple(dict.fromkeys((*SHAPE_FIELDS, *QUESTION_KEYS, *REFERENCE_KEYS)))
QA_ORDER = (f"{SHAPE_ORDER} (as SFT reads them), else a question ({', '.join(QUESTION_KEYS)}, instruction with input) "
            f"and a reference ({', '.join(REFERENCE_KEYS)})")
LETTERS = "ABCD"
# a QA task of at most MAX_LABELS different references, ITEMS_PER_LABEL items or more a label on average, is one of
# labels (classification): its exact match is also its accuracy; with more labels, or fewer items a label (12
# person names among 6 names), its references are free text
MAX_LABELS, ITEMS_PER_LABEL = 10, 3
# the QA scores mix two scales: BLEU as sacrebleu, lm-evaluation-harness and MT papers give it, the rest fractions
# (a model that answers `，，，，` everywhere had word_bleu 0.351, read as 35%); eval.json and the summary say so
CONTINUATION_TOKENS = 64  # the most a continuation of a plain prompt gets, whatever --max_new_tokens says
QA_SCALES = ("bleu and word_bleu: 0-100, as sacrebleu gives them; rouge_l, char_f1, exact_match, majority_baseline "
             "and accuracy: fractions, 0-1")


# --- language modelling ---


@torch.no_grad()
def loss_sums(forward: Callable[[dict], torch.Tensor], data, indices: Sequence[int], batch_size: int,
              device: torch.device, tokenizer: Tokenizer | None = None, desc: str | None = None,
              padding_batches: int = 0) -> tuple[float, int, int]:
    """Summed cross-entropy (nats), target tokens and the UTF-8 bytes of their text over data's rows `indices`.

    The validation loss of the trainer and of `babyllama eval`. forward(batch) gives the batch's
    mean loss over targets that are not -1 (0 when there are none); the bytes (Tokenizer.text_bytes)
    need the tokenizer. padding_batches: forward passes more, over row 0 with every target masked,
    which count nothing: under torchrun every rank must run as many forward passes as the others.
    """
    nats, tokens, nbytes = 0.0, 0, 0
    starts = range(0, len(indices), batch_size)
    for s in progress(starts, desc=desc or "", unit=" batch", disable=desc is None):
        batch = {k: v.to(device) for k, v in data.collate(list(indices[s : s + batch_size])).items()}
        targets = batch["targets"][batch["targets"] != -1]
        nats += forward(batch).item() * len(targets)
        tokens += len(targets)
        if tokenizer is not None:  # the token before each target is its input, idx
            before, after = batch["idx"].cpu().numpy(), batch["targets"].cpu().numpy()
            nbytes += int(tokenizer.text_bytes(before, after.clip(min=0))[after != -1].sum())
    for _ in range(padding_batches):
        forward({k: v.to(device) for k, v in padding_batch(data, 0).items()})
    return nats, tokens, nbytes


def padding_batch(data, row: int) -> dict[str, torch.Tensor]:
    """A batch of data's row that counts nothing, every target masked: for a process with no rows of its own to run
    as many passes as the others (DDP, FSDP), in validation (loss_sums) and in a partial last training step."""
    batch = data.collate([row])
    batch["targets"] = torch.full_like(batch["targets"], -1)  # not in place: it may share idx's storage
    return batch


def lm_metrics(model, data_dir: str | Path, tokenizer: Tokenizer, batch_size: int = 8, max_batches: int = 200,
               doc_mask: bool = False, manifest: dict | None = None) -> dict:
    """Loss, perplexity and bits per byte over the validation windows of a token directory, and doc_mask: with it,
    attention stays within documents (each <eos> starts the next), as pretraining with doc_mask trained and
    validated the model; without it the loss of such a model is another one (trained_doc_mask). manifest: data_dir's
    (check_lm_data's), where the caller has read it; else it is read here."""
    data = TokenWindows(data_dir, model.cfg.max_seq_len, "val", manifest=manifest)
    differ = tokenizer.differences(data.manifest["tokenizer"])
    if differ:
        raise UserError(f"{data_dir} was tokenized with another tokenizer ({differ[1]}) than the model's "
                        f"({differ[0]}).")
    if doc_mask:
        data.doc_eos = tokenizer.eos_id
    n = min(len(data), batch_size * max_batches)
    forward = lambda batch: model(batch["idx"], batch["targets"], segments=batch.get("segments"))[1]
    nats, tokens, nbytes = loss_sums(forward, data, range(n), batch_size, model.rope_cos.device, tokenizer,
                                     desc="eval loss")
    return {"val_loss": nats / tokens, "perplexity": math.exp(nats / tokens),
            "bits_per_byte": nats / math.log(2) / max(nbytes, 1), "tokens": tokens, "bytes": nbytes,
            "doc_mask": doc_mask}


def trained_doc_mask(config: dict) -> bool:
    """Whether a checkpoint's config.json says its run trained with doc_mask (pretraining only; older checkpoints,
    which do not record their run, did not)."""
    return bool(config.get("run", {}).get("train", {}).get("doc_mask", False))


def continuations(model, tokenizer: Tokenizer, prompts: Sequence[str], s: Sampling | None = None,
                  max_new_tokens: int = CONTINUATION_TOKENS) -> list[dict]:
    """Continuations of at most max_new_tokens (and s's), sampled as s says (default: sampling.Sampling,
    greedy, the i-th prompt's draws seeded with item_seed("continuation", i)); a prompt starts after an <eos>, as
    a document does in the shards, and a prompt too long to leave room for them keeps its end
    (chat_format.prompt_budget), from a whole character (chat_format.last_whole_characters)."""
    s = s or Sampling()
    s = replace(s, max_new_tokens=min(s.max_new_tokens, max_new_tokens))
    budget = prompt_budget(model.cfg.max_seq_len, s.max_new_tokens)
    out = []
    for i, prompt in enumerate(progress(prompts, desc="continuations", unit=" prompt")):
        ids = model.generate(last_whole_characters(tokenizer, text_prompt(tokenizer, prompt), budget),
                             **s.generate_kwargs(), generator=seeded(model, s, item_seed("continuation", i)),
                             **tokenizer.generation_kwargs(model.cfg.vocab_size))
        out.append({"prompt": prompt, "continuation": tokenizer.decode_complete(ids)})
    return out


# --- QA ---

def record_files(paths: Sequence[str | Path], flag: str | None = None) -> list[Path]:
    """The files of --qa or --mc: files_of_records' with their held-out splits (what is scored), less the text files
    below a folder, which hold no records; flag: the option, named in a note on those skipped (None: no note)."""
    files, texts = files_of_records(list(paths), held_out=True)
    if texts and flag:
        print(f"note: {flag} reads records from {', '.join(RECORD_SUFFIXES)} files; {first_few(texts, 3)} "
              f"{agree(len(texts), 'is', 'are')} skipped.")
    return files


class RecordItems:
    """The items of record files (--qa's or --mc's), read from the files again at each pass over them, one at a time,
    instead of held: 200k QA items held took 1.1 GB. item(file, record, why) makes a record's item (why: the reader's
    reason when record is None), None for a record without a reference, which is counted (no_reference), or raises
    ValueError saying why a record is bad ("file:line: why" in bad). The first pass, here, counts them; limit (0: all)
    keeps the first limit items. A pass reads the files as they are then: change them while eval runs, and the items
    asked may not be those counted. unread(record): the fields of a record that its shape leaves out, counted on the
    first pass in left_out, a LeftOut per file. group(item): a name of its group (a multiple-choice item's subject);
    not_reached lists, in order, the groups none of whose items the limit keeps."""

    def __init__(self, files: list[Path], item: Callable[[Path, dict | None, str], dict | None], limit: int = 0,
                 unread: Callable[[dict], list[str]] | None = None, group: Callable[[dict], str] | None = None):
        self.files, self.item = files, item
        self.no_reference, self.bad, n = 0, [], 0
        self.left_out: dict[Path, LeftOut] = {}
        groups: dict[str, bool] = {}  # each group, in order, and whether the limit keeps an item of it
        for file, where, record, it in self.read(quiet=False):
            if isinstance(it, ValueError):
                self.bad.append(f"{where}: {it}")
                continue
            if it is None:
                self.no_reference += 1
            else:
                if group:
                    groups[group(it)] = groups.get(group(it), False) or not limit or n < limit
                n += 1
            if unread and record is not None:
                self.left_out.setdefault(file, LeftOut()).note(unread(record), where)
        self.length = min(n, limit or n)
        self.reached = [g for g, kept in groups.items() if kept]
        self.not_reached = [g for g, kept in groups.items() if not kept]

    def read(self, quiet: bool = True) -> Iterator[tuple[Path, str, dict | None, dict | ValueError | None]]:
        """(file, file:line, the record, and its item, None or the ValueError that says why it is bad) of every record,
        in order; quiet: without the reader's warnings (a file not UTF-8, one cut short), which the first pass said."""
        for file in self.files:
            records = iter_records(file)
            for where, record, why in (unwarned(records) if quiet else records):
                try:
                    yield file, where, record, self.item(file, record, why)
                except ValueError as e:
                    yield file, where, record, e

    def __iter__(self) -> Iterator[dict]:
        return islice((it for *_, it in self.read() if isinstance(it, dict)), self.length)

    def __len__(self) -> int:
        return self.length


def unwarned(records: Iterator) -> Iterator:
    """records, read with the warnings of the readers' logger (data/sources.py) off, and on between records."""
    readers = logging.getLogger(iter_records.__module__)
    while True:
        readers.disabled = True
        try:
            record = next(records, None)
        finally:
            readers.disabled = False
        if record is None:
            return
        yield record


def read_qa(path: str | Path, limit: int = 0) -> tuple[RecordItems, int, list[str]]:
    """{question, reference, task} (and system, history where given: qa_item) from records with a question field
    and a reference field, the first limit of them (0: all), read at each pass (RecordItems); the number of records
    skipped because their reference is missing or blank (nothing to score against: BELLE's eval set has such items);
    and "file:line: why" of each record skipped as bad (not a JSON object, no question, a field of the wrong type,
    bytes that are not text). Raises UserError when path holds no record (it is empty, or blank lines) or no record has
    a reference."""
    items = RecordItems(record_files([path], "--qa"), lambda file, record, why: qa_item(record, why), limit,
                        unread=lambda r: unread_fields(r, qa_fields(r), QA_FIELDS))
    for file, left_out in items.left_out.items():
        if left_out.counts:
            print(f"note: {file}: records with the fields of more than one shape are read in the first of {QA_ORDER}, "
                  f"leaving out {left_out.words()}")
    if not items and not items.no_reference and not items.bad:
        raise UserError(f"{path} is empty: it holds no QA records; pass a file of them ({QA_ORDER}).")
    if not items:
        raise UserError(f"{path} holds no QA records with a reference ({', '.join(REFERENCE_KEYS)}, or a "
                        "conversation's last answer); "
                        f"{items.no_reference} had none or an empty one{bad_detail(items.bad)}.")
    return items, items.no_reference, items.bad


def qa_item(record: dict | None, why: str) -> dict | None:
    """The {question, reference, task} of a record (None: the reader's bad record, saying why), or None
    when its reference is missing or blank; ValueError, saying why, for a bad record. The question and reference are
    those of qa_fields (a record that SFT reads, such as {prompt, completion, output}, as SFT reads it: its reference
    is the answer SFT trains on), each read by field_text: the question as SFT reads it, a string; the reference and
    task also numbers, as their text, and the reference a list of strings, joined with 、. A record's `system`
    text and `history` ([[question, answer], ...]), read as SFT reads them (chat_format.context_messages), are the
    item's "system" and "history" when given, so that eval asks the question after them as SFT trained
    (qa_conversation); an item without them has no such keys. A conversation (`conversations`, `messages`, or TRL's
    `prompt` and `completion` lists) is read as SFT reads it (chat_format.conversation_from_record): its last answer
    that carries loss (as SFT trains on it; not one of "weight": 0) is the reference, its question the question, and
    what comes before them its system text and history."""
    if record is None:
        raise ValueError(why)
    not_a_pair(record)  # whatever its prompt's shape, as SFT refuses it
    if messages_key(record):  # raises for a blank question
        conv = conversation_from_record(record)
        (question, reference), system, history = conv.turns[-1], conv.system, [list(t) for t in conv.turns[:-1]]
    else:
        fields = qa_fields(record)
        question = qa_question(record, fields[0])
        if question is None or not question.strip():
            raise ValueError(f"a QA record needs a question ({', '.join(QUESTION_KEYS)} or instruction+input)")
        reference = field_text(record, fields[-1], numbers=True, lists=True) if fields[-1] in REFERENCE_KEYS else ""
        question, reference = line_ends(question), line_ends(reference)  # as a conversation's are (chat_format)
        context_messages(record)  # raises for a system or history of another type
        system, history = record.get("system") or "", record.get("history") or []
    task = field_text(record, "task", numbers=True)
    if why := not_unicode("".join([question, reference, task or "", system, *(t for turn in history for t in turn)])):
        raise ValueError(f"the record holds {why}")
    if not reference.strip():
        return None
    return {"question": question, "reference": reference, "task": "qa" if task is None else task,
            **({"system": system} if system else {}), **({"history": history} if history else {})}


def qa_fields(record: dict) -> tuple[str, ...]:
    """The fields of QA_FIELDS that qa_item reads of a good record, in QA_ORDER: those SFT reads of it
    (chat_format.read_fields: a conversation's, ("prompt", "completion"), ("instruction", "input", "output")), else its
    question's (the first of QUESTION_KEYS it has, else instruction and input) and its reference's (the first of
    REFERENCE_KEYS it has): the question's field (or instruction) first, the reference's last."""
    if fields := read_fields(record):
        return fields
    question = next((k for k in QUESTION_KEYS if record.get(k) is not None), None)
    reference = next((k for k in REFERENCE_KEYS if record.get(k) is not None), None)
    return ((question,) if question else ("instruction", "input")) + ((reference,) if reference else ())


def qa_conversation(item: dict) -> Conversation:
    """The conversation a QA item asks, built as SFT builds a record's (chat_format): its system text and history's
    turns (context_messages), then its question."""
    return conversation_from_messages([*context_messages(item), ("user", item["question"])], add_generation_prompt=True)


def qa_question(record: dict, key: str) -> str | None:
    """The question of record in its field key (qa_fields'), checked by field_text: instruction and input as the chat
    format joins them (chat_format.instruction_prompt) where key is "instruction"; None when it is not there. Raises
    ValueError for a field that is not a string."""
    if key != "instruction":
        return field_text(record, key)
    if field_text(record, "instruction") is None:
        return None
    field_text(record, "input")
    return instruction_prompt(record)


def question_of(record: dict) -> str | None:
    """The question eval asks of a record: its question or prompt, else its instruction + input as the chat
    format renders them (chat_format.instruction_prompt); None when it has neither."""
    question = next((record[k] for k in QUESTION_KEYS if isinstance(record.get(k), str)), None)
    return question if question is not None else instruction_prompt(record)


def bad_detail(bad: list[str]) -> str:
    """", N were bad (the first: file:line: why)" for an error message ("1 was bad"); "" when none were."""
    return f", {len(bad)} {agree(len(bad), 'was', 'were')} bad (the first: {bad[0]})" if bad else ""


def answer(model, tokenizer: Tokenizer, question: str | Conversation, s: Sampling | None = None,
           generator: torch.Generator | None = None) -> str:
    """The answer to question (or to a conversation's last turn) in the chat format (the same ids SFT trained on,
    up to the answer), sampled as s says (default: sampling.Sampling, greedy) with generator's draws; it ends at
    <eos>, max_new_tokens or the end of the context, less a character that the end cut (Tokenizer.decode_complete).
    A prompt that leaves no room for max_new_tokens (at most half the context: chat_format.prompt_budget) is cut as
    SFT cuts one: its oldest turns go first, then the beginning of what is left."""
    s = s or Sampling()
    prompt = qa_prompt(tokenizer, question, prompt_budget(model.cfg.max_seq_len, s.max_new_tokens))
    ids = model.generate(prompt, **s.generate_kwargs(), generator=generator,
                         **tokenizer.generation_kwargs(model.cfg.vocab_size))
    return tokenizer.decode_complete(ids).strip()


def qa_prompt(tokenizer: Tokenizer, question: str | Conversation, max_len: int | None = None) -> list[int]:
    """The ids that ask question (or a conversation's last turn) in the chat format, ending with <bos>: SFT's
    ids up to the answer, cut to at most max_len as SFT cuts (chat_format.truncate_conversation)."""
    conv = question if isinstance(question, Conversation) else Conversation([(question, "")])
    return render_prompt(tokenizer, conv, max_len)


def seeded(model, s: Sampling, seed: int) -> torch.Generator | None:
    """The draws of the item whose item_seed is seed when s samples (temperature > 0): a generator seeded with it, so
    that an item gets the same answer whether or not the run stopped and resumed before it; None for greedy."""
    return torch.Generator(model.rope_cos.device).manual_seed(seed) if s.temperature > 0 else None


def item_seed(kind: str, number: int, task: str = "") -> int:
    """The seed, in [0, 2**63), of an item's draws: the first 8 bytes of the SHA-256 of its kind ("qa",
    "continuation"), task and number within its task, stable across runs and Python processes (hash() is not). The
    number i of every task and the i-th continuation were all seeded with i, so sampled answers agreed by index."""
    key = json.dumps([kind, task, number], ensure_ascii=False).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1


def numbered_in_task(items: Iterable[dict]) -> Iterator[tuple[int, dict]]:
    """(its number among its task's items, from 0, item) of each item in turn."""
    seen: Counter = Counter()
    for it in items:
        yield seen[it["task"]], it
        seen[it["task"]] += 1


def lcs_length(a: str, b: str) -> int:
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0]
        for j, cb in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if ca == cb else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over characters."""
    lcs = lcs_length(prediction, reference)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(prediction), lcs / len(reference)
    return 2 * p * r / (p + r)


def char_f1(prediction: str, reference: str) -> float:
    """F1 of the characters in common (as bags), the usual QA score for Chinese."""
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return float(prediction == reference)
    p, r = same / len(prediction), same / len(reference)
    return 2 * p * r / (p + r)


BLEU_CHUNK = 1000  # (prediction, reference) pairs whose BLEU statistics are counted at once (CorpusBleu)


class CorpusBleu:
    """Corpus BLEU-4 by sacrebleu (its corpus_bleu, tokenize as given) of pairs added one at a time, not held: its
    statistics, the hypothesis and reference lengths and the n-gram matches and totals, are sums over the pairs,
    counted BLEU_CHUNK pairs at a time, so the score is corpus_bleu's of all the pairs at once, to the last bit
    (sacrebleu's n-gram counts of 200k pairs at once took ~3 KB a pair)."""

    def __init__(self, tokenize: str):
        self.metric = require("sacrebleu", "eval").BLEU(tokenize=tokenize)
        self.sums = [0] * (2 + 2 * self.metric.max_ngram_order)  # lengths, then matches and totals by order
        self.pairs: tuple[list[str], list[str]] = ([], [])

    def add(self, prediction: str, reference: str) -> None:
        self.pairs[0].append(prediction)
        self.pairs[1].append(reference)
        if len(self.pairs[0]) >= BLEU_CHUNK:
            self.count()

    def count(self) -> None:
        """Add the statistics of the pairs held to the sums, and let them go."""
        if self.pairs[0]:
            s = self.metric.corpus_score(self.pairs[0], [self.pairs[1]])
            self.sums = [a + b for a, b in zip(self.sums, [s.sys_len, s.ref_len, *s.counts, *s.totals], strict=True)]
            self.pairs = ([], [])

    def score(self) -> float:
        """BLEU of all the pairs added, 0-100."""
        self.count()
        m, n = self.metric, self.metric.max_ngram_order
        return m.compute_bleu(self.sums[2 : 2 + n], self.sums[2 + n :], self.sums[0], self.sums[1],
                              smooth_method=m.smooth_method, smooth_value=m.smooth_value,
                              effective_order=m.effective_order, max_ngram_order=n).score


class TaskScores:
    """The running sums of one QA task's scores (score_qa): sacrebleu's BLEU-4 (tokenize zh) and the recipe's BLEU
    over jieba words (CorpusBleu each), ROUGE-L and F1 over characters and exact matches summed, and each
    reference's count (the majority baseline, and the labels of a task of few), not the items. Every score compares
    prediction and reference with the whitespace around each stripped (as SQuAD's normalization does; the whitespace
    inside is kept): a reference "  JJJJ\\n" is matched exactly by "JJJJ", and the answers are stripped already."""

    def __init__(self):
        jieba = require("jieba", "eval")
        jieba.setLogLevel(60)
        self.words = lambda text: " ".join(jieba.cut(text))
        self.bleu, self.word_bleu = CorpusBleu("zh"), CorpusBleu("none")
        self.rouge_l, self.char_f1, self.exact = 0.0, 0.0, 0
        self.labels: Counter = Counter()

    def add(self, prediction: str, reference: str) -> None:
        prediction, reference = prediction.strip(), reference.strip()
        self.bleu.add(prediction, reference)
        self.word_bleu.add(self.words(prediction), self.words(reference))
        self.rouge_l += rouge_l(prediction, reference)
        self.char_f1 += char_f1(prediction, reference)
        self.exact += prediction == reference
        self.labels[reference] += 1

    def scores(self) -> dict:
        n = sum(self.labels.values())
        scores = {"items": n, "bleu": self.bleu.score(), "word_bleu": self.word_bleu.score(),
                  "rouge_l": self.rouge_l / n, "char_f1": self.char_f1 / n, "exact_match": self.exact / n}
        scores["majority_baseline"] = self.labels.most_common(1)[0][1] / n  # always answering the commonest
        if len(self.labels) <= MAX_LABELS and n >= ITEMS_PER_LABEL * len(self.labels):  # a classification task
            scores["accuracy"] = scores["exact_match"]
            scores["labels"] = dict(self.labels)
        return scores


def score_qa(items: Iterable[dict]) -> dict:
    """Scores per task of items that carry task, prediction and reference, read once (items.jsonl's lines, one
    at a time): only each task's running sums are held (TaskScores)."""
    by_task: dict[str, TaskScores] = defaultdict(TaskScores)
    for it in items:
        by_task[it["task"]].add(it["prediction"], it["reference"])
    return {task: scores.scores() for task, scores in by_task.items()}


# --- multiple choice ---


def read_mc(paths: Sequence[str | Path], limit: int = 0) -> tuple[RecordItems, list[str]]:
    """C-Eval / CMMLU items: question, A-D, answer, subject from the file name (column names and answer
    letters in any case, with spaces around), the first limit of them (0: all), read at each pass (RecordItems). Also
    "file:line: why" of each row skipped as bad (not a record, a field missing, an answer that is not one of A-D or
    whose option is empty, bytes that are not text): every row is one or the other. Raises UserError when no item
    remains. Its not_reached: the subjects (in file order) none of whose items --limit keeps."""
    subject = lambda file: re.sub(r"_(val|dev|test)$", "", file.name.split(".")[0])
    items = RecordItems(record_files(paths, "--mc"), lambda file, row, why: mc_item(row, why, subject(file)), limit,
                        group=lambda it: it["subject"])
    if not items:
        raise UserError(f"no multiple-choice items with an answer in {', '.join(map(str, paths))}"
                        f"{bad_detail(items.bad)}.")
    return items, items.bad


def mc_limit_note(limit: int, items: RecordItems) -> str:
    """What --limit leaves out of multiple-choice items (read_mc's): "--limit 3 scored multiple-choice items of
    accountant only; agronomy was not reached." (three names at most of each, then how many more)."""
    more = len(items.not_reached)
    return (f"--limit {limit} scored multiple-choice items of {first_few(items.reached, 3)} only; "
            f"{first_few(items.not_reached, 3)} {agree(more, 'was', 'were')} not reached.")


def mc_item(row: dict | None, why: str, subject: str) -> dict:
    """A multiple-choice item of a row (None: the reader's bad record, saying why), its answer an upper-case
    letter of A-D; ValueError, saying why, for a bad row."""
    if row is None:
        raise ValueError(why)
    names = {str(k).strip(): k for k in row if k is not None}  # A-D upper-case, the other columns lower-case
    r = {(n.upper() if n.upper() in set(LETTERS) else n.lower()): row[k] for n, k in names.items()}
    missing = [k for k in ("question", *LETTERS, "answer") if k not in r]
    if missing:
        raise ValueError(f"a multiple-choice row needs question, A-D, answer; missing {', '.join(missing)}")
    text = lambda key: field_text(r, key, numbers=True) or ""  # a JSON null is no text; a list or object is bad
    item = {"subject": field_text(r, "subject") or subject, "question": text("question"),
            "options": {c: text(c) for c in LETTERS}, "answer": text("answer").strip().upper()}
    if not item["question"].strip():
        raise ValueError("a multiple-choice row needs a question; it is empty")
    if item["answer"] not in set(LETTERS):  # not `in LETTERS`: "" and "AB" are substrings
        raise ValueError(f"the answer {text('answer').strip()!r} is not one of {', '.join(LETTERS)}")
    if not any(o.strip() for o in item["options"].values()):  # letters alone would be scored
        raise ValueError("a multiple-choice row needs options; A-D are all empty")
    if not item["options"][item["answer"]].strip():  # an empty option is no choice (mc_choices): none is right
        raise ValueError(f"the answer {item['answer']} is an empty option")
    if why := not_unicode(item["question"] + "".join(item["options"].values())):
        raise ValueError(f"the row holds {why}")
    return item


class ModelScorer:
    """Sum of the model's log-probabilities of continuation ids after context ids (of tokenizer's)."""

    def __init__(self, model, tokenizer: Tokenizer):
        self.model, self.tokenizer = model, tokenizer

    @torch.no_grad()
    def logprob(self, context: list[int], continuation: list[int]) -> float:
        """Of the ids that fit the context window (max_seq_len + 1, cut from the left, as lm-evaluation-harness
        cuts, from a whole character: chat_format.last_whole_characters): a continuation longer than the window has
        its last max_seq_len ids scored (fewer where the cut splits a character), each after the ids before it in
        the text."""
        ids = last_whole_characters(self.tokenizer, context + continuation, self.model.cfg.max_seq_len + 1)
        continuation = continuation[len(continuation) - min(len(continuation), len(ids) - 1) :]  # what it predicts
        x = torch.tensor([ids[:-1]], device=self.model.rope_cos.device)
        logits, _ = self.model(x)
        logp = torch.log_softmax(logits[0, -len(continuation) :].float(), dim=-1)
        return float(logp.gather(1, torch.tensor(continuation, device=logp.device)[:, None]).sum())


def split_continuation(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Ids of the context, and of the continuation as it is tokenized after the context in the full text
    (lm-evaluation-harness's `_encode_pair`, whose context's trailing spaces move to the continuation):
    the full text's ids split where they stop agreeing with the context's own. Encoding the continuation
    alone would give SentencePiece's word-initial piece (`▁A`) where the full text has `A`; and where
    the first piece of the continuation merges with the context's end (`：“`), that piece is scored."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, alone = tokenizer.encode(context + continuation), tokenizer.encode(context)
    if not continuation or len(whole) <= 1:
        return alone, [tokenizer.eos_id]  # no text of its own: the end of text
    same = (i for i, (a, b) in enumerate(zip(whole, alone, strict=False)) if a != b)
    k = min(next(same, len(alone)), len(whole) - 1)  # where they part; at least one id to score
    return whole[:k], whole[k:]


def mc_texts(it: dict) -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]]]:
    """The (context, continuation) texts that mc_choices scores, per letter of A-D: the letter after the listed
    options, and the option's text after the question alone."""
    options = "".join(f"\n{c}. {it['options'][c]}" for c in LETTERS)
    return ({c: (f"{it['question']}{options}\n答案：", c) for c in LETTERS},
            {c: (f"{it['question']}\n答案：", it["options"][c]) for c in LETTERS})


def mc_choices(it: dict, scorer, tokenizer: Tokenizer) -> dict:
    """The item with the option that the log-likelihood of its letter picks (letter_choice) and the one that
    the log-likelihood per token of its text picks (text_choice). An empty option (blank: an empty CSV cell, a
    null) is no choice, by letter or by text, and is not scored: its text has no token to average over (the
    <eos> scored in its place won each item of a tester's file), and a row with fewer options asks fewer choices."""
    letters, texts = mc_texts(it)
    choices = [c for c in LETTERS if it["options"][c].strip()]  # the answer's at least (mc_item)
    by_letter = {c: scorer.logprob(*split_continuation(tokenizer, *letters[c])) for c in choices}
    by_text = {}
    for c in choices:
        context, ids = split_continuation(tokenizer, *texts[c])
        by_text[c] = scorer.logprob(context, ids) / len(ids)
    return {**it, "letter_choice": max(by_letter, key=by_letter.get), "text_choice": max(by_text, key=by_text.get)}


def mc_summary(results: Iterable[dict]) -> dict:
    """Accuracy by letter and by option text, overall and per subject, of items scored by mc_choices, read once
    (items.jsonl's lines, one at a time): only the counts are held."""
    overall, subjects = Counter(), defaultdict(Counter)
    for r in results:
        for counts in (overall, subjects[r["subject"]]):
            counts.update(items=1, letter=r["letter_choice"] == r["answer"], text=r["text_choice"] == r["answer"])

    def accuracy(c: Counter) -> dict:
        return {"items": c["items"], "letter_accuracy": c["letter"] / c["items"],
                "text_accuracy": c["text"] / c["items"]}

    return {"overall": accuracy(overall), "subjects": {s: accuracy(subjects[s]) for s in sorted(subjects)}}


# --- leakage ---


def leakage(questions: Iterable[str], train_paths: Sequence[str | Path], min_chars: int = 8,
            eval_files: Sequence[str | Path] = ()) -> dict:
    """Eval questions (of at least min_chars characters) that occur verbatim in the training files; the shorter ones,
    which a corpus holds by chance, are not checked, and counted (too_short).

    Questions and training text are compared with their line ends made "\n" (chat_format.line_ends), as the model
    is given both. Every training file is searched as training reads it (expand_inputs: a folder's held-out splits are
    not), each record with all its text (record_text: instructions with their input and output, every
    turn of a conversation, a preference pair's prompt and both answers, pretraining text) and the question
    eval would ask of it (question_of: an instruction joined to its input, as the chat format joins them),
    the eval files too when they are among them. leaked_in_eval_files counts the questions found only in those eval
    files; searched_documents the training records with text (0: the check checked nothing). Raises
    UserError when a training path names no data files.
    """
    from babyllama.data.clean import SubstringIndex

    questions = set(map(line_ends, questions))  # the texts as the chat format gives them to the model
    checked = {q for q in questions if len(q) >= min_chars}
    index = SubstringIndex(checked, min_chars)
    evals = {Path(f).resolve() for f in eval_files}
    found: set[str] = set()
    in_eval: set[str] = set()
    documents = 0
    records = ((f, r) for f in expand_inputs(list(train_paths)) for _, r, _ in iter_records(f) if r is not None)
    for file, record in progress(records, desc="leakage check", unit=" records"):
        if text := "\n".join(filter(None, (question_of(record) if isinstance(record, dict) else None,
                                            record_text(record)))):
            documents += 1
            (in_eval if file.resolve() in evals else found).update(index.matches(line_ends(text)))
    return {"checked": len(checked), "too_short": len(questions) - len(checked), "min_chars": min_chars,
            "leaked": len(found | in_eval), "leaked_in_eval_files": len(in_eval - found),
            "searched_documents": documents, "examples": sorted(found | in_eval)[:10]}


def record_text(value) -> str:
    """Every string of a record, in lists and objects at any depth, one a line, whatever its shape."""
    if isinstance(value, str):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return "\n".join(t for t in map(record_text, items) if t)


def eval_files_in(train_data: Sequence[str | Path], *eval_data: Sequence[str]) -> list[Path]:
    """The eval files (of eval_data) that are also among the files of train_data as training reads them,
    with a note naming each."""
    evals = {f.resolve() for paths in eval_data for f in record_files(paths)}
    both = [f for f in expand_inputs(list(train_data)) if f.resolve() in evals]
    for f in both:
        print(f"note: {f} is in --train_data, so its own questions count as leaked; if the model did not train "
              "on it, pass the training files alone as --train_data.")
    return both


# --- resuming ---

PARTIAL = "items.jsonl.partial"  # in OUT while eval runs: a settings line, then items.jsonl's lines so far
FLUSH_EVERY = 32  # items a write: a kill -9 loses fewer answers than this (Ctrl-C, SIGTERM and a crash lose none)


def run_settings(checkpoint: str | Path, model, sampling: Sampling, qa_items: Iterable[dict], mc_items: Iterable[dict]
                 ) -> dict:
    """What the answers in items.jsonl.partial depend on, its first line: the SHA-256 of the checkpoint's weights,
    the device type, the sampling settings (and, sampled, how the draws are seeded: SEEDS), and the SHA-256 of the
    QA and multiple-choice items asked (as read, after --limit). A rerun goes on with the answers only when all of
    these are the same."""
    from babyllama.checkpoint import weights_sha256

    def digest(items: Iterable[dict]) -> str:
        h = hashlib.sha256()
        for it in items:  # one at a time: no copy of them all
            h.update(json.dumps(it, ensure_ascii=False).encode() + b"\n")
        return h.hexdigest()

    return {"kind": "settings", "weights_sha256": weights_sha256(checkpoint), "device": model.rope_cos.device.type,
            "sampling": asdict(sampling), "qa_items": digest(qa_items), "mc_items": digest(mc_items)} | (
        {"seeds": SEEDS} if sampling.temperature > 0 else {})


SEEDS = "item_seed"  # how sampled answers are seeded: answers sampled with seeds by index alone are not gone on from


def answered(path: Path, settings: dict, qa_items: RecordItems | list, mc_items: RecordItems | list) -> int:
    """How many items path (items.jsonl.partial) holds answered under settings, in order: qa_items, then mc_items.
    The file is cut after the last line that answers the next item (is_answer): a line cut by a kill -9, or one
    damaged, moved or repeated by hand (a note says which), is dropped with what follows it; a file written under
    other settings, or none, is started anew with the settings line, and 0 returned (a note says why)."""
    done, end, before = 0, 0, None
    total = len(qa_items) + len(mc_items)
    items = chain((("qa", it) for it in qa_items), (("mc", it) for it in mc_items))  # read one at a time
    if path.is_file():
        with path.open("rb") as f:
            before = _json_line(f.readline())
            if before == settings:
                end = f.tell()
                for line in f:
                    item = next(items, None)
                    if item is None or not is_answer(_json_line(line), *item):
                        if line.endswith(b"\n"):  # not a line cut by a kill
                            print(f"note: line {done + 2} of {path} is not the answer to item {done + 1} of "
                                  f"{total}, so eval drops it and what follows it.")
                        break
                    done, end = done + 1, end + len(line)
    if end:
        os.truncate(path, end)
        return done
    if path.is_file():
        differ = [k for k in settings if before.get(k) != settings[k]] if before else ["its first line is cut"]
        print(f"note: {path} holds the answers of another checkpoint or other settings ({', '.join(differ)}), "
              "so eval starts over.")
    with writing(path, path):  # a settings line cut by a full disk is removed
        path.write_text(json.dumps(settings, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


def is_answer(line: dict | None, kind: str, item: dict) -> bool:
    """Whether line (of items.jsonl.partial) is item's answer as evaluate appends it: kind, the item's own fields
    and no others, and a prediction that is text ("qa") or a letter_choice and a text_choice of A-D ("mc")."""
    answers = ("prediction",) if kind == "qa" else ("letter_choice", "text_choice")
    if line is None or {k: v for k, v in line.items() if k not in answers} != {"kind": kind, **item}:
        return False
    if kind == "qa":
        return isinstance(line.get("prediction"), str)
    return all(line.get(k) in tuple(LETTERS) for k in answers)  # a tuple: a list or a dict in it is no error


def _json_line(line: bytes) -> dict | None:
    """The JSON object of a whole line (ending in a newline), else None."""
    try:
        value = json.loads(line) if line.endswith(b"\n") else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class Appender:
    """items.jsonl.partial open for appending: items are written FLUSH_EVERY at a time, as whole lines, and are
    on the disk (fsync) before the next ones are generated."""

    def __init__(self, file: IO[str]):
        self.file, self.lines = file, []

    def append(self, item: dict) -> None:
        self.lines.append(json.dumps(item, ensure_ascii=False) + "\n")
        if len(self.lines) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        text = "".join(self.lines)
        self.lines.clear()  # first: lines that a Ctrl-C stopped half written are not written again after them
        self.file.write(text)
        self.file.flush()
        os.fsync(self.file.fileno())


@contextmanager
def appending(path: Path) -> Iterator[Appender]:
    """An Appender to path, whose items are written when the body ends however it ends: Ctrl-C, SIGTERM or an
    error keep the answers so far (a kill -9 loses those not yet flushed). CannotWrite where the disk refuses
    them (errors.cannot_write), the file as it was (a line that a full disk cut is dropped by the next run)."""
    file = path.open("a", encoding="utf-8")
    log = Appender(file)
    try:
        yield log
        log.flush()
    except BaseException as e:
        if not isinstance(e, OSError):  # an OSError is the write's own: what it cut is not written again after it
            with suppress(OSError):
                log.flush()
        cannot_write(e, path, None, file)
    file.close()


def logged(path: Path, kind: str) -> Iterator[dict]:
    """The items of kind ("qa" or "mc") in path (items.jsonl.partial), one at a time."""
    with path.open(encoding="utf-8") as f:
        next(f)  # the settings
        yield from (item for item in map(json.loads, f) if item["kind"] == kind)


def write_items(partial: Path, path: Path) -> None:
    """items.jsonl at path: the items of partial (items.jsonl.partial) without its settings line, copied a block
    at a time, whole or not at all (a temporary renamed over it, as errors.write_whole)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path, tmp):
        with partial.open(encoding="utf-8") as src, tmp.open("w", encoding="utf-8") as f:
            next(src)
            shutil.copyfileobj(src, f)
        tmp.replace(path)


# --- everything ---


def checkpoint_record(checkpoint: str | Path, out: Path) -> dict:
    """eval.json's record of the checkpoint it scored: as written, its real path, and its path relative
    to out (so that a run folder moved with its eval still matches)."""
    real = Path(checkpoint).resolve()
    return {"checkpoint": str(checkpoint), "checkpoint_path": str(real),
            "checkpoint_relative": os.path.relpath(real, out.resolve())}


def _our_result(path: Path) -> dict | None:
    """The eval.json at path if evaluate wrote it (an object with a checkpoint string and a list of continuations,
    which every eval has), else None."""
    try:
        r = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ours = isinstance(r, dict) and isinstance(r.get("checkpoint"), str) and isinstance(r.get("continuations"), list)
    return r if ours else None


def _are_our_items(path: Path) -> bool:
    """Whether path is an items.jsonl that evaluate wrote: empty, or its first line an object with a kind."""
    try:
        with path.open(encoding="utf-8") as f:
            line = f.readline(MAX_RECORD_CHARS)
        return not line or isinstance(item := json.loads(line), dict) and "kind" in item
    except (OSError, ValueError):
        return False


def refuse_to_overwrite(out: Path, checkpoint: str | Path) -> None:
    """Raise UserError when this eval would overwrite, in out, an eval.json or items.jsonl that babyllama
    eval did not write (_our_result, _are_our_items) or the eval of another checkpoint (by real path or
    by path relative to out; an eval.json without checkpoint_path: its checkpoint as written)."""
    result, items = out / "eval.json", out / "items.jsonl"
    before = _our_result(result) if result.exists() else None  # read once: what is checked is what is compared
    theirs = [f for f, ours in ((result, before is not None), (items, _are_our_items(items)))
              if f.exists() and not ours]
    if theirs:
        raise UserError(f"{theirs[0]} was not written by babyllama eval, which would overwrite it; pass another "
                        "--out_dir (or move that file away).")
    if before is None:
        return
    scored, relative = Path(before.get("checkpoint_path") or before["checkpoint"]), before.get("checkpoint_relative")
    now = checkpoint_record(checkpoint, out)
    if str(scored.resolve()) != now["checkpoint_path"] and relative != now["checkpoint_relative"]:
        raise UserError(f"{out} holds the eval of another checkpoint ({scored}); pass another --out_dir "
                        f"(or delete {out / 'eval.json'}) to keep both results.")


def check_out_dir_of_eval(out: Path, checkpoint: str | Path) -> None:
    """Raise UserError for an eval --out_dir that is a file (or below one), a babyllama output folder
    that eval.json and items.jsonl must not join (a checkpoint, a tokenizer, token shards: output_kind), one
    whose results eval would overwrite (refuse_to_overwrite), or one whose items.jsonl.partial is not a file."""
    check_output_folder(out, "eval.json and items.jsonl", example=out.parent / "eval", beside_data=True)  # not
    # inside a checkpoint: one saved again replaces its whole folder; beside a run's config.json is harmless
    refuse_to_overwrite(out, checkpoint)
    if (out / PARTIAL).exists() and not (out / PARTIAL).is_file():
        raise UserError(f"{out / PARTIAL}, where eval keeps its answers so far, is not a file; move it away or "
                        "pass another --out_dir.")


def check_lm_data(data: str | Path, seq_len: int) -> dict:
    """data's manifest (read_manifest), for lm_metrics. Raise UserError unless data is a folder of pretokenize's token
    shards, its val split's files whole (check_shard_files), with a window of seq_len + 1 tokens in a val shard at
    least (TokenWindows' windows, with the model's max_seq_len): else the remedy is pretokenize's --val_fraction, which
    eval does not have, or more data where the val split holds every document already (larger_val_fraction)."""
    manifest = read_manifest(data)
    val = split_shards(manifest, "val")
    if not val:
        missed = val_missed(manifest)
        raise UserError(f"--data {data} has no val split to measure the loss on: {missed}." if missed else
                        f"--data {data} has no val split to measure the loss on; pretokenize with a --val_fraction "
                        "above 0.")
    check_shard_files(Path(data), manifest, val)
    if not any(shard_windows(val, seq_len)):
        tokens, shards = sum(s["tokens"] for s in val), f" in {len(val)} shards" if len(val) > 1 else ""
        larger = larger_val_fraction(manifest)
        raise UserError(f"the val split of --data {data} has {tokens} {agree(tokens, 'token', 'tokens')}{shards}, "
                        f"fewer than one window of {seq_len + 1} (the model's max_seq_len + 1) to measure the loss on; "
                        + (f"run babyllama pretokenize again with {larger}." if larger else
                           "it holds every document (the train split is empty): the data is smaller than one window; "
                           "pretokenize more text."))
    return manifest


def read_prompts(path: str | Path) -> tuple[list[str], list[str]]:
    """The continuation prompts of a text file, one a line in any encoding, less blank lines; and "file:line: why"
    of each line skipped as bad (bytes that are not text, a line over MAX_RECORD_CHARS), as read_qa's bad records.
    Raises UserError when the file is not there, is not a regular file, or holds no prompt."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file {path} {not_a_file(path)}; pass a text file, one prompt a line.")
    prompts, bad = [], []
    with open_text(path, file_encoding(path)) as f:
        for where, record, why in to_the_end(path, records_text(path, f)):
            why = why or (f"the line holds {text}" if (text := not_unicode(record["text"])) else "")
            if why:
                bad.append(f"{where}: {why}")
            elif record["text"].strip():
                prompts.append(record["text"])
    if not prompts:
        raise UserError(f"prompts file {path} has no prompts (a line of text each){bad_detail(bad)}; pass a file "
                        "that has some.")
    return prompts, bad


def cut_to_context(tokenizer: Tokenizer, max_seq_len: int, max_new_tokens: int, prompts: Sequence[str],
                   qa_items: Iterable[dict], mc_items: Iterable[dict]) -> dict[str, int]:
    """How many continuation prompts ("prompts"), QA questions ("qa") and multiple-choice items ("mc") are cut to
    fit the context of max_seq_len: a prompt (text_prompt, qa_prompt) of more ids than prompt_budget leaves for
    max_new_tokens (at most CONTINUATION_TOKENS for a continuation), an item with a scored text (mc_texts) of
    more than max_seq_len + 1 ids, which ModelScorer cuts from the left to at most that many (max_seq_len inputs),
    from a whole character (chat_format.last_whole_characters: fewer where the cut splits one)."""
    def mc_cut(it: dict) -> bool:
        letters, texts = mc_texts(it)
        return any(sum(map(len, split_continuation(tokenizer, *pair))) > max_seq_len + 1
                   for pair in (*letters.values(), *texts.values()))

    continued = prompt_budget(max_seq_len, min(max_new_tokens, CONTINUATION_TOKENS))
    asked = prompt_budget(max_seq_len, max_new_tokens)
    return {"prompts": sum(len(text_prompt(tokenizer, p)) > continued for p in prompts),
            "qa": sum(cut_conversation(tokenizer, qa_conversation(it), asked, add_generation_prompt=True)[2]
                      for it in qa_items),  # whether it is cut, not the ids of a huge question whole
            "mc": sum(map(mc_cut, mc_items))}


def say_cut(cut: dict[str, int], totals: dict[str, int], max_seq_len: int, max_new_tokens: int) -> None:
    """A warning for each kind of cut_to_context's counts that is not 0: how many of how many were cut, and how."""
    def room(n: int) -> str:
        left = max_seq_len - prompt_budget(max_seq_len, n)
        return f" with {left} {agree(left, 'token', 'tokens')} left"

    for kind, what, cutting in [
            ("prompts", "continuation prompts", room(min(max_new_tokens, CONTINUATION_TOKENS)) + " for the "
             "continuation, so the model reads only {its} end"),
            ("qa", "QA questions", room(max_new_tokens) + " for the answer (--max_new_tokens, at most half the "
             "context), so eval cuts {them} as SFT does: {its} oldest history turns first, then the beginning of the "
             "rest"),
            ("mc", "multiple-choice items", ", so the model reads only {its} end")]:
        n = cut[kind]
        if n:
            its, them = agree(n, "its", "their"), agree(n, "it", "them")
            print(f"WARNING: {n} of {totals[kind]} {what} {agree(n, 'does', 'do')} not fit the context of "
                  f"{max_seq_len} tokens{cutting.format(its=its, them=them)}; eval.json counts {them} "
                  f"({kind}_cut_to_context).")


@functools.cache
def say_device(device: str) -> None:
    """"eval: running on DEVICE" on stderr, once a process for each device: the demo evaluates two checkpoints
    (three with --dpo) in one process, and said it each time."""
    print(f"eval: running on {device}", file=sys.stderr, flush=True)


def evaluate(checkpoint: str | Path, out: str | Path, *, data: str | None = None, prompts: str | None = None,
             qa: str | None = None, mc: Sequence[str] | None = None, train_data: Sequence[str] | None = None,
             sampling: Sampling | None = None, limit: int = 0, device: str = DEVICE) -> dict:
    """Every evaluation asked for, written to OUT/eval.json and OUT/items.jsonl; returns eval.json's content.
    QA answers and multiple-choice picks go to OUT/items.jsonl.partial as they come, and a run with the same
    settings goes on after those it holds (answered); it is removed at the end.
    sampling: how QA answers and continuations are generated (default: sampling.Sampling). Every input and out
    are checked before the model loads, and out is made only then: UserError as check_out_dir_of_eval,
    check_lm_data, read_prompts, read_qa, read_mc and expand_inputs (of train_data) raise."""
    from babyllama.checkpoint import checked_tokenizer, load_model, pick_device

    if train_data and not (qa or mc):
        raise UserError("--train_data is for the leakage check of --qa or --mc questions; pass --qa or --mc too.")
    out = Path(out)
    check_out_dir_of_eval(out, checkpoint)
    tokenizer, cfg, config = checked_tokenizer(checkpoint)  # all but the weights, which load after the checks
    manifest = check_lm_data(data, cfg.max_seq_len) if data else None
    prompt_list, prompts_bad = read_prompts(prompts) if prompts else (DEFAULT_PROMPTS, [])
    qa_items, no_reference, qa_bad = read_qa(qa, limit) if qa else ([], 0, [])  # bad eval files fail before any
    mc_items, mc_bad = read_mc(mc, limit) if mc else ([], [])  # work; the items are read at each pass, not held
    train_files = expand_inputs(list(train_data)) if train_data else []
    for what, bad in (("prompt", prompts_bad), ("QA", qa_bad), ("multiple-choice", mc_bad)):
        if bad:
            print(f"note: {len(bad)} bad {what} {agree(len(bad), 'record is', 'records are')} skipped; the first: "
                  f"{bad[0]}")
    if mc and mc_items.not_reached:
        print(f"note: {mc_limit_note(limit, mc_items)}")
    sampling = sampling or Sampling()
    device = pick_device(device)
    say_device(str(device))  # after the checks, the checkpoint's too: an error is all it says
    model = load_model(checkpoint, device, cfg)
    cut = cut_to_context(tokenizer, model.cfg.max_seq_len, sampling.max_new_tokens, prompt_list, qa_items, mc_items)
    say_cut(cut, {"prompts": len(prompt_list), "qa": len(qa_items), "mc": len(mc_items)}, model.cfg.max_seq_len,
            sampling.max_new_tokens)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = checkpoint_record(checkpoint, out) | {"sampling": asdict(sampling), "limit": limit}
    partial = out / PARTIAL
    settings = run_settings(checkpoint, model, sampling, qa_items, mc_items) if qa_items or mc_items else {}
    done = answered(partial, {"kind": "settings", **settings}, qa_items, mc_items)  # nothing to answer: no hash
    qa_done, mc_done = min(done, len(qa_items)), max(done - len(qa_items), 0)
    if done:
        print(f"resuming: {qa_done} of {len(qa_items)} QA and {mc_done} of {len(mc_items)} multiple-choice items "
              f"are answered in {partial}.")
    if data:  # scored as trained: with the document mask of a doc_mask run (eval.json's lm.doc_mask says which)
        result["lm"] = lm_metrics(model, data, tokenizer, doc_mask=trained_doc_mask(config), manifest=manifest)
    result["continuations"] = continuations(model, tokenizer, prompt_list, sampling)
    result["prompts_cut_to_context"] = cut["prompts"]
    if prompts:
        result["prompts_bad_records"] = len(prompts_bad)
    if qa and no_reference:
        print(f"note: {no_reference} QA {agree(no_reference, 'item has', 'items have')} no reference (missing or "
              f"empty) and {agree(no_reference, 'is', 'are')} not scored.")
    with appending(partial) as log:
        for i, it in progress(islice(numbered_in_task(qa_items), qa_done, None), desc="QA", unit=" item",
                              total=len(qa_items), initial=qa_done, disable=not qa):
            log.append({"kind": "qa", **it,
                        "prediction": answer(model, tokenizer, qa_conversation(it), sampling,
                                             seeded(model, sampling, item_seed("qa", i, it["task"])))})
        for it in progress(islice(mc_items, mc_done, None), desc="multiple choice", unit=" item",
                           total=len(mc_items), initial=mc_done, disable=not mc):
            log.append({"kind": "mc", **mc_choices(it, ModelScorer(model, tokenizer), tokenizer)})
    if qa:
        result["qa"] = score_qa(logged(partial, "qa"))
        result["qa_scales"] = QA_SCALES
        result["qa_skipped_no_reference"] = no_reference
        result["qa_bad_records"] = len(qa_bad)
        result["qa_cut_to_context"] = cut["qa"]
    if mc:
        result["mc"] = mc_summary(logged(partial, "mc"))
        result["mc_bad_records"] = len(mc_bad)
        result["mc_cut_to_context"] = cut["mc"]
        result["mc_not_reached"] = mc_items.not_reached
    if train_data and (qa or mc):
        questions = (it["question"] for it in chain(qa_items, mc_items))
        result["leakage"] = leakage(questions, train_files,
                                    eval_files=eval_files_in(train_files, [qa] if qa else [], mc or []))
        if short := result["leakage"]["too_short"]:  # checked: 3 of 11 questions, the others were not, unsaid
            print(f"note: {short} eval {agree(short, 'question', 'questions')} under "
                  f"{result['leakage']['min_chars']} characters {agree(short, 'was', 'were')} not checked for leakage: "
                  "text so short occurs in training data by chance.")
        if not result["leakage"]["searched_documents"]:
            print(f"note: --train_data {' '.join(train_data)} holds no documents, so the leakage check "
                  "searched nothing.")
        elif result["leakage"]["leaked"]:
            leaked = result["leakage"]["leaked"]
            print(f"WARNING: {leaked} eval {agree(leaked, 'question occurs', 'questions occur')} verbatim in the "
                  f"training data; {agree(leaked, 'its score is', 'their scores are')} inflated.")
    with signals_held(complete=out):  # Ctrl-C and SIGTERM wait: eval.json and items.jsonl are of one run
        (out / "eval.json").unlink(missing_ok=True)  # first: a kill -9 in here leaves no eval.json beside the new
        write_items(partial, out / "items.jsonl")  # items, and the partial, removed last, lets a rerun write both
        write_whole(out / "eval.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        partial.unlink()
    return result
