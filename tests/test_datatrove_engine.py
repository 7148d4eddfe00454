"""The datatrove engine: same documents as the embedded path, resumable, Slurm scripts, Ray."""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import re
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("datatrove")
pytest.importorskip("xxhash")

from babyllama.cli import main  # noqa: E402
from babyllama.data import datatrove_engine as dt  # noqa: E402
from babyllama.data.clean import prepare  # noqa: E402
from babyllama.data.pretokenize import pretokenize  # noqa: E402
from babyllama.data.shards import TokenWindows, read_manifest  # noqa: E402
from babyllama.errors import UserError  # noqa: E402

CHARS = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
GOOD = [f"第{i}篇：长城始建于春秋战国时期，“秦时明月汉时关”。" for i in range(1000)]
GOOD_LINES = [f"第{i}行：今天天气很好，我们去公园散步吧。" for i in range(100)]


def shingles(text: str, n: int = 5) -> set[str]:
    return {text[i : i + n] for i in range(len(text) - n + 1)}


def jaccard(a: str, b: str) -> float:
    x, y = shingles(a), shingles(b)
    return len(x & y) / len(x | y)


def edited(rng: random.Random, text: str, changes: int) -> str:
    """text with `changes` characters replaced at evenly spread places (each kills 5 shingles)."""
    chars = list(text)
    for i in range(changes):
        j = (i * len(chars)) // changes + rng.randrange(len(chars) // changes)
        chars[j] = rng.choice(CHARS)
    return "".join(chars)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """4 files: 400 distinct documents of 200 random characters; 100 near copies at 5-gram Jaccard
    >= 0.9 (1 character changed) and 100 edited copies at Jaccard <= 0.6 (12 changed), each placed after
    its original, often in a later file; 20 exact copies; 8 too short; 4 unparsable lines."""
    rng = random.Random(7)
    base = ["".join(rng.choices(CHARS, k=200)) for _ in range(400)]
    above = [(i, edited(rng, base[i], 1)) for i in rng.sample(range(400), 100)]
    below = [(i, edited(rng, base[i], 12)) for i in rng.sample(range(400), 100)]
    exact = [(i, base[i]) for i in rng.sample(range(400), 20)]
    assert min(jaccard(base[i], t) for i, t in above) >= 0.9
    assert max(jaccard(base[i], t) for i, t in below) <= 0.6
    order = [(i, t) for i, t in enumerate(base)]
    for i, t in above + below + exact:  # somewhere after the original
        order.insert(rng.randrange(order.index((i, base[i])) + 1, len(order) + 1), (i, t))
    d = tmp_path_factory.mktemp("corpus")
    texts = [t for _, t in order]
    for f in range(4):
        part = texts[f * len(texts) // 4 : (f + 1) * len(texts) // 4] + ["短文"] * 2
        lines = [json.dumps({"text": t}, ensure_ascii=False) for t in part] + ["{not json"]
        (d / f"in{f}.jsonl").write_text("\n".join(lines) + "\n")
    planted = {"distinct": set(base) | {t for _, t in below}, "above": {t for _, t in above}}
    return d, sorted(str(p) for p in d.glob("*.jsonl")), planted


def kept_documents(out: Path) -> list[str]:
    return [json.loads(line)["text"] for f in sorted(out.glob("part_*.jsonl")) for line in f.open()]


def local(tasks: int, workers: int = 1) -> dt.Launch:
    return dt.Launch(executor="local", tasks=tasks, workers=workers)


@pytest.fixture(scope="module")
def both(corpus, tmp_path_factory):
    """prepare's output through the embedded path and through datatrove (4 tasks, 2 workers)."""
    d, files, _ = corpus
    out = tmp_path_factory.mktemp("prepared")
    embedded = prepare(files, out / "embedded")
    datatrove = dt.prepare(files, out / "datatrove", local(4, 2))
    return out, embedded, datatrove


def test_datatrove_and_embedded_keep_the_same_documents(corpus, both):
    _, _, planted = corpus
    out, embedded, datatrove = both
    a, b = kept_documents(out / "embedded"), kept_documents(out / "datatrove")
    disagree = set(a) ^ set(b)
    assert len(disagree) <= 0.01 * len(set(a) | set(b)), f"{len(disagree)} documents kept by one path only"
    for kept in (set(a), set(b)):
        assert len(planted["above"] & kept) <= 0.05 * len(planted["above"])  # >= 95% of near copies removed
        assert len(planted["distinct"] - kept) < 0.01 * len(planted["distinct"])  # < 1% of distinct ones
    assert len(b) == len(set(b))  # the 20 exact copies are gone
    for key in ("records", "bad", "too_short", "exact_duplicates"):
        assert embedded["total"][key] == datatrove["total"][key], key
    assert datatrove["total"] | {"near_duplicates": 0, "kept": 0, "characters": 0} == {
        "records": 620 + 8 + 4, "bad": 4, "too_short": 8, "exact_duplicates": 20, "near_duplicates": 0, "kept": 0,
        "characters": 0}
    assert datatrove["total"]["kept"] == len(b) and datatrove["total"]["characters"] == sum(map(len, b))
    bad = sorted(line.split(": ")[0] for line in (out / "datatrove" / "bad_records.txt").read_text().splitlines())
    assert bad == sorted(str(Path(f).resolve()) + ":" + str(len(Path(f).read_text().splitlines()))
                         for f in corpus[1])
    assert not (out / "datatrove" / "datatrove" / "clean").exists()  # the work files are removed


def test_kept_documents_stay_in_corpus_order(both):
    out, _, _ = both
    a, b = kept_documents(out / "embedded"), kept_documents(out / "datatrove")
    common = set(a) & set(b)
    assert [t for t in a if t in common] == [t for t in b if t in common]  # corpus order, both ways


def split_documents(tokens_dir: Path, split: str) -> Counter:
    """Every document of a split (its ids up to and with <eos>) as a multiset."""
    m = read_manifest(tokens_dir)
    eos, docs = m["tokenizer"]["eos_id"], Counter()
    for s in m["shards"]:
        if s["split"] == split:
            ids = np.fromfile(tokens_dir / s["file"], dtype=m["dtype"])
            ends = np.flatnonzero(ids == eos) + 1
            docs.update(tuple(x) for x in np.split(ids, ends)[:-1])
    return docs


def test_pretokenize_through_datatrove_makes_the_same_documents(both, tmp_path, bpe_tokenizer):
    out, _, _ = both
    bpe_tokenizer.save(tmp_path / "tok")
    parts = [str(out / "datatrove")]  # 4 part files, one per task
    embedded = pretokenize(parts, str(tmp_path / "tok"), tmp_path / "embedded", val_fraction=0.1)
    manifest = dt.pretokenize(parts, str(tmp_path / "tok"), tmp_path / "datatrove", local(3, 2), val_fraction=0.1)
    assert manifest["totals"] == embedded["totals"]
    assert len({s["file"] for s in manifest["shards"] if s["split"] == "train"}) == 3
    for split in ("train", "val"):
        assert split_documents(tmp_path / "datatrove", split) == split_documents(tmp_path / "embedded", split)
        assert sum(split_documents(tmp_path / "datatrove", split).values()) == manifest["totals"][split]["documents"]
    windows = TokenWindows(tmp_path / "datatrove", seq_len=32)  # what pretrain reads
    assert len(windows) == sum(s["tokens"] // 33 for s in manifest["shards"] if s["split"] == "train")


def test_pretokenize_through_datatrove_skips_and_counts_empty_records(tmp_path, bpe_tokenizer):
    """As the embedded engine: an empty or blank record is no document (it was a lone <eos>), counted per source."""
    bpe_tokenizer.save(tmp_path / "tok")
    f = tmp_path / "in" / "e.jsonl"
    f.parent.mkdir()
    f.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in ["", *GOOD[:3], " \n", "\u200b"]))
    embedded = pretokenize([str(f)], str(tmp_path / "tok"), tmp_path / "embedded", val_fraction=0)
    manifest = dt.pretokenize([str(f)], str(tmp_path / "tok"), tmp_path / "datatrove", local(1), val_fraction=0)
    source = manifest["sources"][str(f.resolve())]
    assert (source["records"], source["bad"], source["empty"]) == (6, 0, 3)
    assert source == embedded["sources"][str(f)] and manifest["totals"] == embedded["totals"]
    assert manifest["totals"]["train"]["documents"] == 3
    f.write_text('{"text": ""}\n')
    with pytest.raises(UserError, match="^the one record has no text: 1 empty; nothing was written.$"):
        dt.pretokenize([str(f)], str(tmp_path / "tok"), tmp_path / "none", local(1), val_fraction=0)


def test_pretokenize_through_datatrove_ends_with_its_docs_tokens_time_and_tokens_per_second(tmp_path, bpe_tokenizer,
                                                                                          caplog):
    """The embedded engine's bar ends with `30 docs, 1,234 tokens/s`; pretokenize --engine datatrove ended with the
    last stage's `stage finish done in 0.0 s`: no count, time nor rate. It says them as prepare --engine datatrove
    does, counted as the bar counts (docs, tokens/s), and a rerun with nothing left to do says so."""
    bpe_tokenizer.save(tmp_path / "tok")
    f = tmp_path / "in" / "e.jsonl"
    f.parent.mkdir()
    f.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in GOOD[:30]))
    caplog.set_level(logging.INFO, logger=dt.__name__)
    manifest = dt.pretokenize([str(f)], str(tmp_path / "tok"), tmp_path / "out", local(1), val_fraction=0)
    tokens = manifest["totals"]["train"]["tokens"]
    assert tokens > 1000 and manifest["totals"]["train"]["documents"] == 30
    assert re.fullmatch(rf"30 docs, {tokens:,} tokens in {manifest['seconds']:.1f} s: [\d,]+ tokens/s",
                        caplog.messages[-1]), caplog.messages[-1]
    caplog.clear()
    dt.pretokenize([str(f)], str(tmp_path / "tok"), tmp_path / "out", local(1), val_fraction=0)
    assert caplog.messages[-1] == (f"30 docs, {tokens:,} tokens, read by an earlier run with the same settings in "
                                   f"{manifest['seconds']:.1f} s; nothing left to do.")


def test_pretrain_reads_the_datatrove_shards(both, tmp_path, bpe_tokenizer):
    from babyllama.config import load_config
    from babyllama.train.stages import pretrain

    out, _, _ = both
    bpe_tokenizer.save(tmp_path / "tok")
    dt.pretokenize([str(out / "datatrove")], str(tmp_path / "tok"), tmp_path / "tokens", local(2), val_fraction=0.1)
    tiny = ["--model.dim", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--model.n_kv_heads", "2",
            "--model.vocab_size", "600", "--model.max_seq_len", "32", "--model.multiple_of", "16",
            "--max_steps", "2", "--batch_size", "2", "--eval_every", "0", "--save_every", "0", "--warmup_steps", "1"]
    pretrain(load_config(None, [*tiny, "--data", str(tmp_path / "tokens"), "--out_dir", str(tmp_path / "run")]))
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) >= 2


def outputs(out: Path) -> dict[str, str]:
    """Every output file's content; stats.json without its timing."""
    files = {f.name: f.read_text() for f in out.iterdir() if f.is_file() and not f.name.startswith(".")}
    stats = json.loads(files.pop("stats.json"))
    stats.pop("seconds")
    return {**files, "stats.json": json.dumps(stats)}


def test_a_killed_run_resumes_to_the_same_output(corpus, both, tmp_path, monkeypatch, caplog):
    _, files, _ = corpus
    out, _, _ = both
    write_run, finished = dt.WriteParts.run, []

    def dies_on_task_2(self, data, rank=0, world_size=1):
        if rank == 2:
            raise RuntimeError("killed")
        write_run(self, data, rank, world_size)
        finished.append(rank)

    monkeypatch.setattr(dt.WriteParts, "run", dies_on_task_2)
    with pytest.raises(RuntimeError, match="killed"):
        dt.prepare(files, tmp_path / "run", local(4))
    assert finished == [0, 1] and not (tmp_path / "run" / "stats.json").exists()

    read_calls, read_run = [], dt.ReadCorpus.run

    def counted_read(self, *args, **kwargs):
        read_calls.append(1)
        yield from read_run(self, *args, **kwargs)

    def counted_write(self, data, rank=0, world_size=1):
        write_run(self, data, rank, world_size)
        finished.append(rank)

    monkeypatch.setattr(dt.ReadCorpus, "run", counted_read)
    monkeypatch.setattr(dt.WriteParts, "run", counted_write)
    settings = tmp_path / "run" / dt.STAGE / "datatrove" / "settings.json"
    first = json.loads(settings.read_text())
    settings.write_text(json.dumps({**first, "started": first["started"] - 1000}))  # killed 1000 s ago
    caplog.set_level(logging.INFO, logger=dt.__name__)
    stats = dt.prepare(files, tmp_path / "run", local(4))
    assert read_calls == [] and finished == [0, 1, 2, 3]  # finished stages and tasks are skipped
    assert outputs(tmp_path / "run") == outputs(out / "datatrove")
    # was "N records in 1000.5 s: 1 records/s", the earlier run's time and the time between in it
    assert stats["seconds"] > 1000 and re.fullmatch(
        rf"{stats['total']['records']} records in {stats['seconds']:.1f} s since an earlier run with the same settings "
        r"started, whose finished tasks this one kept; this run took \d+\.\d s\.", caplog.messages[-1])
    assert float(caplog.messages[-1].split("this run took ")[1].split()[0]) < 100
    caplog.clear()
    dt.prepare(files, tmp_path / "run", local(4))  # done: nothing left to do
    assert caplog.messages[-1] == (f"{stats['total']['records']} records, read by an earlier run with the same "
                                   f"settings in {stats['seconds']:.1f} s; nothing left to do.")


SLOW_READS = """
import pathlib, sys, time

from babyllama.data import datatrove_engine


def slow(self, data=None, rank=0, world_size=1):  # each read task says it started, then takes a minute
    (pathlib.Path({marks!r}) / str(rank)).touch()
    time.sleep(60)
    yield from ()


datatrove_engine.ReadCorpus.run = slow  # here, and in the forkserver, which imports this file as __mp_main__
if __name__ == "__main__":
    from babyllama.cli import main

    sys.exit(main(sys.argv[1:]))
"""


def in_group(pgid: int) -> list[int]:
    """The live processes (not zombies) of process group pgid."""
    found = []
    for proc_stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = proc_stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
        except (OSError, IndexError):  # ended meanwhile
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(proc_stat.parent.name))
    return found


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_a_local_run_killed_by_sigkill_leaves_no_process_and_frees_its_out_dir(corpus, tmp_path):
    """kill -9 of a local run of several workers left datatrove's Manager (forked from it, the out_dir's lock
    inherited) running for ever, and with it the forkserver: a rerun was refused, "in use by" the dead process;
    the workers ran their tasks on to the end. Now every process of the run ends with it, within seconds."""
    import signal
    import time
    from contextlib import suppress

    from babyllama.lock import holding

    _, files, _ = corpus
    out = tmp_path / "out"
    proc = workers_in_tasks(tmp_path, files[:2], stderr=subprocess.DEVNULL)
    try:
        proc.kill()
        proc.wait()
        deadline = time.time() + 10
        while (left := in_group(proc.pid)) and time.time() < deadline:
            time.sleep(0.1)
        assert left == []
        with holding(out, "prepare"):  # free: a rerun may start
            pass
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def workers_in_tasks(tmp_path: Path, files: list[str], stderr: int) -> subprocess.Popen:
    """`prepare --engine datatrove --workers 2` of files into tmp_path/out, in a session of its own, once both
    workers are inside a task (SLOW_READS marks each start)."""
    import time

    marks, script = tmp_path / "started", tmp_path / "slow_reads.py"
    marks.mkdir()
    script.write_text(SLOW_READS.format(marks=str(marks)))
    proc = subprocess.Popen([sys.executable, str(script), "prepare", "--input", *files, "--out_dir",
                             str(tmp_path / "out"), "--engine", "datatrove", "--workers", "2"],
                            start_new_session=True, text=True, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.time() + 60
    while len(list(marks.iterdir())) < 2:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError("the workers never started their tasks")
        time.sleep(0.1)
    return proc


def deaf_to_sigint(pid: int) -> bool:
    """Whether process pid blocks or ignores SIGINT (SigBlk, SigIgn of /proc/PID/status)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return any(int(fields[key], 16) >> (2 - 1) & 1 for key in ("SigBlk", "SigIgn"))  # SIGINT is 2


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_ctrl_c_of_a_local_run_is_the_main_processs_alone(corpus, tmp_path):
    """The local executor's pool workers, forked from multiprocess's forkserver, handled SIGINT as the main process
    does: a terminal's Ctrl-C, which reaches the whole group, printed a KeyboardInterrupt traceback from each worker
    that was importing or unpickling its task. The forkserver starts with SIGINT blocked now, and so does every
    worker it forks: the main process alone takes Ctrl-C, says its line and ends the others."""
    import signal
    import time
    from contextlib import suppress

    _, files, _ = corpus
    proc = workers_in_tasks(tmp_path, files[:2], stderr=subprocess.PIPE)
    try:
        others = [pid for pid in in_group(proc.pid) if pid != proc.pid]  # forkserver, workers, Manager, tracker
        assert len(others) >= 4 and [pid for pid in others if not deaf_to_sigint(pid)] == []
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "Traceback" not in err, err
        assert err.splitlines()[-1] == "babyllama: interrupted; run the same command to continue."
        deadline = time.time() + 10
        while (left := in_group(proc.pid)) and time.time() < deadline:
            time.sleep(0.1)
        assert left == []
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_killed_run_leaves_the_earlier_output_until_it_is_resumed(tmp_path, monkeypatch):
    """The stages write into OUT/.incomplete: a run killed halfway leaves the earlier output in OUT as it was, and
    the same command resumes the run there and only then replaces it."""
    (tmp_path / "a.txt").write_text("\n".join(GOOD_LINES[:30]) + "\n")
    out = tmp_path / "out"
    dt.prepare([str(tmp_path / "a.txt")], out, local(1), dedup="none")
    before = outputs(out)
    (tmp_path / "a.txt").write_text("\n".join(GOOD_LINES[:20]) + "\n")

    def dies(self, data, rank=0, world_size=1):
        raise RuntimeError("killed")

    monkeypatch.setattr(dt.WriteParts, "run", dies)
    with pytest.raises(RuntimeError, match="killed"):
        dt.prepare([str(tmp_path / "a.txt")], out, local(1), dedup="none")
    assert outputs(out) == before and json.loads(before["stats.json"])["total"]["kept"] == 30
    assert (out / ".incomplete" / "datatrove" / "settings.json").is_file()
    monkeypatch.undo()
    assert dt.prepare([str(tmp_path / "a.txt")], out, local(1), dedup="none")["total"]["kept"] == 20
    assert json.loads(outputs(out)["stats.json"])["total"]["kept"] == 20
    assert outputs(out)["part_00000_00000.jsonl"].count("\n") == 20
    assert not (out / ".incomplete").exists() and (out / "datatrove" / dt.FINISHED).is_file()


def test_a_stage_says_every_30_s_how_many_tasks_are_done_and_their_documents(tmp_path, monkeypatch, caplog):
    """A stage printed its first line, then nothing until it ended (133 s of silence at 480 MB, hours at 200 GB):
    a line every progress.LINE_EVERY_S (here 0.05 s) counts its tasks done and the documents they read."""
    import logging
    import time

    from babyllama import progress

    (tmp_path / "a.txt").write_text("\n".join(GOOD_LINES[:20]) + "\n")
    (tmp_path / "b.txt").write_text("\n".join(GOOD_LINES[20:30]) + "\n")
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.05)
    real = dt.WriteParts.run

    def slow(self, data, rank=0, world_size=1):
        time.sleep(0.5)  # a task that takes a while: lines come meanwhile
        return real(self, data, rank, world_size)

    monkeypatch.setattr(dt.WriteParts, "run", slow)
    with caplog.at_level(logging.INFO, logger="babyllama.data.datatrove_engine"):
        dt.prepare([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], tmp_path / "out", local(2), dedup="none")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stage 1/2 read: ")]
    assert lines[0] == "stage 1/2 read: 2 tasks" and len(lines) >= 4, lines
    assert re.fullmatch(r"stage 1/2 read: 0 of 2 tasks done, \d+ s", lines[1]), lines
    assert any(re.fullmatch(r"stage 1/2 read: 1 of 2 tasks done \(20 documents\), \d+ s", x) for x in lines), lines


def test_its_lists_of_bad_records_end_as_the_embedded_engine_s(tmp_path, monkeypatch, caplog, bpe_tokenizer):
    """The console list of bad records (each task shows 20) ended without the count of those it did not show, and
    bad_records.txt joined the tasks' lists whole; both end as the embedded engine's now: the console counts the
    rest, and the file lists the first MAX_LISTED (here 3), then counts the rest."""
    import logging

    from babyllama.data import sources

    for module in (sources, dt):  # the tasks' readers (workers 1: in this process) and the finish
        monkeypatch.setattr(module, "MAX_LISTED", 3)
    d = tmp_path / "in"
    d.mkdir()
    for i in range(25):  # 50 bad records, two tasks of 20 shown
        (d / f"f{i:02}.jsonl").write_text(json.dumps({"text": GOOD_LINES[i]}, ensure_ascii=False) + "\n{bad\n{bad\n")
    bpe_tokenizer.save(tmp_path / "tok")
    files = sorted(str(f) for f in d.iterdir())
    for out, run in ((tmp_path / "clean", lambda out: dt.prepare(files, out, local(2), dedup="none")),
                     (tmp_path / "tokens", lambda out: dt.pretokenize(files, str(tmp_path / "tok"), out, local(2)))):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="babyllama"):
            run(out)
        assert (out / "bad_records.txt").read_text().splitlines() == [
            f"{d / f}: not valid JSON (Expecting property name enclosed in double quotes)"
            for f in ("f00.jsonl:2", "f00.jsonl:3", "f01.jsonl:2")] + ["... and 47 more bad records (50 in all)"]
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 41 and warnings[-1] == (
            f"... and 10 more bad records (50 in all), the first 3 listed in {out / 'bad_records.txt'}")


def test_a_stage_s_line_says_one_task_and_one_document_in_the_singular(tmp_path):
    """The status line said `0 of 1 tasks done (1 documents)`; its words agree with their numbers now."""
    line = lambda tasks: dt.stage_status("stage 1/2 read", tmp_path, tasks, 5.0)
    assert line(1) == "stage 1/2 read: 0 of 1 task done, 5 s"
    (tmp_path / "completions").mkdir()
    (tmp_path / "completions" / "00000").write_text("")
    (tmp_path / "stats").mkdir()
    (tmp_path / "stats" / "00000.json").write_text(json.dumps([{"stats": {"documents": 1}}]))
    assert line(1) == "stage 1/2 read: 1 of 1 task done (1 document), 5 s"
    (tmp_path / "stats" / "00001.json").write_text(json.dumps([{"stats": {"documents": {"total": 1}}}]))
    (tmp_path / "completions" / "00001").write_text("")
    assert line(2) == "stage 1/2 read: 2 of 2 tasks done (2 documents), 5 s"


def test_a_stage_s_line_counts_the_documents_of_the_tasks_it_counts_done(tmp_path):
    """The documents were those of every statistics file, of tasks not yet marked done too (datatrove writes a task's
    statistics, then marks it done): they are those of the done tasks now. A done task that read no document counts
    none: 7 done tasks of 40,000 documents or none can hold 240,000."""
    (tmp_path / "completions").mkdir()
    (tmp_path / "stats").mkdir()
    for rank, documents in enumerate([40_000] * 6 + [None] + [40_000] * 3 + [43_790]):
        counts = {"documents": documents} if documents else {}
        (tmp_path / "stats" / f"{rank:05d}.json").write_text(json.dumps([{"stats": counts}, {"stats": {}}]))
        if rank < 7:
            (tmp_path / "completions" / f"{rank:05d}").write_text("")
    assert dt.stage_status("stage 1/7 read", tmp_path, 11, 60.0) == ("stage 1/7 read: 7 of 11 tasks done (240,000 "
                                                                      "documents), 60 s")


def test_datatrove_draws_none_of_its_bars(corpus, tmp_path, capsys):
    """Its bars count files and queues (`Initializing pq...: 6/6`, a `0/1 ... 1/1 [00:00, 29330 it/s]` bar or two
    a task of the unique stage, `Reading dup files: 9/9`): a dozen lines of the console a stage, now none."""
    _, files, _ = corpus
    dt.prepare(files[:2], tmp_path / "out", local(2))  # every stage in this process: its bars on sys.stderr
    err = capsys.readouterr().err
    assert "it/s]" not in err and "%|" not in err, err


def test_a_task_without_near_duplicates_says_nothing_of_it(tmp_path, capsys):
    """MinHash's filter warned `No .remove file for rank=0.` on the console for each task of whose documents none was
    a near duplicate: nothing wrong. It is in the task's log alone now; other warnings still reach the console."""
    rng = random.Random(0)
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("\n".join("".join(chr(rng.randrange(0x4E00, 0x9FA5)) for _ in range(40))
                                               for _ in range(5)) + "\n")
    stats = dt.prepare([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], tmp_path / "out", local(2))
    assert stats["total"]["near_duplicates"] == 0 and "No .remove file" not in capsys.readouterr().err
    logs = (tmp_path / "out" / "datatrove" / "logs").glob("*_write/logs/task_*.log")
    assert sum("No .remove file for rank=" in f.read_text() for f in logs) == 2
    from loguru import logger

    dt._default_logger()  # datatrove's console logger between tasks: the same filter
    logger.warning("No .remove file for rank=3.")
    logger.warning("No .clusters file for rank=3.")
    assert capsys.readouterr().err.endswith(" - No .clusters file for rank=3.\n")


def test_other_settings_or_changed_inputs_start_anew_unless_a_run_is_unfinished(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("\n".join(GOOD_LINES[:30]) + "\n")
    first = dt.prepare([str(tmp_path / "a.txt")], tmp_path / "out", local(1), dedup="none")
    assert first["total"]["kept"] == 30
    (tmp_path / "a.txt").write_text("\n".join(GOOD_LINES[:20]) + "\n")  # the input changed: not stale output
    assert dt.prepare([str(tmp_path / "a.txt")], tmp_path / "out", local(1), dedup="none")["total"]["kept"] == 20
    assert dt.prepare([str(tmp_path / "a.txt")], tmp_path / "out", local(1), dedup="exact")["total"]["kept"] == 20

    def dies(self, data, rank=0, world_size=1):
        raise RuntimeError("killed")

    monkeypatch.setattr(dt.WriteParts, "run", dies)
    with pytest.raises(RuntimeError):
        dt.prepare([str(tmp_path / "a.txt")], tmp_path / "out", local(1), dedup="none")
    monkeypatch.undo()
    with pytest.raises(UserError, match="unfinished datatrove run with other dedup"):
        dt.prepare([str(tmp_path / "a.txt")], tmp_path / "out", local(1), dedup="exact")


def test_user_mistakes_are_one_sentence_without_a_traceback(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "x.bak").write_text("text")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    for name, fragment in (("empty.jsonl", "hold no records"), ("x.bak", "unknown file type"),
                           ("bad.jsonl", "the one record was bad (")):
        code = main(["prepare", "--input", str(tmp_path / name), "--out_dir", str(tmp_path / f"o_{name}"),
                     "--engine", "datatrove"])
        err = capsys.readouterr().err
        assert code == 2 and fragment in err and "Traceback" not in err, name
    assert main(["prepare", "--input", str(tmp_path / "bad.jsonl"), "--out_dir", str(tmp_path / "e"),
                 "--executor", "slurm"]) == 2
    assert "--executor needs --engine datatrove" in capsys.readouterr().err
    assert main(["prepare", "--input", str(tmp_path / "bad.jsonl"), "--out_dir", str(tmp_path / "e"),
                 "--workers", "4"]) == 2  # the embedded prepare has one process: not silently ignored
    assert "--workers needs --engine datatrove" in capsys.readouterr().err
    assert main(["prepare", "--input", str(tmp_path / "bad.jsonl"), "--out_dir", str(tmp_path / "e"),
                 "--engine", "datatrove", "--executor", "slurm", "--slurm_partition", "cpu"]) == 2
    assert "sbatch, which is not on this machine's PATH" in capsys.readouterr().err


def test_the_default_engine_clears_what_a_datatrove_run_left(corpus, tmp_path):
    _, files, _ = corpus
    dt.prepare(files, tmp_path, local(4), dedup="none")
    stats = prepare(files, tmp_path, dedup="none")
    assert sorted(f.name for f in tmp_path.glob("part_*.jsonl")) == stats["files"] == ["part_00000.jsonl"]
    assert not (tmp_path / "datatrove").exists()


def test_a_file_named_twice_is_read_once(corpus, tmp_path):
    _, files, _ = corpus  # as by the local engine (sources.expand_inputs)
    stats = dt.prepare([files[0], files[0]], tmp_path, local(2))
    source = stats["sources"][str(Path(files[0]).resolve())]
    assert source["records"] == 158 and source["too_short"] == 2 and source["kept"] > 100


def test_a_file_s_schema_is_the_one_of_most_of_its_records_as_on_the_embedded_engine(tmp_path):
    """The stats of one file were added up over the tasks that read it, keeping the last task's schema, not the
    schema of most of its records. A file is one task's (its real path once, however it is spelled), so its schema
    is the one its reader counted most: the embedded engine's, here text, whose first record is wudao's."""
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"title": "标题", "content": GOOD_LINES[0]}, *({"text": t} for t in GOOD_LINES[1:4]), {"x": 1}]) + "\n")
    (tmp_path / "b.txt").write_text("\n".join(GOOD_LINES[4:8]) + "\n")
    (tmp_path / "x").mkdir()
    inputs = [str(mixed), str(tmp_path / "x" / ".." / "mixed.jsonl"), str(tmp_path / "b.txt")]
    ours = dt.prepare(inputs, tmp_path / "dt", local(3), dedup="none")["sources"]
    embedded = prepare(inputs, tmp_path / "embedded", dedup="none")["sources"]
    assert [(s["schema"], s["records"], s["bad"]) for s in ours.values()] == \
        [(s["schema"], s["records"], s["bad"]) for s in embedded.values()] == [("text", 5, 1), ("text", 4, 0)]


def test_chunked_minhash_signature_equals_datatrove_s():
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

    config = dt.minhash_config(0.8)
    ours = dt.MinhashSignature("/tmp/unused", config, language=dt.Characters())
    theirs = MinhashDedupSignature("/tmp/unused", config, language=dt.Characters())
    shingles = ours.get_shingles("".join(GOOD) * 3)  # ~90,000 shingles: many chunks
    assert len(shingles) > 10_000 and ours.get_signature(shingles) == theirs.get_signature(shingles)


def test_minhash_shingles_are_datatrove_s_made_a_piece_of_the_key_at_a_time(monkeypatch):
    """datatrove's shingles of a document held each character of its dedup key as a string and each hash as a Python
    int (a 12.5 M-character document took its signature stage to 1.9 GB): they are made a piece of the key at a time
    into an array, the same values (keys shorter than 5 characters have none), in ~8 bytes a character, not ~100."""
    import tracemalloc

    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

    from babyllama.data import clean

    config = dt.minhash_config(0.8)
    ours = dt.MinhashSignature("/tmp/unused", config, language=dt.Characters())
    theirs = MinhashDedupSignature("/tmp/unused", config, language=dt.Characters())
    texts = ["", "短", "今天，好", "今天，天气好", " Hello, world -5 1.5 今天，天气很好。 ", "".join(GOOD[:200])]
    expected = [theirs.get_shingles(t) for t in texts]
    assert [len(x) for x in expected[:4]] == [0, 0, 0, 1]
    for size in (1, 2, 7, 1 << 20):
        monkeypatch.setattr(clean, "KEY_PIECE_CHARS", size)
        for text, shingles in zip(texts, expected, strict=True):
            got = ours.get_shingles(text)
            assert got.shape == shingles.shape and (got == shingles).all(), (size, text[:20])
    monkeypatch.setattr(clean, "KEY_PIECE_CHARS", 1 << 12)
    text = "".join(GOOD) * 3
    peaks = []
    for signature in (ours, theirs):
        tracemalloc.start()
        try:
            shingles = signature.get_shingles(text)
            peaks.append(tracemalloc.get_traced_memory()[1] / len(text))
        finally:
            tracemalloc.stop()
    assert len(shingles) > 60_000 and peaks[0] < 12 < 50 < peaks[1], peaks  # bytes a character: 8.2 and 97


def fake_slurm(bin_dir: Path, log: Path) -> None:
    """sbatch that records each script it is given and its arguments; srun that runs its command; scontrol
    that names this machine."""
    bin_dir.mkdir()
    log.mkdir()
    (bin_dir / "sbatch").write_text(f"""#!/bin/sh
n=$(ls {log} | wc -l)
cp "$(eval echo \\${{$#}})" {log}/$n.sh
echo "$@" > {log}/$n.args
echo "Submitted batch job $((100 + n))"
""")
    (bin_dir / "srun").write_text('#!/bin/sh\nwhile [ "$1" != launch_pickled_pipeline ]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node1\n")  # show hostnames
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)


def submitted(log: Path) -> list[tuple[int, str, str]]:
    """(job id, script, sbatch arguments) of each stage's job array, in submission order (datatrove's
    stats-merging jobs left out)."""
    jobs = sorted((int(f.stem), f.read_text(), f.with_suffix(".args").read_text()) for f in log.glob("*.sh"))
    return [(100 + n, s, a) for n, s, a in jobs if "launch_pickled_pipeline" in s]


def every_job(log: Path) -> list[str]:
    """The id of every job submitted, stages' arrays and datatrove's stats-merging jobs, in submission order."""
    return [str(100 + n) for n in sorted(int(f.stem) for f in log.glob("*.sh"))]


def test_slurm_submits_one_dependent_job_array_per_stage(corpus, tmp_path, monkeypatch):
    _, files, _ = corpus
    fake_slurm(tmp_path / "bin", tmp_path / "jobs")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert main(["prepare", "--input", *files, "--out_dir", str(tmp_path / "out"), "--engine", "datatrove",
                 "--executor", "slurm", "--slurm_partition", "cpu", "--tasks", "2"]) == 0
    jobs = submitted(tmp_path / "jobs")
    names = [s.split("--job-name=babyllama-")[1].split()[0] for _, s, _ in jobs]
    assert names == ["1_read", "2_exact", "3_unique", "4_buckets", "5_cluster", "6_write", "7_finish"]
    arrays = [s.split("#SBATCH --array=")[1].split()[0] for _, s, _ in jobs]
    assert arrays == ["0-1", "0-0", "0-1", "0-8", "0-0", "0-1", "0-0"]  # tasks, 1, tasks, bands, 1, tasks, 1
    assert all("#SBATCH --partition=cpu" in s and f"source {sys.prefix}/bin/activate" in s for _, s, _ in jobs)
    assert "--dependency" not in jobs[0][2]
    for (before, _, _), (_, _, args) in zip(jobs[:-1], jobs[1:], strict=True):
        assert f"--dependency=afterok:{before}" in args  # every stage waits for the one before


def test_a_second_slurm_submission_is_refused_while_the_first_is_queued(corpus, tmp_path, monkeypatch, capsys,
                                                                         bpe_tokenizer):
    """squeue (fake) lists the first submission's jobs: a second one, of either command (each in its own folder),
    submits nothing; once they have left the queue (failed, say), the same command submits again to do what is
    left."""
    _, files, _ = corpus
    fake_slurm(tmp_path / "bin", tmp_path / "jobs")
    (tmp_path / "bin" / "squeue").write_text(f"#!/bin/sh\ncat {tmp_path / 'queue'}\n")  # what is in the queue
    (tmp_path / "bin" / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "out"
    args = ["prepare", "--input", *files, "--out_dir", str(out), "--engine", "datatrove", "--dedup", "exact",
            "--executor", "slurm", "--slurm_partition", "cpu", "--tasks", "2"]
    assert main(args) == 0
    first = [str(j) for j, _, _ in submitted(tmp_path / "jobs")]
    assert json.loads((out / "datatrove" / "slurm_jobs.json").read_text())["jobs"] == every_job(tmp_path / "jobs")
    (tmp_path / "queue").write_text(f"{first[0]}_1\n{first[1]}\n{first[2]}\n")  # a task of the first running
    capsys.readouterr()
    bpe_tokenizer.save(tmp_path / "tok")
    tokens = ["pretokenize", "--input", *files, "--out_dir", str(out), "--tokenizer", str(tmp_path / "tok"),
              "--engine", "datatrove", "--executor", "slurm", "--slurm_partition", "cpu"]
    def queued(folder: Path, jobs: list[str]) -> str:
        return (f"babyllama: error: {folder} has Slurm jobs of an earlier submission still queued or running "
                f"({', '.join(jobs)}); wait for them (squeue --me) or cancel them (scancel {' '.join(jobs)}) "
                "before running there again.\n")

    for command in (args, [*args[:args.index("--executor")], "--tasks", "2"]):  # and on the local executor
        assert main(command) == 2
        assert capsys.readouterr().err == queued(out, first[:3])
    assert main(tokens) == 2  # pretokenize never writes into prepare's folder, queued or not
    assert capsys.readouterr().err == (f"babyllama: error: --out_dir {out} is the work folder of prepare --engine "
                                       "datatrove, which token shards must not be written into; pass another "
                                       "--out_dir.\n")
    assert [str(j) for j, _, _ in submitted(tmp_path / "jobs")] == first  # nothing more submitted
    tokens[tokens.index(str(out))] = str(tmp_path / "tokens")  # into its own folder: a second is refused
    assert main(tokens) == 0
    mine = [str(j) for j, _, _ in submitted(tmp_path / "jobs")][len(first):]
    (tmp_path / "queue").write_text(f"{first[0]}_1\n{first[1]}\n{first[2]}\n{mine[0]}\n")
    capsys.readouterr()
    assert main(tokens) == 2
    assert capsys.readouterr().err == queued(tmp_path / "tokens", mine[:1])
    before = len(every_job(tmp_path / "jobs"))
    (tmp_path / "queue").write_text("")  # they failed and left the queue
    assert main(args) == 0
    again = every_job(tmp_path / "jobs")[before:]
    assert len(again) == 2 * len(first)  # each array and its stats-merging job
    assert json.loads((out / "datatrove" / "slurm_jobs.json").read_text())["jobs"] == again


def test_a_datatrove_whose_slurm_launch_changed_is_refused_before_anything_is_submitted(corpus, tmp_path,
                                                                                         monkeypatch, capsys):
    """submit replaces datatrove's internal launch_slurm_job(launch_file_contents, job_id_retriever, *args) to record
    each job id: a datatrove whose function takes other arguments would submit jobs that are recorded nowhere, or
    fail part way; it is refused with one sentence naming its version, before any sbatch."""
    import importlib.metadata

    import datatrove.executor.slurm

    _, files, _ = corpus
    fake_slurm(tmp_path / "bin", tmp_path / "jobs")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(datatrove.executor.slurm, "launch_slurm_job", lambda contents, *args, retries=3: "1")
    assert main(["prepare", "--input", *files, "--out_dir", str(tmp_path / "out"), "--engine", "datatrove",
                 "--executor", "slurm", "--slurm_partition", "cpu", "--tasks", "2"]) == 2
    assert capsys.readouterr().err == (
        f"babyllama: error: datatrove {importlib.metadata.version('datatrove')} submits Slurm jobs otherwise than the "
        "datatrove 0.10 that babyllama records their job ids with (its launch_slurm_job changed); install datatrove "
        "0.10 (pip install 'datatrove>=0.10,<0.11') for --executor slurm.\n")
    assert submitted(tmp_path / "jobs") == []


def test_a_failed_sbatch_is_one_sentence_and_the_jobs_it_queued_are_kept(corpus, tmp_path, monkeypatch, capsys):
    """sbatch refuses its 3rd job (a limit of jobs): was datatrove's CalledProcessError traceback, exit 1, with the 2
    jobs queued before (stage 1's array and its stats-merging job) recorded nowhere, so a rerun submitted a whole new
    chain into the same folder while they were queued. A refused first job submits nothing."""
    _, files, _ = corpus
    fake_slurm(tmp_path / "bin", tmp_path / "jobs")
    sbatch = tmp_path / "bin" / "sbatch"
    limit = ('[ "$(ls {log} | wc -l)" -ge {n} ] && {{ echo "sbatch: error: QOSMaxSubmitJobPerUserLimit" >&2; '
             'echo "sbatch: error: Batch job submission failed: Job violates accounting/QOS policy" >&2; exit 1; }}\n')
    script = sbatch.read_text()
    sbatch.write_text(script.replace("\n", "\n" + limit.format(log=tmp_path / "jobs", n=4), 1))  # 2 files a job
    (tmp_path / "bin" / "squeue").write_text(f"#!/bin/sh\ncat {tmp_path / 'queue'}\n")
    (tmp_path / "bin" / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "out"
    args = ["prepare", "--input", *files, "--out_dir", str(out), "--engine", "datatrove", "--executor", "slurm",
            "--slurm_partition", "cpu", "--tasks", "2"]
    said = ("sbatch: error: QOSMaxSubmitJobPerUserLimit; sbatch: error: Batch job submission failed: Job violates "
            "accounting/QOS policy")
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"babyllama: error: sbatch refused a job of the submission ({said}) after it had queued 100 102; once they "
        "have left the queue (squeue --me lists them, scancel 100 102 ends them), run the same command again to "
        "submit the rest.\n")
    assert every_job(tmp_path / "jobs") == ["100", "102"]
    assert json.loads((out / "datatrove" / "slurm_jobs.json").read_text())["jobs"] == ["100", "102"]
    (tmp_path / "queue").write_text("100_0\n100_1\n102\n")
    assert main(args) == 2  # refused while they are queued: no second chain
    assert capsys.readouterr().err == (
        f"babyllama: error: {out} has Slurm jobs of an earlier submission still queued or running (100, 102); wait for "
        "them (squeue --me) or cancel them (scancel 100 102) before running there again.\n")
    assert every_job(tmp_path / "jobs") == ["100", "102"]
    sbatch.write_text(script.replace("\n", "\n" + limit.format(log=tmp_path / "jobs", n=0), 1))  # refuses them all
    (tmp_path / "queue").write_text("")
    assert main(args) == 2
    assert capsys.readouterr().err == (f"babyllama: error: sbatch refused the first job of the submission ({said}); "
                                       "nothing was submitted.\n")


def test_slurm_time_is_checked_and_qos_asked_for_only_when_given(corpus, tmp_path, monkeypatch, capsys):
    """--slurm_time banana went into every job script for sbatch to refuse; every script asked for
    --qos=normal (datatrove's default), a QOS that not every cluster has."""
    _, files, _ = corpus
    fake_slurm(tmp_path / "bin", tmp_path / "jobs")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    base = ["prepare", "--input", *files, "--engine", "datatrove", "--executor", "slurm", "--slurm_partition", "cpu",
            "--tasks", "2", "--dedup", "none"]
    with pytest.raises(SystemExit, match="2"):
        main([*base, "--out_dir", str(tmp_path / "bad"), "--slurm_time", "banana"])
    assert capsys.readouterr().err.endswith(
        "error: argument --slurm_time: 'banana' is not a Slurm time limit; give MINUTES, MM:SS, HH:MM:SS, D-HH, "
        "D-HH:MM or D-HH:MM:SS (12:00:00 is 12 hours).\n")
    assert not (tmp_path / "bad").exists() and every_job(tmp_path / "jobs") == []
    for time in ("90", "1:30", "12:00:00", "2-12", "2-12:30", "2-12:30:00", "UNLIMITED"):
        assert main([*base, "--out_dir", str(tmp_path / time), "--slurm_time", time]) == 0
    for bad in ("", "1:2:3:4", "1-", "-5", "12h", "1.5", "1-2-3"):
        with pytest.raises(SystemExit, match="2"):
            main([*base, "--out_dir", str(tmp_path / "bad"), "--slurm_time", bad])
    scripts = [s for _, s, _ in submitted(tmp_path / "jobs")]
    assert [s.split("#SBATCH --time=")[1].split()[0] for s in scripts[::2]] == [
        "90", "1:30", "12:00:00", "2-12", "2-12:30", "2-12:30:00", "UNLIMITED"]  # 2 stages each: read, finish
    assert not any("--qos" in s for s in scripts)
    assert main([*base, "--out_dir", str(tmp_path / "qos"), "--slurm_qos", "high"]) == 0
    assert ["#SBATCH --qos=high" in s for _, s, _ in submitted(tmp_path / "jobs")[len(scripts):]] == [True, True]
    capsys.readouterr()
    assert main([*base[:base.index("--executor")], "--out_dir", str(tmp_path / "q"), "--slurm_qos", "high"]) == 2
    assert capsys.readouterr().err == ("babyllama: error: --slurm_qos needs --executor slurm; the local executor "
                                       "submits nothing to Slurm.\n")


def test_slurm_job_scripts_run_on_the_nodes_make_the_same_output(corpus, tmp_path, monkeypatch):
    """Runs each submitted script as Slurm would (every array index, stage after stage)."""
    _, files, _ = corpus
    fake_slurm(tmp_path / "bin", tmp_path / "jobs")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    args = ["--input", *files, "--engine", "datatrove", "--dedup", "exact", "--tasks", "2"]
    assert main(["prepare", *args, "--out_dir", str(tmp_path / "slurm"), "--executor", "slurm",
                 "--slurm_partition", "cpu"]) == 0
    assert not (tmp_path / "slurm" / "stats.json").exists()  # submitted, not run
    for _, script, _ in submitted(tmp_path / "jobs"):
        n = int(script.split("#SBATCH --array=0-")[1].split()[0]) + 1
        for i in range(n):
            env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(i), "RUN_OFFSET": "0", "SLURM_NODELIST": "node1"}
            r = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
            assert r.returncode == 0, r.stderr[-2000:]
    assert main(["prepare", *args, "--out_dir", str(tmp_path / "local")]) == 0
    slurm, here = outputs(tmp_path / "slurm"), outputs(tmp_path / "local")
    assert slurm.keys() == here.keys() and len(slurm) == 2 + 2  # stats, bad records, a part per task
    assert {k: v for k, v in slurm.items() if k != "stats.json"} == {k: v for k, v in here.items() if k != "stats.json"}
    assert json.loads(slurm["stats.json"])["total"] == json.loads(here["stats.json"])["total"]


def test_ray_runs_the_pipeline_on_a_local_instance(corpus, tmp_path):
    ray = pytest.importorskip("ray")
    _, files, _ = corpus
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        dt.prepare(files, tmp_path / "ray", dt.Launch(executor="ray", tasks=2, workers=2), dedup="exact")
    finally:
        ray.shutdown()
    dt.prepare(files, tmp_path / "local", local(2), dedup="exact")
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "local")


def test_cli_errors_are_one_sentence(corpus, tmp_path, capsys):
    _, files, _ = corpus
    base = ["prepare", "--input", *files, "--out_dir", str(tmp_path), "--engine", "datatrove"]
    assert main([*base, "--executor", "slurm"]) == 2
    assert "--executor slurm needs --slurm_partition" in capsys.readouterr().err
    assert main(["pretokenize", "--input", *files, "--tokenizer", str(tmp_path / "none"), "--out_dir",
                 str(tmp_path / "t"), "--engine", "datatrove", "--sft", "--max_seq_len", "8"]) == 2
    assert "embedded engine only" in capsys.readouterr().err


def test_an_unreachable_ray_address_is_one_sentence_within_seconds(corpus, tmp_path, capsys, monkeypatch):
    import socket
    import time

    _, files, _ = corpus
    with socket.socket() as s:  # a port that nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
            monkeypatch.setenv("RAY_ADDRESS", address)
            start = time.time()
            assert main(["prepare", "--input", *files, "--out_dir", str(tmp_path), "--engine", "datatrove",
                         "--executor", "ray"]) == 2
            assert time.time() - start < 5  # ray.init itself retried for more than 30 s
            assert capsys.readouterr().err == (f"babyllama: error: the Ray cluster at RAY_ADDRESS={address} does not "
                                               "answer (Connection refused); start it there (`ray start --head`), "
                                               "correct RAY_ADDRESS, or unset it to start a local one.\n")
    with pytest.raises(UserError, match="RAY_ADDRESS=head:x is not host:port"):
        dt.check_ray_address("head:x")
    dt.check_ray_address("auto")  # ray finds the cluster itself


def test_a_port_that_answers_but_is_not_ray_is_one_sentence_within_seconds(corpus, tmp_path, capsys, monkeypatch):
    """A port that accepts connections but is no Ray server (here an HTTP server) passed the check, and ray.init
    retried it for minutes ("Failed to connect to GCS") or ended in a traceback, after the run's folder was made."""
    pytest.importorskip("ray")
    import http.server
    import threading
    import time

    _, files, _ = corpus
    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # not on the stderr the test reads
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        for address, what in ((f"127.0.0.1:{port}", "a Ray cluster's GCS"), (f"ray://127.0.0.1:{port}",
                                                                            "a Ray Client server")):
            monkeypatch.setenv("RAY_ADDRESS", address)
            start = time.time()
            assert main(["prepare", "--input", *files, "--out_dir", str(tmp_path / "out"), "--engine", "datatrove",
                         "--executor", "ray"]) == 2
            assert time.time() - start < 8
            err = capsys.readouterr().err
            assert err.startswith(f"babyllama: error: RAY_ADDRESS={address} does not answer as {what} within 5 s (")
            assert err.endswith("); correct RAY_ADDRESS (host:port of the head node's GCS, 6379 by default, or "
                                "ray://host:10001 of Ray Client), or unset it to start a local one.\n")
            assert err.count("\n") == 1 and "HTTP/2" in err  # gRPC's reason: the server does not speak HTTP/2
            assert not (tmp_path / "out").exists()  # nothing written, not even the run's work folder
    finally:
        server.shutdown()
        server.server_close()


def test_a_failing_ray_init_is_one_sentence_and_leaves_nothing(corpus, tmp_path, capsys, monkeypatch, bpe_tokenizer):
    """ray.init raising (ConnectionError: Failed to connect to Ray cluster) was a traceback, with OUT/.incomplete
    left behind."""
    ray = pytest.importorskip("ray")
    _, files, _ = corpus
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    monkeypatch.setattr(dt, "check_ray_address", lambda address: None)
    monkeypatch.setattr(ray, "init", lambda *a, **k: (_ for _ in ()).throw(ConnectionError(
        "Failed to connect to Ray cluster\nmore lines")))
    bpe_tokenizer.save(tmp_path / "tok")
    assert main(["pretokenize", "--input", *files, "--tokenizer", str(tmp_path / "tok"), "--out_dir",
                 str(tmp_path / "out"), "--engine", "datatrove", "--executor", "ray"]) == 2
    assert capsys.readouterr().err == ("babyllama: error: cannot connect to Ray at RAY_ADDRESS=head:6379 (Failed to "
                                       "connect to Ray cluster); check that the cluster runs (`ray status`), or "
                                       "unset RAY_ADDRESS to start a local one.\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("address", ["head", "head:", ":6379", "head:0", "head:65536", "head:x", "http://head:6379",
                                     "ray://head:6379/x", "head:6379?x", "me@head:6379", "he ad:6379", "ray://:10001",
                                     "ray:/head:10001", "AUTO", " auto", "head:6379 "])
def test_a_ray_address_ray_does_not_take_is_one_sentence_before_any_connection(address, monkeypatch):
    """check_ray_address checked only the port: http://head:6379, a path or a user went on to ray.init."""
    monkeypatch.setattr(dt.socket, "create_connection", lambda *a, **k: pytest.fail("contacted the network"))
    with pytest.raises(UserError) as e:
        dt.check_ray_address(address)
    assert str(e.value) == (f"RAY_ADDRESS={address} is not host:port, ray://host:port, auto or local; set it to the "
                            "head node's address or unset it to start a local Ray instance.")


@pytest.mark.parametrize("address, host, port", [
    ("head:6379", "head", 6379), ("ray://head-1.lan:10001", "head-1.lan", 10001), ("10.0.0.7:6379", "10.0.0.7", 6379),
    ("ray://[::1]:10001", "::1", 10001), ("node_2:65535", "node_2", 65535)])
def test_the_ray_addresses_ray_takes_are_checked_at_their_host_and_port(address, host, port, monkeypatch):
    tried = []
    monkeypatch.setattr(dt.socket, "create_connection", lambda where, timeout: tried.append(where) or socket_like())
    monkeypatch.setattr(dt, "not_ray", lambda address, host, port, timeout: None)  # a Ray server answers there
    dt.check_ray_address(address)
    assert tried == [(host, port)]
    for name in ("", "auto", "local"):  # ray finds or starts the cluster itself: nothing to contact
        dt.check_ray_address(name)
    assert tried == [(host, port)]


def socket_like():
    class Closed:
        def close(self) -> None:
            pass

    return Closed()


def test_eleven_files_one_of_them_small_get_a_task_each(tmp_path):
    """`split -l 40000` of 403,790 documents: 10 files of 40,000 and one of 3,790, a task each by default. Each task
    took the files whose middle byte fell in its 1/11 of the bytes: task 6 none, task 10 two (the stage took twice
    as long as it needed). Now each reads one, in order, and the parts keep the documents in corpus order."""
    lines = [f"第{i:03d}行：今天天气很好，我们去公园散步吧。" for i in range(404)]
    files = []
    for k in range(11):
        files.append(str(tmp_path / f"p_{k:02d}.txt"))
        Path(files[-1]).write_text("\n".join(lines[40 * k : 40 * k + 40]) + "\n")
    stats = dt.prepare(files, tmp_path / "out", dt.Launch(), dedup="none")
    work = tmp_path / "out" / "datatrove"
    assert [list(json.loads((work / "read" / f"{r:05d}.json").read_text())) for r in range(11)] == [[f] for f in files]
    assert stats["settings"]["task_files"] == [1] * 11 and kept_documents(tmp_path / "out") == lines


def test_many_files_are_shared_out_within_one_file_of_an_equal_share():
    """2,000 files of 0 to 10,000 bytes in 37 tasks: no task idle, none above total / tasks by more than the
    largest file (a file weighs its bytes + 1); on small cases the largest task is the smallest any contiguous runs
    make (every way of cutting tried)."""
    rng = random.Random(0)
    sizes = [rng.choice([0, rng.randrange(10_000)]) for _ in range(2_000)]
    shares = dt.task_shares(sizes, 37)
    assert len(shares) == 37 and sum(shares) == 2_000 and min(shares) >= 1
    assert largest_task(sizes, itertools.accumulate(shares[:-1])) <= sum(s + 1 for s in sizes) / 37 + 10_000
    for _ in range(200):
        sizes = [rng.randrange(100) for _ in range(rng.randrange(1, 9))]
        tasks = rng.randrange(1, len(sizes) + 1)
        best = min(largest_task(sizes, cuts)
                   for cuts in itertools.combinations_with_replacement(range(len(sizes) + 1), tasks - 1))
        assert largest_task(sizes, itertools.accumulate(dt.task_shares(sizes, tasks)[:-1])) == best, (sizes, tasks)


def largest_task(sizes: list[int], cuts) -> int:
    """The weight (bytes + 1 a file) of the largest run of sizes cut before the indices in cuts (ascending)."""
    bounds = [0, *cuts, len(sizes)]
    return max(sum(s + 1 for s in sizes[a:b]) for a, b in itertools.pairwise(bounds))


def test_the_shares_follow_a_fixed_rule():
    """Ties go the same way each time (the earlier tasks fill up first, the later ones keep a file each); a task
    can only be idle when there are more tasks than files, which --tasks never makes."""
    assert dt.task_shares([10] * 6, 4) == [2, 2, 1, 1]
    assert dt.task_shares([100, 1, 1, 1, 1, 1], 2) == [1, 5]
    assert dt.task_shares([0] * 5, 5) == [1] * 5  # empty files spread too
    assert dt.task_shares([5], 2) == [0, 1]
    assert dt.task_shares([], 1) == [0]


def killed_before_task_files(files: list[str], out: Path, monkeypatch, dies_on: int) -> Path:
    """prepare(files, out) with one task per file, killed as task dies_on writes its part (the tasks before it done),
    its settings.json then made as a version before task_files wrote it. Returns that settings.json."""
    write_run = dt.WriteParts.run

    def dies(self, data, rank=0, world_size=1):
        if rank == dies_on:
            raise RuntimeError("killed")
        write_run(self, data, rank, world_size)

    monkeypatch.setattr(dt.WriteParts, "run", dies)
    with pytest.raises(RuntimeError, match="killed"):
        dt.prepare(files, out, dt.Launch(), dedup="none")
    monkeypatch.undo()
    settings = out / ".incomplete" / "datatrove" / "settings.json"
    written = json.loads(settings.read_text())
    settings.write_text(json.dumps({k: v for k, v in written.items() if k != "task_files"}))
    return settings


def test_the_rule_before_task_shares_is_the_middle_byte_s():
    """split -l 40000 of 403,790 documents in 11 tasks: task 6 got none and task 10 two."""
    assert dt.middle_byte_shares([40_000] * 10 + [3_790], 11) == [1] * 6 + [0, 1, 1, 1, 2]
    assert dt.middle_byte_shares([10] * 3, 3) == [1, 1, 1]


def test_a_run_from_before_task_files_is_resumed_when_its_shares_are_these(tmp_path, monkeypatch):
    """Files of equal sizes, a task each: the rule before shared them out as task_shares does, so the run stopped
    halfway under it is resumed (its finished task skipped), not refused."""
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("\n".join(GOOD_LINES[:30]) + "\n")
    files, out = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], tmp_path / "out"
    killed_before_task_files(files, out, monkeypatch, dies_on=1)
    write_run, written = dt.WriteParts.run, []

    def counted_write(self, data, rank=0, world_size=1):
        write_run(self, data, rank, world_size)
        written.append(rank)

    monkeypatch.setattr(dt.WriteParts, "run", counted_write)
    assert dt.prepare(files, out, dt.Launch(), dedup="none")["total"]["kept"] == 60
    assert written == [1]


def test_a_run_from_before_task_files_with_other_shares_is_refused(tmp_path, monkeypatch):
    """Two files and a small one, a task each: the rule before gave them [1, 0, 2], task_shares [1, 1, 1]; resumed,
    the tasks would read some files twice and others never."""
    for name, lines in (("a.txt", 30), ("b.txt", 30), ("c.txt", 1)):
        (tmp_path / name).write_text("\n".join(GOOD_LINES[:lines]) + "\n")
    files, out = [str(tmp_path / n) for n in ("a.txt", "b.txt", "c.txt")], tmp_path / "out"
    settings = killed_before_task_files(files, out, monkeypatch, dies_on=2)
    refused = (f"{out} holds an unfinished datatrove run whose tasks share the input files otherwise (another "
               f"version of babyllama started it); finish it with that version, or remove {settings.parent} to "
               "start again.")
    with pytest.raises(UserError, match=re.escape(refused)):
        dt.prepare(files, out, dt.Launch(), dedup="none")


def test_a_finished_run_from_before_task_files_is_kept(tmp_path, monkeypatch):
    """The same command with the same inputs did nothing after a finished run, whatever rule had shared out its
    files; it was redone from scratch (with Slurm, its output deleted at submission) as if its settings differed."""
    for name, lines in (("a.txt", 30), ("b.txt", 30), ("c.txt", 1)):
        (tmp_path / name).write_text("\n".join(GOOD_LINES[:lines]) + "\n")
    files, out = [str(tmp_path / n) for n in ("a.txt", "b.txt", "c.txt")], tmp_path / "out"
    dt.prepare(files, out, dt.Launch(), dedup="none")
    settings = out / "datatrove" / "settings.json"
    settings.write_text(json.dumps({k: v for k, v in json.loads(settings.read_text()).items() if k != "task_files"}))
    before = outputs(out)
    read_calls = []
    monkeypatch.setattr(dt.ReadCorpus, "run", lambda *args, **kwargs: read_calls.append(1) or iter(()))
    assert dt.prepare(files, out, dt.Launch(), dedup="none")["total"]["kept"] == 61
    assert read_calls == [] and outputs(out) == before and "task_files" not in json.loads(settings.read_text())


def test_copies_that_differ_in_width_punctuation_or_spacing_are_duplicates_on_datatrove(tmp_path):
    from tests.test_clean import PARAGRAPH

    docs = [PARAGRAPH, PARAGRAPH.replace("，", ","), PARAGRAPH.replace("，", "， "),
            PARAGRAPH.replace("长城", "运河").replace("城墙", "河堤")]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in docs))
    stats = dt.prepare([str(tmp_path / "a.jsonl")], tmp_path / "out", local(1))
    assert kept_documents(tmp_path / "out") == [PARAGRAPH, docs[3]] and stats["total"]["exact_duplicates"] == 2


def test_chinese_copies_without_punctuation_or_with_spaces_are_duplicates_on_datatrove(tmp_path):
    """The same key as the embedded path's (tests/test_clean.py): a copy less its punctuation, or with a space for
    it, is an exact duplicate beside Chinese characters; 1.5 and 15 stay apart."""
    from tests.test_clean import NEWS

    docs = ["今天天气很好，我们一起去公园散步吧。", "今天天气很好我们一起去公园散步吧",
            "今天天气很好 我们一起去公园散步吧", NEWS, NEWS.translate(dict.fromkeys(map(ord, "，。、"))),
            "商品的价格是1.5元一斤", "商品的价格是15元一斤"]
    (tmp_path / "zh.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    stats = dt.prepare([str(tmp_path / "zh.txt")], tmp_path / "out", local(1))
    assert kept_documents(tmp_path / "out") == [docs[0], NEWS, docs[5], docs[6]]
    assert (stats["total"]["exact_duplicates"], stats["total"]["near_duplicates"]) == (3, 0)


def test_a_failing_squeue_is_not_taken_for_an_empty_queue(corpus, tmp_path, monkeypatch, capsys):
    """squeue exits 1 both when every job asked about has left the queue ("Invalid job id specified") and when it
    cannot reach its controller: the second was taken for the first, so a rerun submitted a second chain of jobs into
    the folder while the first could still be running. Now it is refused, naming squeue's words."""
    _, files, _ = corpus
    fake_slurm(tmp_path / "bin", tmp_path / "jobs")
    squeue = tmp_path / "bin" / "squeue"
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "out"
    args = ["prepare", "--input", *files, "--out_dir", str(out), "--engine", "datatrove", "--dedup", "exact",
            "--executor", "slurm", "--slurm_partition", "cpu", "--tasks", "2"]
    assert main(args) == 0
    first = every_job(tmp_path / "jobs")
    squeue.write_text("#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller (connect failure)' "
                      ">&2\nexit 1\n")
    squeue.chmod(0o755)
    capsys.readouterr()
    assert main(args) == 2
    assert capsys.readouterr().err == (
        "babyllama: error: squeue failed (slurm_load_jobs error: Unable to contact slurm controller (connect failure)),"
        f" so whether the Slurm jobs of an earlier submission in {out} ({', '.join(first)}) are still queued is "
        "unknown; run the command again once squeue answers.\n")
    assert every_job(tmp_path / "jobs") == first
    squeue.write_text("#!/bin/sh\necho 'slurm_load_jobs error: Invalid job id specified' >&2\nexit 1\n")
    assert main(args) == 0  # they have all left the queue: submitted again
    assert len(every_job(tmp_path / "jobs")) == 2 * len(first)
