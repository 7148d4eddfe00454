"""The `babyllama` command line, run as a user would run it."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import generated_corpus, run_cli


def run_process(*args: str) -> subprocess.CompletedProcess:
    """`python -m babyllama ARGS` as its own process: for what only a process shows (its exit status)."""
    return subprocess.run([sys.executable, "-m", "babyllama", *args], capture_output=True, text=True, timeout=300)


def test_tokenizer_train_then_info(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(generated_corpus(200)), encoding="utf-8")
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text(json.dumps({"text": "另一份文档"}, ensure_ascii=False) + "\n{bad json\n", encoding="utf-8")
    out = tmp_path / "tok"
    r = run_cli("tokenizer", "train", "--input", str(corpus), str(jsonl), "--vocab-size", "500", "--out_dir", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "tokenizer.json").is_file() and "more.jsonl:2: skipped a bad record" in r.stderr
    trained = json.loads(r.stdout)  # its chars_per_token (of 4 built-in lines) was taken for the training data's
    r = run_cli("tokenizer", "info", str(out))
    info = json.loads(r.stdout)
    assert info["vocab_size"] == 500 and info["token_dtype"] == "uint16"
    assert (info["bos_id"], info["eos_id"], info["pad_id"]) == (1, 2, 0)
    from babyllama.tokenizer import BUILT_IN_SAMPLE, SAMPLE_TEXT, load_tokenizer

    n_tokens = sum(len(load_tokenizer(out).encode(line)) for line in SAMPLE_TEXT.splitlines())
    assert info["chars_per_token"] == round(len(SAMPLE_TEXT.replace("\n", "")) / n_tokens, 3)
    assert info == {k: v for k, v in trained.items() if k != "saved"}
    assert info["chars_per_token_of"] == BUILT_IN_SAMPLE and "not the training data" in BUILT_IN_SAMPLE


def test_tokenizer_train_trains_on_a_sample_of_max_train_bytes_and_shows_its_reading(tmp_path):
    """Training held every document (about 100 bytes of memory a byte of text: 3.8 GB for 36 MB, 140 GB for
    BaiduBaike), with no line while it read: it trains on a random sample of at most --max_train_bytes, and a
    progress bar counts the input's bytes read, of their total (a percentage and an ETA, which a count of documents
    had not), with the documents so far, and a line says what was sampled of how much."""
    from babyllama.tokenizer import load_tokenizer, train_bpe, training_sample

    docs = generated_corpus(300)
    (tmp_path / "c.txt").write_text("\n".join(docs), encoding="utf-8")
    size = sum(len(d.encode()) for d in docs)
    r = run_cli("tokenizer", "train", "--input", tmp_path / "c.txt", "--vocab_size", "400", "--max_train_bytes",
                size // 3, "--out_dir", tmp_path / "tok")
    assert r.returncode == 0, r.stderr
    sample = training_sample(docs, size // 3)
    held = sum(len(d.encode()) for d in sample)
    assert 0 < len(sample) < 300 and (f"INFO babyllama.tokenizer: training on {len(sample)} of 300 documents: "
                                      f"{held / 2**20:.1f} of {size / 2**20:.1f} MiB (--max_train_bytes "
                                      f"{size // 3:,} bytes ({size // 3 / 2**20:.1f} MiB))") in r.stderr.splitlines(), \
        r.stderr
    assert re.search(r"^tokenizer train: reading: 100%\|#+\| (\S+)/\1 \[[^\]]*, 300 docs\]$", r.stderr, re.M), r.stderr
    assert load_tokenizer(tmp_path / "tok").fingerprint == train_bpe(sample, 400).fingerprint
    smallest = min(len(d.encode()) for d in docs)  # a budget under every document: the beginning of one, not nothing
    r = run_cli("tokenizer", "train", "--input", tmp_path / "c.txt", "--vocab_size", "400", "--max_train_bytes",
                smallest - 1, "--out_dir", tmp_path / "tok")
    assert r.returncode == 0, r.stderr
    piece = training_sample(docs, smallest - 1)
    assert len(piece) == 1 and piece[0] in {d[:len(piece[0])] for d in docs}, piece
    assert (f"(--max_train_bytes {smallest - 1:,} bytes (0.0 MiB)); 300 documents are larger than that: one's first "
            f"{len(piece[0].encode()):,} bytes are in the sample") in r.stderr, r.stderr
    (tmp_path / "zh.txt").write_text("长城\n故宫\n", encoding="utf-8")  # a sample of nothing trained the 259 byte ids
    r = run_cli("tokenizer", "train", "--input", tmp_path / "zh.txt", "--vocab_size", "400", "--max_train_bytes", 2,
                "--out_dir", tmp_path / "tok")
    assert (r.returncode, r.stderr.splitlines()[-1]) == (2, "babyllama: error: --max_train_bytes 2 holds no whole "
                                                            "character of the text (2 documents read, each larger "
                                                            "than it), so none was sampled; raise it, or pass 0 to "
                                                            "train on every document.")
    assert load_tokenizer(tmp_path / "tok").fingerprint == train_bpe(piece, 400).fingerprint  # the earlier one


def test_tokenizer_train_writes_its_json_alone_to_a_pipe(tmp_path):
    """The Rust trainer's progress bars, hidden off a terminal, still wrote 3 newlines to stdout before the JSON."""
    (tmp_path / "c.txt").write_text("\n".join(generated_corpus(20)), encoding="utf-8")
    r = run_process("tokenizer", "train", "--input", str(tmp_path / "c.txt"), "--vocab_size", "300", "--out_dir",
                    str(tmp_path / "tok"))
    assert r.returncode == 0 and r.stdout.startswith('{\n  "saved"'), (r.stdout, r.stderr)


def test_tokenizer_info_reads_its_sample_as_every_text_input(tmp_path, bpe_tokenizer):
    """--sample was decoded as UTF-8 with errors="replace": a GBK file measured replacement characters, a .jsonl
    sample its JSON, random bytes were measured, and a folder "did not exist". It is read as every text input is."""
    bpe_tokenizer.save(tmp_path / "tok")
    texts = ["你好，世界。这是分词器的样本。", "中文的句子，用来数每个词元有几个字。"]
    n_tokens = sum(len(bpe_tokenizer.encode(t)) for t in texts)
    expected = round(sum(map(len, texts)) / n_tokens, 3)
    (tmp_path / "gbk.txt").write_bytes("\n".join(texts).encode("gbk"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "s.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                                            encoding="utf-8")
    for sample in (tmp_path / "gbk.txt", tmp_path / "d" / "s.jsonl", tmp_path / "d"):
        r = run_cli("tokenizer", "info", tmp_path / "tok", "--sample", sample)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["chars_per_token"] == expected, sample
        assert json.loads(r.stdout)["chars_per_token_of"] == str(sample)
    (tmp_path / "random.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "empty.jsonl").write_bytes(b"")
    for sample, error in [
        ("random.bin", "{}: unknown file type .bin; use one of .jsonl, .json, .txt, .parquet, .csv."),
        ("empty.jsonl", "--sample {} has no text to measure."),
        ("missing.txt", "--sample {} does not exist."),
        ("/dev/null", "--sample {} is not a regular file."),  # it said "input /dev/null", not the flag
    ]:
        r = run_cli("tokenizer", "info", tmp_path / "tok", "--sample", tmp_path / sample)  # after the bar, if any
        assert (r.returncode, r.stderr.splitlines()[-1]) == (2, f"babyllama: error: {error.format(tmp_path / sample)}")


def test_tokenizer_info_streams_its_sample(tmp_path, bpe_tokenizer, monkeypatch):
    """--sample was read whole, joined and encoded at once: about 57 bytes of memory a byte of sample (1.1 GB for
    20 MB), with no line while it read. Its documents are read one at a time and encoded a batch at a time, with a
    bar of the bytes read, and the numbers are those of the whole sample: its lines (CRLF, U+2028 and blank ones among
    them) encoded each alone, over its characters less newlines."""
    import babyllama.tokenizer as tokenizer_module

    bpe_tokenizer.save(tmp_path / "tok")
    texts = ["你好，世界。\n这是分词器的样本。\n", "中文的句子\r\n用来数\u2028每个词元", "", "  有几个字。\n\n末行"]
    whole = "\n".join(texts)  # what info measured before: the documents joined, then split into lines
    expected = round(len(whole.replace("\n", "")) / sum(len(bpe_tokenizer.encode(t)) for t in whole.splitlines()), 3)
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                                      encoding="utf-8")
    size = (tmp_path / "s.jsonl").stat().st_size
    r = run_cli("tokenizer", "info", tmp_path / "tok", "--sample", tmp_path / "s.jsonl")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["chars_per_token"] == expected
    assert re.search(rf"^tokenizer info: reading --sample: 100%\|#+\| {size}/{size} \[[^\]]*, 4 docs\]$",
                     r.stderr, re.M), r.stderr
    read, encoded = [], []  # the documents read when each batch was encoded: a few, not all of them
    monkeypatch.setattr(tokenizer_module, "MEASURE_BATCH", 10)
    monkeypatch.setattr(type(bpe_tokenizer), "encode_batch",
                        lambda self, batch, *a: encoded.append(len(read)) or [[0] * len(t) for t in batch])
    docs = [f"第{i}篇文档，十个字以上。" for i in range(5)]
    assert bpe_tokenizer.measure(read.append(d) or d for d in docs) == (sum(map(len, docs)), sum(map(len, docs)))
    assert encoded == [1, 2, 3, 4, 5, 5]


def test_tokenizer_train_on_no_documents_writes_nothing(tmp_path):
    """`tokenizer train --input EMPTY.jsonl` exited 0 with a tokenizer of the 259 byte ids alone: no usable document
    is exit 2 and one sentence, as prepare and pretokenize say it, and no tokenizer is written."""
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "bad.jsonl").write_text("{oops\n[1]\n")
    for name, error in (("empty.jsonl", "the inputs hold no records; check the paths and --format."),
                        ("bad.jsonl", "every one of the 2 records was bad (the first: {}:1: not valid JSON")):
        r = run_cli("tokenizer", "train", "--input", tmp_path / name, "--vocab_size", "300",
                    "--out_dir", tmp_path / "t")
        assert r.returncode == 2 and r.stderr.splitlines()[-1].startswith(
            "babyllama: error: " + error.format(tmp_path / name)), r.stderr
        assert not (tmp_path / "t").exists()


def test_tokenizer_train_on_records_that_show_nothing_writes_nothing(tmp_path, bpe_tokenizer):
    """Lines of whitespace and a zero-width space trained a tokenizer of 261 ids ("training on 1 of 1 document: 0.0
    of 0.0 MiB", exit 0), where prepare and pretokenize refuse them: a record that shows nothing is no document, and
    none is pretokenize's refusal."""
    (tmp_path / "blank.txt").write_bytes(b"   \n\xe2\x80\x8b\n\n")
    (tmp_path / "docs.txt").write_text("长城很长。\n\u200b\n故宫很大。\n", encoding="utf-8")
    bpe_tokenizer.save(tmp_path / "tok")
    r = run_cli("pretokenize", "--input", tmp_path / "blank.txt", "--tokenizer", tmp_path / "tok", "--out_dir",
                tmp_path / "p")
    refusal = "babyllama: error: the one record has no text: 1 empty; nothing was written."
    assert (r.returncode, r.stderr.splitlines()[-1]) == (2, refusal), r.stderr
    r = run_cli("tokenizer", "train", "--input", tmp_path / "blank.txt", "--vocab_size", "300",
                "--out_dir", tmp_path / "t")
    assert (r.returncode, r.stderr.splitlines()[-1]) == (2, refusal), r.stderr
    assert not (tmp_path / "t").exists()
    r = run_cli("tokenizer", "train", "--input", tmp_path / "docs.txt", "--vocab_size", "300",
                "--out_dir", tmp_path / "t")
    assert r.returncode == 0 and "training on 2 of 2 documents" in r.stderr, r.stderr


def test_tokenizer_train_refuses_an_out_dir_of_other_files(tmp_path):
    """--out_dir of raw data files took a tokenizer.json, after which prepare and pretokenize read the folder as "a
    tokenizer, not a folder of data files": a folder that holds files other than a tokenizer's is refused, as export
    --format hf refuses one; an earlier tokenizer's is trained again in place."""
    (tmp_path / "c.txt").write_text("\n".join(generated_corpus(50)), encoding="utf-8")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "gbk.txt").write_bytes("长城".encode("gbk"))
    (tmp_path / "raw" / "wudao.json").write_text("[]")
    r = run_cli("tokenizer", "train", "--input", tmp_path / "c.txt", "--vocab_size", "300", "--out_dir",
                tmp_path / "raw")
    assert (r.returncode, r.stderr.splitlines()[-1]) == (2, f"babyllama: error: --out_dir {tmp_path / 'raw'} holds "
                                                            "files that are not a tokenizer's (gbk.txt, wudao.json); "
                                                            "choose a new or empty --out_dir (the tokenizer.json "
                                                            "written there would make the folder read as a "
                                                            "tokenizer, not as data)."), r.stderr
    assert sorted(f.name for f in (tmp_path / "raw").iterdir()) == ["gbk.txt", "wudao.json"]
    for _ in range(2):  # a new folder, then the tokenizer in it again
        r = run_cli("tokenizer", "train", "--input", tmp_path / "c.txt", "--vocab_size", "300", "--out_dir",
                    tmp_path / "tok")
        assert r.returncode == 0, r.stderr


def test_large_vocab_says_uint32(tmp_path):
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(70000)} | {"<s>": 70000, "</s>": 70001}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(tmp_path / "tokenizer.json"))
    r = run_cli("tokenizer", "info", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert '"token_dtype": "uint32"' in r.stdout and "twice the disk" in r.stdout


def test_missing_paths_exit_2_with_one_sentence(tmp_path):
    r = run_process("tokenizer", "info", str(tmp_path / "missing"))  # the status a shell sees
    assert r.returncode == 2
    assert r.stderr.startswith("babyllama: error: tokenizer") and "Traceback" not in r.stderr
    r = run_cli("tokenizer", "train", "--input", str(tmp_path / "nope.txt"), "--out_dir", str(tmp_path / "t"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_an_out_dir_that_is_a_file_is_one_sentence_before_any_work(tmp_path, bpe_tokenizer, capsys, monkeypatch):
    """`eval --out_dir FILE` loaded the model, then mkdir's FileExistsError came as a traceback; so for every command
    that writes a folder: checked before the work (no tokenizer trained, no model loaded)."""
    import babyllama.checkpoint
    import babyllama.tokenizer
    import babyllama.train.dpo  # noqa: F401  imported under the stubs below, it would keep one for later tests
    from babyllama.checkpoint import save_checkpoint
    from babyllama.cli import main
    from tests.conftest import sharp_model, tiny_config

    for module, name in ((babyllama.checkpoint, "load_model"), (babyllama.tokenizer, "train_bpe")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("the work began"))
    corpus, file = tmp_path / "corpus.jsonl", tmp_path / "file"
    corpus.write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in generated_corpus(20)))
    file.write_text("mine")
    bpe_tokenizer.save(tmp_path / "tok")
    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    below = file / "sub"
    for args, out, flag in (
            (["prepare", "--input", str(corpus)], file, "--out_dir"),
            (["pretokenize", "--input", str(corpus), "--tokenizer", str(tmp_path / "tok")], below, "--out_dir"),
            (["tokenizer", "train", "--input", str(corpus)], file, "--out_dir"),
            (["demo"], file, "--out_dir"),
            (["eval", str(tmp_path / "ck")], file, "--out_dir"),
            (["sft", "--init", str(tmp_path / "ck"), "--data", str(corpus), "--data_workers", "1"], below, "out_dir")):
        assert main([*args, "--out_dir", str(out)]) == 2, args
        where = "is" if out == file else f"is below {file}, which is"
        assert capsys.readouterr().err == (f"babyllama: error: {flag} {out} {where} a file, not a folder; choose "
                                           f"another {flag}.\n"), args
        assert file.read_text() == "mine"


def test_an_out_dir_inside_an_input_folder_or_holding_an_input_is_refused(tmp_path, bpe_tokenizer, capsys):
    """`prepare --input data3 --out_dir data3/clean` was taken: each rerun read its earlier output as input (records
    3, then 6), and a document deleted from the source stayed in the output. Every command that reads input folders
    and writes an --out_dir refuses an out_dir that is or lies inside an input folder, or holds an input, before
    any work (no folder made); pretokenize --merge refuses its own (tests/test_pretokenize.py)."""
    from babyllama.cli import main

    data = tmp_path / "data3"
    data.mkdir()
    (data / "a.jsonl").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in generated_corpus(3)))
    bpe_tokenizer.save(tmp_path / "tok")
    tok = ["--tokenizer", str(tmp_path / "tok")]
    for args in (["prepare"], ["prepare", "--engine", "datatrove"], ["tokenizer", "train"], ["pretokenize", *tok],
                 ["pretokenize", "--sft", *tok, "--max_seq_len", "64"]):
        for out, where in ((data / "clean", "is inside"), (data, "is")):
            assert main([*args, "--input", str(data), "--out_dir", str(out)]) == 2, (args, out)
            assert capsys.readouterr().err == (
                f"babyllama: error: --out_dir {out} {where} the --input folder {data}, which a run reads whole, so a "
                "later run may read this one's output as input; choose an --out_dir outside it.\n"), (args, out)
        out = tmp_path / "x" / ".." / "data3"  # a folder that holds an input, spelled another way
        assert main([*args, "--input", str(data / "a.jsonl"), "--out_dir", str(out)]) == 2, args
        assert capsys.readouterr().err == (
            f"babyllama: error: --out_dir {out} holds --input {data / 'a.jsonl'}, which a run may replace or read "
            "again beside its output; choose an --out_dir that holds none of the inputs.\n"), args
    assert [p.name for p in data.iterdir()] == ["a.jsonl"] and not (tmp_path / "x").exists()
    assert main(["prepare", "--input", str(data), "--out_dir", str(tmp_path / "clean")]) == 0  # beside it: taken
    assert json.loads(capsys.readouterr().out)["records"] == 3


@pytest.mark.parametrize("args, message", [
    (["prepare", "--engine", "datatrove", "--slurm_partition", "cpu"],
     "--slurm_partition needs --executor slurm; the local executor submits nothing to Slurm."),
    (["pretokenize", "--tokenizer", "t", "--engine", "datatrove", "--executor", "ray", "--slurm_partition", "cpu",
      "--slurm_time", "1:00:00"], "--slurm_partition --slurm_time need --executor slurm; the ray executor submits "
     "nothing to Slurm."),
    (["pretokenize", "--tokenizer", "t", "--tasks", "4"], "--tasks needs --engine datatrove; without it pretokenize "
     "runs on this machine alone, with no executor or tasks."),
    (["prepare", "--executor", "slurm", "--tasks", "2"], "--executor --tasks need --engine datatrove; without it "
     "prepare runs on this machine alone, with no executor or tasks."),
    (["pretokenize", "--tokenizer", "t", "--max_seq_len", "8"], "--max_seq_len needs --sft: it is a setting of the "
     "SFT token cache, which token shards do not use; add --sft or leave it out."),
], ids=["slurm-flag-local", "slurm-flags-ray", "tasks-embedded", "executor-tasks-embedded", "sft-flag"])
def test_flags_for_another_engine_executor_or_mode_are_refused_in_words_that_agree(tmp_path, capsys, args, message):
    """`prepare --engine datatrove --slurm_partition cpu` ran locally, the flag ignored, where the embedded engine
    refused it; "--tasks need", "--executor need"; `pretokenize --tasks 4` said "everything runs in this process",
    though the embedded pretokenize has worker processes."""
    from babyllama.cli import main

    assert main([*args, "--input", str(tmp_path / "a.jsonl"), "--out_dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"babyllama: error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_an_empty_path_is_refused_by_every_path_argument(tmp_path, monkeypatch):
    """`--out ""` was read as "." and `--out_dir ""`, `--init ""` or `--config ""` as not given (eval wrote beside the
    checkpoint, sft took the config's init): every path argument refuses "" with one sentence, before any work."""
    monkeypatch.chdir(tmp_path)  # "" was "." here: nothing may appear
    cases = [["tokenizer", "train", "--input", ""], ["tokenizer", "train", "--out_dir", ""], ["tokenizer", "info", ""],
             ["tokenizer", "info", "x", "--sample", ""], ["prepare", "--input", "a", ""], ["prepare", "--out_dir", ""],
             *[["pretokenize", flag, ""] for flag in ("--input", "--tokenizer", "--out_dir", "--merge")],
             ["pretrain", "--config", ""],  # its --init and --data are settings: "" is their default (--help)
             *[[stage, flag, ""] for stage in ("sft", "dpo") for flag in ("--config", "--init", "--data")],
             ["eval", ""],
             *[["eval", "ck", flag, ""] for flag in ("--data", "--prompts", "--qa", "--mc", "--train_data",
                                                     "--out_dir")],
             ["report", ""], ["chat", ""], ["serve", ""], ["export", ""], ["export", "ck", "--out", ""],
             ["demo", "--out_dir", ""]]
    for args in cases:
        r = run_cli(*args)
        assert r.returncode == 2, args
        assert r.stderr.endswith(': an empty path names no file or folder; give one ("." for this folder).\n'), args
    assert list(tmp_path.iterdir()) == []


def test_one_dialect_every_flag_with_underscores():
    import re

    from babyllama.cli import build_parser, spelled_one_way

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    flags = [o for name, p in commands.items() for a in p._actions for o in a.option_strings
             if name != "tokenizer"]
    flags += [o for p in commands["tokenizer"]._subparsers._group_actions[0].choices.values()
              for a in p._actions for o in a.option_strings]
    assert "--max_new_tokens" in flags and "--out_dir" in flags
    assert [f for f in flags if re.fullmatch(r"--\w+", f) is None and f not in ("-h", "--help")] == []
    assert spelled_one_way(["--max-new-tokens", "8", "--model.n-kv-heads=2", "-1", "--"]) == [
        "--max_new_tokens", "8", "--model.n_kv_heads=2", "-1", "--"]


def test_every_command_takes_device_and_sampling_defaults_from_one_place():
    import dataclasses
    import inspect

    from babyllama import chat, evaluate, serve
    from babyllama.cli import build_parser
    from babyllama.config import TrainConfig
    from babyllama.sampling import DEVICE, Sampling

    sampling = {f.name: f.default for f in dataclasses.fields(Sampling)}
    commands = build_parser()._subparsers._group_actions[0].choices
    seen = {}
    for name, p in commands.items():
        for a in p._actions:
            if a.dest == "device" or a.dest in sampling:
                assert a.default == (DEVICE if a.dest == "device" else sampling[a.dest]), (name, a.dest)
                seen.setdefault(name, set()).add(a.dest)
    assert seen == {"eval": {"device", *sampling}, "chat": {"device", *sampling},
                    "serve": {"device", *sampling} - {"max_new_tokens"}}  # serve: a request's max_tokens
    assert TrainConfig().device == DEVICE  # pretrain and sft
    for function in (chat.chat, evaluate.evaluate, serve.serve):
        assert inspect.signature(function).parameters["device"].default == DEVICE, function
    assert serve.Common.model_fields["temperature"].default is None  # a request without one: the server's
    assert serve.Common.model_fields["top_p"].default is None


def test_version_prints_the_package_version():
    """`babyllama --version` was "error: the following arguments are required: command" with exit code 2."""
    import babyllama
    from babyllama.settings import read_toml

    project = read_toml(Path(__file__).parents[1] / "pyproject.toml")["project"]
    r = run_cli("--version")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"babyllama {project['version']}\n", "")
    assert babyllama.__version__ == project["version"]


def test_help_shows_every_default():
    from babyllama.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    parsers = {**commands, **{f"tokenizer {k}": v for k, v in
                              commands["tokenizer"]._subparsers._group_actions[0].choices.items()}}
    shown = 0
    for name, p in parsers.items():
        text = " ".join(p.format_help().split())
        for a in p._actions:
            none = a.default is None or a.default is False or a.default == ""
            if a.option_strings and a.dest != "help" and not none:
                assert f"(default: {a.default})" in text, (name, a.dest)
                shown += 1
    assert shown > 25  # pretokenize --sft's filters default to None (refused without --sft), said "default 0: off"
    text = " ".join(commands["sft"].format_help().split())
    assert "warmup_steps 1000" in text and "ddp_timeout 1800" in text and "device 'auto'" in text
    for name in ("pretrain", "sft", "dpo"):  # a default worked out at the start is said in words, not as ''
        assert "''" not in " ".join(commands[name].format_help().split())
    said = {  # each stage's own default or need, not a text for all three
        "pretrain": "out_dir (runs/pretrain, or beside the --init run: runs/x/final -> runs/x-pretrain), tokenizer "
                    "(the one saved with the data), init (none: random weights), max_steps 0 (the length comes from "
                    "tokens or epochs)",
        "sft": "out_dir (beside the --init run: runs/x/final -> runs/x-sft), tokenizer (the one saved with --init), "
               "init (none: pass --init, the model to fine-tune), max_steps 0",
        "dpo": "out_dir (beside the --init run: runs/x/final -> runs/x-dpo), tokenizer (the one saved with --init), "
               "init (none: pass --init, the model to tune and the reference), max_steps 0",
    }
    for name, text in said.items():
        assert text in " ".join(commands[name].format_help().split()), name
    sft_data = ["val_fraction 0.02", "data_workers 0 (one per CPU core), min_prompt_chars 0 (no limit), "
                "max_prompt_chars 0 (no limit), min_answer_chars 0 (no limit), max_answer_chars 0 (no limit)"]
    sft_data = {"sft": [*sft_data, "sft_cache (OUT_DIR/sft_tokens), data_workers"],  # the token cache's: SFT and DPO
                "dpo": [*sft_data, "sft_cache (OUT_DIR/dpo_tokens), data_workers"]}
    stage_only = {"pretrain": ["doc_mask False"], "sft": ["pack False", "lora_rank 0", "lora_alpha 32.0",
                                                           *sft_data["sft"]],
                  "dpo": ["lora_rank 0", "lora_alpha 32.0", "beta 0.1", "label_smoothing 0.0",
                          "precompute_ref_log_probs False", "rpo_alpha 0.0", *sft_data["dpo"]]}
    for name, own in stage_only.items():  # each stage lists its own settings, not the other stages'
        text = " ".join(commands[name].format_help().split())
        others = {s for settings in stage_only.values() for s in settings} - set(own)
        assert all(s in text for s in own) and not [s for s in others if s in text], name


def test_help_lists_the_model_settings_of_pretraining_and_says_sft_and_dpo_take_the_init():
    from babyllama.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    text = " ".join(commands["pretrain"].format_help().split())
    assert ("model settings (--model.key value) and their defaults: preset 'demo' (or baby-218m, baby-92m: the preset "
            "sets every value below, and --model.key overrides one), dim 256, n_layers 4, n_heads 8, n_kv_heads 4, "
            "vocab_size 8192, hidden_dim (LLaMA's 2/3 * 4 * dim, rounded up to multiple_of), multiple_of 32, norm_eps "
            "1e-05, max_seq_len 256, rope_theta 10000.0, dropout 0.0, tie_embeddings True; with --init (continued "
            "pretraining) the model is the init's, of whose settings only --model.dropout can change.") in text
    for name in ("sft", "dpo"):
        text = " ".join(commands[name].format_help().split())
        assert text.endswith("model settings: the model is --init's; of its settings only --model.dropout can change "
                             "(default: the init's).") and "n_layers" not in text, name


@pytest.mark.parametrize("rank, speaks", [(None, True), ("0", True), ("1", False), ("7", False)])
def test_only_rank_0_or_a_process_alone_speaks(monkeypatch, rank, speaks):
    from babyllama.progress import is_rank0

    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    assert is_rank0() is speaks


def handles_sigterm(pid: int) -> bool:
    """Whether process pid has a handler of its own for SIGTERM (SigCgt of /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


@pytest.mark.parametrize("stop, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_during_tokenizer_training_acts_at_once_and_keeps_the_earlier_tokenizer(tmp_path, bpe_tokenizer, stop,
                                                                                         code):
    """Ctrl-C took 60 s to act on 36 MB: the Rust trainer's merges run no Python, and a signal's handler runs only
    in the main thread between Python instructions. They run in a thread now, the main thread waiting on it. Here
    3 MB of random Chinese: about 5 s of training on 2 busy cores, stopped half a second after reading ends."""
    import random

    rng = random.Random(0)
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    lines = ("，".join("".join(rng.choices(chars, k=11)) for _ in range(30)) for _ in range(3000))
    (tmp_path / "c.txt").write_text("\n".join(lines), encoding="utf-8")
    bpe_tokenizer.save(tmp_path / "tok")
    before = {p.name: p.read_bytes() for p in (tmp_path / "tok").iterdir()}
    proc = subprocess.Popen([sys.executable, "-m", "babyllama", "tokenizer", "train", "--input", tmp_path / "c.txt",
                             "--vocab_size", "20000", "--out_dir", tmp_path / "tok"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert any(line.startswith("INFO babyllama.tokenizer: training on 3000 of 3000") for line in proc.stderr)
    time.sleep(0.5)
    proc.send_signal(stop)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=120)
    waited = time.monotonic() - sent
    assert proc.returncode == code and "Traceback" not in err, err
    assert waited < 1.5, f"the stop took {waited:.1f} s to act"
    assert {p.name: p.read_bytes() for p in (tmp_path / "tok").iterdir()} == before
    how = "interrupted" if stop == signal.SIGINT else "stopped by SIGTERM"
    assert err.splitlines()[-1] == (f"babyllama: {how}; the earlier output at {tmp_path / 'tok'}, if any, is kept; "
                                    "run the same command to start again.")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the signal mask in /proc")
def test_a_sigterm_while_torch_imports_is_the_stop_sentence_and_nothing_else(tmp_path):
    """The handler raised inside an import: a module left half made (an ImportError traceback later), a library's
    bare except swallowing it (the command went on), or torch's exit hook logging "FakeTensor cache stats" after
    the sentence. Killed at several moments from when its handler is in place, while torch imports: fractions of
    the time from then until the command, not stopped, has said its error (about 0.9 s on a quiet machine)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def started(out: Path) -> tuple[subprocess.Popen, float]:
        proc = subprocess.Popen([sys.executable, "-m", "babyllama", "pretrain", "--config", "configs/demo.toml",
                                 "--data", str(tmp_path / "none"), "--out_dir", str(out)], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).parents[1])
        while not handles_sigterm(proc.pid):
            time.sleep(0.001)
        return proc, time.monotonic()

    def unstopped() -> float:
        proc, t0 = started(tmp_path / "unstopped")
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2 and "does not exist" in err, err
        return time.monotonic() - t0

    handled, stopped, seen = min(unstopped(), unstopped()), 0, []  # the first run may be slowed by a cold cache
    for fraction in (0, 0.1, 0.2, 0.4, 0.6, 0.75):
        proc, _ = started(tmp_path / f"run{fraction}")
        time.sleep(fraction * handled)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        seen.append((fraction, proc.returncode, err[-300:]))
        if "Traceback" in err or "INFO" in err or list(tmp_path.iterdir()):  # the whole stderr (assert cuts it)
            pytest.fail(f"signal at {fraction}: exit {proc.returncode}, stderr:\n{err}", pytrace=False)
        if proc.returncode in (2, -signal.SIGTERM) and err.splitlines() == [f"babyllama: error: {tmp_path / 'none'} "
                                                                            "does not exist."]:
            handled = min(handled, unstopped())  # measured again: the later fractions of a quicker run
            continue  # ran faster than the first (a busy machine): its error said, the signal came as it exited
        again = r"to start again( \(no checkpoint was saved yet\))?"  # no note: stopped before the command was known
        assert proc.returncode == 143 and re.fullmatch(r"babyllama: stopped by SIGTERM; run the same command "
                                                       rf"{again}\.", err.splitlines()[-1]), err
        stopped += 1
    assert stopped >= 4, f"only {stopped} of 6 signals came while the command ran ({handled:.2f} s unstopped): {seen}"


def test_an_error_of_one_rank_alone_is_said_with_its_rank(monkeypatch, capsys):
    """A process of a torchrun job other than the first, not stopped by torchrun within the grace, had an error of
    its own: it says it, with its rank; rank 0 says its errors at once; the SIGTERM handler is put back."""
    from babyllama import cli
    from babyllama.errors import UserError

    monkeypatch.setattr(cli, "RANK_GRACE_S", 0.01)
    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setenv("RANK", "1")
    cli.say_once(UserError("shard 3 is cut."))
    assert capsys.readouterr().err == "babyllama: error: (rank 1) shard 3 is cut.\n"
    assert signal.getsignal(signal.SIGTERM) is handler
    monkeypatch.setenv("RANK", "0")
    cli.say_once(UserError("shard 3 is cut."))
    assert capsys.readouterr().err == "babyllama: error: shard 3 is cut.\n"
    monkeypatch.setattr(cli, "first_to_say", lambda: False)  # another process of the joined job said why first
    cli.say_once(UserError("shard 3 is cut."))
    assert capsys.readouterr().err == ""


def test_a_file_where_a_folder_is_taken_is_called_a_file(tmp_path):
    """`report FILE` said "run directory FILE does not exist", `chat FILE` "does not exist or is not a directory":
    every command that takes a folder says that the path is a file, and what to pass; a folder as --config too."""
    f = tmp_path / "mixed.jsonl"
    f.write_text(json.dumps({"text": "一段文字"}, ensure_ascii=False) + "\n")
    checkpoint = f"checkpoint {f} is a file, not a folder; pass a checkpoint's folder (a run's final/ or " \
                 "checkpoints/step_NNNNNN/)."
    shards = f"{f} is a file, not a folder; pass a folder of token shards, the --out_dir of babyllama pretokenize " \
             "(with manifest.json)."
    for args, error in [
        (["report", f], f"run directory {f} is a file, not a folder; pass a run's folder or a folder of runs (e.g. "
                        "runs/demo)."),
        (["report", tmp_path / "none"], f"run directory {tmp_path / 'none'} does not exist."),
        (["chat", f], checkpoint), (["serve", f], checkpoint), (["eval", f, "--out_dir", tmp_path / "e"], checkpoint),
        (["export", f, "--out", tmp_path / "x"], checkpoint),
        (["sft", "--init", f, "--data", f, "--out_dir", tmp_path / "s"], checkpoint),
        (["chat", tmp_path / "none"], f"checkpoint {tmp_path / 'none'} does not exist."),
        (["pretokenize", "--merge", f, tmp_path / "e", "--out_dir", tmp_path / "m"], shards),
        (["pretrain", "--config", tmp_path, "--data", tmp_path], f"config file {tmp_path} is a folder, not a file; "
                                                                  "pass a TOML file (e.g. configs/demo.toml)."),
    ]:
        r = run_cli(*args)
        assert (r.returncode, r.stderr.splitlines()[-1]) == (2, f"babyllama: error: {error}"), args


def test_a_training_run_passed_as_a_checkpoint_is_named_as_one(bpe_tokenizer, tmp_path, capsys):
    """`chat R/sft` (the run, not its checkpoint) said "R/sft has neither tokenizer.json nor tokenizer.model; copy
    into it the tokenizer...", `sft --init R/sft` "has no model.safetensors", `export --adapter` "is not a LoRA
    checkpoint": every command that takes a checkpoint says that it is a run, and which checkpoint to pass."""
    from babyllama.checkpoint import save_checkpoint, step_checkpoint
    from babyllama.cli import main
    from babyllama.config import load_config
    from tests.conftest import sharp_model, tiny_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(load_config(None, ["--out_dir", str(run)]).to_dict()))
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"instruction": "问", "output": "答"}, ensure_ascii=False) + "\n")
    commands = [["chat", run], ["serve", run], ["eval", run, "--out_dir", tmp_path / "e"],
                ["export", run, "--out", tmp_path / "x"], ["export", run, "--adapter", "--out", tmp_path / "x"],
                ["export", run, "--format", "gguf", "--out", tmp_path / "x.gguf"],
                ["sft", "--init", run, "--data", data, "--out_dir", tmp_path / "s"],
                ["dpo", "--init", run, "--data", data, "--out_dir", tmp_path / "d"],
                ["pretrain", "--init", run, "--data", tmp_path, "--out_dir", tmp_path / "p"]]
    model = sharp_model(tiny_config(vocab_size=600))
    for saved, example in [(None, None), (step_checkpoint(run, 2), step_checkpoint(run, 2)),
                           (run / "final", run / "final")]:
        if saved is not None:
            save_checkpoint(saved, model, bpe_tokenizer)
        for args in commands:
            assert main([str(a) for a in args]) == 2, args
            said = capsys.readouterr().err.splitlines()[-1]
            assert said == "babyllama: error: " + (
                f"{run} is a training run, not a checkpoint; pass one of its checkpoints, e.g. {example}."
                if example else f"{run} is a training run, not a checkpoint, and has saved none yet; pass a "
                                "checkpoint (a run's final/ or checkpoints/step_NNNNNN/)."), args
    assert main(["chat", str(run / "checkpoints")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"babyllama: error: {run / 'checkpoints'} holds a run's step "
                                                        f"checkpoints, not one; pass one of them, e.g. "
                                                        f"{step_checkpoint(run, 2)}.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "sft.jsonl"]
    assert main(["chat", str(tmp_path)]) == 2  # a folder of runs, as the demo's: "not a checkpoint: no config.json"
    assert capsys.readouterr().err.splitlines()[-1] == (f"babyllama: error: {tmp_path} holds training runs, not a "
                                                        f"checkpoint; pass one of their checkpoints, e.g. "
                                                        f"{run / 'final'} (the newest).")


def test_a_checkpoint_command_says_what_a_folder_is(tmp_path, bpe_tokenizer):
    """`chat TOKENS` (pretokenize's output) said "TOKENS is not a checkpoint: it has no config.json."; it says what the
    folder is, as the data commands say it of a folder that is not data (output_kind, own_output)."""
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / "manifest.json").write_text("{}")
    (tmp_path / "tokens" / "shard_00000.bin").write_bytes(b"")
    bpe_tokenizer.save(tmp_path / "tok")
    (tmp_path / "empty").mkdir()
    for name, said in [("tokens", "is a folder of token shards, not a checkpoint; pass a checkpoint's folder (a run's "
                                  "final/ or checkpoints/step_NNNNNN/)."),
                       ("tok", "is a tokenizer, not a checkpoint; pass a checkpoint's folder (a run's final/ or "
                               "checkpoints/step_NNNNNN/)."),
                       ("empty", "is not a checkpoint: it has no config.json.")]:
        r = run_cli("chat", tmp_path / name, stdin="hi\n")
        assert (r.returncode, r.stderr.splitlines()[-1]) == (2, f"babyllama: error: {tmp_path / name} {said}"), name


def test_a_stop_says_how_each_command_goes_on(monkeypatch, capsys, tmp_path):
    """Ctrl-C or SIGTERM said "run the same command to continue" of every command, but a rerun of prepare,
    pretokenize, tokenizer train or export starts from zero, and chat and serve have nothing to run again. Each
    says what is true of it: continue (training with a checkpoint, eval, datatrove, the demo), start again (with the
    earlier output kept where it is written aside and moved in whole, pretokenize --sft's cache too; a training run
    with no checkpoint yet, as sft or dpo stopped while they built their token cache, which --resume built again from
    its first record), or nothing."""
    from babyllama import cli
    from babyllama.errors import Terminated

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.toml").write_text('[train]\nout_dir = "p"\n')
    for run in ("p", "ck-sft", "mine"):  # pretrain's out_dir by c.toml, sft's beside --init, dpo's by --out_dir
        (tmp_path / run / "checkpoints" / "step_000061").mkdir(parents=True)
    (tmp_path / "none" / "checkpoints" / ".step_000001.tmp-7").mkdir(parents=True)  # a checkpoint half written
    (tmp_path / "refs" / "ref_logps.parts").mkdir(parents=True)  # dpo stopped in its precompute
    again, kept = "run the same command to start again.", "the earlier output at o, if any, is kept; "
    first = "; run the same command to start again (no checkpoint was saved yet)."
    for argv, said in [
        (["chat", "ck"], "."), (["serve", "ck"], "."),
        (["pretrain", "--config", "c.toml"], "; run the same command with --resume to continue."),
        (["sft", "--init", "ck", "--resume"], "; run the same command to continue."),
        (["dpo", "--init", "ck", "--out_dir", "mine"], "; run the same command with --resume to continue."),
        (["pretrain", "--config", "c.toml", "--out_dir", "none"], first),
        (["sft", "--init", "other", "--resume"], first), (["dpo", "--init", "ck"], first),
        (["dpo", "--init", "ck", "--out_dir", "refs"], f"{first[:-2]}; the reference log-probs computed so far are "
                                                       "kept)."),
        (["pretrain", "--config", "missing.toml"], first),
        (["eval", "ck"], "; run the same command to continue."), (["demo"], "; run the same command to continue."),
        (["prepare", "--input", "a", "--out_dir", "o", "--engine", "datatrove"], "; run the same command to continue."),
        (["prepare", "--input", "a", "--out_dir", "o"], f"; {kept}{again}"),
        (["pretokenize", "--input", "a", "--tokenizer", "t", "--out_dir", "o"], f"; {kept}{again}"),
        (["pretokenize", "--merge", "a", "b", "--out_dir", "o"], f"; {kept}{again}"),
        (["pretokenize", "--sft", "--input", "a", "--tokenizer", "t", "--max_seq_len", "8", "--out_dir", "o"],
         f"; {kept}{again}"),
        (["tokenizer", "train", "--input", "a", "--out_dir", "o"], f"; {kept}{again}"),
        (["tokenizer", "info", "t"], f"; {again}"), (["report", "r"], f"; {again}"),
        (["export", "ck", "--out", "o"], f"; {kept}{again}"),
        (["export", "ck", "--format", "gguf", "--out", "o"], f"; {kept}{again}"),
    ]:
        args, args.overrides = cli.build_parser().parse_known_args(argv)  # as main makes them
        assert cli.stopped("interrupted", args) == f"babyllama: interrupted{said}", argv
    assert cli.stopped("stopped by SIGTERM", argparse.Namespace()) == f"babyllama: stopped by SIGTERM; {again}"

    def stop(error):
        def command(args):
            raise error
        return command

    for name, error, code, said in [("cmd_chat", KeyboardInterrupt, 130, "interrupted"),
                                    ("cmd_serve", Terminated, 143, "stopped by SIGTERM")]:
        monkeypatch.setattr(cli, name, stop(error))
        assert cli.main([name[4:], "ck"]) == code
        assert capsys.readouterr().err == f"babyllama: {said}.\n"


def test_a_path_that_is_there_but_no_regular_file_is_not_called_missing(tmp_path):
    """`eval C --prompts /dev/null` said "does not exist or is not a regular file", `--qa /dev/null` and
    `--tokenizer /dev/null` "does not exist": /dev/null exists. Each says which of the two is the case."""
    from babyllama.data.sources import expand_inputs
    from babyllama.errors import UserError
    from babyllama.evaluate import read_prompts
    from babyllama.settings import read_toml
    from babyllama.tokenizer import load_tokenizer

    device, missing = Path("/dev/null"), tmp_path / "none"
    for read, what, remedy in [(read_prompts, "prompts file", "; pass a text file, one prompt a line."),
                               (lambda p: expand_inputs([p]), "input", "."),
                               (read_toml, "config file", "."),
                               (load_tokenizer, "tokenizer", "; train one with `babyllama tokenizer train` or pass "
                                                             "a path.")]:
        for path, why in ((device, "is not a regular file"), (missing, "does not exist")):
            with pytest.raises(UserError) as e:
                read(path)
            assert str(e.value) == f"{what} {path} {why}{remedy}", what
    with pytest.raises(UserError) as e:
        read_prompts(tmp_path)
    assert str(e.value) == f"prompts file {tmp_path} is a folder, not a file; pass a text file, one prompt a line."


def test_a_sigterm_while_the_command_says_its_error_is_said_after_it_not_raised(monkeypatch, capsys):
    """A SIGTERM put off during an import came back (SIGALRM) while run's handler said the command's error: raised
    there, outside the command's try, Terminated was a traceback (seen once in the full suite under load). Now the
    command's end puts it off for main to say."""
    from babyllama import cli
    from babyllama.errors import UserError

    def fails(args):
        raise UserError("data none does not exist.")

    def said_as_sigterm_comes(e):
        os.kill(os.getpid(), signal.SIGTERM)
        print(f"babyllama: error: {e}", file=sys.stderr)

    monkeypatch.setattr(cli, "cmd_chat", fails)
    monkeypatch.setattr(cli, "say_once", said_as_sigterm_comes)
    assert cli.main(["chat", "ck"]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.splitlines() == ["babyllama: error: data none does not exist.",
                                                    "babyllama: stopped by SIGTERM."]


def test_a_sigterm_after_the_command_ended_is_said_not_raised():
    """A SIGTERM put off during an import came back (SIGALRM) after main had said the stop: Terminated raised
    outside the command was a traceback after the sentence (seen under load)."""
    from babyllama.cli import said_from_now_on, terminated_as_ctrl_c

    with terminated_as_ctrl_c() as deferred:
        said_from_now_on(deferred)
        os.kill(os.getpid(), signal.SIGTERM)
        signal.raise_signal(signal.SIGALRM)  # the put-off one, brought back
        assert deferred == [signal.SIGTERM, signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_a_config_with_settings_outside_its_tables_names_only_those(tmp_path, capsys, monkeypatch):
    """Settings above any table were refused with "only [model] and [train] tables are allowed, got ['batch_size',
    'data', 'max_steps', 'model', 'out_dir']", which named the allowed model too and not where the others go."""
    from babyllama.cli import main

    monkeypatch.chdir(tmp_path)  # nothing written: not out_dir, not the default runs/pretrain
    for text, said in (
            ('batch_size = 2\ndata = "d"\nmax_steps = 3\nout_dir = "o"\n[model]\ndim = 64\n',
             "only [model] and [train] tables are allowed; put batch_size, data, max_steps and out_dir under "
             "[train]."),
            ('preset = "demo"\ndim = 64\nzzz = 1\nlr = 1\n[extra]\nx = 1\n[train]\nout_dir = "o"\n',
             "only [model] and [train] tables are allowed, not zzz or [extra]; put preset and dim under [model], "
             "lr under [train]."),
            ('model = "demo"\ntrain = 5\n', "only [model] and [train] tables are allowed, not model as a value or "
             "train as a value.")):  # a traceback: 'str' object is not a mapping
        (tmp_path / "c.toml").write_text(text)
        for command in ("pretrain", "sft"):
            assert main([command, "--config", "c.toml"]) == 2
            assert capsys.readouterr().err == f"babyllama: error: c.toml: {said}\n"
    assert list(tmp_path.iterdir()) == [tmp_path / "c.toml"]


def test_a_config_file_must_be_utf8_and_may_start_with_a_byte_order_mark(tmp_path, capsys, monkeypatch):
    """A config file with a GBK comment (`# 演示配置`) or of binary bytes was a UnicodeDecodeError traceback, exit 1,
    in every command that reads one; a UTF-8 one that starts with a byte-order mark (Notepad's) was "not valid TOML
    (Invalid statement (at line 1, column 1))". The one is a sentence, exit 2; the other is read."""
    from babyllama.cli import main
    from babyllama.settings import read_toml

    monkeypatch.chdir(tmp_path)  # nothing written: not out_dir, not the default runs/pretrain
    Path("gbk.toml").write_bytes("# 演示配置\n[train]\nmax_steps = 3\n".encode("gbk"))
    Path("bin.toml").write_bytes(b"[train]\nmax_steps = 3\n\x89PNG\r\n\x1a\n\x00\xff")
    Path("bom.toml").write_bytes("\ufeff# 演示配置\n[train]\nmax_steps = 3\n".encode())
    for name, byte, line in (("gbk.toml", 0xd1, 1), ("bin.toml", 0x89, 3)):
        for command in ("pretrain", "sft", "dpo"):
            assert main([command, "--config", name]) == 2
            assert capsys.readouterr().err == (f"babyllama: error: {name} is not UTF-8 text (byte 0x{byte:02x} on line "
                                               f"{line}), as a TOML file must be; save it as UTF-8.\n")
    assert read_toml("bom.toml") == {"train": {"max_steps": 3}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin.toml", "bom.toml", "gbk.toml"]


def test_a_path_given_twice_is_refused_another_value_is_replaced(tmp_path, monkeypatch):
    """`--config a.toml --config b.toml` read b.toml alone, silently, as argparse keeps a flag's last value; so did
    `--input a --input b`, `--out_dir a --out_dir b` (a flag or a setting) and sft's --init with --train.init. A path
    given twice is refused, before anything is read or written; another value given again replaces the one before
    (a script's defaults changed after them, as the tests' and the README check's base settings are)."""
    from babyllama.cli import build_parser
    from babyllama.settings import parse_overrides

    monkeypatch.chdir(tmp_path)
    for args, said in (
            (["pretrain", "--config", "a.toml", "--config=b.toml"],
             "argument --config: given twice (a.toml, then b.toml); give it once."),
            (["sft", "--config", "a.toml", "--config", "b.toml"],
             "argument --config: given twice (a.toml, then b.toml); give it once."),
            (["pretokenize", "--input", "a", "b", "--tokenizer", "t", "--input", "c", "--out_dir", "o"],
             "argument --input: given twice (a b, then c); give it once, with all its paths after it."),
            (["prepare", "--input", "a", "--out_dir", "o", "--out-dir", "p"],
             "argument --out_dir: given twice (o, then p); give it once."),
            (["eval", "ck", "--qa", "q.jsonl", "--qa", "q.jsonl"],
             "argument --qa: given twice (q.jsonl, then q.jsonl); give it once.")):
        r = run_cli(*args)
        assert (r.returncode, r.stderr.splitlines()[-1]) == (2, f"babyllama: error: {said}"), args
    for args, said in (
            (["pretrain", "--out_dir", "a", "--lr", "1e-3", "--out_dir", "b"],
             "setting out_dir given twice (--out_dir a, then --out_dir b)"),
            (["pretrain", "--data", "d", "--train.data=e"], "setting data given twice (--data d, then --train.data e)"),
            (["sft", "--train.init", "b", "--init", "a"], "setting init given twice (--init a and --train.init b)"),
            (["dpo", "--data", "a", "b", "--train.data", "c"],
             "setting data given twice (--data a b and --train.data c)")):
        r = run_cli(*args)
        assert (r.returncode, r.stderr) == (2, f"babyllama: error: {said}; give it once.\n"), args
    assert list(tmp_path.iterdir()) == []
    args, _ = build_parser().parse_known_args(["eval", "ck", "--limit", "2", "--device", "cpu", "--limit", "6"])
    assert args.limit == 6
    assert parse_overrides(["--max_steps", "20", "--lr", "1", "--train.max_steps=4", "--preset", "demo",
                            "--model.preset", "tiny"]) == {"train": {"max_steps": "4", "lr": "1"},
                                                           "model": {"preset": "tiny"}}


def test_no_flag_is_taken_abbreviated(tmp_path, monkeypatch):
    """`sft --resum` was --resume and `pretrain --conf` --config (argparse's allow_abbrev), while a setting after them
    (--train.x) is never abbreviated: a prefix would change meaning when a flag was added. No parser takes a prefix;
    one of the command's own flags is refused as unrecognized, naming the flag it may mean, before anything is read."""
    monkeypatch.chdir(tmp_path)
    for args, given, meant in ((["sft", "--init", "ck", "--resum"], "--resum", "--resume"),
                               (["dpo", "--conf=c.toml"], "--conf", "--config"),
                               (["pretrain", "--conf", "c.toml", "--lr", "1"], "--conf", "--config"),
                               (["prepare", "--inp", "a", "--out_dir", "o"], "--inp", "--input"),
                               (["export", "ck", "--form", "gguf", "--out", "x.gguf"], "--form", "--format"),
                               (["eval", "ck", "--out", "e"], "--out", "--out_dir")):
        r = run_cli(*args)
        assert (r.returncode, r.stderr) == (2, f"babyllama: error: unrecognized argument {given} (flags are spelled "
                                               f"in full: did you mean {meant}?).\n"), args
    r = run_cli("pretrain", "--inp", "a")  # no flag of pretrain's: a setting, unknown
    assert r.returncode == 2 and r.stderr.startswith("babyllama: error: unknown train setting 'inp'; known: ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overrides, flag", [(["--max_steps"], "--max_steps"), (["--lr", "1", "--model.dim"],
                                                                                 "--model.dim"),
                                             (["--lr", "--max_steps", "1", "2"], "--lr"),
                                             (["--max_steps", "--lr=1"], "--max_steps")])
def test_a_setting_without_its_value_is_named(overrides, flag):
    """"settings come in pairs `--key value`; got --lr --max_steps 1 2" left the user to find the flag at fault
    (or said "expected a --key, got '1'"): the setting without its value is named."""
    from babyllama.errors import UserError
    from babyllama.settings import parse_overrides

    with pytest.raises(UserError) as e:
        parse_overrides(overrides)
    assert str(e.value) == f"setting {flag} has no value; settings come in pairs `--key value`."


def test_a_flag_replaces_the_config_files_path_as_it_does_any_value(tmp_path, monkeypatch):
    """A tester read "a path is given once ... where the first would be ignored silently" as covering a config's
    `data = [...]` beside `--data`, which the flag replaced: the README says what holds, that the command line
    replaces the config file's value, a path's too, and its data list whole (no merging), as its
    `dpo --config configs/dpo-demo.toml --out_dir runs/demo/dpo-lora` relies on."""
    import babyllama.train.dpo
    import babyllama.train.stages
    from babyllama.cli import main

    monkeypatch.chdir(tmp_path)
    Path("c1.toml").write_text('[train]\ndata = ["y.jsonl", "z.jsonl"]\nout_dir = "from_config"\nmax_steps = 2\n')
    ran = []
    for module, name in ((babyllama.train.stages, "sft"), (babyllama.train.dpo, "dpo")):
        monkeypatch.setattr(module, name, lambda cfg, resume: ran.append((cfg.train.data, cfg.train.out_dir,
                                                                           cfg.train.max_steps)) or Path("f"))
    assert main(["sft", "--init", "ck", "--config", "c1.toml", "--data", "x.jsonl", "--out_dir", "o"]) == 0
    assert main(["dpo", "--init", "ck", "--config", "c1.toml", "--max_steps", "3"]) == 0
    assert ran == [(["x.jsonl"], "o", 2), (["y.jsonl", "z.jsonl"], "from_config", 3)]
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8").split())
    assert ("A flag replaces the value of its setting in the config file, a path's too (`--out_dir runs/x` its "
            "`out_dir`, `--data x.jsonl` its whole `data` list: the two are not merged)") in readme


def test_a_ctrl_c_as_python_exits_prints_nothing_after_the_sentence(tmp_path):
    """Ctrl-C in the second or two that Python takes to exit after a command (torch's atexit callbacks, the threads
    it joins) printed "Exception ignored in atexit callback ... KeyboardInterrupt" after the command's sentence, or,
    as the sentence was printed, a traceback. Once the command has ended, Ctrl-C is ignored. Here an exit hook of a
    second makes that time certain."""
    script = ("import atexit, sys, time\n"
              "atexit.register(time.sleep, 1)  # run last: Python is exiting\n"
              "from babyllama.cli import main\n"
              "sys.exit(main())\n")
    proc = subprocess.Popen([sys.executable, "-c", script, "report", str(tmp_path / "none")], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stderr.readline() == f"babyllama: error: run directory {tmp_path / 'none'} does not exist.\n"
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    assert (proc.returncode, rest) == (2, "")
    from babyllama.cli import main

    assert main(["report", str(tmp_path / "none")]) == 2  # called with argv, main gives Ctrl-C back
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)


def test_output_into_a_pipe_whose_reader_has_gone_ends_quietly_as_cat_does(tmp_path, bpe_tokenizer):
    """`babyllama chat CKPT < many.txt | head -c 100` and `babyllama eval ... | head -1` ended with BrokenPipeError
    tracebacks once head had gone. Every command now ends as cat does: no word of it, exit status 128 + SIGPIPE
    (141); chat says only what it said before, and eval's results are written before its summary is printed."""
    from babyllama.checkpoint import save_checkpoint
    from tests.conftest import sharp_model, tiny_config

    ck = tmp_path / "ck"
    save_checkpoint(ck, sharp_model(tiny_config(vocab_size=600, max_seq_len=64)), bpe_tokenizer)
    read, write = os.pipe()
    os.close(read)  # the reader has gone before the first write
    try:
        said = []
        for args, stdin in [(["chat", ck, "--max_new_tokens", "4"], "你好\n" * 50),
                            (["eval", ck, "--out_dir", tmp_path / "eval", "--max_new_tokens", "4"], "")]:
            r = subprocess.run([sys.executable, "-m", "babyllama", *map(str, args)], input=stdin, stdout=write,
                               stderr=subprocess.PIPE, text=True, timeout=300)
            said.append((r.returncode, r.stderr.splitlines()[0], "Error" in r.stderr or "Exception" in r.stderr))
    finally:
        os.close(write)
    assert said == [(141, "chat: running on cpu", False), (141, "eval: running on cpu", False)]
    assert signal.SIGPIPE == 141 - 128 and (tmp_path / "eval" / "eval.json").is_file()


def test_a_flag_out_of_its_range_is_one_sentence_not_the_usage_block():
    """argparse's errors printed the whole usage block, then `babyllama chat: error: argument ...`: the README
    promises one sentence, `babyllama: error: ...`, and exit code 2."""
    for args, said in [(["chat", "ckpt", "--max_new_tokens", "0"], "argument --max_new_tokens: 0 is below 1."),
                       (["prepare", "--input", "a", "--out_dir", ""],
                        'argument --out_dir: an empty path names no file or folder; give one ("." for this folder).'),
                       (["eval"], "the following arguments are required: checkpoint (see babyllama eval --help).")]:
        r = run_cli(*args)
        assert (r.returncode, r.stdout, r.stderr) == (2, "", f"babyllama: error: {said}\n"), args
