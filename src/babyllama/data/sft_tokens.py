"""SFT samples tokenized once, in parallel, to disk: the token cache that `babyllama sft` memory-maps.

    babyllama pretokenize --sft --input alpaca_gpt4_data_zh.json train_1M_CN.json --tokenizer runs/tok \
        --max_seq_len 512 --out_dir data/sft_tokens     # ahead of time, on any CPU machine
    babyllama sft --init ... --data (the same files) --sft_cache data/sft_tokens    # or built on first use

Worker processes turn records into conversations (chat_format.py), apply the recipe's length
filters, render ids and loss mask, truncate to max_seq_len + 1 ids and pick the split by a hash of
the prompts. The main process writes what they return in input order (the same bytes for any
number of workers), per split:

    train.ids.bin       uint16 ids (uint32 when the vocab does not fit) of all samples, back to back
    train.mask.bin      uint8, 1 where the id carries loss (answers and their <eos>)
    train.lengths.bin   int32, ids per sample
    val.*               the same for the validation split
    bad_records.txt     the records skipped as bad, one a line: `file:line: why`, the first MAX_LISTED, then a line
                        that counts the rest (sources.more_bad)
    manifest.json       written last: tokenizer (fingerprint, special ids), chat template digest, inputs
                        (path, its path relative to the
                        cache, size, mtime, SHA-256), the settings that change the samples, and the
                        counts. A cache is used only when they match; a folder moved with its cache
                        still does, and so does a file copied or downloaded again with the same bytes.

Memory stays flat whatever the corpus: records stream in, at most 2 * workers batches are in flight.
The DPO token cache (kind "dpo", data/preferences.py) is the same files with two samples per
preference pair, the chosen answer's then the rejected one's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from babyllama import chat_format
from babyllama.chat_format import (
    conversation_from_record,
    cut_conversation,
    is_blank,
    preference_answers,
    read_fields,
    unread_fields,
)
from babyllama.data.pretokenize import in_workers, worker_tokenizer
from babyllama.data.shards import first_difference, is_val, write_json
from babyllama.data.sources import (
    BAD_RECORDS,
    MAX_LISTED,
    RECORD_SUFFIXES,
    BytesRead,
    Item,
    LeftOut,
    files_of_records,
    iter_records,
    more_bad,
    say_unshown,
    warn_once,
)
from babyllama.errors import CannotWrite, UserError, agree, discard, first_few, signals_held, writing
from babyllama.lock import locked
from babyllama.progress import bytes_bar, is_rank0
from babyllama.tokenizer import load_tokenizer
from babyllama.weights_file import file_sha256

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "babyllama-sft-tokens"
VERSION = 14  # of the chat format, filters and layout: a new version never reuses an old cache (2: no empty answers;
# 3: no empty questions, no blank rejected answers; the relative path and SHA-256 of inputs came within 2; 4: the
# tokenizer's special ids and the chat template's digest are keys; 5: a record's top-level system and history are
# rendered, SFT's and all of DPO's shapes, where 4 dropped them; 6: no DPO pair whose samples are the same ids and
# mask, as truncation made them; equal_after_truncation counted; both answers empty is empty_answers, not equal;
# bad_records.txt names bytes that are not text apart from a lone surrogate, and an empty conversations list; 7:
# `messages` records, content as a list of text parts, the developer role and TRL's conversational DPO shapes are
# read, where 6 counted them bad; 8: prompt / completion records are read, and an assistant message with "weight": 0
# carries no loss, where 7 trained on it; 9: a conversational prompt / completion's system and history come once, a
# cut answer ends with a whole character, a cut that leaves no question or answer is filtered, and a DPO answer of
# "weight": 0 is bad; 10: a prompt whose beginning is cut begins with a whole character, where 9 could begin with the
# tail of one; a DPO record is read in the first of its shapes (preferences.PREFERENCE_ORDER): a question with chosen
# and rejected is read, where 9 counted it bad, and chosen and rejected go before response_chosen and
# response_rejected; a chosen without a rejected is "its 'rejected' is missing"; 11: OpenAI's DPO records (input,
# preferred_output, non_preferred_output) are read, where 10 counted them bad, a question without response_chosen or
# response_rejected is "not a preference record" (whose words name OpenAI's shape), and SFT counts bad, as a preference
# record, one with any answer field of a pair (chat_format.PREFERENCE_ANSWERS), where 10 read {messages, chosen} as its
# messages; 12: the stats count filtered_by_chars, the samples of `filtered` that the filters of characters dropped, and
# a DPO pair's null field is named null ("its 'chosen' is null, not ..."), answers without a prompt "its prompt is
# missing (...)", where 11 said "missing" and "not a preference record"; every text's line ends are "\n"
# (chat_format.line_ends), where 11 kept a "\r\n"; a folder's .txt files are no inputs; 13: LLaMA-Factory's alpaca
# pairs, {instruction, input, chosen, rejected}, are read, where 12 said "its prompt is missing", and SFT names what
# dpo finds bad in a preference record; empty answers of a pair beside an SFT shape's fields, as a CSV has them, make
# no preference record: {prompt, answer, chosen: ""} is read, where 12 counted it bad; 14: a text longer than
# (max_len + 32) x the longest piece's characters keeps the ids it has whole, where 13 could keep others when a run
# began 2 or more characters before where it was shortened (ChatGLM2: a question "xat" + "a" * 8703 kept ▁t's pairs
# of a, not ▁x ata's; chat_format.bounded_ids); other records' samples are the same as 13's)
RECORDS_PER_BATCH = 1000
SPLITS = ("train", "val")


@dataclass(frozen=True)
class SFTSettings:
    """Everything besides the inputs and the tokenizer that changes the samples. Lengths in characters, 0: off
    (the recipe used 10 / 256 / 5 / 256)."""

    max_len: int  # ids per sample at most: max_seq_len + 1
    val_fraction: float = 0.02
    min_prompt_chars: int = 0
    max_prompt_chars: int = 0
    min_answer_chars: int = 0
    max_answer_chars: int = 0

    def fits(self, prompt: str, answer: str) -> bool:
        def within(n: int, low: int, high: int) -> bool:
            return n >= low and (high <= 0 or n <= high)

        return within(len(prompt), self.min_prompt_chars, self.max_prompt_chars) and within(
            len(answer), self.min_answer_chars, self.max_answer_chars)


@dataclass
class SFTStats:
    records: int = 0
    bad: int = 0
    filtered: int = 0  # by length: the characters' filters (filtered_by_chars), or a max_len that leaves nothing
    filtered_by_chars: int = 0  # by the filters of characters, min/max_prompt_chars and min/max_answer_chars
    empty_answers: int = 0  # an answer (DPO: chosen or rejected) with nothing visible: <eos> alone
    equal_pairs: int = 0  # DPO: pairs whose chosen and rejected answers are the same text or the same tokens
    equal_after_truncation: int = 0  # DPO: pairs whose answers differ only in what truncation to max_len cut off
    truncated: int = 0
    samples: int = 0
    val_samples: int = 0
    bad_examples: list[str] = field(default_factory=list)  # "file:line: reason" of the first few
    max_id: int | None = None  # the largest token id in the cache; None: a cache from before it was recorded


PAIR_COUNTS = ("equal_pairs", "equal_after_truncation")  # the SFTStats of a DPO cache alone


def cache_key(paths: list[Path], tokenizer: dict, settings: SFTSettings, kind: str, cache_dir: str | Path) -> dict:
    """What the cache in cache_dir must match to be used: everything that changes its tokens. Format and version
    (of the rendering code), kind (sft or dpo), the tokenizer's record() (its fingerprint and the special ids that
    a conversation's <bos> and <eos> are), the chat template's digest, settings (max_len, val_fraction, the length
    filters), and each input's size, mtime and path, absolute and relative to cache_dir (same_input); a build adds
    each input's SHA-256 (digested)."""
    here = Path(cache_dir).resolve()
    inputs = [{"path": str(p.resolve()), "relative_path": os.path.relpath(p.resolve(), here),
               "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in paths]
    return {"format": FORMAT, "version": VERSION, "kind": kind, "tokenizer": tokenizer,
            "chat_format": chat_format_digest(), "inputs": inputs, "settings": asdict(settings)}


def chat_format_digest() -> str:
    """16 hex digits of the SHA-256 of chat_format.CHAT_TEMPLATE, the chat format as a Jinja template: another
    format never reuses a cache rendered in this one."""
    return hashlib.sha256(chat_format.CHAT_TEMPLATE.encode()).hexdigest()[:16]


def same_input(had: dict, now: dict) -> bool:
    """Whether an input of a cache's manifest (`had`) is the input `now` (cache_key's): the same size, and the
    same mtime or else the same bytes (same_bytes), at the same absolute path or at the same path relative to
    the cache, so that a folder moved or copied with its cache (mv, cp -a, rsync -a keep mtimes) still matches,
    as does a file copied without its mtime or downloaded again, and a changed file never does."""
    return (had.get("bytes") == now["bytes"] and same_place(had, now)
            and (had.get("mtime_ns") == now["mtime_ns"] or same_bytes(had, now)))


_SAME_BYTES: dict[tuple, bool] = {}  # (path, size, mtime_ns, recorded SHA-256) -> whether the file hashes to it


def same_bytes(had: dict, now: dict) -> bool:
    """Whether the file of `now` hashes to the SHA-256 that `had` records (False for a manifest from before
    digests). A process hashes a file once while its size and mtime stay the same, and notes it once; the process that
    holds the cache then records the new mtime (restamped), so that the next run trusts it without hashing."""
    if "sha256" not in had:
        return False
    key = (now["path"], now["bytes"], now["mtime_ns"], had["sha256"])
    if key not in _SAME_BYTES:
        _SAME_BYTES[key] = file_sha256(now["path"]) == had["sha256"]
        if _SAME_BYTES[key] and is_rank0():  # every process of a torchrun job hashes
            print(f"note: {now['path']} has a new mtime but the same bytes; using it")
    return _SAME_BYTES[key]


def same_place(had: dict, now: dict) -> bool:
    """Whether a manifest's input (`had`) names the file of `now` (cache_key's): the same absolute path, or the
    same path relative to the cache."""
    return had.get("path") == now["path"] or had.get("relative_path") == now["relative_path"]


# --- the worker side ---


def render_batch(batch: list[Item], settings: SFTSettings, parse, samples_of) -> dict:
    """Samples of a batch of (location, record, why it is bad): flat ids and mask, lengths, split; counts,
    and every bad record as "file:line: why". parse(record) raises ValueError, saying why, for a bad
    record; samples_of(tok, parsed, settings, counts) gives its samples [(ids, mask)] and whether they
    are held out, counting in counts what it skips (SFT: _sft_samples; DPO: preferences.pair_samples)."""
    tok = worker_tokenizer()
    ids: list[int] = []
    mask: list[int] = []
    lengths, val, bad = [], [], []
    counts: Counter = Counter()
    for where, record, why in batch:
        try:
            if record is None:
                raise ValueError(why)
            parsed = parse(record)
        except ValueError as e:
            counts["bad"] += 1
            bad.append(f"{where}: {e}")
            continue
        samples, held_out = samples_of(tok, parsed, settings, counts)
        for s_ids, s_mask in samples:
            ids += s_ids
            mask += s_mask
            lengths.append(len(s_ids))
            val.append(held_out)
    return {"ids": np.array(ids, dtype=np.uint32), "mask": np.array(mask, dtype=np.uint8),
            "lengths": np.array(lengths, dtype=np.int32), "val": np.array(val, dtype=bool),
            "counts": counts, "bad": bad}


def _sft_samples(tok, conv, settings: SFTSettings, counts: Counter) -> tuple[list, bool]:
    """The one sample of a conversation, cut to max_len; none when an answer with loss is blank, a filter of
    characters fails (counted filtered and filtered_by_chars: a question or an answer of any turn, those of the
    history and of weight 0 too, out of its limits; the system text is not measured), or max_len leaves nothing of
    its last question or answer (counted filtered)."""
    if any(is_blank(a) for i, (_, a) in enumerate(conv.turns) if i not in conv.untrained):
        counts["empty_answers"] += 1
        return [], False
    if not all(settings.fits(u, a) for u, a in conv.turns):
        counts.update(("filtered", "filtered_by_chars"))
        return [], False
    s_ids, s_mask, cut = cut_conversation(tok, conv, settings.max_len)  # a huge text: from what a cut keeps
    if not s_ids:
        counts["filtered"] += 1
        return [], False
    counts["truncated"] += cut
    return [(s_ids, s_mask)], is_val("\x00".join(u for u, _ in conv.turns), settings.val_fraction)


def _shapes(kind: str) -> tuple[Callable[[dict], list[str]], str]:
    """(unread, order) of the records of this kind (sft, or dpo's preference pairs): unread(record) gives the fields of
    the kind's shapes that record has and that the shape it is read in leaves out, order says the order in which
    those shapes are tried (chat_format.SHAPE_ORDER, preferences.PREFERENCE_ORDER)."""
    if kind == "dpo":
        from babyllama.data.preferences import PREFERENCE_FIELDS, PREFERENCE_ORDER, preference_fields

        return (lambda r: unread_fields(r, preference_fields(r), PREFERENCE_FIELDS)), PREFERENCE_ORDER
    # a preference record is a bad SFT record (chat_format.record_conversation): no field of it is read or left out
    return (lambda r: [] if preference_answers(r) else unread_fields(r, read_fields(r))), chat_format.SHAPE_ORDER


def _record_batches(read: BytesRead, read_at: deque[int], unread: Callable[[dict], list[str]],
                    left_out: dict[Path, LeftOut]) -> Iterator[list[Item]]:
    """Lists of RECORDS_PER_BATCH records of read's files, in turn; read's count of bytes after each is appended to
    read_at, for the bar to move as the batch is written, not as it is read ahead. left_out gets per file the fields
    that unread(record) names (_shapes): those of a shape that the shape a record is read in leaves out."""
    batch = []
    for path in read.in_turn():
        for item in iter_records(path, read.opened):
            where, record, _ = item
            if record is not None and (fields := unread(record)):
                left_out.setdefault(path, LeftOut()).note(fields, where)
            batch.append(item)
            if len(batch) == RECORDS_PER_BATCH:
                read_at.append(read())
                yield batch
                batch = []
    if batch:
        read_at.append(read())
        yield batch


# --- the main process ---


def build_sft_cache(inputs: list[str | Path], tokenizer_path: str | Path, out: str | Path, settings: SFTSettings,
                    workers: int = 1, kind: str = "sft", whole: bool = False) -> dict:
    """Tokenize the SFT records (kind "dpo": preference pairs) of inputs into out/ (see the module
    docstring), or, once out is held, find them there; returns the manifest. The earlier cache in out stays as it
    was until the new one's files are complete, and a stop while they are renamed in comes after that; whole: the
    cache is the command's whole output (pretokenize --sft), so that stop is Completed.

    Raises UserError when out/ cannot be written or no record is usable.
    """
    start = time.time()
    tok = load_tokenizer(tokenizer_path)
    paths = input_files(inputs, kind)
    _writable(Path(out))
    with locked(out, f"the {kind.upper()} token cache build"):  # one build at a time (held already by pretokenize
        # --sft, which replaces another cache, and by sft_data.opened_cache, which refuses one)
        manifest = read_sft_cache(out)
        key = cache_key(paths, tok.record(), settings, kind, out)
        if manifest is not None and cache_differences(manifest, key) == []:
            return restamped(Path(out), manifest, key)
        return _build(paths, tok, tokenizer_path, Path(out), settings, workers, start, digested(key), whole)


def restamped(out: Path, manifest: dict, key: dict) -> dict:
    """The manifest of the cache in out/, which matches key (cache_differences found nothing), with the mtime of each
    input that is new but whose bytes are the same (same_bytes hashed it) recorded, and written to out/manifest.json
    whole (write_json), so that the next run trusts the input's stat and does not hash it again (minutes for GB). The
    caller holds out (lock.locked). The manifest as it was where no mtime is new, or where the disk refuses the
    write (CannotWrite: the next run hashes again, as it would have)."""
    inputs = [{**had, "mtime_ns": now["mtime_ns"]} for had, now in zip(manifest["inputs"], key["inputs"], strict=True)]
    if inputs == manifest["inputs"]:
        return manifest
    stamped = {**manifest, "inputs": inputs}
    try:
        write_json(out / MANIFEST, stamped)
    except CannotWrite:
        return manifest
    return stamped


def input_files(inputs: list[str | Path], kind: str) -> list[Path]:
    """The files of inputs that hold records of SFT or DPO (kind): files_of_records', the text files below a folder (a
    readme.txt, whose every line was a bad record) skipped with a warning (once), as eval --qa skips them. Raises
    UserError where no file is left, and expand_inputs' errors."""
    files, texts = files_of_records(list(inputs))
    if texts:
        warn_once(f"{kind.upper()} reads records from {', '.join(RECORD_SUFFIXES)} files; {first_few(texts, 3)} "
                  f"{agree(len(texts), 'is', 'are')} skipped (name a file itself to read it)")
    if not files:
        raise UserError(f"{' '.join(map(str, inputs))} holds no {'/'.join(RECORD_SUFFIXES)} files of {kind.upper()} "
                        f"records, only text: {first_few(texts, 3)}.")
    return files


def digested(key: dict) -> dict:
    """cache_key's key with each input's SHA-256, taken before the build reads the inputs: a file changed while
    it is read then no longer matches the manifest."""
    return {**key, "inputs": [{**i, "sha256": file_sha256(i["path"])} for i in key["inputs"]]}


def _renderer(kind: str):
    """The worker function that renders a batch of records of this kind."""
    if kind == "dpo":
        from babyllama.data.preferences import pair_samples, preference_from_record  # they build on this module

        return partial(render_batch, parse=preference_from_record, samples_of=pair_samples)
    return partial(render_batch, parse=conversation_from_record, samples_of=_sft_samples)


def _build(paths: list[Path], tok, tokenizer_path, out: Path, settings: SFTSettings, workers: int,
           start: float, key: dict, whole: bool) -> dict:
    kind = key["kind"]
    names = [f"{split}.{part}.bin" for split in SPLITS for part in ("ids", "mask", "lengths")]
    files = {}  # each file's name -> its open temporary, .NAME.tmp
    stats = SFTStats()
    read, read_at = BytesRead(paths), deque()  # the bytes of the inputs read, and after each batch in flight
    bar = bytes_bar(f"{kind} tokens", read.total)
    what = "SFT" if kind == "sft" else "preference"
    try:  # on any failure, Ctrl-C too, the temporaries are removed; CannotWrite where the disk refuses a write
        for name in [*names, BAD_RECORDS]:
            with writing(out / name):
                files[name] = (out / f".{name}.tmp").open("wb")
        render = partial(_renderer(kind), settings=settings)
        (unread, order), left_out, other = _shapes(kind), {}, None
        for batch, r in in_workers(render, _record_batches(read, read_at, unread, left_out), str(tokenizer_path),
                                   workers):
            if not stats.records:  # the first batch: the other stage's records stop the build at once where no
                # other input follows them (they would be counted bad, and a later input's may be good)
                other = other_kind(batch, kind)
                if other and (len(batch) < RECORDS_PER_BATCH or files_of(batch) == [str(paths[-1])]):
                    raise UserError(f"{other}; nothing was written.")
            _write(files, out, r, tok.dtype, MAX_LISTED - min(stats.bad, MAX_LISTED))
            if len(r["ids"]):  # what a run checks against its model's vocab_size (check_ids_fit), the cache unread
                stats.max_id = max(stats.max_id or 0, int(r["ids"].max()))
            stats.records += len(batch)
            for k, n in r["counts"].items():  # bad, filtered, empty_answers, equal_pairs (...), truncated
                setattr(stats, k, getattr(stats, k) + n)
            stats.val_samples += int(r["val"].sum())
            stats.samples += int((~r["val"]).sum())
            for line in r["bad"][: 5 - len(stats.bad_examples)]:
                stats.bad_examples.append(line)
                log.warning("%s: skipped %s %s record", line, "an" if kind == "sft" else "a", what)
            rate = (stats.samples + stats.val_samples) / (time.time() - start)
            bar.set_postfix_str(f"{stats.records:,} {agree(stats.records, 'record', 'records')}, {rate:,.0f} samples/s",
                                refresh=False)
            bar.update(read_at.popleft() - bar.n)
        if stats.bad > MAX_LISTED:
            with writing(out / BAD_RECORDS):
                files[BAD_RECORDS].write(f"{more_bad(stats.bad - MAX_LISTED, stats.bad)}\n".encode())
        for name, f in files.items():
            with writing(out / name):
                f.close()
        for path, fields in left_out.items():
            log.warning("%s: records with the fields of more than one shape are read in the first of %s, leaving out "
                        "%s", path, order, fields.words())
        if stats.samples == 0:
            detail = (f"{stats.records} read, {stats.bad} bad, {stats.empty_answers} with an empty answer, "
                      f"{filtered_words(stats)}" + (f", {equal_words(stats)}" if kind == "dpo" else ""))
            if stats.val_samples:
                raise UserError(f"every {what} sample landed in the validation split ({detail}); lower "
                                "--val_fraction.")
            raise UserError(f"no usable {what} records in {', '.join(map(str, paths))} ({detail}); "
                            f"{other + '; ' if other else ''}nothing was written.")
        manifest = {**key, "dtype": tok.dtype.name, "stats": asdict(stats), "seconds": round(time.time() - start, 2)}
        with signals_held(out if whole else None):  # a stop waits for the new cache: the earlier one stays whole
            # until then, now it goes
            (out / MANIFEST).unlink(missing_ok=True)
            for name in [*names, BAD_RECORDS]:
                (out / f".{name}.tmp").rename(out / name)
            write_json(out / MANIFEST, manifest)  # last: a manifest means every file it describes is complete
        say_unshown(stats.bad, len(stats.bad_examples), min(stats.bad, MAX_LISTED), out / BAD_RECORDS, what)
    except BaseException:
        for name, f in files.items():
            discard(out / f".{name}.tmp", f)
        raise
    finally:
        bar.close()
    return manifest


def other_kind(batch: list[Item], kind: str) -> str | None:
    """Where every record of batch, the first RECORDS_PER_BATCH of the inputs (or all, where they are fewer), is of the
    kind that the other stage reads: preference records (chosen / rejected ...) given to sft, SFT records (instruction
    / output, prompt / answer, conversations ...) given to dpo, a sentence naming that kind and the stage ("the first
    1,000 records of a.jsonl are preference records ('chosen' and 'rejected'), which `babyllama dpo` reads, not SFT
    records"); else None. Each would be a bad record, and a corpus of them was read to its end (a million records:
    25 s) before "no usable ... records" was said, with a warning whose reason listed every shape but theirs."""
    records = [record for _, record, _ in batch]
    if not records or not all(isinstance(r, dict) for r in records):
        return None
    if kind == "sft" and all(preference_answers(r) for r in records):
        fields, what, reader = preference_answers(records[0]), "preference", "dpo"
    elif kind == "dpo" and all(read_fields(r) and not preference_answers(r) for r in records):
        fields = read_fields(records[0])
        what, reader = "/".join(fields) if fields[0] == "prompt" else fields[0], "sft"  # prompt/completion
    else:
        return None
    named = " and ".join(filter(None, [", ".join(map(repr, fields[:-1])), repr(fields[-1])]))
    n, record = len(records), agree(len(records), "record", "records")
    first = ("the only record" if n == 1 else f"all {n:,} records" if n < RECORDS_PER_BATCH else
             f"the first {n:,} records")
    return (f"{first} of {first_few(files_of(batch), 3)} {agree(n, 'is an' if what[0] in 'aeiou' else 'is a', 'are')}"
            f" {what} {record} ({named}), which `babyllama {reader}` reads, not "
            f"{agree(n, 'an' if kind == 'sft' else 'a', '')}{' ' if n == 1 else ''}"
            f"{'SFT' if kind == 'sft' else 'preference'} {record}")


def files_of(batch: list[Item]) -> list[str]:
    """The files that batch's records come from, in order (each record's location is "file:line")."""
    return list(dict.fromkeys(where.rsplit(":", 1)[0] for where, _, _ in batch))


def filtered_words(stats: SFTStats) -> str:
    """The samples filtered by length, in words, each filter's apart where there are any: "3 filtered by length (2 by
    characters, 1 by max_seq_len)", "0 filtered by length"."""
    if not stats.filtered:
        return "0 filtered by length"
    return (f"{stats.filtered} filtered by length ({stats.filtered_by_chars} by characters, "
            f"{stats.filtered - stats.filtered_by_chars} by max_seq_len)")


def equal_words(stats: SFTStats) -> str:
    """The DPO pairs skipped as equal, in words: "2 with equal answers, 1 equal once truncated" (to max_seq_len)."""
    return f"{stats.equal_pairs} with equal answers, {stats.equal_after_truncation} equal once truncated"


def _writable(out: Path) -> None:
    """out/, created; one sentence when it cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write the SFT token cache to {out} ({e.strerror}); choose another directory.") \
            from None


def _write(files: dict, out: Path, r: dict, dtype: np.dtype, room: int) -> None:
    """Append a worker's samples to the train and val files, and the first room of its bad records to
    bad_records.txt (the lines MAX_LISTED leaves)."""
    token_val = np.repeat(r["val"], r["lengths"])
    for split, rows, tokens in (("train", ~r["val"], ~token_val), ("val", r["val"], token_val)):
        for part, data in (("ids", r["ids"][tokens].astype(dtype, copy=False)), ("mask", r["mask"][tokens]),
                           ("lengths", r["lengths"][rows])):
            with writing(out / f"{split}.{part}.bin"):
                files[f"{split}.{part}.bin"].write(data.tobytes())
    with writing(out / BAD_RECORDS):
        files[BAD_RECORDS].write("".join(f"{line}\n" for line in r["bad"][:room]).encode())


def read_sft_cache(out: str | Path) -> dict | None:
    """The manifest of a complete cache in out/, else None; a manifest that is not one stops the run."""
    f = Path(out) / MANIFEST
    if not f.is_file():
        return None
    try:
        manifest = json.loads(f.read_text())
        if isinstance(manifest, dict) and manifest.get("format") == FORMAT and "stats" in manifest:
            return manifest
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    raise UserError(f"{f} is not an SFT token cache manifest (damaged?); delete {Path(out)} to rebuild.")


def cache_differences(manifest: dict, key: dict) -> list[str]:
    """What a cache's manifest was made with that differs from what it must match (key), each in the words of
    the flags and config keys that set it, to follow "built with"; [] when nothing. A cache of another version
    says only that (an older one: its chat format and manifest are not this version's, so its inputs, which
    version 2 recorded without their relative path and SHA-256, cannot be compared)."""
    version = manifest.get("version")
    if version != key["version"]:
        newer = isinstance(version, int) and version > key["version"]
        return [f"{'a newer' if newer else 'an older'} version of babyllama"]
    if manifest.get("kind", "sft") != key["kind"]:
        return [f"{manifest.get('kind', 'sft').upper()} samples, not {key['kind'].upper()}"]
    out = []
    if manifest.get("tokenizer") != key["tokenizer"]:
        out.append(tokenizer_words(manifest.get("tokenizer"), key["tokenizer"]))
    if manifest.get("chat_format") != key["chat_format"]:
        out.append("another chat format")
    what = input_difference(manifest.get("inputs", []), key["inputs"])
    if what:
        out.append(f"other inputs ({what})")
    settings = manifest.get("settings", {})
    out += [setting_words(k, settings.get(k), v) for k, v in key["settings"].items() if settings.get(k) != v]
    return out


def tokenizer_words(had, now: dict) -> str:
    """"another tokenizer", or where only its special ids differ, which ones: "eos_id 2 (now 1)"."""
    if not isinstance(had, dict) or had.get("fingerprint") != now["fingerprint"]:
        return "another tokenizer"
    return ", ".join(f"the tokenizer's {k} {had.get(k)} (now {v})" for k, v in now.items() if had.get(k) != v)


def setting_words(name: str, had, now) -> str:
    """A setting of SFTSettings that differs, as the user sets it: max_len is the model's max_seq_len + 1."""
    if name == "max_len":
        return f"the model's max_seq_len {had - 1 if isinstance(had, int) else had} (now {now - 1})"
    return f"{name} {had} (now {now})"


def input_difference(had: list[dict], now: list[dict]) -> str | None:
    """The first way the inputs now differ from those a cache had, in words ("X is new", "X is gone",
    "X differs", or another order); None when they are the same files in the same order (same_input)."""
    def match(i: dict) -> dict | None:
        return next((h for h in had if same_place(h, i)), None)

    matched = [match(i) for i in now]
    changed = [i["path"] for i, h in zip(now, matched, strict=True) if h is not None and not same_input(h, i)]
    new = [i["path"] for i, h in zip(now, matched, strict=True) if h is None]
    gone = [h.get("path") for h in had if not any(h is m for m in matched)]
    return first_difference(changed, new, gone) or (None if matched == had else "the same files in another order")


def open_split(out: str | Path, manifest: dict, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, mask, lengths) of a split: ids and mask memory-mapped, lengths (n,) int32 in memory."""
    out = Path(out)
    damaged = f"the SFT token cache {out} is damaged ({split} files missing or cut); delete it to rebuild."
    try:
        lengths = np.fromfile(out / f"{split}.lengths.bin", dtype=np.int32)
        if not len(lengths):
            return np.zeros(0, dtype=manifest["dtype"]), np.zeros(0, dtype=np.uint8), lengths
        ids = np.memmap(out / f"{split}.ids.bin", dtype=manifest["dtype"], mode="r")
        mask = np.memmap(out / f"{split}.mask.bin", dtype=np.uint8, mode="r")
    except (OSError, ValueError):  # missing, or empty where samples are expected
        raise UserError(damaged) from None
    counts = {"train": manifest["stats"]["samples"], "val": manifest["stats"]["val_samples"]}
    if len(lengths) != counts[split] or len(ids) != lengths.sum() or len(mask) != len(ids):
        raise UserError(damaged)
    return ids, mask, lengths
