"""Pretraining: learning, exact resume, signals, torchrun with gloo, clear refusals."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from babyllama.checkpoint import read_config
from babyllama.config import load_config
from babyllama.data.pretokenize import pretokenize
from babyllama.data.shards import TokenWindows
from babyllama.errors import UserError
from babyllama.train.distributed import Dist
from babyllama.train.stages import pretrain
from babyllama.train.trainer import GlobalOrder, Trainer, lr_at, micro_batches
from tests.conftest import generated_corpus, logged_losses, run_cli, simulate_death

TINY = ["--model.dim", "32", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads", "2",
        "--model.vocab_size", "600", "--model.max_seq_len", "32", "--model.multiple_of", "16"]
FAST = ["--warmup_steps", "2", "--lr", "3e-3", "--min_lr", "3e-4", "--log_every", "1", "--eval_every", "0",
        "--save_every", "0", "--eval_batches", "2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, bpe_tokenizer):
    d = tmp_path_factory.mktemp("shards")
    (d / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False)
                                            for t in generated_corpus(200, seed=21)))
    bpe_tokenizer.save(d / "tok")
    pretokenize([str(d / "docs.jsonl")], str(d / "tok"), d / "tokens", val_fraction=0.05)
    return d / "tokens"


def config(shards, out, *extra):
    return load_config(None, [*TINY, *FAST, "--data", str(shards), "--out_dir", str(out), *extra])


losses = logged_losses


def test_tiny_model_learns_far_below_unigram_entropy(tmp_path, bpe_tokenizer):
    import random

    rng = random.Random(0)
    sentences = generated_corpus(6, seed=5)  # a corpus with structure to learn: 6 sentences, repeated
    docs = ["".join(rng.choices(sentences, k=3)) for _ in range(300)]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in docs))
    bpe_tokenizer.save(tmp_path / "tok")
    shards = tmp_path / "tokens"
    pretokenize([str(tmp_path / "docs.jsonl")], str(tmp_path / "tok"), shards, val_fraction=0.05)
    tokens = TokenWindows(shards, 32).arrays[0]
    p = np.bincount(tokens) / len(tokens)
    unigram = -(p[p > 0] * np.log(p[p > 0])).sum()
    pretrain(config(shards, tmp_path / "run", "--max_steps", "300", "--batch_size", "8"))
    final = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").open()][-1]
    assert final["val_loss"] < unigram / 2, (final, unigram)
    # `babyllama eval` measures the same loss on the same windows (eval_batches 2 x batch_size 8)
    from babyllama.checkpoint import load_model
    from babyllama.evaluate import lm_metrics

    lm = lm_metrics(load_model(tmp_path / "run" / "final"), shards, bpe_tokenizer, batch_size=8, max_batches=2)
    assert lm["tokens"] == 16 * 32 and lm["val_loss"] == pytest.approx(final["val_loss"], rel=1e-5)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_gives_bitwise_identical_losses(shards, tmp_path, optimizer):
    args = ("--max_steps", "8", "--batch_size", "4", "--grad_accum", "2", "--save_every", "4", "--keep_last", "5",
            "--optimizer", optimizer)
    pretrain(config(shards, tmp_path / "straight", *args))
    simulate_death(tmp_path / "straight", tmp_path / "died", step=4)
    pretrain(config(shards, tmp_path / "died", *args), resume=True)
    assert losses(tmp_path / "died") == losses(tmp_path / "straight")  # bitwise: == on floats
    assert len(losses(tmp_path / "straight")) == 8


def test_resume_in_a_moved_folder_reads_its_shards(shards, tmp_path):
    """runs/ (token shards and the run) moved elsewhere: the shards' manifest names its files relative to it,
    so --resume there continues as the straight run did."""
    import shutil

    args = ("--max_steps", "4", "--batch_size", "4", "--save_every", "2")
    pretrain(config(shards, tmp_path / "straight", *args))
    runs = tmp_path / "runs"
    shutil.copytree(shards, runs / "tokens")
    simulate_death(tmp_path / "straight", runs / "died", step=2)
    moved = tmp_path / "elsewhere" / "runs"
    shutil.move(runs, moved)
    pretrain(config(moved / "tokens", moved / "died", *args), resume=True)
    assert losses(moved / "died") == losses(tmp_path / "straight")


def test_resume_on_other_shards_is_refused(shards, tmp_path, capsys):
    """The checkpoints record the shards (token_record): --resume on a directory with a shard added or removed
    stops with one sentence, nothing written; the same shards resume, and so does a checkpoint from before the
    record, whatever the shards."""
    from babyllama.cli import main
    from babyllama.data.shards import merge

    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False)
                                                   for t in generated_corpus(100, seed=22)))
    pretokenize([str(tmp_path / "docs.jsonl")], str(shards.parent / "tok"), tmp_path / "extra", val_fraction=0.05)
    shutil.copytree(shards, tmp_path / "part0")
    for i, part in enumerate((tmp_path / "part0", tmp_path / "extra")):  # as if the two halves of one corpus
        manifest = json.loads((part / "manifest.json").read_text())
        (part / "manifest.json").write_text(json.dumps(manifest | {"partition": {"num_shards": 2, "shard_index": i}}))
    more = tmp_path / "more"
    merge([str(tmp_path / "part0"), str(tmp_path / "extra")], more)  # the run's shards, then one more of each split

    def pretrain_cli(data, run, steps, *resume):
        return main(["pretrain", *TINY, *FAST, "--data", str(data), "--out_dir", str(run), "--max_steps", str(steps),
                     "--save_every", "2", "--batch_size", "4", *resume])

    def refused(data, what):
        return (f"babyllama: error: the inputs changed since the run started: other shards in {data} ({what}); "
                "resuming needs the same inputs, so restore them, or start a new run without --resume in a new "
                "--out_dir.\n")

    a, b = tmp_path / "a", tmp_path / "b"
    assert pretrain_cli(shards, a, 2) == 0 and pretrain_cli(more, b, 2) == 0
    config = json.loads((a / "checkpoints" / "step_000002" / "config.json").read_text())
    assert config["data"]["shards"] == json.loads((shards / "manifest.json").read_text())["shards"]
    capsys.readouterr()
    assert pretrain_cli(more, a, 4, "--resume") == 2
    assert capsys.readouterr().err == refused(more, f"{more / 'shard_00001.bin'} is new")
    assert pretrain_cli(shards, b, 4, "--resume") == 2
    assert capsys.readouterr().err == refused(shards, f"{shards / 'shard_00001.bin'} is gone")
    assert not (a / "checkpoints" / "step_000004").exists() and not (b / "checkpoints" / "step_000004").exists()
    assert pretrain_cli(shards, a, 4, "--resume") == 0  # the same shards
    config = json.loads((b / "checkpoints" / "step_000002" / "config.json").read_text())
    del config["data"]  # as written before the record
    (b / "checkpoints" / "step_000002" / "config.json").write_text(json.dumps(config))
    assert pretrain_cli(shards, b, 4, "--resume") == 0


def test_a_shard_that_its_manifest_lists_but_is_gone_is_one_sentence(shards, tmp_path, capsys):
    """pretrain, with and without --resume, and eval --data stop with one sentence naming the file, not a
    traceback from np.memmap (a resume that has steps to train: a finished one is left before its shards open)."""
    from babyllama.cli import main

    data, run = tmp_path / "tokens", tmp_path / "run"
    shutil.copytree(shards, data)
    pretrain_args = ["pretrain", *TINY, *FAST, "--data", str(data), "--max_steps", "2", "--batch_size", "4"]
    assert main([*pretrain_args, "--out_dir", str(run)]) == 0
    tokens = {s["file"]: s["tokens"] for s in json.loads((data / "manifest.json").read_text())["shards"]}
    for name, commands in (("val_00000.bin", (["eval", str(run / "final"), "--data", str(data)],
                                              [*pretrain_args, "--out_dir", str(run), "--resume", "--max_steps",
                                               "3"])),
                           ("shard_00000.bin", ([*pretrain_args, "--out_dir", str(tmp_path / "new")],))):
        (data / name).unlink()
        capsys.readouterr()
        for command in commands:
            assert main(command) == 2, command
            assert capsys.readouterr().err.splitlines(keepends=True)[-1] == (  # eval first says where it runs
                f"babyllama: error: {data / name} is missing, though {data / 'manifest.json'} lists it "
                f"({tokens[name]} tokens); restore it or run `babyllama pretokenize` again.\n"), command


@pytest.mark.parametrize("on_device", [False, True], ids=["host", "device"])
def test_metrics_log_every_log_every_steps_and_the_last(shards, tmp_path, monkeypatch, on_device):
    device_steps = sync_free_steps(monkeypatch) if on_device else []
    real_forward = Trainer.forward

    def nan_at_step_3(self, batch):  # a skipped step between two logged ones still gets its line
        return real_forward(self, batch) * (float("nan") if self.step == 2 else 1.0)

    monkeypatch.setattr(Trainer, "forward", nan_at_step_3)
    pretrain(config(shards, tmp_path, "--max_steps", "5", "--batch_size", "4", "--log_every", "2"))
    logged = strict_lines(tmp_path / "metrics.jsonl")
    assert [(r["step"], r.get("skipped", False)) for r in logged if "loss" in r] == [
        (2, False), (3, True), (4, False), (5, False)]
    assert len(device_steps) == (5 if on_device else 0)


def test_final_is_the_mean_of_the_last_steps_weights_and_resumes_bitwise(shards, tmp_path):
    from safetensors.torch import load_file

    args = ("--max_steps", "8", "--batch_size", "4", "--save_every", "1", "--keep_last", "8", "--average_last", "0.5")
    pretrain(config(shards, tmp_path / "straight", *args))
    weights = lambda d: load_file(str(d / "model.safetensors"))
    steps = [weights(tmp_path / "straight" / "checkpoints" / f"step_{s:06d}") for s in range(5, 9)]
    final = weights(tmp_path / "straight" / "final")
    for name, w in final.items():  # the mean of the weights after steps 5 to 8, not step 8's
        torch.testing.assert_close(w, sum(s[name] for s in steps) / 4, rtol=0, atol=1e-6)
    assert not torch.equal(final["norm.weight"], steps[-1]["norm.weight"])
    simulate_death(tmp_path / "straight", tmp_path / "died", step=6)  # within the averaged steps
    pretrain(config(shards, tmp_path / "died", *args), resume=True)
    assert all(torch.equal(w, final[k]) for k, w in weights(tmp_path / "died" / "final").items())
    with pytest.raises(UserError, match="average_last"):
        config(shards, tmp_path, "--average_last", "1")


def test_average_last_changed_on_resume_is_refused_unless_the_mean_is_exact(shards, tmp_path):
    """average_last turned on at a --resume inside its steps averaged only the steps after the resume (a final/ of
    steps 7-8, not 5-8): refused, unless the resume comes before the averaged steps (then the mean is the one of an
    uninterrupted run), or average_last is turned off (final/ then holds the last weights)."""
    from safetensors.torch import load_file

    args = ("--max_steps", "8", "--batch_size", "4", "--save_every", "1", "--keep_last", "8")
    pretrain(config(shards, tmp_path / "plain", *args))
    pretrain(config(shards, tmp_path / "averaged", *args, "--average_last", "0.5"))
    weights = lambda d: load_file(str(d / "model.safetensors"))
    for changed, stop, message in ((("--average_last", "0.5"), 6, "holds no mean of the weights, but average_last "
                                    "0.5 of 8 steps averages the steps after step 4, 2 of them by step 6"),
                                   (("--average_last", "0.25", "--max_steps", "12"), 6, "holds the mean of the "
                                    "weights of its last 2 steps, but average_last 0.25 of 12 steps averages the "
                                    "steps after step 9, 0 of them by step 6")):
        source = tmp_path / ("plain" if "no mean" in message else "averaged")
        run = tmp_path / f"died-{len(changed)}"
        simulate_death(source, run, step=stop)
        with pytest.raises(UserError) as e:
            pretrain(config(shards, run, *args, *changed), resume=True)
        assert str(e.value) == f"{run / 'checkpoints' / 'step_000006'} {message}; resume with the average_last and " \
                               "length the run had, or use a new out_dir."
    simulate_death(tmp_path / "plain", tmp_path / "early", step=3)  # before the averaged steps 5-8: exact
    pretrain(config(shards, tmp_path / "early", *args, "--average_last", "0.5"), resume=True)
    final = weights(tmp_path / "averaged" / "final")
    assert all(torch.equal(w, final[k]) for k, w in weights(tmp_path / "early" / "final").items())
    simulate_death(tmp_path / "averaged", tmp_path / "off", step=6)  # turned off: the last weights
    pretrain(config(shards, tmp_path / "off", *args, "--average_last", "0"), resume=True)
    last = weights(tmp_path / "plain" / "final")
    assert all(torch.equal(w, last[k]) for k, w in weights(tmp_path / "off" / "final").items())


def test_a_resume_reads_the_trainer_state_once_and_checks_the_average_once(shards, tmp_path, monkeypatch):
    """A resume read the checkpoint's trainer state three times (resumable_checkpoint, checked_run, the Trainer)
    and checked the weight average twice where checked_run knew the run's length (then run_training again): once
    each now, the state carried from resumable_checkpoint (RunStart.state)."""
    from babyllama.train import stages

    args = ("--batch_size", "4", "--average_last", "0.5")
    pretrain(config(shards, tmp_path, "--max_steps", "2", *args))
    loads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loads.append(Path(f).resolve().name) or load(f, *a, **k))
    # resolve: load_train_state loads the file it holds open, /proc/self/fd/N
    checks, check = [], stages.check_average
    monkeypatch.setattr(stages, "check_average", lambda *a: checks.append(a[2:]) or check(*a))
    pretrain(config(shards, tmp_path, "--max_steps", "3", *args), resume=True)
    assert loads == ["trainer_state.pt"] and checks == [(2, 1, 3, 3)]  # at step 2 with 1 step averaged, of 3
    assert losses(tmp_path).keys() == {1, 2, 3}


def test_pretrain_reads_the_shards_manifest_once(shards, tmp_path, monkeypatch, capsys):
    """pretrain read the manifest for the tokenizer and the run's length, then each TokenWindows read it again, and
    has_split once more: four reads of one file. It is read once and passed; the windows are as before."""
    windows = len(TokenWindows(shards, 32))
    reads, read_text = [], Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: reads.append(self) or read_text(self, *a, **k))
    pretrain(config(shards, tmp_path, "--max_steps", "1", "--batch_size", "1"))
    assert reads.count(shards / "manifest.json") == 1
    assert f"pretrain: {windows:,} rows, 1 step of 1 row on 1 x cpu, " in capsys.readouterr().out


def test_average_last_goes_on_when_a_tokens_run_is_resumed_with_another_batch(shards, tmp_path):
    """README: a tokens or epochs run may resume with another global batch (other processes). Its length in steps
    then changes (20 steps of 4 -> 17 + 2 of 8 and 4), and with it the averaged window (after step 15 -> after step
    14): the mean of steps 16-17 was refused as not the 3 steps due. It is the mean the run had before, so it goes
    on."""
    args = ("--tokens", str(80 * 32), "--batch_size", "4", "--save_every", "1", "--keep_last", "30",
            "--average_last", "0.25")
    pretrain(config(shards, tmp_path / "straight", *args))
    simulate_death(tmp_path / "straight", tmp_path / "died", step=17)
    pretrain(config(shards, tmp_path / "died", *args, "--batch_size", "8"), resume=True)
    state = torch.load(tmp_path / "died" / "checkpoints" / "step_000019" / "trainer_state.pt", weights_only=True)
    assert (state["step"], state["consumed_samples"], state["averaged"]) == (19, 80, 4)


def test_muon_takes_the_block_matrices_and_adamw_the_rest(shards, tmp_path):
    cfg = config(shards, tmp_path, "--optimizer", "muon")
    trainer = Trainer(cfg, TokenWindows(shards, 32), None, None, Dist(), "pretrain")
    muon, adamw = trainer.optimizers
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    in_muon = sorted(names[id(p)] for g in muon.param_groups for p in g["params"])
    in_adamw = sorted(names[id(p)] for g in adamw.param_groups for p in g["params"])
    assert in_muon == sorted(n for n, p in trainer.model.named_parameters() if n.startswith("layers.") and p.dim() == 2)
    assert "tok_embeddings.weight" in in_adamw and "norm.weight" in in_adamw
    assert len(in_muon) + len(in_adamw) == len(names)
    with pytest.raises(UserError, match="adamw or muon"):
        config(shards, tmp_path, "--optimizer", "sgd")


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = load_config(None, ["--lr", "1e-3", "--min_lr", "1e-4", "--warmup_steps", "10"]).train
    assert lr_at(0, cfg, 100) == pytest.approx(1e-4) and lr_at(9, cfg, 100) == pytest.approx(1e-3)
    assert lr_at(55, cfg, 100) == pytest.approx(5.5e-4) and lr_at(100, cfg, 100) == pytest.approx(1e-4)


@pytest.mark.parametrize("lengths", [None, [(i * 37) % 101 for i in range(538)]], ids=["windows", "by-length"])
def test_global_order_splits_steps_over_ranks_without_overlap(lengths):
    n = 538
    order = GlobalOrder(n, seed=3)

    def indices(world, batch, accum, steps):
        per_rank = [[] for _ in range(world)]
        for step in range(steps):
            rows = [order(step * batch * accum * world + i) for i in range(batch * accum * world)]
            for rank in range(world):
                mbs = micro_batches(rows, lengths, batch, accum, Dist(rank=rank, world=world))
                assert [len(m) for m in mbs] == [batch] * accum
                per_rank[rank] += [i for m in mbs for i in m]
        return per_rank

    two = indices(world=2, batch=2, accum=2, steps=60)  # 480 samples: within the first epoch of 538
    assert not set(two[0]) & set(two[1])  # the ranks see disjoint samples
    assert sorted(two[0] + two[1]) == sorted(indices(world=1, batch=8, accum=1, steps=60)[0])  # the same ones
    one = indices(world=1, batch=8, accum=1, steps=80)[0]
    assert len(one) == 640 > n and set(one) == set(range(n))  # past a whole epoch
    assert len(set(one[:536])) == 536  # no sample twice within the 67 steps of the first epoch
    if lengths is not None:  # each micro-batch holds rows of like length
        rows = [order(i) for i in range(8)]
        mbs = micro_batches(rows, lengths, 4, 2, Dist())
        assert max(lengths[i] for i in mbs[0]) <= min(lengths[i] for i in mbs[1])


def test_refuses_other_model_shape_and_other_tokenizer(shards, tmp_path, bpe_tokenizer):
    pretrain(config(shards, tmp_path, "--max_steps", "2", "--save_every", "2"))
    with pytest.raises(UserError, match="other model settings \\(dim\\)"):
        pretrain(config(shards, tmp_path, "--max_steps", "4", "--model.dim", "64"), resume=True)
    with pytest.raises(UserError, match="already has checkpoints"):
        pretrain(config(shards, tmp_path, "--max_steps", "4"))
    from babyllama.tokenizer import train_bpe

    other = train_bpe(generated_corpus(50, seed=99), 500)
    other.save(tmp_path / "other_tok")
    with pytest.raises(UserError, match="made with another tokenizer"):
        pretrain(config(shards, tmp_path / "x", "--tokenizer", str(tmp_path / "other_tok")))
    # the same vocabulary with other special ids (babyllama_tokenizer.json edited): the same fingerprint
    bpe_tokenizer.save(tmp_path / "edited")
    (tmp_path / "edited" / "babyllama_tokenizer.json").write_text(json.dumps({"bos_id": 1, "eos_id": 0, "pad_id": 2}))
    with pytest.raises(UserError, match=f"^the shards in {shards} were made with another tokenizer "
                                        f"\\(eos_id 2, pad_id 0\\) than {tmp_path / 'edited'} "
                                        f"\\(eos_id 0, pad_id 2\\)\\.$"):
        pretrain(config(shards, tmp_path / "x", "--tokenizer", str(tmp_path / "edited")))


def test_sigterm_writes_a_checkpoint_that_resumes(shards, tmp_path):
    args = ["pretrain", *TINY, *FAST, "--data", str(shards), "--out_dir", str(tmp_path), "--batch_size", "4"]
    proc = subprocess.Popen([sys.executable, "-m", "babyllama", *args, "--max_steps", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    stopped = max(losses(tmp_path))
    checkpoint = tmp_path / "checkpoints" / f"step_{stopped:06d}"
    assert proc.returncode == 128 + signal.SIGTERM and "done:" not in out  # not done: stopped
    assert err.splitlines()[-1] == (f"babyllama: stopped by SIGTERM at step {stopped} of 100000, checkpoint "
                                    f"{checkpoint}; run the same command with --resume to continue.")
    assert (checkpoint / "trainer_state.pt").is_file() and not (tmp_path / "final").exists()
    r = run_cli(*args, "--max_steps", stopped + 3, "--resume")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == f"done: {tmp_path / 'final'}"
    assert sorted(losses(tmp_path)) == list(range(1, stopped + 4))


THREADS_LEFT = (  # `python -m babyllama`, then the rank's file gets its exit code and the threads still running
    "import os, sys, threading\n"
    "from babyllama.cli import main\n"
    "rc = main(sys.argv[2:])\n"
    "tasks = os.listdir('/proc/self/task') if os.path.isdir('/proc/self/task') else []  # Linux lists native ones\n"
    "native = sorted(open(f'/proc/self/task/{t}/comm').read().strip() for t in tasks)\n"
    "python = [t.name for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]\n"
    "with open(sys.argv[1] + os.environ['RANK'], 'w') as f:  # a file each: the ranks' stdout lines interleave\n"
    "    f.write(f'rc {rc} threads {[n for n in native if \"gloo\" in n] + python}')\n"
    "sys.exit(rc)\n")


def torchrun(args, nproc, timeout=300, threads_to=None):
    """`torchrun -m babyllama ARGS` on nproc CPU processes (gloo); with threads_to, each rank writes to the file
    threads_to + RANK its exit code and the gloo and non-daemon Python threads left when main returned."""
    what = ["-m", "babyllama"]
    if threads_to is not None:
        script = threads_to.parent / "threads_left.py"
        script.write_text(THREADS_LEFT)
        what = [str(script), str(threads_to)]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           *what, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def threads_left(prefix, nproc) -> list[str]:
    return [(prefix.parent / f"{prefix.name}{i}").read_text() for i in range(nproc)]


def final_val_loss(out) -> float:
    return [json.loads(x) for x in (out / "metrics.jsonl").open()][-1]["val_loss"]


def one_process_val_loss(final, shards, batch_size, eval_batches) -> float:
    """The validation loss of a final model over the trainer's rows, computed in this one process."""
    from babyllama.checkpoint import load_model
    from babyllama.evaluate import lm_metrics
    from babyllama.tokenizer import load_tokenizer

    return lm_metrics(load_model(final), shards, load_tokenizer(final), batch_size, eval_batches)["val_loss"]


def test_torchrun_two_processes_match_one_and_resume_on_one(shards, tmp_path):
    # 3 validation batches of 2 rows: the ranks get 2 and 1, so one of them runs a padding batch
    assert len(TokenWindows(shards, 32, "val")) >= 6
    common = ["pretrain", *TINY, *FAST, "--data", str(shards), "--max_steps", "6", "--eval_batches", "3",
              "--ddp_timeout", "60"]
    r = torchrun([*common, "--out_dir", str(tmp_path / "ddp"), "--batch_size", "2", "--grad_accum", "2",
                  "--save_every", "3", "--max_steps", "3"], nproc=2, threads_to=tmp_path / "ddp-rank")
    assert r.returncode == 0, r.stderr[-3000:]
    # and each rank ends with no thread but the main one (gloo's threads once ran into interpreter exit)
    assert threads_left(tmp_path / "ddp-rank", 2) == ["rc 0 threads []"] * 2
    # validation covers eval_batches global batches: 3 x 8 rows, as one process at --batch_size 8 sees them
    assert final_val_loss(tmp_path / "ddp") == pytest.approx(
        one_process_val_loss(tmp_path / "ddp" / "final", shards, 8, 3), rel=1e-5)
    # resume the 2-process run in 1 process with the same global batch (4 x 2 accumulation = 2 x 2 x 2)
    r = run_cli(*common, "--out_dir", tmp_path / "ddp", "--batch_size", "4", "--grad_accum", "2", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli(*common, "--out_dir", tmp_path / "one", "--batch_size", "4", "--grad_accum", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    ddp, one = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert sorted(ddp) == sorted(one) == list(range(1, 7))
    for step in one:
        assert math.isclose(ddp[step], one[step], rel_tol=1e-4), (step, ddp[step], one[step])
    # FSDP2 (fully_shard) on gloo: the same losses again, and the validation loss of one process
    r = torchrun([*common, "--out_dir", str(tmp_path / "fsdp"), "--batch_size", "2", "--grad_accum", "2",
                  "--fsdp", "true", "--max_steps", "3"], nproc=2, threads_to=tmp_path / "fsdp-rank")
    assert r.returncode == 0, r.stderr[-3000:]
    # gloo's threads once ran into interpreter exit and aborted rank 0 after a good FSDP run (shutdown)
    assert threads_left(tmp_path / "fsdp-rank", 2) == ["rc 0 threads []"] * 2
    fsdp = losses(tmp_path / "fsdp")
    assert all(math.isclose(fsdp[s], one[s], rel_tol=1e-4) for s in (1, 2, 3)), (fsdp, one)
    assert final_val_loss(tmp_path / "fsdp") == pytest.approx(
        one_process_val_loss(tmp_path / "fsdp" / "final", shards, 8, 3), rel=1e-5)


def test_torchrun_three_processes_validate_when_a_rank_gets_no_batch(shards, tmp_path):
    # 2 validation batches over 3 ranks, at every step and at the end: rank 2 gets none (DDP hung there)
    args = ["pretrain", *TINY, *FAST, "--data", str(shards), "--out_dir", str(tmp_path), "--max_steps", "2",
            "--batch_size", "2", "--eval_every", "1", "--eval_batches", "2", "--ddp_timeout", "60"]
    start = time.time()
    r = torchrun(args, nproc=3, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert time.time() - start < 240
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").open()]
    assert [x["step"] for x in logged if "val_loss" in x] == [1, 2]  # step 1's; step 2 is the last: the final one
    assert final_val_loss(tmp_path) == pytest.approx(one_process_val_loss(tmp_path / "final", shards, 6, 2), rel=1e-5)


def test_a_stuck_collective_ends_the_run_with_one_sentence(tmp_path):
    script = tmp_path / "stuck.py"
    script.write_text(
        "import sys, time, torch\n"
        "from babyllama.errors import UserError\n"
        "from babyllama.train.distributed import all_reduce_sum, process_group\n"
        "try:\n"
        "    with process_group('cpu', timeout_s=3) as d:\n"
        "        if d.rank == 1:\n"
        "            all_reduce_sum(torch.ones(1), d)  # rank 0 never joins\n"
        "        else:\n"
        "            time.sleep(60)\n"
        "except UserError as e:\n"
        "    print(f'babyllama: error: {e}', file=sys.stderr)\n"
        "    sys.exit(2)\n")
    start = time.time()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0 and time.time() - start < 50  # not the 60 s of the sleeping rank
    assert ("babyllama: error: process 1 of 2 stopped: a collective operation waited over 3 s for the other "
            "processes, ddp_timeout (Timed out waiting 3000ms for ") in r.stderr  # a send or recv operation
    assert "died" not in r.stderr  # a timeout, no process ended


@pytest.mark.parametrize("on_device", [False, True], ids=["host", "device"])
def test_non_finite_losses_are_skipped_then_stop_the_run(shards, tmp_path, monkeypatch, on_device):
    device_steps = sync_free_steps(monkeypatch) if on_device else []
    real_forward = Trainer.forward
    calls = {"n": 0}

    def flaky(self, batch):
        calls["n"] += 1
        loss = real_forward(self, batch)
        return loss * float("nan") if calls["n"] in (2, 3) or calls["n"] >= 6 else loss

    monkeypatch.setattr(Trainer, "forward", flaky)
    with pytest.raises(UserError, match="not finite in 3 steps in a row"):
        pretrain(config(shards, tmp_path, "--max_steps", "20", "--max_bad_steps", "3"))
    logged = strict_lines(tmp_path / "metrics.jsonl")
    assert [r["grad_norm"] is None for r in logged] == [False, True, True, False, False, True, True, True]
    assert [r["loss"] is None for r in logged] == [False, True, True, False, False, True, True, True]  # NaN: null
    assert [r.get("skipped", False) for r in logged] == [False, True, True, False, False, True, True, True]
    assert not (tmp_path / "final").exists()
    assert len(device_steps) == (8 if on_device else 0)


def sync_free_steps(monkeypatch) -> list[int]:
    """Run the GPU's step that never waits for the GPU (fused AdamW skipping through found_inf) on
    the CPU, which has fused AdamW too; returns the list of steps that took it."""
    monkeypatch.setattr("babyllama.train.trainer.FUSED_ADAMW_DEVICES", {"cpu", "cuda"})
    steps, real = [], Trainer.device_step

    def device_step(self, loss):
        steps.append(self.step)
        return real(self, loss)

    monkeypatch.setattr(Trainer, "device_step", device_step)
    return steps


def strict_lines(path):
    """Each line parsed as strict JSON (RFC 8259: no NaN or Infinity), as jq or JavaScript's JSON.parse would."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("on_device", [False, True], ids=["host", "device"])
def test_a_finite_loss_with_a_non_finite_gradient_changes_nothing(shards, tmp_path, monkeypatch, on_device):
    """host: the CPU's step reads the loss and norm; device: the GPU's step that never waits for them
    (fused AdamW skips through found_inf; CPUs have fused AdamW too, so it runs here)."""
    from safetensors.torch import load_file

    device_steps = sync_free_steps(monkeypatch) if on_device else []

    real_forward = Trainer.forward

    def nan_gradient_at_step_2(self, batch):  # loss + sqrt(0 * w): the loss is unchanged, d/dw is inf * 0 = NaN
        loss = real_forward(self, batch)
        return loss + (self.model.norm.weight.sum() * 0).sqrt() if self.step == 1 else loss

    monkeypatch.setattr(Trainer, "forward", nan_gradient_at_step_2)
    pretrain(config(shards, tmp_path, "--max_steps", "4", "--save_every", "1", "--keep_last", "5"))
    logged = strict_lines(tmp_path / "metrics.jsonl")
    step2 = next(r for r in logged if r["step"] == 2)
    assert math.isfinite(step2["loss"]) and step2["grad_norm"] is None and step2["skipped"] is True
    ckpt = tmp_path / "checkpoints"
    before, after = (load_file(str(ckpt / f"step_00000{s}" / "model.safetensors")) for s in (1, 2))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the skipped step left the weights alone
    moments = [torch.load(ckpt / f"step_00000{s}" / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
               for s in (1, 2)]
    for name, state in moments[0].items():  # and AdamW's moments and step count
        assert all(torch.equal(v, moments[1][name][k]) for k, v in state.items())
    final = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in final.values())
    assert all(math.isfinite(r["loss"]) for r in logged if r["step"] != 2 and "loss" in r)
    assert device_steps == ([1, 2, 3, 4] if on_device else [])


def test_non_finite_weights_are_never_saved_as_final(shards, tmp_path, monkeypatch):
    real_step = Trainer.train_step

    def poisoned(self):  # an optimiser that writes NaN into the weights at step 3
        out = real_step(self)
        if self.step == 3:
            with torch.no_grad():
                self.model.norm.weight.fill_(float("nan"))
        return out

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    with pytest.raises(UserError, match="the weights are not finite after step 3, so nothing was saved"):
        pretrain(config(shards, tmp_path, "--max_steps", "3"))
    assert not (tmp_path / "final").exists() and not (tmp_path / "checkpoints").exists()


def test_the_counts_of_one_step_agree(shards, tmp_path, monkeypatch, capsys):
    """"in 1 steps in a row", "to 1 samples", "its last 1 steps" and "of 1 steps" said one step or sample."""
    from babyllama.train.trainer import check_average

    pretrain(config(shards, tmp_path, "--max_steps", "2", "--batch_size", "2", "--save_every", "1"))
    capsys.readouterr()
    pretrain(config(shards, tmp_path, "--max_steps", "3", "--batch_size", "1", "--save_every", "1"), resume=True)
    assert "note: global batch changed from 2 to 1 sample\n" in capsys.readouterr().out
    forward = Trainer.forward
    monkeypatch.setattr(Trainer, "forward", lambda self, batch: forward(self, batch) * float("nan"))
    with pytest.raises(UserError) as e:
        pretrain(config(shards, tmp_path / "nan", "--max_steps", "2", "--max_bad_steps", "1"))
    assert str(e.value) == ("the loss or its gradient was not finite at step 1; lower the lr, use bf16 instead of "
                            "fp16, or check the data.")
    with pytest.raises(UserError) as e:
        check_average(config(shards, tmp_path, "--average_last", "0.5").train, Path("ck"), 1, 1, 1, 1)
    assert str(e.value) == ("ck holds the mean of the weights of its last step, but average_last 0.5 of 1 step "
                            "averages the steps after step 1, 0 of them by step 1; resume with the average_last and "
                            "length the run had, or use a new out_dir.")


def test_resume_with_another_global_batch_ends_after_the_same_samples(shards, tmp_path):
    n = len(TokenWindows(shards, 32))
    common = ("--epochs", "1", "--save_every", "3", "--keep_last", "5")
    pretrain(config(shards, tmp_path, *common, "--batch_size", "4", "--max_steps", "3"))  # stopped at step 3
    pretrain(config(shards, tmp_path, *common, "--batch_size", "8", "--grad_accum", "2"), resume=True)
    state = torch.load(tmp_path / "checkpoints" / f"step_{max(losses(tmp_path)):06d}" / "trainer_state.pt",
                       weights_only=True)
    assert state["consumed_samples"] == n  # the last step takes the samples left, fewer than 16
    assert max(losses(tmp_path)) == 3 + math.ceil((n - 12) / 16)  # not ceil(n / 16): steps of 4 are not of 16
    logged = strict_lines(tmp_path / "metrics.jsonl")
    assert [r for r in logged if r.get("resumed")] == [{"step": 3, "resumed": True, "global_batch": 16}]


def test_a_tokens_budget_resumed_with_a_larger_batch_ends_after_its_samples(shards, tmp_path):
    """--tokens 20480 (320 windows of 64) at batch 8, stopped at step 21 and resumed at batch 16, ended at step 31
    after 328 windows (20992 tokens): the steps of 16 overshot the samples left. The last step now takes the samples
    left; on more ranks or micro-steps than they fill, the empty ones run a padding micro-batch that counts nothing
    (the same step as one micro-batch of those rows)."""
    common = ("--tokens", str(80 * 32), "--save_every", "0")
    for name, batch in (("one", ("--batch_size", "8")), ("accum", ("--batch_size", "4", "--grad_accum", "2"))):
        pretrain(config(shards, tmp_path / name, *common, "--batch_size", "4", "--max_steps", "5"))  # 20 windows
        pretrain(config(shards, tmp_path / name, *common, *batch), resume=True)  # 60 left: 7 steps of 8, 1 of 4
        state = torch.load(tmp_path / name / "checkpoints" / "step_000013" / "trainer_state.pt", weights_only=True)
        assert (state["step"], state["consumed_samples"], state["tokens"]) == (13, 80, 80 * 32)
        assert strict_lines(tmp_path / name / "metrics.jsonl")[-1]["tokens"] == 80 * 32
    one, accum = losses(tmp_path / "one"), losses(tmp_path / "accum")
    assert sorted(one) == list(range(1, 14)) and all(math.isclose(one[s], accum[s], rel_tol=1e-5) for s in one)


def test_resumed_metrics_have_each_step_once(shards, tmp_path):
    args = ("--max_steps", "8", "--batch_size", "4", "--save_every", "4")
    pretrain(config(shards, tmp_path / "straight", *args))
    died = tmp_path / "died"
    simulate_death(tmp_path / "straight", died, step=4)  # killed after step 6: its lines 5 and 6 are written
    straight = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    (died / "metrics.jsonl").write_text("\n".join(straight[:6]) + '\n{"step": 7, "tok')  # and a cut line
    pretrain(config(shards, died, *args), resume=True)
    logged = [r["step"] for r in strict_lines(died / "metrics.jsonl")]
    assert logged == [1, 2, 3, 4, 4, 5, 6, 7, 8, 8]  # 4: the step and the resume mark; 8: the step and final
    assert losses(died) == losses(tmp_path / "straight")


def test_report_reads_metrics_written_with_bare_nan(tmp_path):
    from babyllama.report import make_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"step": 1, "tokens": 64, "loss": 6.1, "lr": 0.001, "grad_norm": 1.5}\n'
        '{"step": 2, "tokens": 128, "loss": NaN, "lr": 0.001, "grad_norm": null}\n'
        '{"step": 3, "tokens": 192, "loss": 5.9, "lr": 0.001, "grad_norm": Infinity}\n'
        '{"step": 4, "tokens": 256, "loss": NaN, "lr": 0.001, "grad_norm": null}\n'
        '{"step": 4, "tokens": 256, "val_loss": NaN, "final": true}\n')
    pytest.importorskip("matplotlib")
    text = make_report(run).read_text()
    # steps, tokens, final train and val loss: not finite, as written (the last finite one, 5.9, was shown: a
    # diverged run looked healthy)
    assert "| 4 | 256 | not finite (nan) | not finite (nan) |" in text


def test_a_warmup_that_covers_the_run_is_warned_about(shards, tmp_path, capsys):
    pretrain(config(shards, tmp_path / "a", "--max_steps", "4", "--warmup_steps", "1000", "--lr", "1e-3"))
    out = capsys.readouterr().out
    assert ("warning: warmup_steps 1000 cover the whole run of 4 steps: the learning rate ends at 4/1000 of lr "
            "0.001 and never decays to min_lr 0.0003; set --warmup_steps to a small part of the steps (the configs "
            "use 1-10%).") in out
    pretrain(config(shards, tmp_path / "b", "--max_steps", "4", "--warmup_steps", "4", "--lr", "3e-4",
                    "--min_lr", "1e-5"))  # it read "ends at 0.0003, not lr 0.0003"
    assert ("warning: warmup_steps 4 cover the whole run of 4 steps: the learning rate reaches lr 0.0003 only at "
            "the last step and never decays to min_lr 1e-05; set --warmup_steps") in capsys.readouterr().out
    assert [r["lr"] for r in map(json.loads, (tmp_path / "b" / "metrics.jsonl").open()) if "loss" in r] == [
        pytest.approx(3e-4 * s / 4) for s in (1, 2, 3, 4)]
    pretrain(config(shards, tmp_path / "c", "--max_steps", "4", "--warmup_steps", "3"))
    assert "warmup" not in capsys.readouterr().out


def test_compile_switch_trains(shards, tmp_path):
    pretrain(config(shards, tmp_path, "--max_steps", "3", "--compile", "true"))
    assert len(losses(tmp_path)) == 3 and (tmp_path / "final" / "model.safetensors").is_file()


def test_settings_take_the_types_of_the_dataclass_fields(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[model]\nn_kv_heads = 2\n[train]\ndata = ["a", "b"]\ncompile = true\nlr = 1\n')
    cfg = load_config(toml, ["--model.n_kv_heads", "none", "--max_steps", "7", "--fsdp", "yes"])
    assert cfg.model.n_kv_heads is None and cfg.train.data == ["a", "b"] and cfg.train.compile is True
    assert cfg.train.max_steps == 7 and cfg.train.fsdp is True and cfg.train.lr == 1.0
    assert cfg.model_settings == {"n_kv_heads": None}
    assert load_config(None, ["--data", "d"]).train.data == "d"
    for flags, message in [(["--compile", "maybe"], "train.compile expects true or false \\(or yes/no, on/off, "
                                                    "1/0\\), got 'maybe'"),
                           (["--max_steps", "1.5"], "train.max_steps expects an integer, got '1.5'"),
                           (["--model.n_kv_heads", "two"], "model.n_kv_heads expects an integer or none, got 'two'"),
                           (["--nope", "1"], "unknown train setting 'nope'")]:
        with pytest.raises(UserError, match=message):
            load_config(None, flags)
    for line in ("max_steps = true", "max_steps = 1.5", "compile = 1", "out_dir = 5"):  # as strict as the flags
        toml.write_text(f"[train]\n{line}\n")
        with pytest.raises(UserError, match=f"{line.split()[0]} expects"):
            load_config(toml)
    toml.write_text("[train]\nmax_steps = 1e3\n")
    assert load_config(toml, ["--tokens=2e6"]).train.max_steps == 1000


@pytest.mark.parametrize("line, flag", [("max_steps = 2.0", "2.0"), ("max_steps = 2.5", "2.5"),
                                        ("max_steps = 1e-3", "1e-3"), ("max_steps = 2_000.0", "2000.0")])
def test_an_integer_setting_refuses_a_number_with_a_point(tmp_path, line, flag):
    """`max_steps = 2.0` was taken as 2 (a whole float passed for an integer), in a config file and as a flag: an
    integer setting takes an integer as written, 1000 or 1e3, and refuses any number with a point or a fraction,
    naming the key."""
    toml = tmp_path / "c.toml"
    toml.write_text(f"[train]\n{line}\n")
    for flags, given in (([], f"the number {line.split()[-1]} in {toml}"), (["--max_steps", flag], repr(flag))):
        with pytest.raises(UserError) as e:
            load_config(toml, flags)
        assert str(e.value) == f"setting train.max_steps expects an integer, got {given}."
    toml.write_text("[model]\ndim = 64.0\n")
    with pytest.raises(UserError) as e:
        load_config(toml)
    assert str(e.value) == f"setting model.dim expects an integer, got the number 64.0 in {toml}."
    toml.write_text("[train]\nmax_steps = 1e3\ntokens = 2_000\n")
    assert (load_config(toml).train.max_steps, load_config(toml, ["--tokens", "+3E2"]).train.tokens) == (1000, 300)


def test_every_bool_setting_takes_the_same_words(tmp_path):
    """`--fsdp off` was refused while `--fsdp no` was taken: a bool flag, of training or of the model, takes true
    or false, yes or no, on or off, 1 or 0 (any case), and its error lists them; TOML writes true or false."""
    for word, value in (("on", True), ("OFF", False), ("yes", True), ("no", False), ("1", True), ("0", False),
                        ("True", True), ("false", False)):
        cfg = load_config(None, ["--compile", word, "--doc_mask", word, "--model.tie_embeddings", word])
        assert (cfg.train.compile, cfg.train.doc_mask, cfg.model.tie_embeddings) == (value, value, value), word
    for flag, key in (("--fsdp", "train.fsdp"), ("--model.tie_embeddings", "model.tie_embeddings")):
        with pytest.raises(UserError) as e:
            load_config(None, [flag, "y"])
        assert str(e.value) == f"setting {key} expects true or false (or yes/no, on/off, 1/0), got 'y'."
    toml = tmp_path / "c.toml"
    toml.write_text('[model]\ntie_embeddings = "off"\n')
    with pytest.raises(UserError) as e:
        load_config(toml)
    assert str(e.value) == f'setting model.tie_embeddings expects true or false, got the string "off" in {toml}.'


@pytest.mark.parametrize("line, sentence, flag", [
    ('max_steps = "5"', 'train.max_steps expects an integer, got the string "5"', "5"),
    ("data = 3", "train.data expects a string or a list of strings, got the integer 3", "x"),
    ("lora_targets = 3", "train.lora_targets expects a string or a list of strings, got the integer 3", "wo"),
    ('lr = "1e-3"', 'train.lr expects a number, got the string "1e-3"', "0.001"),
    ("compile = 1", "train.compile expects true or false, got the integer 1", "true"),
    ("out_dir = [1]", "train.out_dir expects a string, got the list [1]", "x"),
])
def test_a_config_value_of_the_wrong_type_is_one_sentence_in_words(tmp_path, line, sentence, flag):
    """`max_steps = "5"` in a config file was taken as 5, and a wrong type said "expects str | list[str]", Python's
    text for the type: a TOML value is of the setting's kind, said in words with the value given and the file."""
    toml = tmp_path / "c.toml"
    toml.write_text(f"[train]\n{line}\n")
    with pytest.raises(UserError) as e:
        load_config(toml)
    assert str(e.value) == f"setting {sentence} in {toml}."
    key = line.split()[0]
    assert str(getattr(load_config(toml, [f"--{key}", flag]).train, key)).lower() == flag  # a flag given instead wins
    for key, close in (("lr_min", "min_lr"), ("batchsize", "batch_size"), ("model.dims", "dim")):
        with pytest.raises(UserError) as e:
            load_config(None, [f"--{key}", "1"])
        assert str(e.value).startswith(f"unknown {'model' if '.' in key else 'train'} setting "
                                       f"'{key.split('.')[-1]}' (did you mean {close}?); known: ")
    with pytest.raises(UserError, match="^unknown train setting 'zzz'; known: activation_checkpointing, "):
        load_config(None, ["--zzz", "1"])
    assert load_config(None, ["--tokens=2e6"]).train.tokens == 2_000_000


def test_doc_mask_segments_start_at_each_eos_and_train(shards, tmp_path, bpe_tokenizer):
    windows = TokenWindows(shards, 32)
    windows.doc_eos = bpe_tokenizer.eos_id
    batch = windows.collate(list(range(len(windows))))
    idx, seg = batch["idx"], batch["segments"]
    assert (idx == bpe_tokenizer.eos_id).any()
    for row, s in zip(idx.tolist(), seg.tolist(), strict=True):  # a new document at (and after) each <eos>
        assert s == [sum(t == bpe_tokenizer.eos_id for t in row[: i + 1]) for i in range(len(row))]
    args = ("--max_steps", "4", "--batch_size", "4", "--activation_checkpointing", "true")
    pretrain(config(shards, tmp_path / "plain", *args))
    pretrain(config(shards, tmp_path / "doc", *args, "--doc_mask", "true"))
    plain, doc = losses(tmp_path / "plain"), losses(tmp_path / "doc")
    assert len(doc) == 4 and all(math.isfinite(v) for v in doc.values())
    assert doc[1] != plain[1]  # same weights and rows; only the attention across documents differs


def test_eval_scores_a_doc_mask_model_with_its_document_mask(shards, tmp_path):
    """`eval --data` of a doc_mask run's final/ gave 6.277173 where the run's final val_loss was 6.277388: eval
    attended across documents. It now scores the model as its run trained it, and eval.json says which."""
    n = len(TokenWindows(shards, 32, "val"))
    pretrain(config(shards, tmp_path / "run", "--max_steps", "4", "--batch_size", "4", "--doc_mask", "true",
                    "--eval_batches", str(-(-n // 4))))  # every val window, as eval --data scores them
    r = run_cli("eval", tmp_path / "run" / "final", "--data", shards, "--out_dir", tmp_path / "eval",
                "--max_new_tokens", "2", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    lm = json.loads((tmp_path / "eval" / "eval.json").read_text())["lm"]
    assert abs(lm["val_loss"] - final_val_loss(tmp_path / "run")) < 1e-6
    assert lm["tokens"] == n * 32 and lm["doc_mask"] is True and '"doc_mask": true' in r.stdout


@pytest.mark.parametrize(("flags", "message"), [
    (["--log_every", "0"], "log_every must be at least 1, got 0."),
    (["--batch_size", "0"], "batch_size must be at least 1, got 0."),
    (["--grad_accum", "0"], "grad_accum must be at least 1, got 0."),
    (["--eval_batches", "0"], "eval_batches must be at least 1, got 0."),
    (["--keep_last", "0"], "keep_last must be at least 1, got 0."),
    (["--max_bad_steps", "0"], "max_bad_steps must be at least 1, got 0."),
    (["--max_steps", "-1"], "max_steps must be 0 (the length comes from tokens or epochs) or more, got -1."),
    (["--save_every", "-5"], "save_every must be 0 (checkpoint only at the end or on a signal) or more, got -5."),
    (["--grad_clip", "-1"], "grad_clip must be 0 (no clipping) or more, got -1.0."),
    (["--grad_clip", "nan"], "grad_clip must be a finite number, got nan."),
    (["--weight_decay", "inf"], "weight_decay must be a finite number, got inf."),
    (["--epochs", "inf"], "epochs must be a finite number, got inf."),
    (["--epochs", "0"], "epochs must be more than 0, got 0.0."),
    (["--lr", "0"], "lr must be in (0, 10], got 0.0."),
    (["--lr", "1e30"], "lr must be in (0, 10], got 1e+30."),
    (["--lr", "nan"], "lr must be a finite number, got nan."),
    (["--lr", "inf"], "lr must be a finite number, got inf."),
    (["--lr", "1e-6"], "min_lr must be in [0, lr = 1e-06], got 1e-05."),
    (["--min_lr", "-1e-5"], "min_lr must be in [0, lr = 0.0003], got -1e-05."),
    (["--min_lr", "nan"], "min_lr must be a finite number, got nan."),
    (["--lora_alpha", "nan"], "lora_alpha must be a finite number, got nan."),  # every step was skipped, NaN saved
    (["--lora_alpha", "-inf"], "lora_alpha must be a finite number, got -inf."),
    (["--lora_dropout", "nan"], "lora_dropout must be a finite number, got nan."),
    (["--beta", "inf"], "beta must be a finite number, got inf."),
    (["--rpo_alpha", "nan"], "rpo_alpha must be a finite number, got nan."),
    (["--average_last", "nan"], "average_last must be a finite number, got nan."),
    (["--lr", "5", "--weight_decay", "0.2"], "lr * weight_decay must be below 1 (each step multiplies the weights "
                                             "by 1 - lr * weight_decay), got 5.0 * 0.2."),
    (["--ddp_timeout", "0"], "ddp_timeout must be in [1, 1,000,000,000] seconds, got 0."),
    (["--ddp_timeout", "-60"], "ddp_timeout must be in [1, 1,000,000,000] seconds, got -60."),
    (["--ddp_timeout", "1e15"], "ddp_timeout must be in [1, 1,000,000,000] seconds, got 1000000000000000."),
    (["--beta2", "1"], "beta2 must be in [0, 1), got 1.0."),
    (["--val_fraction", "-0.1"], "val_fraction must be in [0, 1), got -0.1."),
    (["--seed", "-1"], "seed must be in [0, 2**63), got -1."),
    (["--min_answer_chars", "9", "--max_answer_chars", "5"], "min_answer_chars 9 is above max_answer_chars 5, so no "
     "record would pass; lower the one or raise the other."),
    (["--dtype", "fp8"], "dtype must be auto, fp32, bf16 or fp16, got 'fp8'."),
])
def test_every_training_setting_is_checked_when_read(flags, message):
    with pytest.raises(UserError) as e:
        load_config(None, flags)
    assert str(e.value) == message


def test_settings_of_zero_that_mean_off_run(shards, tmp_path):
    """0 turns off warmup, clipping, decay, evaluation and saving during the run; the run ends normally."""
    pretrain(config(shards, tmp_path, "--max_steps", "2", "--warmup_steps", "0", "--grad_clip", "0",
                    "--weight_decay", "0", "--eval_every", "0", "--save_every", "0"))
    assert list(losses(tmp_path)) == [1, 2] and (tmp_path / "final" / "model.safetensors").is_file()


def test_a_zero_setting_is_exit_code_2_and_one_sentence(shards, tmp_path):
    r = run_cli("pretrain", *TINY, "--data", shards, "--out_dir", tmp_path, "--log_every", "0")
    assert (r.returncode, r.stderr) == (2, "babyllama: error: log_every must be at least 1, got 0.\n")
    assert not tmp_path.joinpath("metrics.jsonl").exists()


def test_data_that_is_not_a_shards_folder_is_one_sentence(shards, tmp_path):
    """A corpus file, the manifest itself or a missing path as --data: one sentence, not a JSONDecodeError."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "一段文字"}, ensure_ascii=False) + "\n")
    folder = "is a file, not a folder; pass a folder of token shards, the --out_dir of babyllama pretokenize (with " \
             "manifest.json)."
    for data, error in ((corpus, f"{corpus} {folder}"),
                        (shards / "manifest.json", f"{shards / 'manifest.json'} {folder}"),
                        (tmp_path / "nonexist", f"{tmp_path / 'nonexist'} does not exist.")):
        with pytest.raises(UserError) as e:
            pretrain(config(data, tmp_path / "run", "--max_steps", "1"))
        assert str(e.value) == error


def test_continued_pretraining_takes_the_model_from_init(shards, tmp_path):
    """`pretrain --init` without the model settings trains the init's model (it crashed on the default
    shape); settings that would change it, and SFT's --pack, are one sentence."""
    first = pretrain(config(shards, tmp_path / "a", "--max_steps", "2"))
    more = load_config(None, ["--data", str(shards), "--init", str(first), "--out_dir", str(tmp_path / "b"), *FAST,
                              "--max_steps", "2"])
    final = pretrain(more)
    assert json.loads((final / "config.json").read_text())["model"]["dim"] == 32
    with pytest.raises(UserError, match="^pretraining takes its model from --init .*; it cannot change dim "):
        pretrain(load_config(None, ["--data", str(shards), "--init", str(first), "--model.dim", "64",
                                    "--out_dir", str(tmp_path / "c")]))
    with pytest.raises(UserError) as e:
        pretrain(config(shards, tmp_path / "d", "--pack", "true"))
    assert str(e.value) == ("pretraining does not read pack, a setting of SFT only (pretraining windows are always "
                            "full; doc_mask keeps documents apart); drop it.")
    for flag, value in [("--val_fraction", "0.1"), ("--sft_cache", "x"), ("--data_workers", "2"),
                        ("--min_prompt_chars", "10"), ("--max_prompt_chars", "256"), ("--min_answer_chars", "5"),
                        ("--max_answer_chars", "256")]:  # the SFT/DPO token cache's settings
        with pytest.raises(UserError) as e:
            pretrain(config(shards, tmp_path / "d", flag, value))
        assert str(e.value) == (f"pretraining does not read {flag[2:]}, a setting of SFT and DPO only (pretraining "
                                "reads the token shards that pretokenize split and wrote); drop it.")
    for flag, value in [("--lora_rank", "8"), ("--lora_alpha", "16"), ("--lora_dropout", "0.1"),
                        ("--lora_targets", "wo")]:
        with pytest.raises(UserError) as e:
            pretrain(config(shards, tmp_path / "d", flag, value))
        assert str(e.value) == (f"pretraining does not read {flag[2:]}, a setting of SFT and DPO only (LoRA adapts a "
                                "trained model; pretraining trains every weight); drop it.")
    assert not (tmp_path / "d").exists()  # refused before anything was written


def test_a_finished_continued_pretraining_whose_init_is_gone_is_said_finished(shards, tmp_path, capsys):
    """pretrain --init read the init's model settings before it looked whether the run was finished (sft and dpo look
    first), so a finished run whose init was since deleted was refused for its missing init; it is said finished now,
    its files as they were, its length (an epochs run's) from the rows its checkpoint records. Unfinished, the missing
    init is said."""
    from babyllama.cli import main

    init, run = tmp_path / "init", tmp_path / "run"
    shutil.copytree(pretrain(config(shards, tmp_path / "a", "--max_steps", "2")), init)
    windows = len(TokenWindows(shards, 32))
    args = ["pretrain", "--data", str(shards), "--init", str(init), "--out_dir", str(run), *FAST, "--batch_size", "4",
            "--resume"]
    assert main([*args, "--epochs", str(8.5 / windows)]) == 0  # 9 windows: 3 steps, the last of 1
    shutil.rmtree(init)
    files = lambda: {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    before = files()
    capsys.readouterr()
    assert main([*args, "--epochs", str(8.5 / windows)]) == 0
    assert capsys.readouterr().out == (f"note: the run in {run} is finished at step 3, so nothing was done; its model "
                                       f"is {run / 'final'}\ndone: {run / 'final'}\n")
    assert files() == before
    assert main([*args, "--epochs", str(12.5 / windows)]) == 2
    assert capsys.readouterr().err == f"babyllama: error: checkpoint {init} does not exist.\n"


def test_shards_without_their_tokenizer_name_the_tokenizer_setting(shards, tmp_path):
    import shutil

    shutil.copytree(shards, tmp_path / "tokens", ignore=shutil.ignore_patterns("tokenizer"))
    with pytest.raises(UserError) as e:
        pretrain(config(tmp_path / "tokens", tmp_path / "run", "--max_steps", "1"))
    assert str(e.value) == (f"tokenizer {tmp_path / 'tokens' / 'tokenizer'} does not exist; pass --tokenizer, the one "
                            "that made the shards.")
    assert not (tmp_path / "run").exists()


def test_settings_of_other_stages_are_refused_all_in_one_sentence(shards, tmp_path):
    """One message names every refused setting, grouped by the stages that read them, each group with the
    reason that is true for pretraining (a refusal one at a time took as many runs as settings)."""
    r = run_cli("pretrain", *TINY, "--data", shards, "--out_dir", tmp_path / "run", "--sft_cache", "x",
                "--val_fraction", "0.1", "--beta", "0.3")
    assert (r.returncode, r.stderr) == (2, "babyllama: error: pretraining does not read val_fraction and "
                                           "sft_cache, settings of SFT and DPO only (pretraining reads the token "
                                           "shards that pretokenize split and wrote), nor beta, a setting of DPO "
                                           "only; drop them.\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["--model.dim", "1000000"], r"^the model has [\d,]+ parameters: training needs about [\d,.]+ TiB for weights"),
    (["--model.n_layers", "10000000"], r"^the model has [\d,]+ parameters"),
    (["--batch_size", "1000000000"], r"^batch_size 1000000000 x grad_accum 1 rows of 32 tokens need [\d,.]+ GiB"),
])
def test_sizes_beyond_the_machine_stop_before_anything_is_allocated(shards, tmp_path, flags, message):
    start = time.perf_counter()
    with pytest.raises(UserError, match=message):
        pretrain(config(shards, tmp_path, "--max_steps", "2", *flags))
    assert time.perf_counter() - start < 5


def test_fp16_off_a_cuda_gpu_is_one_sentence(shards, tmp_path, recwarn):
    """--dtype fp16 on the CPU trained unscaled under torch's `GradScaler is enabled, but CUDA is not available`
    warning, though fp16 runs with a GradScaler: it is refused before anything runs."""
    with pytest.raises(UserError) as e:
        pretrain(config(shards, tmp_path, "--max_steps", "1", "--dtype", "fp16", "--device", "cpu"))
    assert str(e.value) == ("dtype fp16 trains on CUDA GPUs only (its GradScaler runs there); on cpu use bf16 or "
                            "fp32 (auto: fp32).")
    assert not any("GradScaler" in str(w.message) for w in recwarn) and not (tmp_path / "metrics.jsonl").exists()


def test_shards_without_a_val_split_say_so_at_the_start(tmp_path, bpe_tokenizer, capsys):
    """Shards of pretokenize --val_fraction 0 logged "val_loss": null without a word: a note says why."""
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False)
                                                   for t in generated_corpus(40, seed=3)))
    bpe_tokenizer.save(tmp_path / "tok")
    pretokenize([str(tmp_path / "docs.jsonl")], str(tmp_path / "tok"), tmp_path / "tokens", val_fraction=0)
    capsys.readouterr()
    pretrain(config(tmp_path / "tokens", tmp_path / "run", "--max_steps", "2", "--batch_size", "2"))
    notes = [x for x in capsys.readouterr().out.splitlines() if "validation" in x]
    assert notes == [f"note: {tmp_path / 'tokens'} has no validation split (pretokenize --val_fraction 0), so the "
                     "run measures no validation loss."]
    assert strict_lines(tmp_path / "run" / "metrics.jsonl")[-1]["val_loss"] is None


def test_shards_whose_hash_put_no_document_in_validation_say_so_not_val_fraction_0(tmp_path, bpe_tokenizer, capsys):
    """One document pretokenized at the default --val_fraction 0.005 hashed into train, and the note blamed
    `pretokenize --val_fraction 0`, a flag the user never passed: it says what happened, and what to do."""
    from babyllama.data.shards import is_val

    bpe_tokenizer.save(tmp_path / "tok")
    for docs in (generated_corpus(1, seed=3), generated_corpus(3, seed=3)):
        assert not any(is_val(d, 0.005) for d in docs)
        (tmp_path / "docs.txt").write_text("".join(d + "\n" for d in docs))
        pretokenize([str(tmp_path / "docs.txt")], str(tmp_path / "tok"), tmp_path / "tokens")
        capsys.readouterr()
        pretrain(config(tmp_path / "tokens", tmp_path / f"run{len(docs)}", "--max_steps", "1", "--batch_size", "2"))
        notes = [x for x in capsys.readouterr().out.splitlines() if "validation" in x]
        assert notes == [f"note: {tmp_path / 'tokens'} has no validation split, so the run measures no validation "
                         f"loss: pretokenize --val_fraction 0.005 put none of its {len(docs)} "
                         f"{'document' if len(docs) == 1 else 'documents'} there (a hash of each one's text decides); "
                         "pretokenize more documents, or with a larger --val_fraction."]


def test_a_full_disk_while_saving_is_one_sentence_and_resume_finishes(shards, tmp_path, capsys, monkeypatch):
    """ENOSPC while step 4's checkpoint is written: one sentence, exit 2, its temporary removed and step 2's
    checkpoint intact; --resume says where it picks up and finishes the run."""
    import errno

    from babyllama import checkpoint
    from babyllama.cli import main

    args = ["pretrain", *TINY, *FAST, "--data", str(shards), "--out_dir", str(tmp_path), "--max_steps", "6",
            "--save_every", "2", "--batch_size", "4"]
    save_torch = checkpoint.save_torch

    def full_at_step_4(obj, path):
        if obj["step"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        save_torch(obj, path)

    monkeypatch.setattr(checkpoint, "save_torch", full_at_step_4)
    assert main(args) == 2
    ckpts = tmp_path / "checkpoints"
    assert [x for x in capsys.readouterr().err.splitlines() if x.startswith("babyllama")] == [  # and tqdm's bar
        f"babyllama: error: no space left on the device of {ckpts} while writing {ckpts / 'step_000004'} (the "
        "checkpoints before it are intact); free space and run the same command with --resume to continue."]
    assert [p.name for p in ckpts.iterdir()] == ["step_000002"]  # and no .step_000004.tmp-PID
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0
    assert f"resuming from {ckpts / 'step_000002'} (step 2 of 6)\n" in capsys.readouterr().out
    assert sorted(losses(tmp_path)) == list(range(1, 7))


def test_under_torchrun_a_bad_setting_is_said_once(tmp_path):
    """Every process reads the same settings and fails alike before they join: rank 0 says it, torchrun stops
    the other while it waits (cli.say_once), so the sentence is printed once, not once per process."""
    r = torchrun(["pretrain", "--data", tmp_path / "no-tokens", "--out_dir", tmp_path / "out", "--lr", "-1"], nproc=2,
                 timeout=240)
    errors = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("babyllama: error:")]
    assert r.returncode != 0 and len(errors) == 1, r.stderr[-3000:]
    assert "(rank" not in errors[0] and "(exitcode: 2)" in r.stderr


NODE_LOCAL = ("import os, sys\n"
              "os.chdir(f'node{os.environ[\"RANK\"]}')  # a relative --out_dir: each process sees its own folder\n"
              "from babyllama.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")


def test_under_torchrun_processes_that_see_different_checkpoints_stop_with_one_sentence(tmp_path):
    """On several machines with out_dir on each one's own disk, rank 0 resumed from its step 5 and rank 1 from its
    step 10, silently, until a collective timed out naming the wrong cause. The processes compare the checkpoint
    each sees (found_run), and every one stops at once; the sentence is said once."""
    for rank, step in ((0, 5), (1, 10)):
        (tmp_path / f"node{rank}" / "out" / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
    (tmp_path / "node_local.py").write_text(NODE_LOCAL)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(tmp_path / "node_local.py"), "pretrain", "--data", "tokens", "--out_dir", "out",
                        "--resume"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("babyllama:")]
    assert errors == ["babyllama: error: the processes see different checkpoints in out (process 0: step_000005, "
                      "process 1: step_000010): on several machines --out_dir must be a folder that all of them see "
                      "(shared storage)."], r.stderr[-3000:]
    assert "(exitcode: 2)" in r.stderr or "exitcode  : 2" in r.stderr


class Killed(BaseException):
    """A kill -9 in the middle of fit, which nothing catches."""


@pytest.mark.parametrize("when", ["after", "before"])
def test_a_run_killed_around_writing_final_keeps_its_final_line_once(shards, tmp_path, monkeypatch, capsys, when):
    args = ("--max_steps", "4", "--batch_size", "4", "--save_every", "2", "--eval_every", "2")
    save = Trainer.save

    def killed_at_final(self, final=False):
        if final and when == "before":
            raise Killed
        path = save(self, final)
        if final:  # killed just after final/ is written
            raise Killed
        return path

    monkeypatch.setattr(Trainer, "save", killed_at_final)
    with pytest.raises(Killed):
        pretrain(config(shards, tmp_path, *args))
    monkeypatch.setattr(Trainer, "save", save)
    written = (tmp_path / "metrics.jsonl").read_text()
    assert strict_lines(tmp_path / "metrics.jsonl")[-1]["final"] is True
    pretrain(config(shards, tmp_path, *args), resume=True)
    logged = strict_lines(tmp_path / "metrics.jsonl")
    if when == "after":  # finished: every file as it was
        assert "is finished at step 4" in capsys.readouterr().out
        assert (tmp_path / "metrics.jsonl").read_text() == written
    else:  # final/ and its line are redone, once
        assert [(r["step"], bool(r.get("resumed")), bool(r.get("final"))) for r in logged[-3:]] == [
            (4, False, False), (4, True, False), (4, False, True)]
    assert [r["step"] for r in logged].count(4) == (2 if when == "after" else 3)
    assert sum(bool(r.get("final")) for r in logged) == 1


def test_a_finished_run_is_said_finished_before_its_shards_are_opened(shards, tmp_path, capsys):
    """The README says a finished run is left "before any other check ... reading no data", but pretrain opened the
    shards (their files checked against the manifest) and compared their tokenizer first: a finished run resumed
    on shards since damaged, or with another --tokenizer, was refused. Its length comes from the rows
    its checkpoint records now (an epochs run's needs them), and neither the shards nor their manifest are read until
    the run is found unfinished: a finished run whose data folder is gone is said finished too."""
    data = tmp_path / "tokens"
    from babyllama.tokenizer import train_bpe

    shutil.copytree(shards, data)
    run = tmp_path / "run"
    windows = len(TokenWindows(data, 32))
    args = ("--epochs", str(8.5 / windows), "--batch_size", "4")  # 9 windows: 3 steps, the last of 1
    pretrain(config(data, run, *args))
    train = next(data / s["file"] for s in json.loads((data / "manifest.json").read_text())["shards"]
                 if s["split"] == "train")
    train.write_bytes(train.read_bytes()[:-2])  # a token short
    written = {f: f.read_bytes() for f in run.rglob("*") if f.is_file()}
    train_bpe(generated_corpus(50, seed=5), vocab_size=300).save(tmp_path / "other")  # not the shards' tokenizer
    capsys.readouterr()
    pretrain(config(data, run, *args, "--tokenizer", str(tmp_path / "other")), resume=True)
    assert capsys.readouterr().out == (f"note: the run in {run} is finished at step 3, so nothing was done; its model "
                                       f"is {run / 'final'}\n")
    assert {f: f.read_bytes() for f in run.rglob("*") if f.is_file()} == written
    with pytest.raises(UserError, match="has .* tokens, the manifest says"):  # unfinished: the shards are checked
        pretrain(config(data, run, "--epochs", str(12.5 / windows), "--batch_size", "4"), resume=True)
    shutil.rmtree(data)  # the data folder gone since: its manifest is not read either (the checkpoint's rows are)
    capsys.readouterr()
    pretrain(config(data, run, *args), resume=True)
    assert capsys.readouterr().out == (f"note: the run in {run} is finished at step 3, so nothing was done; its model "
                                       f"is {run / 'final'}\n")


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_killed_before_its_first_checkpoint_starts_its_metrics_afresh(shards, tmp_path, resume):
    args = ("--max_steps", "4", "--batch_size", "4", "--log_every", "2")
    (tmp_path / "metrics.jsonl").write_text('{"step": 2, "loss": 9.0}\n{"step": 4, "loss": 8.0}\n{"step": 6, "lo')
    pretrain(config(shards, tmp_path, *args), resume=resume)
    assert [r["step"] for r in strict_lines(tmp_path / "metrics.jsonl")] == [2, 4, 4]  # 4: the step and final
    assert losses(tmp_path)[2] != 9.0


def test_validation_covers_the_same_rows_whatever_splits_the_global_batch(shards, tmp_path):
    """eval_batches global batches of rows: batch_size 4 alone and 2 x grad_accum 2 see the same 8 x 2 windows."""
    assert len(TokenWindows(shards, 32, "val")) > 16  # more rows than validated: eval_batches decides them
    val = []
    for split in (["--batch_size", "4"], ["--batch_size", "2", "--grad_accum", "2"], ["--batch_size", "1",
                                                                                   "--grad_accum", "4"]):
        cfg = config(shards, tmp_path, *split)
        trainer = Trainer(cfg, TokenWindows(shards, 32), TokenWindows(shards, 32, "val"),
                          None, Dist())
        val.append(trainer.evaluate())
    assert val[0] == pytest.approx(val[1], rel=1e-6) and val[0] == pytest.approx(val[2], rel=1e-6)


def test_fsdp_without_torchrun_is_one_sentence(shards, tmp_path, monkeypatch):
    """`pretrain --fsdp true` in a process that torchrun did not start ended in torch's traceback ("environment
    variable RANK expected"); it says that FSDP shards over torchrun's processes, and a model too large for the
    machine names torchrun beside fsdp too."""
    monkeypatch.delenv("RANK", raising=False)
    r = run_cli("pretrain", *TINY, "--data", shards, "--out_dir", tmp_path / "run", "--max_steps", "1",
                "--fsdp", "true")
    assert (r.returncode, r.stderr.splitlines()[-1]) == (2, "babyllama: error: fsdp shards the model over the "
                                                            "processes of torchrun; run with torchrun (torchrun "
                                                            "--standalone --nproc_per_node N -m babyllama ...) or "
                                                            "leave fsdp off.")
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(UserError, match=r"; choose a smaller model \(or shard it with fsdp over the processes of "
                                        r"torchrun\)\.$"):
        pretrain(config(shards, tmp_path / "big", "--model.dim", "1000000"))


def test_the_memory_check_takes_the_least_of_ram_cgroup_ulimit_and_torchrun_share(shards, tmp_path, monkeypatch):
    """The check compared with all the physical RAM, so a run under a cgroup limit, ulimit -v, or as one of N torchrun
    processes on one CPU host passed it, then died in DefaultCPUAllocator. It takes the least of them (RAM and the
    cgroup's limit shared by the LOCAL_WORLD_SIZE processes) and names the one it took. No real allocation: the
    limits are faked."""
    import resource

    from babyllama.train import trainer

    gib = 1 << 30
    sysconf = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda k: {"SC_PAGE_SIZE": 1, "SC_PHYS_PAGES": 64 * gib}.get(k) or sysconf(k))
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    monkeypatch.setattr(trainer, "CGROUP_LIMITS", (v2, v1))
    monkeypatch.setattr(resource, "getrlimit", lambda r: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert trainer.cpu_memory() == (64 * gib, "this machine's memory")
    v2.write_text("max\n")  # no limit
    v1.write_text(f"{16 * gib}\n")
    assert trainer.cpu_memory() == (16 * gib, f"memory that the cgroup limit ({v1}) allows")
    v2.write_text(f"{8 * gib}\n")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert trainer.cpu_memory() == (2 * gib, f"memory that the cgroup limit ({v2}) allows, for each of the 4 "
                                             "torchrun processes on this host (LOCAL_WORLD_SIZE)")
    monkeypatch.setattr(resource, "getrlimit", lambda r: (gib + 2 * 4096, resource.RLIM_INFINITY))
    monkeypatch.setattr(trainer, "Path", lambda p: tmp_path / "statm" if p == "/proc/self/statm" else Path(p))
    (tmp_path / "statm").write_text("2048 1 1 1 0 1 0\n")  # pages (of SC_PAGE_SIZE, 1 byte here) mapped already
    assert trainer.cpu_memory() == (gib + 2 * 4096 - 2048,
                                 "address space that ulimit -v (RLIMIT_AS) leaves this process")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    with pytest.raises(UserError, match=r"more than the 1\.0 GiB of address space that ulimit -v \(RLIMIT_AS\) "
                                        r"leaves this process; choose a smaller model"):
        pretrain(config(shards, tmp_path / "run", "--model.dim", "4096"))


def proc_stat(pid: int) -> list[str]:
    """Process pid's state and what follows it in /proc/PID/stat (state, ppid, ...); [] when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def alive(pid: int) -> bool:
    """Whether process pid runs (a zombie, dead but not yet reaped, does not)."""
    return proc_stat(pid)[:1] not in ([], ["Z"])


@contextmanager
def torchrun_training(shards: Path, out: Path, stderr=subprocess.DEVNULL):
    """A torchrun job of 2 workers pretraining on shards into out with no end in sight, once both train (metrics.jsonl
    has a line): yields its agent (a Popen, stderr as given) and the workers' pids; kills whatever is left of it."""
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "-m", "babyllama", "pretrain", *TINY, *FAST, "--data", str(shards), "--out_dir", str(out),
                              "--max_steps", "1000000", "--batch_size", "2"],
                             stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):  # both train
            assert agent.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        workers = [int(p.name) for p in Path("/proc").iterdir()
                   if p.name.isdigit() and alive(int(p.name)) and proc_stat(int(p.name))[1:2] == [str(agent.pid)]]
        yield agent, workers
    finally:
        agent.kill()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_workers_end_when_torchrun_is_killed(shards, tmp_path):
    """kill -9 of torchrun (its agent) left both workers, each in a session of its own, training on to the end and
    holding out_dir's lock, so that a --resume was refused; each worker now ends with its agent
    (cli.end_with_torchrun_agent)."""
    with torchrun_training(shards, tmp_path / "run") as (agent, workers):
        assert len(workers) == 2
        agent.kill()
        agent.wait()
        deadline = time.monotonic() + 10
        while any(map(alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(map(alive, workers))


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize("killed", [1, 0], ids=["rank-1-killed", "rank-0-killed"])
def test_a_worker_killed_under_torchrun_is_one_true_sentence_of_the_survivor(shards, tmp_path, killed):
    """kill -9 of one of 2 workers. Of rank 1: rank 0 said that a collective "waited over 1800 s ... or one of them
    died", though its peer had died within a second, then torchrun's SIGTERM came as babyllama's own traceback
    (on_sigterm ... Terminated). Of rank 0: rank 1 said nothing (it waited cli.RANK_GRACE_S for torchrun's stop,
    taken as rank 0 having said the error, which a killed rank 0 never does). The survivor now says, once and with
    its rank if it is not rank 0, that the other process ended, and ends with exit code 2, no traceback."""
    survivor = 1 - killed
    with torchrun_training(shards, tmp_path, stderr=subprocess.PIPE) as (agent, workers):
        victim = [pid for pid in workers
                  if f"\0RANK={killed}\0".encode() in b"\0" + Path(f"/proc/{pid}/environ").read_bytes()]
        assert len(workers) == 2 and len(victim) == 1
        os.kill(victim[0], signal.SIGKILL)
        err = agent.communicate(timeout=120)[1]
    said = [x for x in err.splitlines() if x.startswith("babyllama:")]
    rank = f"(rank {survivor}) " if survivor else ""
    assert said == [f"babyllama: error: {rank}process {survivor} of 2 stopped: process {killed} of the job ended (" +
                    said[0].split("ended (", 1)[-1]], err[-3000:]
    assert said[0].endswith("), so this one cannot go on (torchrun's report names it and how it ended); --resume "
                            "continues from the last checkpoint.") and "by peer" in said[0]
    assert "Terminated" not in err and f"[rank{survivor}]:" not in err and "exitcode  : 2 " in err, err[-3000:]


@pytest.mark.parametrize("agent_store", ["True", "False"])
def test_the_first_to_say_counts_in_the_jobs_store_and_where_it_is_gone_only_an_agents_store_says(monkeypatch,
                                                                                                agent_store):
    """The job's store was torch's private default store; a client of the TCPStore at MASTER_ADDR:MASTER_PORT now
    (job_store). Where it cannot be reached, first_to_say said True: right for torchrun's agent's store, which no
    process of the job takes down, but where rank 0 held it, rank 0 has ended, perhaps after saying it: False."""
    from datetime import timedelta

    import torch.distributed as dist

    from babyllama.train import distributed

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=5))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", agent_store)
    monkeypatch.setattr(distributed, "JOB_STORE", distributed.job_store())
    assert [distributed.first_to_say(), distributed.first_to_say()] == [True, False]
    del server  # the store's host has ended
    assert distributed.first_to_say() is (agent_store == "True")
    monkeypatch.setattr(distributed, "JOB_STORE", None)
    assert distributed.first_to_say() is None  # no job joined
    monkeypatch.delenv("MASTER_PORT")
    assert distributed.job_store() is None


def test_a_preset_flag_replaces_the_config_model_table(tmp_path, caplog):
    """`--model.preset baby-92m` beside a [model] table recorded "preset": "baby-92m" but built the table's model
    (dim 128): the command line goes over the config, and a preset stands for all of its settings, so the model is
    the preset's, changed by --model.key flags alone, and a warning names the table's settings it replaced."""
    from babyllama.model import preset

    toml = tmp_path / "t.toml"
    toml.write_text("[model]\ndim = 128\nn_layers = 2\nvocab_size = 1024\n")
    cfg = load_config(toml, ["--model.preset", "baby-92m", "--model.vocab_size", "2048"])
    assert (cfg.preset, cfg.model) == ("baby-92m", preset("baby-92m", vocab_size=2048))
    assert cfg.to_dict()["model"]["dim"] == 512
    assert caplog.messages == [f"--model.preset baby-92m replaces the [model] settings of {toml} (dim, n_layers); "
                               "pass --model.KEY to change the preset's"]
    assert load_config(toml, ["--model.dim", "64"]).model == preset("demo", dim=64, n_layers=2, vocab_size=1024)


def test_pretrain_data_written_as_a_list_like_sfts_is_its_one_shards_folder(shards, tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text(f'[train]\ndata = ["{shards}"]\n')
    pretrain(load_config(toml, [*TINY, *FAST, "--max_steps", "1", "--out_dir", str(tmp_path / "run")]))
    assert len(losses(tmp_path / "run")) == 1
    toml.write_text(f'[train]\ndata = ["{shards}", "b"]\n')
    with pytest.raises(UserError) as e:
        pretrain(load_config(toml, [*TINY, "--out_dir", str(tmp_path / "two")]))
    assert str(e.value) == (f"pretraining reads one folder of token shards, got 2 in data ({shards}, b); pretokenize "
                            "all the inputs into one folder (pretokenize --input takes several).")
    toml.write_text('[train]\ndata = ["a", 5]\n')
    with pytest.raises(UserError) as e:
        load_config(toml)
    assert str(e.value) == f'setting train.data expects a string or a list of strings, got the list ["a", 5] in {toml}.'



def test_a_model_vocab_far_above_the_tokenizers_ids_gets_a_note_at_the_start(shards, tmp_path, capsys):
    """The demo preset (vocab_size 8,192) on the smoke tokenizer's 1,024 ids trained 7,168 embedding rows that no
    id reaches, without a word. A vocab_size padded up to the next multiple of 64 is fine."""
    flags = [*TINY, *FAST, "--max_steps", "1", "--data", str(shards)]
    pretrain(load_config(None, [*flags, "--model.vocab_size", "1000", "--out_dir", str(tmp_path / "a")]))
    notes = [line for line in capsys.readouterr().out.splitlines() if "embedding rows" in line]
    assert notes == ["note: the tokenizer has 600 ids; the model's vocab_size 1000 leaves 400 embedding rows unused; "
                     "set --model.vocab_size 600"]
    pretrain(load_config(None, [*flags, "--model.vocab_size", "640", "--out_dir", str(tmp_path / "b")]))
    assert "embedding rows" not in capsys.readouterr().out


CHECKPOINTING = "pass --activation_checkpointing true (each block recomputed in the backward pass)"
LOWER = "lower --batch_size (and raise --grad_accum to keep the tokens a step)"


@pytest.mark.parametrize("gib, batch_size, checkpointing, needs, fix", [
    (8, 1, False, "13 GiB for its activations, 14 GiB", CHECKPOINTING),
    (8, 2, False, "26 GiB for its activations, 27 GiB", f"{CHECKPOINTING}, or {LOWER}"),
    (5, 2, False, "26 GiB for its activations, 27 GiB", LOWER),  # with checkpointing 2 rows need 7.4 GiB
    (4, 1, False, "13 GiB for its activations, 14 GiB", "choose a smaller --model.max_seq_len or model"),
    (4, 1, True, "3.3 GiB for its activations, 4.1 GiB", "choose a smaller --model.max_seq_len or model"),
])
def test_the_activation_refusal_names_the_remedies_that_apply(monkeypatch, gib, batch_size, checkpointing, needs,
                                                              fix):
    """baby-218m's shape with 32768 positions: the refusal said "lower --batch_size" at batch_size 1 too, and never
    --activation_checkpointing, with which batch_size 1 fits 8 GiB. It names checkpointing when it is off and the
    micro-batch fits with it, a lower batch_size when it has several rows, else a shorter max_seq_len or model."""
    from babyllama.config import RunConfig, TrainConfig
    from babyllama.model import ModelConfig
    from babyllama.train import trainer

    model = ModelConfig(dim=1024, n_layers=12, n_heads=8, vocab_size=64793, max_seq_len=32768)
    run = RunConfig(model=model, train=TrainConfig(batch_size=batch_size, activation_checkpointing=checkpointing))
    monkeypatch.setattr(trainer, "cpu_memory", lambda: (gib << 30, "this machine's memory"))
    with pytest.raises(UserError) as e:
        trainer.check_memory(run, torch.device("cpu"), "pretrain")
    assert str(e.value) == (f"a micro-batch of batch_size {batch_size} rows of 32768 tokens needs at least {needs} "
                            f"with the weights and token ids, more than the {gib}.0 GiB of this machine's memory; "
                            f"{fix}.")
    if fix == CHECKPOINTING:  # as said, it fits
        trainer.check_memory(RunConfig(model=model, train=TrainConfig(batch_size=batch_size,
                                                                      activation_checkpointing=True)),
                             torch.device("cpu"), "pretrain")


def test_an_sft_micro_batch_of_one_row_that_cannot_fit_is_told_to_use_shorter_samples(monkeypatch):
    """SFT and DPO take max_seq_len from --init: one row that does not fit with checkpointing needs shorter samples."""
    from babyllama.config import RunConfig, TrainConfig
    from babyllama.model import ModelConfig
    from babyllama.train import trainer

    model = ModelConfig(dim=1024, n_layers=12, n_heads=8, vocab_size=64793, max_seq_len=32768)
    monkeypatch.setattr(trainer, "cpu_memory", lambda: (4 << 30, "this machine's memory"))
    sft = RunConfig(model=model, train=TrainConfig(batch_size=8, activation_checkpointing=True))
    with pytest.raises(UserError) as e:
        trainer.check_activations(sft, torch.device("cpu"), "sft", 32768, 0, "batch_size 8 rows (counted as the 1 rows "
                                  "the run trains on) padded to the longest row's 32768 tokens", False)
    assert str(e.value).endswith("tokens needs at least 3.3 GiB for its activations, 4.1 GiB with the weights and "
                                 "token ids, more than the 4.0 GiB of this machine's memory; use shorter samples "
                                 "(--max_prompt_chars, --max_answer_chars) or a smaller model.")


def test_the_rows_memory_check_counts_the_longest_row_the_run_visits(monkeypatch):
    """With a --tokens budget of 10 short rows the check counted the longest row of all 1001, which the run never
    trains on, and refused it: it takes the longest of the rows the run visits (the first of the global order; all
    of them in a whole epoch), and under torchrun a process's share of them (here 3 of 10 rows for 4 processes)."""
    import numpy as np

    from babyllama.config import RunConfig, TrainConfig
    from babyllama.model import ModelConfig
    from babyllama.train import trainer

    model = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=600, max_seq_len=4096)
    lengths = np.full(1001, 20)
    lengths[int(trainer.epoch_order(1001, 1337, 0)[-1])] = 4097  # the last row the first epoch visits

    class Rows:
        row_positions = lengths - 1

        def __init__(self):
            self.lengths = lengths

        def __len__(self):
            return 1001

    run = lambda **train: RunConfig(model=model, train=TrainConfig(activation_checkpointing=True, **train))
    cpu = torch.device("cpu")
    have = trainer.model_bytes(run(), "sft")[2] + trainer.activation_bytes(run(), cpu, 4096, True)
    monkeypatch.setattr(trainer, "device_memory", lambda device: (have, "this machine's memory"))
    trainer.check_rows_memory(run(batch_size=1, tokens=190), cpu, "sft", Rows())  # 10 rows of 19 positions
    with pytest.raises(UserError, match="batch_size 1 rows padded to the longest row's 4096 tokens needs"):
        trainer.check_rows_memory(run(batch_size=1, epochs=1.0), cpu, "sft", Rows())
    monkeypatch.setattr(trainer, "device_memory", lambda device: (0, "this machine's memory"))
    with pytest.raises(UserError, match=r"^a micro-batch of batch_size 8 rows \(counted as the 3 rows each of the 4 "
                                        r"processes trains on\) padded to the longest row's 19 tokens needs"):
        trainer.check_rows_memory(run(batch_size=8, tokens=190), cpu, "sft", Rows(), world=4)


def test_a_packed_sft_row_that_cannot_fit_is_told_to_pass_pack_false(monkeypatch):
    """Packed rows are max_seq_len long whatever their samples, so "use shorter samples" did not help: --pack false
    does (rows as long as their samples)."""
    from babyllama.config import RunConfig, TrainConfig
    from babyllama.model import ModelConfig
    from babyllama.train import trainer

    model = ModelConfig(dim=1024, n_layers=12, n_heads=8, vocab_size=64793, max_seq_len=32768)
    monkeypatch.setattr(trainer, "cpu_memory", lambda: (4 << 30, "this machine's memory"))
    sft = RunConfig(model=model, train=TrainConfig(batch_size=1, activation_checkpointing=True, pack=True))
    with pytest.raises(UserError) as e:
        trainer.check_activations(sft, torch.device("cpu"), "sft", 32768, 0, "batch_size 1 rows of 32768 tokens "
                                  "(packed)", False)
    assert str(e.value).endswith("more than the 4.0 GiB of this machine's memory; pass --pack false (rows as long as "
                                 "their samples, not max_seq_len) or use a smaller model.")


def test_a_micro_batch_whose_activations_cannot_fit_is_one_sentence(shards, tmp_path, monkeypatch):
    """batch_size 100000 passed the check of weights and token ids, then the kernel's out-of-memory killer ended the
    run (exit 137, no word): a lower bound of a micro-batch's activations (32 tokens a row; per block the inputs of
    wqkv, wo, w13 (dim 32 each) and w13's output (2 x ffn_dim 96), then the final norm's output and the
    head's input gradient, fp32; 2048 positions' logits of 600 ids) is counted with them; with activation
    checkpointing each block's input and one block. Memory is faked at 16 MiB; 4 rows fit it, and train."""
    from babyllama.train import trainer

    monkeypatch.setattr(trainer, "cpu_memory", lambda: (16 << 20, "this machine's memory"))
    cfg = config(shards, tmp_path / "run", "--max_steps", "1", "--batch_size", "1000")
    assert (cfg.model.dim, cfg.model.ffn_dim, cfg.model.n_layers) == (32, 96, 2)
    acts = (2 * (3 * 32 + 2 * 96) + 2 * 32) * 1000 * 32 * 4 + 2048 * 600 * 4
    total = acts + 4 * cfg.model.num_params + 16 * 1000 * 33
    with pytest.raises(UserError) as e:
        pretrain(cfg)
    assert str(e.value) == (f"a micro-batch of batch_size 1000 rows of 32 tokens needs at least "
                            f"{trainer.size_text(acts)} for its activations, {trainer.size_text(total)} with the "
                            "weights and token ids, more than the 16 MiB of this machine's memory; lower --batch_size "
                            "(and raise --grad_accum to keep the tokens a step).")
    assert trainer.size_text(acts) == "83 MiB" and not (tmp_path / "run" / "checkpoints").exists()
    checkpointed = (2 * 32 + 3 * 32 + 2 * 96 + 2 * 32) * 1000 * 32 * 4 + 2048 * 600 * 4
    with pytest.raises(UserError, match=f"needs at least {trainer.size_text(checkpointed)} for its activations"):
        pretrain(config(shards, tmp_path / "run", "--max_steps", "1", "--batch_size", "1000",
                        "--activation_checkpointing", "true"))
    pretrain(config(shards, tmp_path / "small", "--max_steps", "1", "--batch_size", "4"))
    assert (tmp_path / "small" / "checkpoints").exists()


def test_a_resume_with_a_length_that_ends_before_its_checkpoint_is_refused(shards, tmp_path, capsys):
    """`--resume --max_steps 100` on a run at step 280 said "(step 280 of 100)" and wrote its checkpoint as final/ at
    step 280 without a word (so did a tokens budget below the samples trained on): it is one sentence now, writing
    nothing. A finished run is said finished whatever length is asked (test_sft_resume_of_a_finished_run_...)."""
    run = tmp_path / "run"
    pretrain(config(shards, run, "--max_steps", "4", "--batch_size", "2", "--save_every", "2"))
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step_000004")  # as if stopped at step 2
    written = {f: f.read_bytes() for f in run.rglob("*") if f.is_file()}
    ckpt = run / "checkpoints" / "step_000002"
    with pytest.raises(UserError) as e:
        pretrain(config(shards, run, "--max_steps", "1", "--batch_size", "4"), resume=True)
    assert str(e.value) == (f"{ckpt} is at step 2, past the end that --max_steps 1 asks for, and a resumed run cannot "
                            "end before the step its checkpoint reached; pass a longer length (--max_steps 2 or "
                            "more) or start a new run in another out_dir.")
    with pytest.raises(UserError) as e:  # the length given is the one named: a tokens run was told --max_steps
        pretrain(config(shards, run, "--tokens", "64", "--batch_size", "2"), resume=True)
    assert str(e.value) == (f"{ckpt} is at step 2, past the end that --tokens 64 (2 samples, it has trained on 4) asks "
                            "for, and a resumed run cannot end before the step its checkpoint reached; pass a longer "
                            "length (--tokens 128 or more) or start a new run in another out_dir.")
    rows = len(TokenWindows(shards, 32, "train"))
    with pytest.raises(UserError, match=rf"past the end that --epochs 0.001 \({math.ceil(rows / 1000)} samples?, it "
                       rf"has trained on 4\) .* \(--epochs {math.ceil(400 / rows) / 100:g} or more\)"):
        pretrain(config(shards, run, "--epochs", "0.001", "--batch_size", "2"), resume=True)
    assert {f: f.read_bytes() for f in run.rglob("*") if f.is_file()} == written
    pretrain(config(shards, run, "--tokens", "128", "--batch_size", "2"), resume=True)  # the least it suggests runs
    assert read_config(run / "final")["step"] == 2


def test_a_finished_run_extended_says_its_learning_rate_moves(shards, tmp_path, capsys):
    """A finished 4-step run resumed with --max_steps 6 went from min_lr back up (the cosine's length changed)
    without a word: it is said in one note line."""
    run = tmp_path / "run"
    pretrain(config(shards, run, "--max_steps", "4", "--batch_size", "2", "--save_every", "2"))
    capsys.readouterr()
    pretrain(config(shards, run, "--max_steps", "6", "--batch_size", "2", "--save_every", "2"), resume=True)
    t = config(shards, run).train
    was, now = lr_at(4, t, 4), lr_at(4, t, 6)
    assert f"\nnote: the run was 4 steps long and is now 6, so the learning rate follows the cosine of the new " \
           f"length: {now:.3g} at step 4, where it was {was:.3g}.\n" in capsys.readouterr().out
    assert now > was * 2


def test_the_rows_memory_check_of_a_resumed_run_counts_the_rows_it_visits_from_its_consumed_samples(monkeypatch):
    """A resumed max_steps run counted the positions from 0, not from the checkpoint's consumed samples, so a run
    resumed at 32,000 of 100,000 rows (step 16 of a global batch of 2,000 before) was let through though its steps
    visit a row of 4,000 tokens at position 35,000; the positions [consumed, consumed + steps left x global batch) are
    counted, wrapping the epochs' orders."""
    import numpy as np

    from babyllama.config import RunConfig, TrainConfig
    from babyllama.model import ModelConfig
    from babyllama.train import trainer

    model = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=600, max_seq_len=4096)
    lengths = np.full(100_000, 50)
    order0, order1 = trainer.epoch_order(100_000, 1337, 0), trainer.epoch_order(100_000, 1337, 1)
    lengths[int(order0[35_000])] = 4000

    class Rows:
        row_positions = lengths - 1

        def __init__(self):
            self.lengths = lengths

        def __len__(self):
            return 100_000

    cfg = RunConfig(model=model, train=TrainConfig(activation_checkpointing=True, batch_size=1000, max_steps=20))
    cpu = torch.device("cpu")
    have = trainer.model_bytes(cfg, "sft")[2] + trainer.activation_bytes(cfg, cpu, 1000 * 49, True) + 16 * 1000 * 49
    monkeypatch.setattr(trainer, "device_memory", lambda device: (have, "this machine's memory"))
    trainer.check_rows_memory(cfg, cpu, "sft", Rows())  # steps 0..19: positions 0..19,999 hold no long row
    with pytest.raises(UserError, match="batch_size 1000 rows padded to the longest row's 3999 tokens needs"):
        trainer.check_rows_memory(cfg, cpu, "sft", Rows(), state={"step": 16, "consumed_samples": 32_000})
    assert sorted(trainer.visited_lengths(lengths, 99_000, 101_000, 1337)) == sorted(
        lengths[np.concatenate([order0[99_000:].numpy(), order1[:1000].numpy()])])
    trainer.check_rows_memory(cfg, cpu, "sft", Rows(), state={"step": 16, "consumed_samples": 35_001})
