"""`prepare` and `pretokenize` as datatrove pipelines: many tasks on this machine, on Slurm or on Ray.

    pip install -e ".[scale]"
    babyllama prepare --input wudao/ --out_dir data/clean --engine datatrove --tasks 64 --workers 16
    babyllama pretokenize --input data/clean --tokenizer runs/tok --out_dir data/tokens --engine datatrove
    ... --executor slurm --slurm_partition cpu   # a job array per stage, each waiting for the one before
    ... --executor ray                           # the Ray cluster at RAY_ADDRESS, else a local one

The embedded path's own pieces (readers, normalize, the length filter, the tokenizer, the shard
writers) run as datatrove steps; the deduplication is datatrove's, on disk. Stages of prepare, with
their work files under OUT/datatrove/:

    read     tasks  read this task's files, normalise, length filter -> clean/R.jsonl; exact-dedup hashes
    exact    1      find exact duplicates (the first copy stays)
    unique   tasks  drop them -> unique/R.jsonl; MinHash signatures of character 5-grams
    buckets  bands  documents that agree on a whole band -> duplicate pairs
    cluster  1      pairs -> the documents to remove (all of a cluster but its root)
    write    tasks  drop them -> OUT/part_R_K.jsonl
    finish   1      OUT/stats.json and OUT/bad_records.txt as the embedded path writes them

`--dedup exact` writes after `unique`'s filter and `--dedup none` after `read`. pretokenize has two
stages: `tokenize` (tasks) -> OUT/shard_R_K.bin, val_R_K.bin, and `finish` -> OUT/manifest.json.

A task takes a contiguous run of the sorted input files (task_shares: the runs that make the largest task's
bytes as small as possible, recorded in OUT/datatrove/settings.json as task_files), so rank order is corpus
order and the first copy of a duplicate is the one kept, as in the embedded path. A file is never split
between tasks: cut a single huge file first (`split -l 1000000`). Memory: a task holds its
own documents' signatures (~120 bytes each), the cluster stage the duplicate pairs; with tasks in
proportion to the corpus, a worker's memory stays flat. Datatrove marks every finished task under
OUT/datatrove/logs, so the same command after a crash skips them and ends with the same files. A Slurm
submission's job ids go to OUT/datatrove/slurm_jobs.json; while squeue lists one, no other run starts there.

With the local and Ray executors, which run the stages from this command, "OUT" above is OUT/.incomplete
(shards.STAGE): the earlier output in OUT stays as it was until the new one is complete and holds documents,
then replaces it (finish_run); a run that stops (a crash, Ctrl-C) leaves it for the same command to resume.
A Slurm submission writes into OUT itself, cleared first: its last stage runs after this command has returned.
"""

from __future__ import annotations

import bisect
import functools
import importlib.metadata
import inspect
import itertools
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter
from datatrove.pipeline.dedup.exact_dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
)
from datatrove.pipeline.dedup.minhash import MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import _mersenne_prime as MERSENNE_PRIME
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig
from datatrove.utils.text import TextNormConfig, simplify_text
from datatrove.utils.word_tokenizers import WordTokenizer
from loguru import logger

from babyllama.data.clean import (
    NGRAM,
    ShardWriter,
    SourceStats,
    check_dedup,
    dedup_key,
    key_pieces,
    long_enough,
    lsh_bands,
    normalize,
    nothing_kept,
    prepare_outputs,
    write_stats,
)
from babyllama.data.pretokenize import (
    document_pieces,
    encode_pieces,
    exit_with,
    split_writers,
    text_batches,
    token_manifest,
    write_pieces,
)
from babyllama.data.shards import (
    MANIFEST,
    STAGE,
    finish_swap,
    fresh_output_dir,
    swap_in,
    token_outputs,
    write_json,
    write_manifest,
)
from babyllama.data.sources import (
    BAD_RECORDS,
    MAX_LISTED,
    MAX_WARNINGS,
    SUFFIXES,
    CorpusReader,
    check_counts,
    data_suffix,
    more_bad,
    records_and_bad,
    say_unshown,
)
from babyllama.errors import UserError, agree, children_without_ctrl_c, killed_with_parent, require, write_whole
from babyllama.lock import holding
from babyllama.progress import status_lines
from babyllama.settings import check_fraction
from babyllama.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

EXECUTORS = ("local", "slurm", "ray")
FINISHED = "finished.json"  # written by the last stage: the run is complete
SUBMITTED = "slurm_jobs.json"  # the job ids of a Slurm submission, written as each job is submitted
MAX_TASKS = 65_534  # exact dedup ranks documents by a uint16 priority: 65535 - task


@dataclass
class Launch:
    """Where the stages run. workers: tasks at once on this machine (local) or in the cluster (ray);
    Slurm leaves that to its scheduler."""

    executor: str = "local"
    tasks: int | None = None  # default: one per input file
    workers: int = 1
    slurm_partition: str | None = None
    slurm_time: str = "24:00:00"
    slurm_qos: str | None = None  # None: no --qos, the cluster's default (datatrove's own default is "normal")


# --- datatrove's console: warnings only; its per-task banners and statistics go to the task logs ---

_LOG_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {name}:{function}:{line} - {message}"


def _for_the_console(record: dict) -> bool:
    """Whether a datatrove log record is for the console: not MinHash's filter saying "No .remove file for rank=R."
    (a task of whose documents none is a near duplicate: nothing wrong, yet a WARNING on the console)."""
    return not record["message"].startswith("No .remove file for rank=")


def _console_logger() -> None:
    logger.add(sys.stderr, level="WARNING", format=_LOG_FORMAT, colorize=False, filter=_for_the_console)


def _task_logger(logging_dir, rank: int, local_rank: int = 0, node_rank: int = -1):
    """datatrove.utils.logging.add_task_logger with the console at WARNING: a run of 7 stages printed
    ~540 lines of banners for 2,000 documents. Everything still goes to logs/STAGE/logs/task_R.log."""
    logger.remove()
    logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
    _console_logger()
    logger.add(logfile, level="DEBUG", format=_LOG_FORMAT, colorize=False)
    return logfile


def _default_logger() -> None:
    logger.remove()
    _console_logger()


def quiet_datatrove() -> None:
    """Install the two loggers above where datatrove looks them up (in every process that unpickles a
    pipeline of ours, since it imports this module), and hide its bars (_no_bars)."""
    import datatrove.executor.base
    import datatrove.utils.logging

    datatrove.utils.logging.setup_default_logger = _default_logger
    datatrove.executor.base.add_task_logger = _task_logger
    if "datatrove.executor.ray" in sys.modules:
        sys.modules["datatrove.executor.ray"].add_task_logger = _task_logger
    _default_logger()
    _no_bars()


def _no_bars() -> None:
    """The datatrove modules loaded draw no tqdm bar unless asked (their tqdm gets disable=True): theirs count the
    files or queues of a step, not its work (`Initializing pq...: 6/6`, `Reading dup files: 9/9`, and from exact
    dedup's filter a `0/1 ... 1/1 [00:00, 29330 it/s]` bar or two a task), a dozen lines a stage on the console,
    while a stage's progress is babyllama's status line (run_stages)."""
    from tqdm import tqdm

    for name, module in list(sys.modules.items()):
        if name.startswith("datatrove.") and getattr(module, "tqdm", None) is tqdm:
            module.tqdm = functools.partial(tqdm, disable=True)


quiet_datatrove()


_WATCHING: list[int] = []  # the pid of a pool worker once it watches the process that runs the stages


def end_with_main() -> None:
    """In a worker of the local executor's pool (datatrove's multiprocess forks it from its forkserver), once: end
    when the process that runs the stages ends, even by kill -9; else the task under way runs on to its end, writing
    into the stage (OUT/.incomplete) that a rerun writes too."""
    import multiprocess

    parent = multiprocess.parent_process()  # None in the process that runs the stages, and under Ray or Slurm
    if parent is not None and os.getpid() not in _WATCHING:
        _WATCHING.append(os.getpid())
        threading.Thread(target=exit_with, args=(parent,), daemon=True).start()


_FORKING: list[int] = []  # while local stages run (forks_end_with_this_process): the pid of the process running them


def _end_with_parent() -> None:
    """os.register_at_fork's after_in_child: a process forked while local stages run (datatrove's multiprocess
    Manager, which holds the out_dir's lock, inherited with the fork) gets SIGKILL when the process that forked it
    ends, even by kill -9, rather than live on for ever, an orphan holding that lock (a rerun is refused) and the
    forkserver's pipe (so the forkserver lives on too)."""
    if not _FORKING:
        return
    parent = _FORKING.pop()  # what this process forks in turn is not watched
    killed_with_parent(parent)


if sys.platform == "linux":
    os.register_at_fork(after_in_child=_end_with_parent)


@contextmanager
def forks_end_with_this_process():
    """While the body runs, a process this one forks ends when this one ends (_end_with_parent)."""
    _FORKING.append(os.getpid())
    try:
        yield
    finally:
        _FORKING.clear()


def start_forkserver() -> None:
    """Start multiprocess's forkserver, which forks the local executor's pool workers (its start_method), if it is not
    running, with SIGINT blocked (children_without_ctrl_c): it and every worker it forks keep it so, and a Ctrl-C no
    longer has each print a KeyboardInterrupt traceback (in its imports, or as it unpickles a task); this process
    ends the pool (datatrove's `with Pool`) as it stops."""
    import multiprocess.forkserver
    import multiprocess.resource_tracker

    multiprocess.resource_tracker.ensure_running()  # first: once its process is started it unblocks SIGINT here
    with children_without_ctrl_c():
        multiprocess.forkserver.ensure_running()


def pass_through(data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
    """The first step of every stage: unpickling it makes a worker import this module, and so run
    quiet_datatrove(), even for a stage of datatrove's steps alone; a pool worker ends with the stages' process
    (end_with_main)."""
    end_with_main()
    return data


# --- steps: the embedded path's pieces, as datatrove PipelineSteps ---


def task_shares(sizes: list[int], tasks: int) -> list[int]:
    """How many of the files (sizes: bytes, in corpus order) each of the tasks reads, as contiguous runs in that
    order (exact dedup keeps the copy of the earliest task; parts, shards and bad records are in task order), so
    that the largest task's bytes are as small as possible. A file weighs its bytes + 1, so empty files spread too.
    The rule: C is the smallest capacity at which a greedy fill (each task in turn takes the next files while they
    fit in C, and leaves one for each task after it) places every file, by binary search between max(largest file,
    total / tasks) and total / tasks + largest file, which always fits; the shares are that fill's. With
    tasks <= files no task is idle. O(files + tasks x log(files) x log(largest file)); the same sizes give the
    same shares. Returns tasks counts that add up to len(sizes)."""
    ends = list(itertools.accumulate(s + 1 for s in sizes))  # weight up to the end of each file
    largest = max((s + 1 for s in sizes), default=0)
    lo = max(largest, -(-(ends[-1] if ends else 0) // tasks))
    hi = lo + largest
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _greedy_fill(ends, tasks, mid) is not None else (mid + 1, hi)
    return _greedy_fill(ends, tasks, lo)


def middle_byte_shares(sizes: list[int], tasks: int) -> list[int]:
    """The shares of the rule before task_shares (runs whose settings.json lacks task_files): each file (sizes:
    bytes, in corpus order) went to the task in whose 1/tasks of the weight (bytes + 1 a file) its middle fell.
    Returns tasks counts (some may be 0) that add up to len(sizes)."""
    weight = np.asarray(sizes, dtype=np.float64) + 1.0
    middle = (np.cumsum(weight) - weight / 2) / weight.sum()
    owner = np.minimum((middle * tasks).astype(np.int64), tasks - 1)
    return np.bincount(owner, minlength=tasks).tolist()


def _greedy_fill(ends: list[int], tasks: int, capacity: int) -> list[int] | None:
    """task_shares' fill: files per task, or None when `tasks` runs of at most capacity do not hold them all."""
    shares, start = [], 0
    for left in range(tasks, 0, -1):  # left: this task and those after it
        end = bisect.bisect_right(ends, (ends[start - 1] if start else 0) + capacity, lo=start)
        end = max(min(end, len(ends) - left + 1), start)
        shares.append(end - start)
        start = end
    return shares if start == len(ends) else None


def _json_files(folder: Path) -> list:
    """The values of folder/00000.json ... in task order."""
    return [json.loads(f.read_text()) for f in sorted(folder.glob("[0-9]*.json"))]


class ReadCorpus(PipelineStep):
    """Documents of this task's input files (its run of files, shares[rank] of them: task_shares), in any format and
    schema CorpusReader reads, each with metadata["source"] = its file. Writes the task's per-file record counts to
    work/read/R.json and the location of its first MAX_LISTED bad records to work/bad/R.txt. skip_empty: records
    whose text shows nothing are counted, not given (CorpusReader's; pretokenize's)."""

    name, type = "📖 babyllama files", "📖 - READER"

    def __init__(self, files: list[str], shares: list[int], format: str | None, work: str, skip_empty: bool = False):
        super().__init__()
        self.files, self.shares, self.format, self.work, self.skip_empty = files, shares, format, work, skip_empty

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        work = Path(self.work)
        (work / "bad").mkdir(parents=True, exist_ok=True)
        with (work / "bad" / f"{rank:05d}.txt").open("w", encoding="utf-8") as bad_log:
            start = sum(self.shares[:rank])
            reader = CorpusReader(self.files[start : start + self.shares[rank]], self.format, bad_log, self.skip_empty)
            for i, (source, text) in enumerate(reader.documents_with_source()):
                self.stat_update("documents")
                yield Document(text=text, id=f"{rank:05d}/{i}", metadata={"source": source})
        write_json(work / "read" / f"{rank:05d}.json", {k: v.to_dict() for k, v in reader.stats.items()})


class CleanText(PipelineStep):
    """normalize() each document; drop those shorter than min_chars (clean.long_enough)."""

    name, type = "🧹 babyllama normalize", "🔻 - FILTER"

    def __init__(self, min_chars: int):
        super().__init__()
        self.min_chars = min_chars

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            doc.text = normalize(doc.text)
            if long_enough(len(doc.text), self.min_chars):
                yield doc
            else:
                self.stat_update("too_short")


class CountBySource(PipelineStep):
    """Passes documents through; writes work/KEY/R.json = {source: [documents, characters]}."""

    name, type = "🔢 babyllama count", "📊 - STATS"

    def __init__(self, work: str, key: str):
        super().__init__()
        self.work, self.key = work, key

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for doc in data:
            c = counts[doc.metadata["source"]]
            c[0] += 1
            c[1] += len(doc.text)
            yield doc
        write_json(Path(self.work) / self.key / f"{rank:05d}.json", counts)


class ReadTaskFile(JsonlReader):
    """Reads back R.jsonl, the file that task R of an earlier stage wrote, so that documents keep the
    index in their task that the dedup signatures recorded (a task that kept nothing wrote none)."""

    name = "📖 babyllama task file"

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        name = f"{rank:05d}.jsonl"
        if self.data_folder.exists(name):
            yield from self.read_files_shard([name])


class WriteParts(PipelineStep):
    """Writes the documents of task R to OUT/part_R_00000.jsonl ... ({"text": ...} a line)."""

    name, type = "💽 babyllama parts", "💽 - WRITER"

    def __init__(self, out: str, docs_per_shard: int):
        super().__init__()
        self.out, self.docs_per_shard = out, docs_per_shard

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> None:
        out, tag = Path(self.out), f"_{rank:05d}"
        for f in [*out.glob(f"part{tag}_*.jsonl"), *out.glob(f".part{tag}_*.tmp")]:
            f.unlink()  # from an attempt that was killed
        writer = ShardWriter(out, self.docs_per_shard, tag)
        for doc in data:
            writer.write([doc.text])
        writer.close()


class WriteTokenShards(PipelineStep):
    """Tokenizes the documents of task R into OUT/shard_R_00000.bin ... and val_R_00000.bin ..., as
    `babyllama pretokenize` does; lists them in work/shards/R.json."""

    name, type = "🔢 babyllama tokenize", "🔢 - TOKENIZER"

    def __init__(self, tokenizer_path: str, out: str, work: str, val_fraction: float, bos: bool, shard_tokens: int):
        super().__init__()
        self.tokenizer_path, self.out, self.work = tokenizer_path, out, work
        self.val_fraction, self.bos, self.shard_tokens = val_fraction, bos, shard_tokens

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> None:
        tok = load_tokenizer(self.tokenizer_path)
        out, tag = Path(self.out), f"_{rank:05d}"
        for f in [*out.glob(f"shard{tag}_*.bin"), *out.glob(f"val{tag}_*.bin"), *out.glob(f".*{tag}_*.tmp")]:
            f.unlink()  # from an attempt that was killed
        writers = split_writers(out, tok.dtype, self.shard_tokens, tag)
        pieces = document_pieces((doc.text for doc in data), self.val_fraction, tok)
        for batch in text_batches(pieces, size=lambda piece: len(piece.text)):
            flat, lengths = encode_pieces(tok, batch, self.bos)
            self.stat_update("documents", value=write_pieces(writers, batch, flat, lengths))
            self.stat_update("tokens", value=len(flat))
        for w in writers.values():
            w.close()
        write_json(Path(self.work) / "shards" / f"{rank:05d}.json", writers["train"].shards + writers["val"].shards)


def _sources_read(work: Path) -> dict[str, dict]:
    """{file: its FileStats dict} of every task, in corpus order: each file is read by one task (task_shares; the
    inputs hold each real path once, sources.expand_inputs), so its schema is the one of most of its records."""
    return {path: fs for task in _json_files(work / "read") for path, fs in task.items()}


def write_bad_records(out: Path, work: Path, bad: int) -> None:
    """OUT/bad_records.txt as CorpusReader.bad_records_to writes it: the first MAX_LISTED lines of the tasks' lists
    (work/bad/R.txt, in task order: corpus order), then a line that counts the rest of the bad records, bad in all."""
    lines: list[str] = []
    for f in sorted((work / "bad").glob("*.txt")):
        with f.open(encoding="utf-8") as task:
            lines += itertools.islice(task, MAX_LISTED - len(lines))
    if bad > len(lines):
        lines.append(more_bad(bad - len(lines), bad) + "\n")
    write_whole(out / BAD_RECORDS, "".join(lines))


def say_unshown_bad(out: Path) -> None:
    """After a run of the stages here: the warning that ends the tasks' lists of bad records on the console, as the
    embedded engine's (sources.say_unshown): each task showed at most MAX_WARNINGS, the first 5 of a file (its
    FileStats' bad_examples, in work/read/R.json)."""
    tasks = _json_files(out / "datatrove" / "read")
    bad = sum(fs["bad"] for task in tasks for fs in task.values())
    shown = sum(min(MAX_WARNINGS, sum(len(fs["bad_examples"]) for fs in task.values())) for task in tasks)
    say_unshown(bad, shown, min(bad, MAX_LISTED), out / BAD_RECORDS)


class FinishPrepare(PipelineStep):
    """The last stage of prepare: OUT/stats.json and bad_records.txt from the tasks' counts, then removes
    the work files that only the stages before needed."""

    name, type = "🏁 babyllama stats", "📊 - STATS"

    def __init__(self, out: str, work: str, levels: list[str], settings: dict):
        super().__init__()
        self.out, self.work, self.levels, self.settings = out, work, levels, settings

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> None:
        out, work = Path(self.out), Path(self.work)
        counts = {}
        for level in self.levels:  # documents left after: clean, unique (exact dedup), kept (near dedup)
            counts[level] = defaultdict(lambda: [0, 0])
            for task in _json_files(work / level):
                for src, (n, chars) in task.items():
                    counts[level][src][0] += n
                    counts[level][src][1] += chars
        stats: dict[str, SourceStats] = {}
        for src, fs in _sources_read(work).items():
            n = [counts[level][src][0] for level in self.levels] + [0, 0]
            s = stats[src] = SourceStats(schema=fs["schema"], records=fs["records"], bad=fs["bad"])
            s.too_short = s.records - s.bad - n[0]
            s.exact_duplicates = n[0] - n[1] if len(self.levels) > 1 else 0
            s.near_duplicates = n[1] - n[2] if len(self.levels) > 2 else 0
            s.kept, s.characters = counts[self.levels[-1]][src]
        write_bad_records(out, work, sum(s.bad for s in stats.values()))
        files = sorted(f.name for f in out.glob("part_*.jsonl"))
        started = json.loads((work / "settings.json").read_text())["started"]
        write_stats(out, stats, files, self.settings, time.time() - started)  # the driver checks the totals
        for name in ("clean", "unique", "exact_sigs", "exact_dups", "minhash_sigs", "buckets", "remove"):
            shutil.rmtree(work / name, ignore_errors=True)
        write_json(work / FINISHED, {"seconds": round(time.time() - started, 2)})


class FinishTokens(PipelineStep):
    """The last stage of pretokenize: the tokenizer and OUT/manifest.json (written last, as always)."""

    name, type = "🏁 babyllama manifest", "📊 - STATS"

    def __init__(self, tokenizer_path: str, out: str, work: str, bos: bool, val_fraction: float, tasks: int):
        super().__init__()
        self.tokenizer_path, self.out, self.work = tokenizer_path, out, work
        self.bos, self.val_fraction, self.tasks = bos, val_fraction, tasks

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> None:
        out, work = Path(self.out), Path(self.work)
        sources = _sources_read(work)
        read = records_and_bad(sources)
        write_bad_records(out, work, read["bad"])
        started = json.loads((work / "settings.json").read_text())["started"]
        if read["records"] > read["bad"] + read["empty"]:  # else no manifest: the driver says why (check_records)
            self.write_manifest(out, work, sources, started)
        write_json(work / FINISHED, {"seconds": round(time.time() - started, 2)})

    def write_manifest(self, out: Path, work: Path, sources: dict, started: float) -> None:
        tok = load_tokenizer(self.tokenizer_path)
        tok.save(out / "tokenizer")
        shards = [s for task in _json_files(work / "shards") for s in task]
        manifest = token_manifest(tok, bos=self.bos, val_fraction=self.val_fraction, shards=shards, sources=sources,
                                  engine={"name": "datatrove", "tasks": self.tasks},
                                  seconds=round(time.time() - started, 2))
        write_manifest(out, manifest)


# --- dedup settings: character shingles, as the embedded path's NearDuplicateIndex ---


class Characters(WordTokenizer):
    """Chinese has no spaces: MinHash shingles are n-grams of the characters of the dedup key, as in the
    embedded path (datatrove's own Chinese word tokenizer would need spaCy)."""

    def word_tokenize(self, text: str) -> list[str]:
        return list(dedup_key(text))

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


class MinhashSignature(MinhashDedupSignature):
    """datatrove's MinHash stage 1 with the signature taken over chunks of shingles: its own makes one
    (shingles, hashes) matrix, 940 bytes per character of a document (26 GiB for one of 30M)."""

    def get_shingles(self, text: str) -> np.ndarray:
        """(N, 1) uint64: the shingles datatrove makes with Characters (the hash of each n-gram of the characters of
        text's dedup key, joined by spaces; none for a key shorter than n), made from the key a piece at a time
        (key_pieces) into an array of their number: datatrove's own held each character of the key as a string and
        each hash as a Python int, ~150 bytes a character (1.9 GB for a document of 12.5 M characters), these 8."""
        n, text = self.config.n_grams, simplify_text(text, self.config.norm_config)
        shingles = np.empty((max(sum(map(len, key_pieces(text))) - n + 1, 0), 1), dtype=np.uint64)
        done, held = 0, ""  # held: a piece of the key with the n - 1 characters before it
        for piece in key_pieces(text):
            held += piece
            grams = max(len(held) - n + 1, 0)
            shingles[done : done + grams, 0] = np.fromiter(
                (self._hash_func(" ".join(held[i : i + n])) for i in range(grams)), dtype=np.uint64, count=grams)
            done, held = done + grams, held[grams:]
        return shingles

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        a, b = self.parameters  # (1, num_hashes) each; shingles (N, 1); 64-bit hashes: no masking
        mins = np.full(a.shape[1], np.iinfo(np.uint64).max, dtype=np.uint64)
        for s in range(0, len(shingles), 4096):
            mins = np.minimum(mins, ((shingles[s : s + 4096] * a + b) % MERSENNE_PRIME).min(axis=0))
        return [x.tolist() for x in np.split(mins, self.config.num_buckets)]


def document_key(doc: Document) -> str:
    return dedup_key(doc.text)


def earlier_task_first(doc: Document) -> int:
    """Exact dedup keeps the copy of highest priority, then of lowest index in its task: 65535 - task
    makes that the first copy in corpus order."""
    return 65535 - int(doc.id.split("/")[0])


EXACT = ExactDedupConfig(content_getter=document_key, document_priority=earlier_task_first,
                         hash_config=HashConfig(precision=64, hash_fc="xxhash"))


def minhash_config(threshold: float) -> MinhashConfig:
    """datatrove's MinHash with the embedded path's bands and rows for the threshold, on the text as it is
    (no lowercasing or punctuation removal: that is normalize's job)."""
    bands, rows = lsh_bands(threshold)
    as_is = TextNormConfig(lowercase=False, norm_whitespace=False, remove_punctuation=False,
                           norm_unicode_diacritics=False, norm_numbers=False)
    return MinhashConfig(n_grams=NGRAM, num_buckets=bands, hashes_per_bucket=rows, seed=1, norm_config=as_is,
                         hash_config=HashConfig(precision=64, hash_fc="xxhash"))


# --- stages and their execution ---

Stage = tuple[str, list, int]  # name, pipeline, tasks


def prepare_stages(files: list[str], shares: list[int], out: Path, work: Path, *, format: str | None,
                   min_chars: int, dedup: str, threshold: float | None, docs_per_shard: int,
                   settings: dict) -> list[Stage]:
    w = lambda name: str(work / name)
    tasks = len(shares)
    read = [ReadCorpus(files, shares, format, str(work)), CleanText(min_chars), CountBySource(str(work), "clean")]
    write = [WriteParts(str(out), docs_per_shard)]
    levels = {"none": ["clean"], "exact": ["clean", "unique"], "minhash": ["clean", "unique", "kept"]}[dedup]
    finish = ("finish", [FinishPrepare(str(out), str(work), levels, settings)], 1)
    if dedup == "none":
        return [("read", read + write, tasks), finish]
    stages = [
        ("read", [*read, JsonlWriter(w("clean"), output_filename="${rank}.jsonl", compression=None),
                  ExactDedupSignature(output_folder=w("exact_sigs"), config=EXACT)], tasks),
        ("exact", [ExactFindDedups(data_folder=w("exact_sigs"), output_folder=w("exact_dups"), config=EXACT)], 1),
    ]
    unique = [ReadTaskFile(w("clean")), ExactDedupFilter(data_folder=w("exact_dups"), config=EXACT),
              CountBySource(str(work), "unique")]
    if dedup == "exact":
        return [*stages, ("unique", unique + write, tasks), finish]
    mh = minhash_config(threshold)
    signatures = MinhashSignature(output_folder=w("minhash_sigs"), config=mh, language=Characters())
    return [
        *stages,
        ("unique", [*unique, JsonlWriter(w("unique"), output_filename="${rank}.jsonl", compression=None),
                    signatures], tasks),
        ("buckets", [MinhashDedupBuckets(input_folder=w("minhash_sigs"), output_folder=w("buckets"), config=mh)],
         mh.num_buckets),
        ("cluster", [MinhashDedupCluster(input_folder=w("buckets"), output_folder=w("remove"), config=mh)], 1),
        ("write", [ReadTaskFile(w("unique")), MinhashDedupFilter(input_folder=w("remove")),
                   CountBySource(str(work), "kept"), *write], tasks),
        finish,
    ]


def make_executor(launch: Launch, name: str, pipeline: list, tasks: int, depends, logs: Path):
    """One datatrove executor for a stage, started after `depends` has finished."""
    pipeline = [pass_through, *pipeline]
    if launch.executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(launch.workers, tasks),
                                     logging_dir=str(logs / name), depends=depends)
    if launch.executor == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        activate = Path(sys.prefix) / "bin" / "activate"
        return SlurmPipelineExecutor(pipeline, tasks=tasks, time=launch.slurm_time, partition=launch.slurm_partition,
                                     qos=launch.slurm_qos, job_name=f"babyllama-{name}", logging_dir=str(logs / name),
                                     depends=depends,
                                     venv_path=str(activate) if activate.is_file() else None)
    from datatrove.executor.ray import RayPipelineExecutor

    quiet_datatrove()
    return RayPipelineExecutor(pipeline, tasks=tasks, workers=launch.workers, logging_dir=str(logs / name),
                               depends=depends)


RAY_HOST_PORT = re.compile(r"(?:ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?):([0-9]{1,5})")


def ray_host_port(address: str) -> tuple[str, int]:
    """(host, port) of a RAY_ADDRESS in a form ray.init accepts for a cluster: host:port of its GCS, or
    ray://host:port of Ray Client (host a name, an IPv4 or a bracketed IPv6 address; port 1 to 65535). Raises
    UserError for anything else: another scheme (http://), a path, a user, a space, a port out of range."""
    match = RAY_HOST_PORT.fullmatch(address)
    if match is None or not 0 < int(match[2]) < 1 << 16:
        raise UserError(f"RAY_ADDRESS={address} is not host:port, ray://host:port, auto or local; set it to the head "
                        "node's address or unset it to start a local Ray instance.")
    return match[1].strip("[]"), int(match[2])


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Raise UserError when address (RAY_ADDRESS) is not in a form Ray accepts (ray_host_port), or names a port
    that does not accept a TCP connection within timeout seconds: ray.init has no timeout and retries such an
    address for minutes. "", auto and local need no check."""
    if address in ("", "auto", "local"):
        return
    host, port = ray_host_port(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise UserError(f"the Ray cluster at RAY_ADDRESS={address} does not answer ({e.strerror or e}); start it "
                        "there (`ray start --head`), correct RAY_ADDRESS, or unset it to start a local one.") from None
    if why := not_ray(address, host, port, timeout):
        what = "a Ray Client server" if address.startswith("ray://") else "a Ray cluster's GCS"
        raise UserError(f"RAY_ADDRESS={address} does not answer as {what} within {timeout:g} s ({why}); correct "
                        "RAY_ADDRESS (host:port of the head node's GCS, 6379 by default, or ray://host:10001 of Ray "
                        "Client), or unset it to start a local one.")


def not_ray(address: str, host: str, port: int, timeout: float) -> str | None:
    """Why host:port is not the server that address names, in gRPC's words: it does not answer the request that
    ray.init makes first (the GCS's GetClusterId, Ray Client's ping) within timeout seconds; None when it does.
    Over TLS and with token authentication as ray.init would connect (RAY_USE_TLS, RAY_AUTH_MODE). ray.init itself
    retries a port that answers something else (an HTTP server, another service) for minutes."""
    grpc = require("grpc", "scale")
    try:
        from ray._private.grpc_utils import init_grpc_channel
    except ImportError:  # Ray before 2.5x kept it here
        from ray._private.utils import init_grpc_channel
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc, ray_client_pb2, ray_client_pb2_grpc

    with init_grpc_channel(f"{host}:{port}") as channel:
        if address.startswith("ray://"):
            call = ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo
            request = ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING)
        else:
            call = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId
            request = gcs_service_pb2.GetClusterIdRequest()
        try:
            call(request, timeout=timeout)
        except grpc.RpcError as e:
            return (e.details() or e.code().name).rpartition("last error: ")[2]
    return None


def connect_ray() -> None:
    """Connect this process to Ray, unless it is: the cluster at RAY_ADDRESS (check_ray_address first), else
    `ray start`'s, else a new local one. Raises UserError when ray.init fails, before anything is written."""
    ray = require("ray", "scale")
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "")
    check_ray_address(address)
    try:
        ray.init()
    except (ConnectionError, RuntimeError, TimeoutError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot connect to Ray{f' at RAY_ADDRESS={address}' if address else ''} ({reason}); "
                        "check that the cluster runs (`ray status`), or unset RAY_ADDRESS to start a local one.") \
            from None


def stage_status(label: str, logs: Path, tasks: int, seconds: float) -> str:
    """"stage 3/7 unique: 2 of 6 tasks done (245,312 documents), 90 s": the tasks that datatrove marked done in the
    stage's logging folder (completions/R), and the documents that the statistics of those tasks (stats/R.json,
    written before a task is marked done) count at the stage's first step that counts any (its reader; a task that
    read no document counts none); a stage that reads none says none. The statistics of a task not yet marked done are
    not read: the count and the documents are of the same tasks. A line every progress.LINE_EVERY_S while the stage
    runs (run_stages)."""
    done = [f.name for f in (logs / "completions").glob("[0-9]*")]
    counted = [n for n in (_documents(logs / "stats" / f"{rank}.json") for rank in done) if n is not None]
    n = sum(counted)
    read = f" ({n:,} {agree(n, 'document', 'documents')})" if counted else ""
    return f"{label}: {len(done)} of {tasks} {agree(tasks, 'task', 'tasks')} done{read}, {seconds:.0f} s"


def _documents(stats_file: Path) -> int | None:
    """The documents that a task's statistics (datatrove's stats/R.json: a list of steps) count at the first step
    that counts any: a number, or {"total": n, ...}; None when no step does, or the file cannot be read yet."""
    try:
        steps = json.loads(stats_file.read_text())
    except (OSError, ValueError):
        return None
    counts = [step["stats"]["documents"] for step in steps if "documents" in step.get("stats", {})]
    return None if not counts else counts[0] if isinstance(counts[0], int) else counts[0].get("total", 0)


def run_stages(stages: list[Stage], launch: Launch, work: Path) -> None:
    """Run the stages in order, each once the one before has finished (local, ray), or submit them as
    Slurm job arrays that each depend on the one before (slurm: returns once they are queued)."""
    executors = []
    for i, (name, pipeline, tasks) in enumerate(stages):
        depends = executors[-1] if launch.executor == "slurm" and executors else None
        executor = make_executor(launch, f"{i + 1}_{name}", pipeline, tasks, depends, work / "logs")
        executors.append(executor)
        if launch.executor != "slurm":
            start = time.time()
            label = f"stage {i + 1}/{len(stages)} {name}"
            log.info("%s: %d %s", label, tasks, agree(tasks, "task", "tasks"))
            logs = work / "logs" / f"{i + 1}_{name}"
            with forks_end_with_this_process() if launch.executor == "local" else nullcontext(), \
                    status_lines(functools.partial(stage_status, label, logs, tasks),
                                 functools.partial(log.info, "%s")):
                if launch.executor == "local" and executor.workers > 1:
                    start_forkserver()
                executor.run()
            log.info("stage %s done in %.1f s", name, time.time() - start)
    if launch.executor == "slurm":
        jobs = submit(executors[-1], work / SUBMITTED)
        if not jobs:
            log.info("nothing submitted to Slurm: every stage's tasks are done")
            return
        log.info("submitted %d Slurm %s (%s): a job array per stage left to do, each with a job merging its "
                 "statistics, each array waiting for the one before; logs in %s", len(jobs),
                 agree(len(jobs), "job", "jobs"), " ".join(jobs), work / "logs")


def submit(last, record: Path) -> list[str]:
    """Submit the stages to Slurm (the last stage's executor.run() submits every stage not done, each depending on the
    one before, and after each array datatrove's job merging its statistics) with sbatch; every job id is recorded in
    record as soon as sbatch gives it (shards.write_json: whole or not at all), so that a submission that fails part
    way leaves the jobs already queued where check_no_queued_jobs sees them. Returns the job ids. Raises UserError
    quoting sbatch's error when it refuses a job (datatrove raised CalledProcessError, its stderr not kept)."""
    import datatrove.executor.slurm

    check_slurm_launch(datatrove.executor.slurm.launch_slurm_job)
    jobs: list[str] = []
    started = time.time()

    def sbatch(script: str, job_id_retriever, *args: str) -> str:  # datatrove.executor.slurm.launch_slurm_job
        with tempfile.NamedTemporaryFile("w", suffix=".slurm") as f:
            f.write(script)
            f.flush()
            r = subprocess.run(["sbatch", *args, f.name], capture_output=True, text=True)
        if r.returncode != 0:
            raise UserError(sbatch_failed(r, jobs))
        sys.stderr.write(r.stderr)  # its warnings
        jobs.append(str(job_id_retriever(r.stdout)))
        write_json(record, {"jobs": jobs, "submitted": started})
        return jobs[-1]

    launch = datatrove.executor.slurm.launch_slurm_job
    datatrove.executor.slurm.launch_slurm_job = sbatch
    try:
        last.run()
    finally:
        datatrove.executor.slurm.launch_slurm_job = launch
    return jobs


def check_slurm_launch(launch) -> None:
    """Raise UserError, before anything is submitted, where datatrove's launch_slurm_job, which submit replaces (a
    function of datatrove's internals, no API), is not the launch_slurm_job(launch_file_contents, job_id_retriever,
    *args) of datatrove 0.10 that it was written for: a datatrove that calls another would submit its jobs without
    their ids recorded, or fail in the middle of a submission. Not a pin of datatrove < 0.11 in pyproject.toml: the
    local and Ray executors do not use it, and a later datatrove that keeps it goes on working."""
    kinds = [p.kind for p in inspect.signature(launch).parameters.values()] if callable(launch) else None
    if kinds != [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 2 + [inspect.Parameter.VAR_POSITIONAL]:
        raise UserError(f"datatrove {importlib.metadata.version('datatrove')} submits Slurm jobs otherwise than the "
                        "datatrove 0.10 that babyllama records their job ids with (its launch_slurm_job changed); "
                        "install datatrove 0.10 (pip install 'datatrove>=0.10,<0.11') for --executor slurm.")


def sbatch_failed(r: subprocess.CompletedProcess, queued: list[str]) -> str:
    """The sentence for an sbatch that exited with an error: its error output, and the jobs of this submission it had
    queued before (recorded: the same command is refused while they are queued)."""
    said = "; ".join(line.strip() for line in r.stderr.splitlines() if line.strip()) or f"exit status {r.returncode}"
    if not queued:
        return f"sbatch refused the first job of the submission ({said}); nothing was submitted."
    return (f"sbatch refused a job of the submission ({said}) after it had queued {' '.join(queued)}; once they have "
            f"left the queue (squeue --me lists them, scancel {' '.join(queued)} ends them), run the same command "
            "again to submit the rest.")


def check_no_queued_jobs(out: Path) -> None:
    """Raise UserError when OUT/datatrove records a Slurm submission whose jobs squeue still lists (queued
    or running): a second run there would write the same files at the same time. Jobs that left the queue
    (done, failed, cancelled) do not stop it: a run resubmitted after a failure does what was left. A squeue that
    fails (its controller down) is a UserError too: nothing queued cannot be told from nothing known. Without squeue
    on this machine nothing can be checked."""
    work = out / "datatrove"
    if not (work / SUBMITTED).is_file() or (work / FINISHED).is_file() or shutil.which("squeue") is None:
        return
    jobs = json.loads((work / SUBMITTED).read_text())["jobs"]
    if not jobs:
        return
    r = subprocess.run(["squeue", "--noheader", "--format=%i", f"--jobs={','.join(jobs)}"], capture_output=True,
                       text=True)
    if r.returncode != 0 and "Invalid job id" not in r.stderr:  # that error: every job has left the queue
        said = "; ".join(line.strip() for line in r.stderr.splitlines() if line.strip()) or f"exit {r.returncode}"
        raise UserError(f"squeue failed ({said}), so whether the Slurm jobs of an earlier submission in {out} "
                        f"({', '.join(jobs)}) are still queued is unknown; run the command again once squeue answers.")
    listed = {line.split("_")[0] for line in r.stdout.split()} if r.returncode == 0 else set()
    queued = [j for j in jobs if j in listed]
    if queued:
        raise UserError(f"{out} has Slurm jobs of an earlier submission still queued or running ({', '.join(queued)}); "
                        f"wait for them (squeue --me) or cancel them (scancel {' '.join(queued)}) before running "
                        "there again.")


def start_run(out: Path, settings: dict, outputs, staged: bool) -> Path:
    """The folder a run with these settings (which include each input's size and modification time) writes its
    output into, its work files in FOLDER/datatrove: out/STAGE when staged (the local and Ray executors, which run
    the stages from here: the earlier output in out stays until finish_run swaps the complete new one in), else out
    (Slurm, whose stages run after this command has returned). An earlier run's folder with the same settings is
    kept, so a resumed run skips its finished tasks (a finished one does nothing); a new one is made, empty, or out
    with outputs(out) removed (shards.fresh_output_dir), when there was none or it had finished with other settings.
    Raises UserError for an unfinished run with other settings, also one whose tasks read other files (task_files,
    recorded by task_shares' rule since it came in, middle_byte_shares' before: a run resumed with other shares
    would read some files twice and others never). A finished run from before task_files is compared without them."""
    for place in (out / STAGE, out) if staged else (out,):
        work = place / "datatrove"
        if not (work / "settings.json").is_file():
            continue
        before = {k: v for k, v in json.loads((work / "settings.json").read_text()).items() if k != "started"}
        if "task_files" not in before:  # started before task_shares: a finished run's shares no longer matter
            before["task_files"] = (settings["task_files"] if (work / FINISHED).is_file() else
                                    middle_byte_shares([size for _, size, _ in before["inputs"]], before["tasks"]))
        if before == settings:
            return place
        if not (work / FINISHED).is_file():
            changed = sorted(k for k in settings.keys() | before.keys() if settings.get(k) != before.get(k))
            if changed == ["task_files"]:  # same inputs and tasks: shared out by another version's rule
                raise UserError(f"{out} holds an unfinished datatrove run whose tasks share the input files otherwise "
                                f"(another version of babyllama started it); finish it with that version, or remove "
                                f"{work} to start again.")
            changed = [k for k in changed if k != "task_files"]  # it follows from inputs and tasks
            raise UserError(f"{out} holds an unfinished datatrove run with other {', '.join(changed)}; run it "
                            f"with the same ones to finish it, or remove {work} to start again.")
    if staged:
        place = out / STAGE
        shutil.rmtree(place, ignore_errors=True)  # a finished run with other settings
    else:
        place = fresh_output_dir(out, outputs)  # removes out/datatrove too
    write_json(place / "datatrove" / "settings.json", {**settings, "started": time.time()})
    return place


def finish_run(place: Path, out: Path, check, outputs, last: str) -> None:
    """After the stages: check(place) raises UserError when the new output is of no use (no record read, bad ones
    only, none kept), and a staged run's folder is removed, so that out keeps the earlier output as it was; else a
    staged output replaces the earlier one in out (outputs(out): its files; last: the file that marks it complete,
    swapped in last, shards.swap_in)."""
    try:
        check(place)
    except UserError:
        if place != out:
            shutil.rmtree(place, ignore_errors=True)
        raise
    if place != out:
        swap_in(place, out, outputs, last)


def check_records(place: Path) -> None:
    """UserError, in the embedded engine's words (sources.check_counts), when the tasks read no record, or bad ones
    only (the first named: the first line of place/bad_records.txt) and empty ones."""
    read = records_and_bad(_sources_read(place / "datatrove"))
    first = (place / BAD_RECORDS).read_text(encoding="utf-8").partition("\n")[0] if read["bad"] else ""
    check_counts(read["records"], read["bad"], read["empty"], first)


def check_kept(place: Path) -> None:
    """check_records, then UserError when the stages kept no document (clean.nothing_kept counts why)."""
    check_records(place)
    stats = json.loads((place / "stats.json").read_text())
    if stats["total"]["kept"] == 0:  # a corpus of nothing would go on to the tokenizer and pretokenize
        raise nothing_kept(stats["total"], stats["settings"].get("min_chars"))


def _input_files(inputs: list[str], format: str | None, launch: Launch) -> tuple[list[str], list[int]]:
    """Absolute input paths (tasks may run elsewhere) and how many of them each task reads (task_shares). Raises
    UserError for what would otherwise fail inside every task: an unknown executor or file type, Slurm
    without a partition or without sbatch, a Ray cluster that does not answer or cannot be connected to
    (connect_ray: so that nothing is written before)."""
    if launch.executor not in EXECUTORS:
        raise UserError(f"unknown --executor {launch.executor!r}; choose one of {', '.join(EXECUTORS)}.")
    if launch.executor == "slurm" and not launch.slurm_partition:
        raise UserError("--executor slurm needs --slurm_partition NAME (sinfo lists them).")
    if launch.executor == "slurm" and shutil.which("sbatch") is None:
        raise UserError("--executor slurm submits with sbatch, which is not on this machine's PATH; run it on a "
                        "Slurm login node.")
    files = [str(Path(f).resolve()) for f in CorpusReader(inputs, format).files]
    for f in files:
        if data_suffix(Path(f)) not in SUFFIXES:
            raise UserError(f"{f}: unknown file type; use one of {', '.join(SUFFIXES)} (optionally .gz/.zst).")
    tasks = min(launch.tasks or len(files), len(files))  # more tasks than files would have nothing to do
    if tasks > MAX_TASKS:
        raise UserError(f"--tasks can be at most {MAX_TASKS}, got {tasks}.")
    if launch.executor == "ray":
        connect_ray()  # last: a local instance is not started for inputs that are refused
    return files, task_shares([Path(f).stat().st_size for f in files], max(tasks, 1))


def _identity(files: list[str]) -> list[list]:
    """What says that an input is the one an earlier run read: path, size, modification time."""
    return [[f, (st := Path(f).stat()).st_size, st.st_mtime_ns] for f in files]


def prepare(inputs: list[str], out: str | Path, launch: Launch, *, format: str | None = None, min_chars: int = 10,
            dedup: str = "minhash", threshold: float | None = None, docs_per_shard: int = 100_000) -> dict | None:
    """clean.prepare as a datatrove pipeline; returns the statistics written to stats.json, or None when
    the stages were submitted to Slurm. Raises UserError as clean.prepare does."""
    threshold = check_dedup(dedup, threshold)
    files, shares = _input_files(inputs, format, launch)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = {"command": "prepare", "inputs": _identity(files), "format": format, "min_chars": min_chars,
                "dedup": dedup, "minhash_threshold": threshold, "docs_per_shard": docs_per_shard,
                "engine": "datatrove", "tasks": len(shares), "task_files": shares}
    with _one_run_at_a_time(out, settings["command"]):
        finish_swap(out, prepare_outputs, "stats.json")  # of a run killed while it swapped its output in
        began = time.time()
        place = start_run(out, settings, prepare_outputs, staged=launch.executor != "slurm")
        earlier = None if launch.executor == "slurm" else _earlier_run(place / "datatrove", began)  # for time_line
        stages = prepare_stages(files, shares, place, place / "datatrove", format=format, min_chars=min_chars,
                                dedup=dedup, threshold=threshold, docs_per_shard=docs_per_shard, settings=settings)
        run_stages(stages, launch, place / "datatrove")
        if launch.executor == "slurm":
            return None
        finish_run(place, out, check_kept, prepare_outputs, "stats.json")
    say_unshown_bad(out)
    stats = json.loads((out / "stats.json").read_text())
    records = stats["total"]["records"]
    log.info("%s", time_line(f"{records} {agree(records, 'record', 'records')}", records, "records", stats["seconds"],
                             time.time() - began, earlier))
    return stats


def _earlier_run(work: Path, began: float) -> str | None:
    """Whether start_run kept an earlier run's work folder (its settings.json started before `began`, this run's start,
    in time.time() seconds): "finished" or "unfinished" (this run resumes it); None for a new one."""
    if json.loads((work / "settings.json").read_text())["started"] >= began:
        return None
    return "finished" if (work / FINISHED).is_file() else "unfinished"


def time_line(n: str, amount: int, unit: str, seconds: float, this_run: float, earlier: str | None) -> str:
    """The last line of a prepare or pretokenize: what it made (n: "200 records"; "200 docs, 10,290 tokens") and how
    long it took, with amount (of unit: "records", "tokens") a second. seconds: stats.json's or manifest.json's,
    counted from the start of the first run of these settings, so with an earlier run's, and the time between runs,
    in it; this_run: this command's stages, in seconds. A rate only when one run did it all."""
    if earlier == "finished":
        return f"{n}, read by an earlier run with the same settings in {seconds:.1f} s; nothing left to do."
    if earlier == "unfinished":
        return (f"{n} in {seconds:.1f} s since an earlier run with the same settings started, whose finished tasks "
                f"this one kept; this run took {this_run:.1f} s.")
    return f"{n} in {seconds:.1f} s: {amount / max(seconds, 1e-9):,.0f} {unit}/s"


def pretokenize(inputs: list[str], tokenizer_path: str, out: str | Path, launch: Launch, *,
                val_fraction: float = 0.005, shard_tokens: int = 100_000_000, bos: bool = False,
                format: str | None = None) -> dict | None:
    """pretokenize.pretokenize as a datatrove pipeline; returns the manifest, or None when the stages were
    submitted to Slurm. The shards hold the same documents with the same ids, in task order. Raises
    UserError when no document is usable."""
    check_fraction(val_fraction, "--val_fraction")
    tok = load_tokenizer(tokenizer_path)  # a wrong path fails here, not in every task
    tokenizer_path = str(Path(tokenizer_path).resolve())
    files, shares = _input_files(inputs, format, launch)
    tasks = len(shares)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = {"command": "pretokenize", "inputs": _identity(files), "tokenizer": tok.record(),
                "format": format, "val_fraction": val_fraction, "shard_tokens": shard_tokens, "bos": bos,
                "tasks": tasks, "task_files": shares}
    with _one_run_at_a_time(out, settings["command"]):
        finish_swap(out, token_outputs, MANIFEST)  # of a run killed while it swapped its output in
        began = time.time()
        place = start_run(out, settings, token_outputs, staged=launch.executor != "slurm")
        work = place / "datatrove"
        earlier = None if launch.executor == "slurm" else _earlier_run(work, began)  # for time_line
        stages = [
            ("tokenize", [ReadCorpus(files, shares, format, str(work), skip_empty=True),
                          WriteTokenShards(tokenizer_path, str(place), str(work), val_fraction, bos, shard_tokens)],
             tasks),
            ("finish", [FinishTokens(tokenizer_path, str(place), str(work), bos, val_fraction, tasks)], 1),
        ]
        run_stages(stages, launch, work)
        if launch.executor == "slurm":
            return None
        finish_run(place, out, check_records, token_outputs, MANIFEST)
    say_unshown_bad(out)
    manifest = json.loads((out / MANIFEST).read_text())
    docs, tokens = (sum(split[k] for split in manifest["totals"].values()) for k in ("documents", "tokens"))
    log.info("%s", time_line(f"{docs:,} {agree(docs, 'doc', 'docs')}, {tokens:,} {agree(tokens, 'token', 'tokens')}",
                             tokens, "tokens", manifest["seconds"], time.time() - began, earlier))  # as the bar's
    return manifest


@contextmanager
def _one_run_at_a_time(out: Path, command: str):
    """A second run in the same out_dir is refused at once while the first runs (lock.holding, as the embedded
    engine's), and while Slurm jobs of an earlier submission are queued or running."""
    with holding(out, command):
        check_no_queued_jobs(out)
        yield
