"""Checkpoints: exact round-trip, clear errors on damage and mismatch, no unpickling."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from babyllama.checkpoint import load_checkpoint, load_model, load_train_state, save_checkpoint
from babyllama.errors import UserError
from babyllama.lock import LOCK
from babyllama.model import Transformer
from tests.conftest import not_finite, poison, run_cli, sharp_model, tiny_config
from tests.test_pretrain import shards as pretrain_shards

shards = pretrain_shards  # the token shards fixture, shared


@pytest.mark.parametrize("tie", [True, False])
def test_roundtrip_gives_identical_tensors_and_logits(bpe_tokenizer, tmp_path, tie):
    model = sharp_model(tiny_config(vocab_size=600, n_kv_heads=2, tie_embeddings=tie))
    state = {"step": 7, "rng": torch.get_rng_state(), "optimizer": {"lr": 3e-4}}
    save_checkpoint(tmp_path / "ck", model, bpe_tokenizer, train_state=state, extra_config={"run": "x"})
    loaded, tok, config = load_checkpoint(tmp_path / "ck")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    idx = torch.randint(0, 600, (2, 16))
    assert torch.equal(model(idx)[0], loaded(idx)[0])
    assert (loaded.output.weight is loaded.tok_embeddings.weight) == tie
    assert tok.fingerprint == bpe_tokenizer.fingerprint and config["run"] == "x"
    restored = load_train_state(tmp_path / "ck")
    assert restored["step"] == 7 and torch.equal(restored["rng"], state["rng"])


def test_a_load_checks_the_config_against_the_tensors_once(bpe_tokenizer, tmp_path, monkeypatch):
    import babyllama.checkpoint as ck

    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    checked = []
    model_config = ck.model_config
    monkeypatch.setattr(ck, "model_config", lambda path: checked.append(path) or model_config(path))
    load_checkpoint(tmp_path / "ck")
    assert checked == [tmp_path / "ck"]
    load_model(tmp_path / "ck")
    assert checked == [tmp_path / "ck"] * 2


def test_read_config_reads_config_json_once_and_lists_no_folder(bpe_tokenizer, tmp_path, monkeypatch):
    """Every read_config first asked whether the checkpoint is a run (check_not_a_run): it read config.json to see
    whether it is a run's, then listed the folders inside for runs' final/ (wanted only without a config.json), then
    read config.json again."""
    from pathlib import Path

    from babyllama.checkpoint import read_config

    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    reads, read_text, globs = [], Path.read_text, []
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: reads.append(self.name) or read_text(self, *a, **k))
    monkeypatch.setattr(Path, "glob", lambda self, pattern, **k: globs.append(pattern) or iter(()))
    assert read_config(tmp_path / "ck")["model"]["vocab_size"] == 600
    assert (reads, globs) == (["config.json"], [])


def test_overwrite_replaces_whole_and_leaves_no_temp_dirs(tmp_path):
    a, b = sharp_model(tiny_config(), seed=1), sharp_model(tiny_config(), seed=2)
    save_checkpoint(tmp_path / "ck", a)
    save_checkpoint(tmp_path / "ck", b)
    assert torch.equal(load_model(tmp_path / "ck").layers[0].attention.wqkv.weight, b.layers[0].attention.wqkv.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_truncated_weights_fail_clearly(tmp_path):
    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config()))
    f = tmp_path / "ck" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(UserError, match="cannot be read.*damaged or was cut off"):
        load_model(tmp_path / "ck")


def test_a_checkpoint_pruned_while_it_loads_is_said_to_be_gone(bpe_tokenizer, tmp_path, monkeypatch, capsys):
    """export of a step checkpoint that a running run's keep_last pruning deleted after it was checked said its
    model.safetensors "cannot be read (No such file ...); it is damaged or was cut off"."""
    import shutil

    import babyllama.checkpoint as ck
    import babyllama.export  # noqa: F401  its `from babyllama.checkpoint import checked_tokenizer` binds the real one
    from babyllama.cli import main

    ckpt = ck.step_checkpoint(tmp_path / "run", 2)
    save_checkpoint(ckpt, sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    checked = ck.checked_tokenizer

    def checked_then_pruned(path):
        found = checked(path)
        shutil.rmtree(path)
        return found

    monkeypatch.setattr(ck, "checked_tokenizer", checked_then_pruned)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == (f"babyllama: error: {ckpt / 'model.safetensors'} no longer exists (a training "
                                       "run may have pruned it: a run keeps only its newest keep_last checkpoints).\n")
    assert not (tmp_path / "hf").exists()


def test_config_that_does_not_match_tensors_fails_clearly(tmp_path):
    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config()))
    cfg_file = tmp_path / "ck" / "config.json"
    config = json.loads(cfg_file.read_text())
    config["model"]["dim"] = 32
    cfg_file.write_text(json.dumps(config))
    with pytest.raises(UserError, match="does not match its config.json"):
        load_model(tmp_path / "ck")


def test_tokenizer_larger_than_vocab_is_refused(bpe_tokenizer, tmp_path):
    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=300)), bpe_tokenizer)
    with pytest.raises(UserError, match="tokenizer has 600 ids but the model"):
        load_checkpoint(tmp_path / "ck")


def test_a_checkpoint_whose_special_ids_were_edited_is_refused(bpe_tokenizer, tmp_path):
    """The special ids live in babyllama_tokenizer.json, outside tokenizer.json's fingerprint: config.json
    records them too, and a load compares them."""
    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    recorded = json.loads((tmp_path / "ck" / "config.json").read_text())["tokenizer"]
    assert recorded == {"fingerprint": bpe_tokenizer.fingerprint, "vocab_size": 600, "bos_id": 1, "eos_id": 2,
                        "pad_id": 0}
    (tmp_path / "ck" / "babyllama_tokenizer.json").write_text(json.dumps({"bos_id": 1, "eos_id": 0, "pad_id": 2}))
    ck = tmp_path / "ck"
    with pytest.raises(UserError, match=f"^the tokenizer {ck} \\(eos_id 0, pad_id 2\\) is not the one the model at "
                                        f"{ck} was trained with \\(eos_id 2, pad_id 0\\)\\.$"):
        load_checkpoint(ck)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling would create the marker file


def test_pickle_payload_is_refused_not_executed(tmp_path):
    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config()), train_state={"step": 1})
    marker = tmp_path / "pwned"
    with open(tmp_path / "ck" / "trainer_state.pt", "wb") as f:
        pickle.dump({"step": _Payload(marker)}, f)
    with pytest.raises(UserError, match="refusing"):
        load_train_state(tmp_path / "ck")
    assert not marker.exists()


def test_missing_checkpoint_is_one_sentence(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        load_model(tmp_path / "empty")
    assert isinstance(Transformer(tiny_config()), Transformer)


def test_a_weights_file_that_is_a_folder_is_said_to_be_one(tmp_path):
    """It was said to be missing ("has no model.safetensors"), which sent its owner looking for a file that is there."""
    save_checkpoint(tmp_path / "ck", Transformer(tiny_config()))
    (tmp_path / "ck" / "model.safetensors").unlink()
    (tmp_path / "ck" / "model.safetensors").mkdir()
    with pytest.raises(UserError) as e:
        load_model(tmp_path / "ck")
    assert str(e.value) == (f"checkpoint {tmp_path / 'ck'}'s model.safetensors is a folder, not a file; restore the "
                            "file from a copy of the checkpoint.")


def test_devices_are_honoured_or_refused_in_one_sentence(tmp_path):
    from babyllama.checkpoint import pick_device
    from babyllama.train.distributed import init_distributed

    assert pick_device("cpu") == torch.device("cpu") and init_distributed("cpu").device == torch.device("cpu")
    if torch.cuda.is_available():
        assert pick_device("auto").type == "cuda" and pick_device("cuda:0") == torch.device("cuda:0")
        n = torch.cuda.device_count()
        with pytest.raises(UserError, match=f"there are {n} CUDA devices"):
            pick_device(f"cuda:{n}")
    else:
        assert pick_device("auto").type in ("cpu", "mps")
        for name in ("cuda", "cuda:1"):
            with pytest.raises(UserError, match=rf"--device {name}: this machine has"):
                pick_device(name)
    if not torch.backends.mps.is_available():
        with pytest.raises(UserError, match="MPS .* is not available here"):
            pick_device("mps")
    for name in ("gpu", "tpu:0"):
        with pytest.raises(UserError, match="use auto, cpu, cuda, cuda:N or mps|runs on auto, cpu"):
            pick_device(name)


def test_cpu_n_is_cpu_and_a_good_checkpoint_loads_on_it(bpe_tokenizer, tmp_path):
    """torch takes cpu:0 (cpu:N) for the CPU; safetensors refused it ("device cpu:0 is invalid"), which was said as
    a damaged or cut-off model.safetensors, in chat, serve, eval, for full and LoRA checkpoints."""
    from babyllama.checkpoint import pick_device
    from babyllama.weights_file import read_safetensors

    assert pick_device("cpu:0") == pick_device("cpu:3") == torch.device("cpu")
    model = sharp_model(tiny_config(vocab_size=600))
    save_checkpoint(tmp_path / "ck", model, bpe_tokenizer)
    assert read_safetensors(tmp_path / "ck" / "model.safetensors", "cpu:0").keys() == {
        k for k in model.state_dict() if k != "output.weight" or not model.cfg.tie_embeddings}
    loaded = load_model(tmp_path / "ck", "cpu:0")
    loaded_sd, sd = loaded.state_dict(), model.state_dict()
    assert loaded_sd.keys() == sd.keys() and all(torch.equal(loaded_sd[k], sd[k]) for k in sd)


# --- tampered checkpoints: every value read from a file is checked, in one sentence, before any large allocation ---


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


TAMPERS = {  # what is changed -> what the sentence says
    "n_heads 0": (lambda c: c["model"].update(n_heads=0), "n_heads must be a whole number >= 1, not 0"),
    "n_layers 10M": (lambda c: c["model"].update(n_layers=10_000_000), "it holds 2 layers"),
    "dim a string": (lambda c: c["model"].update(dim="64"), "dim must be a whole number >= 1, not '64'"),
    "vocab_size": (lambda c: c["model"].update(vocab_size=601), "the config needs 2 and (601, 64)"),
    "hidden_dim": (lambda c: c["model"].update(hidden_dim=10**9), "tensor layers.0.feed_forward"),
    "max_seq_len 1e9": (lambda c: c["model"].update(max_seq_len=10**9), "max_seq_len must be a whole number in"),
    "norm_eps negative": (lambda c: c["model"].update(norm_eps=-1), "norm_eps must be a number > 0"),
    "unknown setting": (lambda c: c["model"].update(n_expert=8), "unknown model settings ['n_expert']"),
    "no model": (lambda c: c.pop("model"), "lacks its model or tokenizer settings"),
    "tokenizer a list": (lambda c: c.update(tokenizer=[1]), "lacks its model or tokenizer settings"),
    "version 99": (lambda c: c.update(version=99), "has format version 99, newer than the version 1 this babyllama "
                   "reads; upgrade babyllama to load it."),
    "version a string": (lambda c: c.update(version="2"), "has version '2', not a whole number from 1; the "
                         "checkpoint is damaged."),
    "bos_id beyond the vocab": ("bos_id", 10**6, "ids in [0, 600); bos_id is 1000000"),
    "eos_id negative": ("eos_id", -1, "ids in [0, 600); eos_id is -1"),
    "pad_id a float": ("pad_id", 0.5, "ids in [0, 600); pad_id is 0.5"),
}


@pytest.fixture(scope="module")
def whole_checkpoint(tmp_path_factory, bpe_tokenizer):
    d = tmp_path_factory.mktemp("whole")
    save_checkpoint(d / "ck", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    return d / "ck"


@pytest.fixture
def nothing_large(monkeypatch):
    """Fail the test if the weights are read or a model is built off the meta device: a tampered config
    may ask for any size, so its checks must come first (a wall-clock bound flaked under load)."""
    import safetensors.torch

    def read_weights(*args, **kwargs):
        raise AssertionError("the weights were read before the config was refused")

    build = Transformer.__init__

    def build_on_meta(self, *args, **kwargs):
        assert torch.empty(()).device.type == "meta", "a model was allocated before the config was refused"
        build(self, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "load_file", read_weights)
    monkeypatch.setattr(Transformer, "__init__", build_on_meta)


@pytest.mark.parametrize("tamper", TAMPERS)
def test_a_tampered_checkpoint_stops_chat_in_one_sentence_before_any_allocation(whole_checkpoint, tmp_path, tamper,
                                                                                capsys, monkeypatch, nothing_large):
    import io
    import shutil

    from babyllama.cli import main

    ck = shutil.copytree(whole_checkpoint, tmp_path / "ck")
    edit, *rest = TAMPERS[tamper]
    if callable(edit):
        _edit_json(ck / "config.json", edit)
    else:
        _edit_json(ck / "babyllama_tokenizer.json", lambda ids: ids.update({edit: rest[0]}))
    monkeypatch.setattr("sys.stdin", io.StringIO("你好\n"))
    assert main(["chat", str(ck)]) == 2
    err = capsys.readouterr().err.strip().removeprefix("chat: running on cpu\n")  # the device, then one sentence
    assert err.startswith("babyllama: error: ") and "\n" not in err and rest[-1] in err, err


def test_sft_from_a_tampered_init_stops_before_building_the_model(whole_checkpoint, tmp_path, capsys, nothing_large):
    import shutil

    from babyllama.cli import main

    ck = shutil.copytree(whole_checkpoint, tmp_path / "ck")
    _edit_json(ck / "config.json", TAMPERS["n_layers 10M"][0])
    (tmp_path / "sft.jsonl").write_text('{"instruction": "问", "output": "答"}\n')
    out = tmp_path / "run"  # not tmp_path, which holds the init: that is said first
    assert main(["sft", "--init", str(ck), "--data", str(tmp_path / "sft.jsonl"), "--out_dir", str(out)]) == 2
    assert "it holds 2 layers and an embedding of (600, 64), the config needs 10000000" in capsys.readouterr().err


def test_weights_of_one_layer_against_a_config_of_two_say_one_layer(tmp_path, bpe_tokenizer):
    save_checkpoint(tmp_path / "ck", Transformer(tiny_config(vocab_size=600, n_layers=1)), bpe_tokenizer)
    _edit_json(tmp_path / "ck" / "config.json", lambda c: c["model"].update(n_layers=2))
    with pytest.raises(UserError) as e:
        load_model(tmp_path / "ck")
    assert str(e.value) == (f"{tmp_path / 'ck' / 'model.safetensors'} does not match its config.json: it holds 1 layer "
                            "and an embedding of (600, 64), the config needs 2 and (600, 64).")


def resumed(run: Path) -> tuple[Path | None, int, list]:
    """resumable_checkpoint's checkpoint, the step of the trainer state it read, and the damaged ones."""
    from babyllama.checkpoint import resumable_checkpoint

    ckpt, state, damaged = resumable_checkpoint(run)
    return ckpt, state["step"], damaged


def test_a_newer_format_is_refused_by_name_and_never_skipped_as_damaged(whole_checkpoint, tmp_path):
    from babyllama.checkpoint import read_config, resumable_checkpoint, step_checkpoint

    model = sharp_model(tiny_config(vocab_size=600))
    for step in (2, 4):
        save_checkpoint(step_checkpoint(tmp_path, step), model, train_state={"step": step})
    newest = step_checkpoint(tmp_path, 4)
    assert read_config(newest)["version"] == 1 and resumed(tmp_path) == (newest, 4, [])
    _edit_json(newest / "config.json", lambda c: c.update(version=2))
    with pytest.raises(UserError) as e:  # resuming from step 2 would drop step 4's progress
        resumable_checkpoint(tmp_path)
    assert str(e.value) == (f"checkpoint {newest} has format version 2, newer than the version 1 this babyllama "
                            "reads; upgrade babyllama to load it.")
    _edit_json(newest / "config.json", lambda c: c.pop("version"))  # written by hand: read as version 1
    assert resumed(tmp_path) == (newest, 4, [])


# --- a run's checkpoints: order, pruning, damage, kills ---


def test_checkpoints_are_ordered_by_step_number_past_a_million(tmp_path):
    from babyllama.checkpoint import latest_checkpoint, prune_checkpoints

    for step in (999_998, 999_999, 1_000_000, 1_000_001):
        (tmp_path / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
    assert latest_checkpoint(tmp_path).name == "step_1000001"  # by name, step_999999 came last
    prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_1000000", "step_1000001"]


def test_stale_temporaries_of_dead_writers_are_cleared(tmp_path):
    import shutil
    import subprocess

    from babyllama.checkpoint import remove_stale_temporaries, step_checkpoint

    done = subprocess.Popen(["true"])
    done.wait()
    dead, live = done.pid, os.getppid()
    for step in (2, 4):
        save_checkpoint(step_checkpoint(tmp_path, step), sharp_model(tiny_config(), seed=step))
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step_000004").rename(ckpts / f".step_000004.old-{dead}")  # killed inside the swap of step 4
    shutil.copytree(ckpts / f".step_000004.old-{dead}", ckpts / f".step_000004.tmp-{dead}")
    shutil.copytree(ckpts / "step_000002", ckpts / f".step_000002.pruned-{dead}")  # killed while pruning
    (tmp_path / f".final.tmp-{dead}").mkdir()  # killed writing final/
    (ckpts / f".step_000006.tmp-{live}").mkdir()  # another run, still writing
    remove_stale_temporaries(tmp_path, tmp_path / "checkpoints")
    assert sorted(p.name for p in ckpts.iterdir()) == [f".step_000006.tmp-{live}", "step_000002", "step_000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]
    assert torch.equal(load_model(ckpts / "step_000004").norm.weight, sharp_model(tiny_config(), seed=4).norm.weight)


# the CLI with a kill -9 at a chosen point of checkpointing: KILL_AT=write (step 4 written, not yet in place) or
# KILL_AT=prune (an old checkpoint renamed away and half deleted)
KILLER = """
import os, pathlib, shutil, signal, sys
import babyllama.checkpoint as ck
from babyllama.cli import main

at, fsync, rmtree = os.environ["KILL_AT"], ck._fsync, shutil.rmtree

def _fsync(path):
    fsync(path)
    if at == "write" and path.name.startswith(".step_000004.tmp-"):
        os.kill(os.getpid(), signal.SIGKILL)

def _rmtree(path, *args, **kwargs):
    if at == "prune" and ".pruned-" in str(path):
        os.remove(pathlib.Path(path) / "model.safetensors")
        os.kill(os.getpid(), signal.SIGKILL)
    return rmtree(path, *args, **kwargs)

ck._fsync, shutil.rmtree = _fsync, _rmtree
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_killed_inside_a_checkpoint_write_and_pruning_resumes_whole_and_equal(tmp_path, shards, capsys):
    import subprocess
    import sys

    from safetensors.torch import load_file

    from babyllama.checkpoint import step_checkpoints
    from babyllama.config import load_config
    from babyllama.train.stages import pretrain
    from tests.test_pretrain import FAST, TINY

    args = [*TINY, *FAST, "--data", str(shards), "--max_steps", "8", "--batch_size", "4", "--save_every", "2",
            "--keep_last", "2"]
    pretrain(load_config(None, [*args, "--out_dir", str(tmp_path / "straight")]))
    run = tmp_path / "killed"
    temporaries = lambda: sorted(p.name for d in (run, run / "checkpoints") for p in d.iterdir()
                                 if p.name[0] == "." and p.name != LOCK)  # a killed holder's lock: taken over
    for at, left, steps in (("write", ".step_000004.tmp-", [2]), ("prune", ".step_000002.pruned-", [4, 6])):
        resume = ["--resume"] if run.exists() else []
        r = subprocess.run([sys.executable, "-c", KILLER, "pretrain", *args, "--out_dir", str(run), *resume],
                           capture_output=True, text=True, timeout=300, env={**os.environ, "KILL_AT": at})
        assert r.returncode == -9 and [t[: len(left)] for t in temporaries()] == [left], (r.stderr, temporaries())
        assert [int(p.name[5:]) for p in step_checkpoints(run)] == steps  # each whole:
        assert resumed(run) == (step_checkpoints(run)[-1], steps[-1], [])
    capsys.readouterr()
    pretrain(load_config(None, [*args, "--out_dir", str(run)]), resume=True)
    assert temporaries() == [] and "note: removed" in capsys.readouterr().out
    straight, killed = (load_file(str(d / "final" / "model.safetensors")) for d in (tmp_path / "straight", run))
    assert straight.keys() == killed.keys() and all(torch.equal(straight[k], killed[k]) for k in straight)


def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(tmp_path, shards, capsys):
    from safetensors.torch import load_file

    from babyllama.checkpoint import step_checkpoints
    from babyllama.config import load_config
    from babyllama.train.stages import pretrain
    from tests.test_pretrain import FAST, TINY

    args = [*TINY, *FAST, "--data", str(shards), "--batch_size", "4", "--save_every", "2", "--keep_last", "3"]
    pretrain(load_config(None, [*args, "--max_steps", "6", "--out_dir", str(tmp_path / "straight")]))
    pretrain(load_config(None, [*args, "--max_steps", "4", "--out_dir", str(tmp_path / "run")]))
    state = tmp_path / "run" / "checkpoints" / "step_000004" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a disk that filled up
    capsys.readouterr()
    pretrain(load_config(None, [*args, "--max_steps", "6", "--out_dir", str(tmp_path / "run")]), resume=True)
    out = capsys.readouterr().out
    assert f"note: step_000004 is damaged and skipped: {state} cannot be read (RuntimeError); it is damaged or " \
           "was cut off; resuming from step_000002, and step_000004 is moved to step_000004.damaged (keep_last " \
           "counts whole checkpoints)" in out
    a, b = (load_file(str(tmp_path / d / "final" / "model.safetensors")) for d in ("straight", "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    (tmp_path / "run" / "checkpoints" / "step_000099").mkdir()  # emptied by hand or a failing disk
    pretrain(load_config(None, [*args, "--max_steps", "8", "--out_dir", str(tmp_path / "run")]), resume=True)
    assert "note: step_000099 is damaged and skipped" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step_000004", "step_000004.damaged", "step_000006", "step_000008", "step_000099.damaged"]
    for ckpt in step_checkpoints(tmp_path / "run"):
        (ckpt / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(UserError, match="every checkpoint in .* is damaged"):
        pretrain(load_config(None, [*args, "--max_steps", "8", "--out_dir", str(tmp_path / "run")]), resume=True)


def test_a_refused_resume_leaves_a_damaged_checkpoint_in_place(tmp_path, shards, capsys):
    """A resume past a damaged step_000006, refused (average_last turned on within the averaged steps), had moved it
    to step_000006.damaged already: the refused run wrote. The damaged ones are moved aside once every check has
    passed, as the run begins."""
    from babyllama.config import load_config
    from babyllama.train.stages import pretrain
    from tests.test_pretrain import FAST, TINY

    args = [*TINY, *FAST, "--data", str(shards), "--batch_size", "4", "--out_dir", str(tmp_path), "--max_steps", "6",
            "--save_every", "2"]
    pretrain(load_config(None, args))
    (tmp_path / "checkpoints" / "step_000006" / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(UserError, match=r"step_000004 holds no mean of the weights, but average_last 0\.5 of 6 steps"):
        pretrain(load_config(None, [*args, "--average_last", "0.5"]), resume=True)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002", "step_000004",
                                                                             "step_000006"]
    capsys.readouterr()
    pretrain(load_config(None, args), resume=True)
    assert "step_000006 is moved to step_000006.damaged" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002", "step_000004",
                                                                             "step_000006", "step_000006.damaged"]


def test_damaged_checkpoints_go_with_the_whole_ones_of_their_time(tmp_path, shards, capsys):
    """Every run that found a damaged checkpoint set it aside as step_N.damaged and kept it for good. Pruning now
    deletes one once its step is older than the oldest checkpoint that keep_last keeps, as it deletes the whole ones
    of that time: a run keeps keep_last whole checkpoints and the damaged ones among them, no more."""
    from babyllama.config import load_config
    from babyllama.train.stages import pretrain
    from tests.test_pretrain import FAST, TINY

    args = [*TINY, *FAST, "--data", str(shards), "--batch_size", "4", "--out_dir", str(tmp_path), "--save_every",
            "1", "--keep_last", "2"]
    names = lambda: sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    pretrain(load_config(None, [*args, "--max_steps", "3"]))
    (tmp_path / "checkpoints" / "step_000003" / "trainer_state.pt").write_bytes(b"")
    pretrain(load_config(None, [*args, "--max_steps", "4"]), resume=True)  # from step 2: 3 is set aside
    assert names() == ["step_000003", "step_000003.damaged", "step_000004"]
    pretrain(load_config(None, [*args, "--max_steps", "5"]), resume=True)  # keeps 4 and 5: step 3's time is past
    assert names() == ["step_000004", "step_000005"]


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(folder) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in folder.rglob("*") if p.is_file()}


def test_checkpoint_and_export_files_get_the_umasks_mode(bpe_tokenizer, tmp_path, umask):
    from babyllama.export import export

    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer,
                    train_state={"step": 1})
    export(tmp_path / "ck", tmp_path / "hf")
    export(tmp_path / "ck", tmp_path / "hf")  # over an earlier export: its files are replaced, modes too
    export(tmp_path / "ck", tmp_path / "model.gguf", format="gguf")
    mode = 0o666 & ~umask  # 0o644 or 0o600
    ck, hf = modes(tmp_path / "ck"), modes(tmp_path / "hf")
    assert {"model.safetensors", "trainer_state.pt", "config.json"} <= set(ck) and "model.safetensors" in hf
    assert set(ck.values()) == set(hf.values()) == {mode}
    assert (tmp_path / "model.gguf").stat().st_mode & 0o777 == mode


def test_safetensors_on_a_full_disk_is_cannot_write_and_the_old_checkpoint_stays(tmp_path, monkeypatch):
    """safetensors' own error for a full disk, "No space left on device (os error 28)", is CannotWrite of the
    checkpoint with its temporary removed; the checkpoint written before is untouched."""
    import errno

    import safetensors.torch
    from safetensors import SafetensorError

    from babyllama.errors import CannotWrite

    model = Transformer(tiny_config())
    save_checkpoint(tmp_path / "ck", model)
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(CannotWrite) as raised:
        save_checkpoint(tmp_path / "ck", model)
    assert raised.value.args == (errno.ENOSPC, str(tmp_path / "ck"), "")
    assert str(raised.value) == f"no space left on the device of {tmp_path} while writing {tmp_path / 'ck'}"
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before


def test_pruning_after_a_resume_past_a_damaged_checkpoint_keeps_the_one_resumed_from(tmp_path, shards, capsys):
    """A resume that skipped a damaged step_000006 for step_000005 left step 6 where keep_last counted it: the next
    pruning kept the damaged 6 and deleted the whole 5 the run had resumed from. The damaged one is moved aside."""
    from babyllama.checkpoint import step_checkpoints
    from babyllama.config import load_config
    from babyllama.train.stages import pretrain
    from tests.test_pretrain import FAST, TINY

    args = [*TINY, *FAST, "--data", str(shards), "--batch_size", "4", "--out_dir", str(tmp_path)]
    pretrain(load_config(None, [*args, "--max_steps", "6", "--save_every", "1", "--keep_last", "3"]))
    state = tmp_path / "checkpoints" / "step_000006" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    capsys.readouterr()
    pretrain(load_config(None, [*args, "--max_steps", "8", "--save_every", "0", "--keep_last", "2"]), resume=True)
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step_000005", "step_000008"]
    assert "resuming from step_000005, and step_000006 is moved to step_000006.damaged" in capsys.readouterr().out
    assert resumed(tmp_path) == (tmp_path / "checkpoints" / "step_000008", 8, [])
    assert (tmp_path / "checkpoints" / "step_000006.damaged" / "trainer_state.pt").stat().st_size == 100


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_weights_holding_nan_or_inf_are_refused_at_load(bpe_tokenizer, tmp_path, value):
    """A model.safetensors edited to hold one NaN loaded silently: chat answered nothing and export wrote it on."""
    ck = tmp_path / "ck"
    save_checkpoint(ck, sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    name = poison(ck / "model.safetensors", value, part="layers.1.")
    with pytest.raises(UserError) as e:
        load_model(ck)
    assert f"babyllama: error: {e.value}\n" == not_finite(ck / "model.safetensors", name)
    r = run_cli("export", ck, "--out", tmp_path / "hf")
    assert (r.returncode, r.stderr) == (2, not_finite(ck / "model.safetensors", name))
    assert not (tmp_path / "hf").exists()


def test_a_resume_skips_a_newest_checkpoint_holding_nan_and_refuses_when_every_one_does(shards, tmp_path):
    """A run that diverged (or a disk fault) left a newest checkpoint holding NaN: `--resume` stopped with the
    refusal, though the one before it was whole. It is skipped as a damaged one is (a note, moved aside), checked
    before the run picks where to resume; with no whole one left the refusal names it."""
    from tests.test_pretrain import FAST, TINY

    run = tmp_path / "run"
    args = ["pretrain", *TINY, *FAST, "--data", shards, "--out_dir", run, "--save_every", "2", "--batch_size", "4"]
    assert run_cli(*args, "--max_steps", "4").returncode == 0
    steps = [run / "checkpoints" / f"step_00000{i}" for i in (2, 4)]
    name = poison(steps[1] / "model.safetensors", part="tok_embeddings")
    why = not_finite(steps[1] / "model.safetensors", name).removeprefix("babyllama: error: ").rstrip(".\n")
    assert_resumes_past_step_4(run_cli(*args, "--max_steps", "6", "--resume"), run, why)
    for ckpt in (run / "checkpoints").glob("step_00000[46]"):
        poison(ckpt / "model.safetensors", part="tok_embeddings")
    name = poison(steps[0] / "model.safetensors", part="tok_embeddings")
    why = not_finite(run / "checkpoints" / "step_000006" / "model.safetensors", name).removeprefix(
        "babyllama: error: ").rstrip(".\n")
    r = run_cli(*args, "--max_steps", "8", "--resume")
    assert (r.returncode, r.stderr) == (2, f"babyllama: error: every checkpoint in {run / 'checkpoints'} is damaged "
                                           f"(step_000006: {why}); delete them to start again.\n")
    assert not (run / "checkpoints" / "step_000008").exists()


def test_the_load_after_a_resume_pick_checks_each_tensor_once_and_a_rewritten_file_again(tmp_path, monkeypatch):
    """resumable_checkpoint read every tensor to check it finite, then the load read and checked them all again (on
    every torchrun rank): the load skips a file this process found finite, unless it was written since."""
    from babyllama import weights_file
    from babyllama.checkpoint import resumable_checkpoint, step_checkpoint

    model = sharp_model(tiny_config(vocab_size=600))
    save_checkpoint(step_checkpoint(tmp_path, 2), model, train_state={"step": 2})
    checked, finite = [], weights_file.finite
    monkeypatch.setattr(weights_file, "finite", lambda t: checked.append(t.shape) or finite(t))
    ckpt, _, _ = resumable_checkpoint(tmp_path)
    stored = len(checked)
    assert stored == len(model_tensors_of(ckpt)) > 0
    load_model(ckpt)
    assert len(checked) == stored  # not again
    name = poison(ckpt / "model.safetensors")
    with pytest.raises(UserError, match=f"its tensor {name} holds NaN"):
        load_model(ckpt)


def model_tensors_of(ckpt: Path) -> list[str]:
    """The names of the tensors in ckpt's model.safetensors."""
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        return list(f.keys())


def test_a_file_renamed_over_a_weights_file_as_it_is_read_is_not_taken_for_the_one_checked(tmp_path, monkeypatch):
    """read_safetensors took the memo's key (path, size, mtime, ctime) from the path, then loaded the path: a file
    renamed over it between the two was loaded unchecked under the key of the one found finite, and _hashed alike
    recorded the new file's SHA-256 under the old one's stat. Both key the memo by stat_key (device, inode, ...) of
    the file they hold open, and read that very file."""
    import hashlib

    import safetensors.torch

    from babyllama import checkpoint, weights_file

    ck = tmp_path / "ck"
    save_checkpoint(ck, sharp_model(tiny_config(vocab_size=600)))
    weights, bad = ck / "model.safetensors", tmp_path / "bad.safetensors"
    whole, sha = weights.read_bytes(), hashlib.sha256(weights.read_bytes()).hexdigest()
    bad.write_bytes(whole)
    poison(bad)
    weights_file.check_finite_file(weights)  # found finite
    real_load, real_hash = safetensors.torch.load_file, checkpoint.file_sha256

    def swapped(read):  # read, once bad is renamed over weights (the first time)
        def after_a_swap(name, *args, **kwargs):
            if bad.exists():
                os.replace(bad, weights)
            return read(name, *args, **kwargs)

        return after_a_swap

    monkeypatch.setattr(safetensors.torch, "load_file", swapped(real_load))
    tensors = weights_file.read_safetensors(weights)
    assert all(torch.isfinite(t).all() for t in tensors.values())  # the file held, found finite: not the NaN one
    weights.write_bytes(whole)
    bad.write_bytes(whole[:-1] + bytes([whole[-1] ^ 1]))
    monkeypatch.setattr(checkpoint, "file_sha256", swapped(real_hash))
    assert checkpoint.weights_sha256(ck) == sha  # the file held, not the one renamed over it
    assert checkpoint.weights_sha256(ck) == hashlib.sha256(weights.read_bytes()).hexdigest() != sha  # hashed anew


@pytest.mark.parametrize(("optimizer", "moment"), [("adamw", "exp_avg_sq"), ("muon", "momentum_buffer")])
def test_a_resume_skips_a_checkpoint_whose_optimizer_state_holds_nan(shards, tmp_path, optimizer, moment):
    """A checkpoint whose weights were finite but whose optimizer state held NaN (a flipped bit, a hand edit) was
    resumed, and its first step made every weight NaN: the run stopped at its next save, "the weights are not finite
    after step 5", its newest checkpoint the poisoned one again. The trainer state is checked as the weights are."""
    from tests.test_pretrain import FAST, TINY

    if optimizer == "muon" and not hasattr(torch.optim, "Muon"):
        pytest.skip("Muon needs torch >= 2.9")
    run = tmp_path / "run"
    args = ["pretrain", *TINY, *FAST, "--data", shards, "--out_dir", run, "--save_every", "2", "--batch_size", "4",
            "--optimizer", optimizer]
    assert run_cli(*args, "--max_steps", "4").returncode == 0
    file = run / "checkpoints" / "step_000004" / "trainer_state.pt"
    state = torch.load(file, weights_only=True)
    param, moments = next((k, v) for k, v in sorted(state["optimizer"]["state"].items()) if moment in v)
    moments[moment].view(-1)[0] = float("nan")
    torch.save(state, file)
    name = f"optimizer.state.{param}.{moment}"
    why = not_finite(file, name).removeprefix("babyllama: error: ").rstrip(".\n")
    assert_resumes_past_step_4(run_cli(*args, "--max_steps", "6", "--resume"), run, why)


def assert_resumes_past_step_4(r, run, why: str) -> None:
    """r, a --resume to step 6 of run, skipped its damaged step_000004 (for why), resumed from step 2 and finished."""
    assert r.returncode == 0, r.stderr
    assert (f"note: step_000004 is damaged and skipped: {why}; resuming from step_000002, and step_000004 is moved to "
            "step_000004.damaged (keep_last counts whole checkpoints)\n") in r.stdout
    assert f"resuming from {run / 'checkpoints' / 'step_000002'} (step 2 of 6)" in r.stdout
    assert json.loads((run / "final" / "config.json").read_text())["step"] == 6


def test_a_step_damaged_again_keeps_the_earlier_damaged_copy(tmp_path):
    """step_000003 damaged, set aside, rewritten by the rerun and damaged again: the second move replaced the first
    step_000003.damaged without a word. Each goes to a name of its own, and pruning removes them all once step 3 is
    older than every checkpoint kept."""
    from babyllama.checkpoint import prune_checkpoints, set_aside

    ckpts = tmp_path / "checkpoints"
    names = lambda: sorted(p.name for p in ckpts.iterdir())
    for n in (1, 2, 3):
        step = ckpts / "step_000003"
        step.mkdir(parents=True)
        (step / "trainer_state.pt").write_text(f"damaged {n}")
        assert set_aside(step).name == "step_000003.damaged" + (f".{n}" if n > 1 else "")
    assert names() == ["step_000003.damaged", "step_000003.damaged.2", "step_000003.damaged.3"]
    assert [(ckpts / name / "trainer_state.pt").read_text() for name in names()] == ["damaged 1", "damaged 2",
                                                                                      "damaged 3"]
    for step in (3, 4, 5):
        (ckpts / f"step_{step:06d}").mkdir()
    prune_checkpoints(tmp_path, 3)
    assert names() == ["step_000003", "step_000003.damaged", "step_000003.damaged.2", "step_000003.damaged.3",
                       "step_000004", "step_000005"]
    prune_checkpoints(tmp_path, 2)
    assert names() == ["step_000004", "step_000005"]
