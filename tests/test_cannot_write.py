"""Every command's outputs on a full disk or in a folder it may not write (errors.writing): exit 2, one sentence
naming the file, and no temporary left; Ctrl-C while a command writes leaves no temporary either."""

import errno
import json
from pathlib import Path

import numpy as np
import pytest

from babyllama.checkpoint import save_checkpoint
from babyllama.data.pretokenize import pretokenize
from tests.conftest import CHATGLM2, generated_corpus, refuse_writes, run_cli, sharp_model, tiny_config

MODEL = ["--model.dim", "32", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads", "2",
         "--model.vocab_size", "600", "--model.max_seq_len", "32", "--model.multiple_of", "16"]
STEPS = ["--max_steps", "2", "--batch_size", "2", "--warmup_steps", "1", "--log_every", "1", "--eval_every", "0",
         "--save_every", "0", "--eval_batches", "1"]
SFT = [{"instruction": f"判断情感：很好{i}", "input": "", "output": "正面"} for i in range(40)]
PAIRS = [{"prompt": f"判断情感：很好{i}", "chosen": "正面", "rejected": "负面"} for i in range(20)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, bpe_tokenizer) -> Path:
    """docs.jsonl (and a bad record), a tokenizer, its token shards, a checkpoint, SFT records and DPO pairs."""
    d = tmp_path_factory.mktemp("inputs")
    docs = [json.dumps({"text": t}, ensure_ascii=False) for t in generated_corpus(60, seed=5)]
    (d / "docs.jsonl").write_text("\n".join([*docs, "{broken"]) + "\n")
    bpe_tokenizer.save(d / "tok")
    pretokenize([str(d / "docs.jsonl")], str(d / "tok"), d / "tokens", val_fraction=0.1)
    save_checkpoint(d / "ck", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    for name, records in (("sft.jsonl", SFT), ("pairs.jsonl", PAIRS)):
        (d / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return d


def full_savez(monkeypatch) -> None:
    """np.savez writes part of its file (the open file it is given), then the disk is full."""

    def savez(file, **arrays):
        file.write(b"PK")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", savez)


def full_gguf(monkeypatch) -> None:
    """The GGUF writer's header is written, then the disk is full while the tensors are (gguf opens the file)."""
    import gguf

    def tensors(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", tensors)


def short_gguf(monkeypatch) -> None:
    """The GGUF writer's tensors written short, as on a nearly full disk, without one: a file size limit
    (RLIMIT_FSIZE, its signal ignored) 64 KiB past the header stops write(2) part way through the first tensor
    (600 x 64 floats), and numpy's tofile raises OSError("38400 requested and 16089 written"), which has no errno."""
    import resource
    import signal

    import gguf

    real = gguf.GGUFWriter.write_tensors_to_file

    def tensors(self, *args, **kwargs):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        before = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.fout[0].tell() + 65536, hard))
        try:
            real(self, *args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, before)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", tensors)


# command (OUT: the output), the file refused (Path.open of that name, or a function that makes the disk full
# where the file is opened by a library), as text, the errno, the output the message names, and how the same
# command goes on: it starts again, continues (eval), or continues when given --resume (training, once it saved
# a checkpoint; these training cases fail before the first)
FIRST = "to start again (no checkpoint was saved yet)"
CASES = {
    "prepare's bad records": (["prepare", "--input", "docs.jsonl", "--out_dir", "OUT"], "bad_records.txt", True,
                              errno.EACCES, "OUT/bad_records.txt", "to start again"),
    "pretokenize's bad records": (["pretokenize", "--input", "docs.jsonl", "--tokenizer", "tok", "--out_dir", "OUT"],
                                  "bad_records.txt", True, errno.EACCES, "OUT/bad_records.txt", "to start again"),
    "prepare's stats": (["prepare", "--input", "docs.jsonl", "--out_dir", "OUT"], ".stats.json.tmp", True,
                        errno.ENOSPC, "OUT/stats.json", "to start again"),
    "tokenizer train": (["tokenizer", "train", "--input", "docs.jsonl", "--vocab_size", "300", "--out_dir", "OUT"],
                        ".tokenizer.json.tmp", True, errno.ENOSPC, "OUT/tokenizer.json", "to start again"),
    "pretokenize --sft": (["pretokenize", "--sft", "--input", "sft.jsonl", "--tokenizer", "tok", "--max_seq_len",
                           "32", "--out_dir", "OUT"], ".train.ids.bin.tmp", False, errno.ENOSPC,
                          "OUT/train.ids.bin", "to start again"),
    "pretrain's config": (["pretrain", *MODEL, *STEPS, "--data", "tokens", "--out_dir", "OUT"], ".config.json.tmp",
                          True, errno.EROFS, "OUT/config.json", FIRST),
    "pretrain's metrics": (["pretrain", *MODEL, *STEPS, "--data", "tokens", "--out_dir", "OUT"], "metrics.jsonl",
                           True, errno.ENOSPC, "OUT/metrics.jsonl", FIRST),
    "dpo's reference log-probs": (["dpo", *STEPS, "--init", "ck", "--data", "pairs.jsonl", "--val_fraction",
                                   "0", "--precompute_ref_log_probs", "true", "--out_dir", "OUT"], full_savez, False,
                                  errno.ENOSPC, "OUT/ref_logps.npz",
                                  f"{FIRST[:-1]}; the reference log-probs computed so far are kept)"),
    "eval": (["eval", "ck", "--data", "tokens", "--qa", "sft.jsonl", "--limit", "2", "--out_dir", "OUT"],
             ".items.jsonl.tmp", True,
             errno.ENOSPC, "OUT/items.jsonl", "to continue"),
    "eval's answers so far": (["eval", "ck", "--qa", "sft.jsonl", "--limit", "2", "--out_dir", "OUT"],
                              "items.jsonl.partial", True, errno.ENOSPC, "OUT/items.jsonl.partial", "to continue"),
    "export": (["export", "ck", "--out", "OUT"], "generation_config.json", True, errno.ENOSPC, "OUT",
               "to start again"),
    "export --format gguf": (["export", "ck", "--format", "gguf", "--out", "OUT"], full_gguf, False, errno.ENOSPC,
                             "OUT", "to start again"),
    "export --format gguf written short": (["export", "ck", "--format", "gguf", "--out", "OUT"], short_gguf, False,
                                           errno.ENOSPC, "OUT", "to start again"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_refused_write_is_one_sentence_and_leaves_no_temporary(inputs, tmp_path, monkeypatch, case):
    command, name, text, code, named, again = CASES[case]
    monkeypatch.chdir(inputs)
    out = tmp_path / "out"
    if callable(name):
        name(monkeypatch)
    else:
        refuse_writes(monkeypatch, name, code, text)
    r = run_cli(*[str(out) if a == "OUT" else a for a in command])
    named = Path(named.replace("OUT", str(out)))
    why = {errno.ENOSPC: f"no space left on the device of {named.parent}; free space",
           errno.EACCES: f"no permission to write in {named.parent}; make it writable",
           errno.EROFS: f"{named.parent} is on a read-only file system; make it writable"}[code]
    assert (r.returncode, [x for x in r.stderr.splitlines() if x.startswith("babyllama")]) == (2, [
        f"babyllama: error: {why.replace(';', f' while writing {named};')} and run the same command {again}."]), \
        r.stderr
    assert [p.name for p in tmp_path.rglob("*") if ".tmp" in p.name] == []


def interrupted_after_one(real):
    """real (an iterator function) that yields its first item, then raises KeyboardInterrupt (Ctrl-C)."""

    def once(*args, **kwargs):
        items = real(*args, **kwargs)
        yield next(iter(items))
        raise KeyboardInterrupt

    return once


@pytest.mark.parametrize("module, function, command", [
    ("babyllama.data.clean", "clean_documents", ["prepare", "--input", "docs.jsonl"]),
    ("babyllama.data.pretokenize", "in_workers", ["pretokenize", "--input", "docs.jsonl", "--tokenizer", "tok"]),
    ("babyllama.data.sft_tokens", "in_workers", ["pretokenize", "--sft", "--input", "sft.jsonl", "--tokenizer", "tok",
                                                 "--max_seq_len", "32"]),
], ids=["prepare", "pretokenize", "pretokenize --sft"])
def test_ctrl_c_between_writes_leaves_no_temporary(inputs, tmp_path, monkeypatch, module, function, command):
    """Ctrl-C while the inputs are read, an output file open and half written: exit 130 and no .tmp left. It said
    "run the same command to continue" of commands that start again; it says so, and that prepare's and
    pretokenize's earlier output (--sft's too), which they write aside and move in once complete, is as it was."""
    import importlib

    where = importlib.import_module(module)
    monkeypatch.chdir(inputs)
    out = tmp_path / "out"
    kept = f"the earlier output at {out}, if any, is kept; "
    if "--sft" not in command:  # the same --sft command would use its earlier cache (test_earlier_output has one)
        assert run_cli(*command, "--out_dir", out).returncode == 0
    before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    monkeypatch.setattr(where, function, interrupted_after_one(getattr(where, function)))
    r = run_cli(*command, "--out_dir", out)
    assert (r.returncode, r.stderr.splitlines()[-1]) == (130, f"babyllama: interrupted; {kept}run the same command "
                                                              "to start again.")
    assert [p.name for p in tmp_path.rglob("*") if ".tmp" in p.name] == []
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == before


@pytest.mark.parametrize("command", [["sft", "--data", "sft.jsonl"], ["dpo", "--data", "pairs.jsonl"]])
def test_ctrl_c_while_a_run_builds_its_token_cache_says_how_it_goes_on(inputs, tmp_path, monkeypatch, command):
    """A tester's Ctrl-C while sft built its token cache of 250k records said "run the same command with --resume to
    continue", but the cache's files so far were discarded and --resume built it again from the first record (6
    minutes lost at 1M). Before the first checkpoint a run starts again, and says so; with a checkpoint to resume
    from (its cache deleted, built again under --resume), it continues."""
    from babyllama.data import sft_tokens

    monkeypatch.chdir(inputs)
    real, run = sft_tokens.in_workers, tmp_path / "run"
    monkeypatch.setattr(sft_tokens, "in_workers", interrupted_after_one(real))
    r = run_cli(*command, *STEPS, "--init", "ck", "--out_dir", run)
    assert (r.returncode, r.stderr.splitlines()[-1]) == (130, f"babyllama: interrupted; run the same command {FIRST}.")
    assert [p.name for p in tmp_path.rglob("*") if ".tmp" in p.name] == []
    monkeypatch.setattr(sft_tokens, "in_workers", real)
    assert run_cli(*command, *STEPS, "--init", "ck", "--out_dir", run).returncode == 0  # a checkpoint at step 2
    import shutil

    shutil.rmtree(run / f"{command[0]}_tokens")
    monkeypatch.setattr(sft_tokens, "in_workers", interrupted_after_one(real))
    r = run_cli(*command, *STEPS, "--max_steps", "4", "--init", "ck", "--out_dir", run, "--resume")
    assert (r.returncode, r.stderr.splitlines()[-1]) == (130, "babyllama: interrupted; run the same command to "
                                                              "continue."), r.stderr


STOPPED_MIDWAY = """
import sys, time
import {module} as where
real = getattr(where, "{function}")
def once(*args, **kwargs):  # the first item, then a pause in which the test sends SIGTERM
    items = real(*args, **kwargs)
    yield next(iter(items))
    print("READY", flush=True)
    time.sleep(60)
setattr(where, "{function}", once)
from babyllama.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("module, function, command", [
    ("babyllama.data.clean", "clean_documents", ["prepare", "--input", "docs.jsonl"]),
    ("babyllama.data.sft_tokens", "in_workers", ["pretokenize", "--sft", "--input", "sft.jsonl", "--tokenizer", "tok",
                                                 "--max_seq_len", "32"]),
], ids=["prepare", "pretokenize --sft"])
def test_sigterm_outside_training_says_how_to_go_on_and_leaves_no_temporary(inputs, tmp_path, module, function,
                                                                           command):
    """A tester's `kill -TERM` of pretokenize --sft: exit 143 with no word, and its .bin.tmp files left."""
    import signal
    import subprocess
    import sys

    code = STOPPED_MIDWAY.format(module=module, function=function)
    proc = subprocess.Popen([sys.executable, "-c", code, *command, "--out_dir", str(tmp_path / "out")], cwd=inputs,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "READY"
    assert [p.name for p in tmp_path.rglob("*") if ".tmp" in p.name]  # a write is under way
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err.splitlines()[-1]) == (143, f"babyllama: stopped by SIGTERM; the earlier output at "
                                                            f"{tmp_path / 'out'}, if any, is kept; run the same "
                                                            "command to start again."), err
    assert [p.name for p in tmp_path.rglob("*") if ".tmp" in p.name] == []


def test_ctrl_c_inside_a_write_removes_its_temporary(tmp_path, monkeypatch):
    """KeyboardInterrupt in the middle of write_whole: the file is not there, nor its temporary."""
    from babyllama.errors import write_whole

    real_write = Path.write_text

    def interrupted(self, data, *args, **kwargs):
        real_write(self, data[:3], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_whole(tmp_path / "eval.json", '{"a": 1}\n')
    assert list(tmp_path.iterdir()) == []


def test_a_missing_input_is_said_before_the_earlier_output_is_removed(inputs, tmp_path):
    """A crash tester's typo: `prepare --input nope.jsonl` into a finished folder deleted its parts first."""
    for command, kept in ((["prepare", "--input", str(inputs / "docs.jsonl")], ["part_00000.jsonl", "stats.json"]),
                          (["pretokenize", "--input", str(inputs / "docs.jsonl"), "--tokenizer", str(inputs / "tok")],
                           ["manifest.json"])):
        out = tmp_path / command[0]
        assert run_cli(*command, "--out_dir", out).returncode == 0
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        r = run_cli(*command[:1], "--input", tmp_path / "nope.jsonl", *command[3:], "--out_dir", out)
        assert (r.returncode, r.stderr.splitlines()[-1]) == (2, f"babyllama: error: input {tmp_path / 'nope.jsonl'} "
                                                                "does not exist.")
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before and set(kept) <= set(before)


@pytest.mark.parametrize("command, writes", [
    (["pretrain", "--data", "tokens", "--model.dim", "32", "--max_steps", "1"], "a training run"),
    (["sft", "--init", "ck", "--data", "sft.jsonl", "--max_steps", "1"], "a training run"),
    (["dpo", "--init", "ck", "--data", "pairs.jsonl", "--max_steps", "1"], "a training run"),
    (["tokenizer", "train", "--input", "docs.jsonl", "--vocab_size", "300"], "a tokenizer"),
    (["prepare", "--input", "docs.jsonl"], "prepare's parts"),
], ids=["pretrain", "sft", "dpo", "tokenizer train", "prepare"])
def test_an_out_dir_that_is_a_checkpoint_is_refused_and_left_as_it_was(inputs, tmp_path, monkeypatch, command,
                                                                        writes):
    """The crash tester's `pretrain --out_dir CHECKPOINT` replaced its config.json, and `tokenizer train`
    its tokenizer: the checkpoint could no longer be loaded."""
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(inputs / "ck", ck)
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    monkeypatch.chdir(inputs)
    r = run_cli(*command, "--out_dir", ck)
    flag = "out_dir" if writes == "a training run" else "--out_dir"
    assert (r.returncode, r.stderr.splitlines()[-1]) == (2, f"babyllama: error: {flag} {ck} is a checkpoint, which "
                                                            f"{writes} must not be written into; pass another {flag}.")
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before


def test_merge_across_devices_on_a_full_disk_leaves_no_half_shard(inputs, tmp_path, monkeypatch):
    """The crash tester's `pretokenize --merge` onto a full tmpfs (a copy, not a link): a traceback and a cut
    shard under its final name."""
    import os
    import shutil

    def no_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def full_copy(src, dst):
        Path(dst).write_bytes(Path(src).read_bytes()[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(shutil, "copyfile", full_copy)
    r = run_cli("pretokenize", "--merge", inputs / "tokens", "--out_dir", tmp_path / "merged")
    assert r.returncode == 2 and "no space left on the device of" in r.stderr.splitlines()[-1], r.stderr
    assert [p.name for p in tmp_path.rglob("*") if p.suffix == ".bin" or ".tmp" in p.name] == []


@pytest.mark.skipif(not CHATGLM2.is_file(), reason="ChatGLM2 tokenizer.model not present")
def test_a_full_disk_under_a_sentencepiece_export_is_one_sentence(tmp_path, monkeypatch):
    """The hf export of a SentencePiece tokenizer wrote its tokenizer.json with the tokenizers library, whose error
    of a full disk is no OSError: a traceback and exit 1, where every other file of the export said no space left."""
    pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    from babyllama.tokenizer import load_tokenizer

    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=64793, dim=16, n_heads=2)),
                    load_tokenizer(CHATGLM2))
    refuse_writes(monkeypatch, "tokenizer.json", errno.ENOSPC, text=True)
    out = tmp_path / "hf"
    r = run_cli("export", tmp_path / "ck", "--out", out)
    assert (r.returncode, r.stderr.splitlines()[-1]) == (2, f"babyllama: error: no space left on the device of "
                                                            f"{tmp_path} while writing {out}; free space and run the "
                                                            "same command to start again.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


@pytest.mark.parametrize("fmt, out", [("hf", "new/hf"), ("gguf", "new/m.gguf")])
def test_a_full_disk_when_the_out_is_held_is_one_sentence(inputs, tmp_path, monkeypatch, fmt, out):
    """The lock's "PID COMMAND" is the first byte a command writes: on a full disk it escaped as a traceback and
    left the lock file, and the folders it had made."""
    import os

    def pwrite(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", pwrite)
    r = run_cli("export", inputs / "ck", "--format", fmt, "--out", tmp_path / out)
    assert (r.returncode, r.stderr) == (2, f"babyllama: error: no space left on the device of {tmp_path / 'new'} "
                                           f"while writing {tmp_path / out}; free space and run the same command to "
                                           "start again.\n")
    assert list(tmp_path.iterdir()) == []
