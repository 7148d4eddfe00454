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
from babyllama.lock import LOCK, holding
from tests.conftest import run_cli, sharp_model, tiny_config

HOLD = ("import sys; from babyllama.lock import holding\n"
        "with holding(sys.argv[1], sys.argv[2]):\n print('held', flush=True); sys.stdin.read()")


def hold_in_child(out: Path, command: str) -> subprocess.Popen:
    """Another process that holds out until its stdin closes (or it is killed)."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(out), command], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
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
