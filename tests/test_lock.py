"""Output folders held while a command writes them (lock.py): a second command into a held folder is refused at
once with one sentence and leaves it as it was; a holder killed with kill -9 leaves no lock behind."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from babyllama.checkpoint import save_checkpoint
from babyllama.errors import UserError
from babyllama.lock import LOCK, holding, locked
from tests.conftest import run_cli, sharp_model, tiny_config

HOLD = ("import sys; from babyllama.lock import holding\n"
        "with holding(sys.argv[1], sys.argv[2]):\n print('held', flush=True); sys.stdin.read()")
HOLD_AS = ("import sys; from babyllama.cli import build_parser, held\n"  # what the command of argv holds
           "with held(build_parser().parse_args(sys.argv[1:])):\n print('held', flush=True); sys.stdin.read()")


def hold_in_child(out: Path, command: str) -> subprocess.Popen:
    """Another process that holds out until its stdin closes (or it is killed)."""
    return _holding_child(HOLD, str(out), command)


def hold_as(*argv: str | Path) -> subprocess.Popen:
    """Another process that holds what `babyllama ARGV` holds while it runs, until its stdin closes."""
    return _holding_child(HOLD_AS, *map(str, argv))


def _holding_child(code: str, *args: str) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline() == "held\n"
    return child


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


COMMANDS = {  # each names --out_dir OUT; the inputs need not exist: the lock comes first
    "pretokenize": ["pretokenize", "--input", "docs.jsonl", "--tokenizer", "tok"],
    "pretokenize --sft": ["pretokenize", "--sft", "--input", "sft.jsonl", "--tokenizer", "tok", "--max_seq_len", "64"],
    "pretokenize --merge": ["pretokenize", "--merge", "a", "b"],
    "prepare": ["prepare", "--input", "wiki.json"],
    "tokenizer train": ["tokenizer", "train", "--input", "wiki.json", "--vocab_size", "300"],
    "eval": ["eval", "CK", "--data", "tokens"],
    "pretrain --resume": ["pretrain", "--data", "tokens", "--resume"],
    "sft": ["sft", "--init", "CK", "--data", "sft.jsonl"],
    "dpo --resume": ["dpo", "--init", "CK", "--data", "pairs.jsonl", "--resume"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_second_command_into_a_held_out_dir_is_refused_at_once(tmp_path, command, bpe_tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "CK" in COMMANDS[command]:
        save_checkpoint(tmp_path / "CK", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    child = hold_in_child(out, "pretrain")
    try:
        before = contents(out)
        r = run_cli(*COMMANDS[command], "--out_dir", str(out))
        assert (r.returncode, r.stderr.strip().splitlines()[-1]) == (2, (
            f"babyllama: error: {out} is in use by another babyllama pretrain (pid {child.pid}); wait for it or "
            "choose another --out_dir."))
        assert contents(out) == before
    finally:
        child.communicate("")


def test_a_holder_killed_with_kill_9_leaves_no_lock(tmp_path):
    out = tmp_path / "out"
    child = hold_in_child(out, "prepare")
    with pytest.raises(UserError, match=rf"in use by another babyllama prepare \(pid {child.pid}\)"), \
            holding(out, "pretokenize"):
        pass
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    with holding(out, "pretokenize"):  # the OS let go of the dead process's lock
        assert (out / LOCK).read_text() == f"{os.getpid()} pretokenize\n"


def test_a_folder_made_for_a_command_that_wrote_nothing_is_removed_again(tmp_path):
    with pytest.raises(UserError, match="no data"), holding(tmp_path / "a" / "b", "prepare"):
        raise UserError("no data.")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError), holding(tmp_path / "c", "prepare"):
        (tmp_path / "c" / "part_00000.jsonl").write_text("{}\n")
        raise UserError("stopped.")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["part_00000.jsonl"]  # and no .lock


def test_a_cache_folder_made_for_a_build_that_wrote_nothing_is_removed_again(tmp_path):
    """A token cache build refused for its data left the empty cache folder it had locked, which a rerun or report
    then found; the folders locked made go again, those that were there stay, and one written in stays."""
    with pytest.raises(UserError), locked(tmp_path / "run" / "dpo_tokens", "dpo token cache build"):
        raise UserError("no pairs.")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError), locked(tmp_path / "c", "dpo token cache build"):
        (tmp_path / "c" / "manifest.json").write_text("{}")
        raise UserError("stopped.")
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["manifest.json"]



@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_a_stop_while_the_lock_is_taken_leaves_no_folder(tmp_path, monkeypatch, stop):
    """Ctrl-C or SIGTERM (raised as a stop) after the lock file was made, before it was held: the folders made for
    it were left behind with a .lock (a SIGTERM at once after the CLI's handler was in place, seen on a busy
    machine)."""
    import babyllama.lock as lock_module

    def stopped(fd: int, op: int) -> None:
        raise stop()

    monkeypatch.setattr(lock_module.fcntl, "flock", stopped)
    with pytest.raises(stop), holding(tmp_path / "a" / "b", "pretrain"):
        pass
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()  # a folder that was there: as it was, its lock file taken over by the next run
    with pytest.raises(stop), holding(tmp_path / "kept", "pretrain"):
        pass
    assert (tmp_path / "kept").is_dir()


IMPORTS_TORCH = "import sys; from babyllama.cli import main; rc = main(sys.argv[1:]); print(rc, 'torch' in sys.modules)"


@pytest.mark.parametrize("args, held", [
    (["pretrain", "--data", "tokens", "--out_dir", "out"], "out"),
    (["pretrain", "--data", "tokens", "--train.out_dir=out"], "out"),
    (["sft", "--init", "CK", "--data", "sft.jsonl", "--config", "run.toml"], "from-toml"),  # [train] out_dir
    (["dpo", "--init", "runs/x/final", "--data", "pairs.jsonl"], "runs/x-dpo"),  # beside --init's run
], ids=["flag", "train-flag", "toml", "beside-init"])
def test_training_into_a_held_out_dir_is_refused_before_torch_is_imported(tmp_path, args, held):
    """pretrain, sft and dpo were refused only after importing torch and reading --init (4 s or more): the CLI finds
    their out_dir as the stage does, without torch, and holds it first."""
    (tmp_path / "run.toml").write_text('[train]\nout_dir = "from-toml"\n')
    child = hold_in_child(tmp_path / held, "pretrain")
    try:
        r = subprocess.run([sys.executable, "-c", IMPORTS_TORCH, *args], cwd=tmp_path, capture_output=True, text=True)
        assert (r.stdout, r.stderr) == ("2 False\n", f"babyllama: error: {held} is in use by another babyllama "
                                                     f"pretrain (pid {child.pid}); wait for it or choose another "
                                                     "--out_dir.\n")
        assert sorted(p.name for p in (tmp_path / held).iterdir()) == [LOCK]
    finally:
        child.communicate("")


@pytest.mark.parametrize("args, message", [
    (["pretokenize", "--sft", "--input", "sft.jsonl", "--tokenizer", "tok"],
     "pretokenize --sft needs --input, --tokenizer and --max_seq_len (the model's)."),
    (["pretokenize", "--input", "docs.jsonl"], "pretokenize needs --input and --tokenizer, or --merge DIRS."),
    (["pretokenize", "--sft", "--input", "a", "--tokenizer", "t", "--max_seq_len", "8", "--bos"],
     "--bos cannot go with --sft: it is a setting of token shards, which the SFT token cache does not use; leave "
     "it out."),
    (["prepare"], "prepare needs --input PATH... or --demo."),
    (["prepare", "--input", "a", "--workers", "2"],
     "--workers needs --engine datatrove: the embedded prepare runs in one process."),
], ids=["sft-without-max_seq_len", "no-tokenizer", "sft-with-bos", "prepare-no-input", "prepare-workers"])
def test_wrong_flags_are_refused_before_the_out_dir_is_held(tmp_path, args, message):
    """pretokenize and prepare took their out_dir (made it, wrote .lock) before checking their flags: into a held
    folder a wrong flag was answered "in use"; into a new one the folder came and went."""
    r = run_cli(*args, "--out_dir", str(tmp_path / "new"))
    assert (r.returncode, r.stderr) == (2, f"babyllama: error: {message}\n")
    assert not (tmp_path / "new").exists()
    child = hold_in_child(tmp_path / "held", "prepare")
    try:
        r = run_cli(*args, "--out_dir", str(tmp_path / "held"))
        assert (r.returncode, r.stderr) == (2, f"babyllama: error: {message}\n")
    finally:
        child.communicate("")


def test_under_torchrun_rank_0_alone_says_the_refusal(tmp_path):
    from tests.test_pretrain import torchrun

    out = tmp_path / "out"
    child = hold_in_child(out, "sft")
    try:
        r = torchrun(["pretrain", "--data", "tokens", "--out_dir", out], nproc=2, timeout=240)
    finally:
        child.communicate("")
    refusal = (f"babyllama: error: {out} is in use by another babyllama sft (pid {child.pid}); wait for it or choose "
               "another --out_dir.\n")
    assert r.returncode != 0 and (r.stdout + r.stderr).count("is in use by another") == 1, r.stderr[-3000:]
    assert refusal in r.stderr and "(exitcode: 2)" in r.stderr  # the first process to end, with exit code 2
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("fmt, out, lock", [("hf", "hf", f"hf/{LOCK}"), ("gguf", "dir/m.gguf", "dir/.m.gguf.lock")])
def test_export_into_a_held_out_is_refused_at_once(tmp_path, bpe_tokenizer, fmt, out, lock):
    """export took no lock: a second export into the folder the first was writing wrote over it. hf holds its
    --out folder, gguf its file (by a lock beside it)."""
    save_checkpoint(tmp_path / "CK", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    child = hold_as("export", tmp_path / "CK", "--format", fmt, "--out", tmp_path / out)
    try:
        r = run_cli("export", tmp_path / "CK", "--format", fmt, "--out", tmp_path / out)
        assert (r.returncode, r.stderr) == (2, f"babyllama: error: {tmp_path / out} is in use by another babyllama "
                                               f"export (pid {child.pid}); wait for it or choose another --out.\n")
        assert [str(p.relative_to(tmp_path)) for p in (tmp_path / lock).parent.iterdir()] == [lock]
    finally:
        child.communicate("")
    assert list((tmp_path / lock).parent.iterdir()) == []


def test_gguf_exports_of_two_files_in_one_folder_go_on_together(tmp_path, bpe_tokenizer):
    """A gguf export held the whole folder of its file, so a second one into that folder, to another file, was
    refused. Each holds its file now: the other export runs, and leaves the first one's lock alone."""
    pytest.importorskip("gguf")
    save_checkpoint(tmp_path / "CK", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    child = hold_as("export", tmp_path / "CK", "--format", "gguf", "--out", tmp_path / "a.gguf")
    try:
        r = run_cli("export", tmp_path / "CK", "--format", "gguf", "--out", tmp_path / "b.gguf")
        assert (r.returncode, r.stdout) == (0, f"exported: {tmp_path / 'b.gguf'}\n"), r.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == [".a.gguf.lock", "CK", "b.gguf"]
    finally:
        child.communicate("")
    assert (tmp_path / "b.gguf").read_bytes()[:4] == b"GGUF"


def test_demo_holds_its_out_dir_and_force_keeps_the_hold(tmp_path):
    from babyllama.demo import Demo

    out = tmp_path / "demo"
    child = hold_in_child(out, "demo")
    try:
        r = run_cli("demo", "--smoke", "--out_dir", out)
        assert (r.returncode, r.stderr) == (2, f"babyllama: error: {out} is in use by another babyllama demo "
                                               f"(pid {child.pid}); wait for it or choose another --out_dir.\n")
    finally:
        child.communicate("")
    with holding(out, "demo"):  # --force empties the folder it holds, but for its lock
        (out / "pretrain" / "final").mkdir(parents=True)
        (out / "demo.json").write_text('{"smoke": false}\n')
        Demo(out, smoke=True, force=True)
        assert sorted(p.name for p in out.iterdir()) == [LOCK, "demo.json"]
        other = subprocess.run([sys.executable, "-c", HOLD, str(out), "demo"], capture_output=True, text=True)
        assert f"{out} is in use by another babyllama demo (pid {os.getpid()})" in other.stderr


def test_a_token_cache_build_holding_a_folder_is_named_as_what_it_is(tmp_path):
    """The holder was said as "another babyllama sft token cache build", a command no one can type."""
    out = tmp_path / "cache"
    child = hold_in_child(out, "the SFT token cache build")
    try:
        with pytest.raises(UserError) as e, holding(out, "pretokenize"):
            pass
        assert str(e.value) == (f"{out} is in use by the SFT token cache build of {out} (pid {child.pid}); wait for "
                                "it or choose another --out_dir.")
    finally:
        child.communicate("")
