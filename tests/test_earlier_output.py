"""A command whose inputs turn out to hold nothing usable says so in one sentence and leaves the earlier output in its
folder as it was, byte for byte: a new output replaces the old one only once it is complete and holds something."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from babyllama import tokenizer
from babyllama.data import sft_tokens, shards
from tests.conftest import generated_corpus, run_cli

INVALID_JSON = "{oops\n{nope\n"
NO_TEXT_FIELD = '{"title": "标题"}\n{"id": 2}\n'  # valid JSON, none of a known schema's fields
SFT = [{"instruction": f"问题{i}：长城在哪里？", "output": f"回答{i}：在中国北方。"} for i in range(40)]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below folder, by its path there, with its bytes."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture()
def made(tmp_path, bpe_tokenizer):
    """A good corpus, SFT records and a tokenizer, and a command line of each command that reads them: its
    output folder is out/COMMAND."""
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False)
                                                     for t in generated_corpus(60)))
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in SFT))
    bpe_tokenizer.save(tmp_path / "tok")
    return tmp_path


COMMANDS = {  # command -> (its arguments less --input, the good input)
    "prepare": (["prepare", "--min_chars", "5"], "corpus.jsonl"),
    "pretokenize": (["pretokenize", "--tokenizer", "TOK", "--workers", "1"], "corpus.jsonl"),
    "pretokenize --sft": (["pretokenize", "--sft", "--tokenizer", "TOK", "--max_seq_len", "32", "--workers", "1"],
                          "sft.jsonl"),
    "tokenizer train": (["tokenizer", "train", "--vocab_size", "300"], "corpus.jsonl"),
    "prepare --engine datatrove": (["prepare", "--min_chars", "5", "--engine", "datatrove"], "corpus.jsonl"),
    "pretokenize --engine datatrove": (["pretokenize", "--tokenizer", "TOK", "--engine", "datatrove"], "corpus.jsonl"),
}


@pytest.mark.parametrize("bad", [INVALID_JSON, NO_TEXT_FIELD])
@pytest.mark.parametrize("command", COMMANDS)
def test_inputs_of_bad_records_only_leave_the_earlier_output_as_it_was(made, command, bad):
    """Every command that replaces its earlier output removed it first: inputs of bad records only then left an
    empty folder (prepare, pretokenize) or a cache without its manifest (--sft), or trained a tokenizer of no text
    and saved it over the earlier one (tokenizer train)."""
    if "datatrove" in command:
        pytest.importorskip("datatrove")
    args, good = COMMANDS[command]
    args = [str(made / "tok") if a == "TOK" else a for a in args]
    out = made / "out" / command.replace(" ", "_")
    r = run_cli(*args, "--input", made / good, "--out_dir", out)
    assert r.returncode == 0, r.stderr[-2000:]
    before = snapshot(out)
    (made / "bad.jsonl").write_text(bad)
    r = run_cli(*args, "--input", made / "bad.jsonl", "--out_dir", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.splitlines()[-1]
    if command == "pretokenize --sft":
        assert last.startswith(f"babyllama: error: no usable SFT records in {made / 'bad.jsonl'} (2 read, 2 bad"), last
    else:
        first = (":1: not valid JSON (Expecting property name enclosed in double quotes)" if bad == INVALID_JSON else
                 ":1: has none of the fields of a known schema (title)")
        assert last == (f"babyllama: error: every one of the 2 records was bad (the first: {made / 'bad.jsonl'}"
                        f"{first}); nothing was written.")
    assert last.endswith("; nothing was written.") and snapshot(out) == before


@pytest.mark.parametrize("engine", ["embedded", "datatrove"])
def test_documents_all_too_short_leave_the_earlier_output(made, engine):
    if engine == "datatrove":
        pytest.importorskip("datatrove")
    out = made / "out"
    assert run_cli("prepare", "--input", made / "corpus.jsonl", "--out_dir", out, "--engine", engine).returncode == 0
    before = snapshot(out)
    (made / "short.jsonl").write_text('{"text": "短文"}\n{"text": "也短"}\n')
    r = run_cli("prepare", "--input", made / "short.jsonl", "--out_dir", out, "--engine", engine)
    assert (r.returncode, r.stderr.splitlines()[-1]) == (2, "babyllama: error: none of the 2 records was kept: 2 "
                                                            "shorter than --min_chars 10; lower --min_chars or check "
                                                            "the inputs.")
    assert snapshot(out) == before


def test_a_merge_stopped_halfway_leaves_the_earlier_output(made, monkeypatch):
    parts = []
    for i in range(2):
        parts.append(made / f"t{i}")
        assert run_cli("pretokenize", "--input", made / "corpus.jsonl", "--tokenizer", made / "tok", "--out_dir",
                       parts[-1], "--num_shards", "2", "--shard_index", str(i), "--shard_tokens", "300",
                       "--workers", "1").returncode == 0
    out = made / "merged"
    assert run_cli("pretokenize", "--merge", *parts, "--out_dir", out).returncode == 0
    before = snapshot(out)
    linked = []

    def stopped(src, dst):  # Ctrl-C after the first shard of the merge
        if linked:
            raise KeyboardInterrupt
        linked.append(dst)
        os.link(src, dst)

    monkeypatch.setattr(shards, "_link_or_copy", stopped)
    r = run_cli("pretokenize", "--merge", *parts, "--out_dir", out)
    assert (r.returncode, r.stderr.splitlines()[-1]) == (130, f"babyllama: interrupted; the earlier output at {out}, "
                                                              "if any, is kept; run the same command to start again.")
    assert snapshot(out) == before and not (out / shards.STAGE).exists()


def test_a_stop_while_pretokenize_sft_builds_says_the_earlier_cache_is_kept(made, monkeypatch):
    """Ctrl-C while pretokenize --sft built a new cache over an earlier one said only "run the same command to start
    again", though the earlier cache stays whole until the new one's files are complete: it says so, as prepare and
    pretokenize do."""
    args, good = COMMANDS["pretokenize --sft"]
    args = [str(made / "tok") if a == "TOK" else a for a in args]
    out = made / "out" / "sft"
    assert run_cli(*args, "--input", made / good, "--out_dir", out).returncode == 0
    before = snapshot(out)
    (made / "more.jsonl").write_text(json.dumps({"instruction": "问题", "output": "回答"}, ensure_ascii=False))

    def stopped(*a):  # Ctrl-C as the first samples are written
        raise KeyboardInterrupt

    monkeypatch.setattr(sft_tokens, "_write", stopped)
    r = run_cli(*args, "--input", made / good, made / "more.jsonl", "--out_dir", out)
    assert (r.returncode, r.stderr.splitlines()[-1]) == (130, f"babyllama: interrupted; the earlier output at {out}, "
                                                              "if any, is kept; run the same command to start again.")
    assert snapshot(out) == before


def outputs_of(out: Path) -> list[Path]:
    return [f for f in [*out.glob("part_*"), out / "sub", out / "stats.json"] if f.exists()]


def earlier_and_new(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """out with an earlier output (3 parts, a folder, stats.json) and, in its stage, a new one (2 parts, another
    folder, stats.json); returns out and what the new output is."""
    out, stage = tmp_path / "out", tmp_path / "out" / shards.STAGE
    for folder, parts, tag in ((out, 3, "old"), (stage, 2, "new")):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "f").write_text(tag)
        for i in range(parts):
            (folder / f"part_{i}").write_text(f"{tag} {i}")
        (folder / "stats.json").write_text(tag)
    return out, snapshot(stage)


@pytest.mark.parametrize("renames_done", range(6))
def test_a_swap_killed_at_any_rename_is_finished_by_the_next_run(tmp_path, monkeypatch, renames_done):
    """A kill -9 while swap_in renamed the new output in left neither output whole (both lost when the next run
    cleared the stage): the next run finishes the swap from the names swap_in wrote first (its first rename); killed
    before that, the earlier output stays."""
    out, new = earlier_and_new(tmp_path)
    old = {k: v for k, v in snapshot(out).items() if not k.startswith(shards.STAGE)}
    replace, done = Path.replace, []

    def killed_after(self, target):
        if len(done) == renames_done:
            raise SystemExit("kill -9")  # nothing after it runs: no clean-up
        done.append(self)
        return replace(self, target)

    unlink = Path.unlink

    def killed_at_the_end(self, missing_ok=False):  # every rename done, the names not yet removed
        if self.name == shards.SWAPPING:
            raise SystemExit("kill -9")
        return unlink(self, missing_ok)

    monkeypatch.setattr(Path, "replace", killed_after)
    monkeypatch.setattr(Path, "unlink", killed_at_the_end)
    with pytest.raises(SystemExit):
        shards.swap_in(out / shards.STAGE, out, outputs_of, "stats.json")
    monkeypatch.setattr(Path, "replace", replace)
    monkeypatch.setattr(Path, "unlink", unlink)
    assert (out / "stats.json").exists() == (renames_done in (0, 5))  # an output reads as complete, or as not
    whole = new if renames_done else old
    with shards.staged(out, outputs_of, "stats.json") as stage:  # the next run: finishes the swap first
        assert snapshot(out) == whole and list(stage.iterdir()) == []


def test_a_signal_during_the_swap_comes_after_it(tmp_path, monkeypatch):
    """Ctrl-C while swap_in removed the earlier output and renamed the new one in left a folder of neither: it
    waits for the swap's end."""
    out, new = earlier_and_new(tmp_path)
    rmtree = shards.shutil.rmtree

    def interrupted(path, *args, **kw):
        os.kill(os.getpid(), 2)  # SIGINT, the terminal's Ctrl-C
        return rmtree(path, *args, **kw)

    monkeypatch.setattr(shards.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        shards.swap_in(out / shards.STAGE, out, outputs_of, "stats.json")
    assert snapshot(out) == new and not (out / shards.STAGE).exists()


STOPS = {  # command -> the file that marks its output complete
    "prepare": "stats.json", "pretokenize": "manifest.json", "tokenizer train": "babyllama_tokenizer.json",
    "prepare --engine datatrove": "stats.json", "pretokenize --engine datatrove": "manifest.json",
    "pretokenize --sft": "manifest.json",
}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("command", STOPS)
def test_a_stop_that_came_as_the_output_was_made_whole_says_it_is_complete(made, monkeypatch, command, signum):
    """Ctrl-C or SIGTERM while the new output was swapped in (tokenizer train: saved; pretokenize --sft: its cache's
    files renamed in) waits for its end, and then said "run the same command to continue" (--sft: "to start again")
    of an output that was complete: it says the output is."""
    if "datatrove" in command:
        pytest.importorskip("datatrove")
    args, good = COMMANDS[command]
    args = [str(made / "tok") if a == "TOK" else a for a in args]
    out = made / "out" / command.replace(" ", "_")
    module, name = {"tokenizer train": (tokenizer, "write_whole"), "pretokenize --sft": (sft_tokens, "write_json")
                    }.get(command, (shards, "_swap"))
    real = getattr(module, name)

    def stopped(*a):  # the stop comes as the first file of the new output is written into place
        os.kill(os.getpid(), signum)
        return real(*a)

    monkeypatch.setattr(module, name, stopped)
    r = run_cli(*args, "--input", made / good, "--out_dir", out)
    how = "interrupted" if signum == signal.SIGINT else "stopped by SIGTERM"
    assert (r.returncode, r.stderr.splitlines()[-1]) == (128 + signum, f"babyllama: {how}; {out} is complete, "
                                                                        "nothing to run again.")
    assert (out / STOPS[command]).is_file() and not (out / shards.STAGE).exists()


def test_a_stop_as_a_demo_stage_made_its_output_whole_says_how_to_go_on(tmp_path, monkeypatch):
    """The demo's stages run in its process: its data complete, the rest of the demo is not."""
    from babyllama import demo
    from babyllama.errors import Completed

    def stopped(self):
        raise Completed(self.out / "data", signal.SIGINT)

    monkeypatch.setattr(demo.Demo, "data", stopped)
    r = run_cli("demo", "--smoke", "--out_dir", tmp_path / "demo")
    assert (r.returncode, r.stderr.splitlines()[-1]) == (130, "babyllama: interrupted; run the same command to "
                                                              "continue.")
