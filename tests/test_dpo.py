"""DPO: the loss and rewards equal the published formula and TRL's, a run learns the preferences,
resume is exact with and without LoRA, settings out of range are one sentence."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from babyllama.chat_format import Conversation
from babyllama.checkpoint import save_checkpoint
from babyllama.config import load_config
from babyllama.data.preferences import render_pair
from babyllama.data.sft_tokens import SFTSettings
from babyllama.errors import UserError
from babyllama.model import Transformer
from babyllama.train.distributed import Dist
from babyllama.train.dpo import DPOTrainer, PreferenceData, dpo, dpo_loss, preference_metrics
from babyllama.train.sft_data import SFTData, load_sft_data
from babyllama.train.stages import init_model
from tests.conftest import not_finite, poison, run_cli, simulate_death, tiny_config
from tests.test_sft import write

PAIRS = [(Conversation([("你好", "")]), "对的", "错了吧"), (Conversation([("问题", "")]), "好", "不好的"),
         (Conversation([("你好", "你好！"), ("1+1等于几", "")], "你是助手。"), "等于2。", "等于3。")]
PAIRS_AS_TEXT = {"prompt": "问", "chosen": "对", "rejected": "错"}  # TRL needs a dataset to start; not scored


def model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_config(vocab_size=600)).eval()


def published_dpo(pc: float, pr: float, rc: float, rr: float, beta: float, eps: float) -> tuple[float, float, float]:
    """Rafailov et al. 2023, eq. 7 with conservative label smoothing, written out: loss, chosen and rejected reward."""
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    h = chosen - rejected
    return -(1 - eps) * math.log(1 / (1 + math.exp(-h))) - eps * math.log(1 / (1 + math.exp(h))), chosen, rejected


def summed_answer_log_prob(m: Transformer, ids: list[int], mask: list[int]) -> float:
    """log π(answer | prompt), position by position from the full logits."""
    with torch.no_grad():
        logp = torch.log_softmax(m(torch.tensor([ids[:-1]]))[0][0].double(), dim=-1)  # (T - 1, V)
    return sum(float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1) if mask[t + 1])


def test_dpo_loss_is_the_published_formula():
    pc, pr, rc, rr = (torch.tensor(v) for v in ([-3.0, -10.0, -2.5], [-5.0, -4.0, -2.5], [-4.0, -9.0, -3.0],
                                                  [-4.5, -6.0, -1.0]))
    for beta, eps in ((0.1, 0.0), (0.5, 0.2)):
        losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta, eps)
        for i in range(3):
            expected = published_dpo(*(float(x[i]) for x in (pc, pr, rc, rr)), beta, eps)
            assert [float(losses[i]), float(chosen[i]), float(rejected[i])] == pytest.approx(expected, abs=1e-6)


@pytest.fixture(scope="module")
def fixed_batch(tmp_path_factory, bpe_tokenizer):
    """Reference (the init) and a different policy, their checkpoints and HF exports, and a batch of 3 pairs."""
    d = tmp_path_factory.mktemp("dpo-batch")
    for seed, name in ((0, "ref"), (1, "policy")):
        save_checkpoint(d / name, model(seed), bpe_tokenizer)
    pairs = [render_pair(bpe_tokenizer, conv, c, r, 64)[:2] for conv, c, r in PAIRS]
    return d, pairs


def ours(d, pairs, beta: float, eps: float = 0.0, rpo_alpha: float = 0.0):
    """Our trainer's (losses, chosen rewards, rejected rewards, policy log-probs) on the batch of all pairs,
    its training loss (the mean DPO loss + rpo_alpha times the chosen answers' NLL), and its val_loss on the
    same pairs."""
    cfg = load_config(None, ["--init", str(d / "ref"), "--out_dir", str(d / "run"), "--beta", str(beta),
                             "--label_smoothing", str(eps), "--rpo_alpha", str(rpo_alpha)])
    cfg.model = init_model(cfg, "DPO")
    data = PreferenceData(SFTData.from_samples([s for pair in pairs for s in pair], max_seq_len=63, pad_id=0))
    trainer = DPOTrainer(cfg, data, data, None, Dist())
    trainer.model.load_state_dict(model(1).state_dict())  # the policy: another model than the reference
    trainer.model.train()
    batch = data.collate(list(range(len(pairs))))
    with torch.no_grad():
        loss = trainer.forward(batch)
        return *trainer.pair_losses(batch), loss, trainer.validation()["val_loss"]


def test_validation_on_two_ranks_adds_up_to_one_process(fixed_batch, monkeypatch):
    """Trainer.val_batches deals the held-out pairs out to the ranks in batches of batch_size (5 pairs, batches of 2:
    rank 0 takes [0, 1] and [4], rank 1 [2, 3]); the rank dealt fewer runs a padding batch that counts nothing, so
    that every rank makes as many forward passes. The ranks' sums add up to one process's over the same pairs."""
    import babyllama.train.dpo as dpo_module

    d, pairs = fixed_batch
    data = PreferenceData(SFTData.from_samples([s for pair in [*pairs, *pairs[:2]] for s in pair], 63, 0))
    reduced, passes = [], []
    monkeypatch.setattr(dpo_module, "all_reduce_sum", lambda x, dist: reduced.append(x.clone()) or x)

    def trainer(*flags: str) -> DPOTrainer:
        cfg = load_config(None, ["--init", str(d / "ref"), "--out_dir", str(d / "run"), "--batch_size", "2",
                                 "--eval_batches", "2", *flags])
        cfg.model = init_model(cfg, "DPO")
        t = DPOTrainer(cfg, data, data, None, Dist())
        pair_losses = t.pair_losses
        monkeypatch.setattr(t, "pair_losses", lambda batch: passes.append(t.dist.rank) or pair_losses(batch))
        return t

    trainer("--grad_accum", "2").validation()  # one process, a global batch of 4: all 5 pairs
    one = reduced.pop()
    for rank in (0, 1):  # two processes of one micro-batch each: the same global batch
        t = trainer()
        t.dist, t.global_batch = Dist(rank=rank, world=2), 4
        t.validation()
    assert passes == [0, 0, 0] + [0, 0] + [1, 1]  # one process: 3 batches; each rank: 2, one of them padding
    assert torch.allclose(reduced[0] + reduced[1], one, atol=1e-5) and one[-1] == 5 and reduced[1][-1] == 2


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_trainer_loss_and_rewards_equal_the_formula_on_summed_log_probs(fixed_batch, eps):
    d, pairs = fixed_batch
    losses, chosen, rejected, logps, *_ = ours(d, pairs, beta=0.5, eps=eps)
    policy, reference = model(1), model(0)
    for i, ((c_ids, c_mask), (r_ids, r_mask)) in enumerate(pairs):
        pc, pr = (summed_answer_log_prob(policy, ids, m) for ids, m in ((c_ids, c_mask), (r_ids, r_mask)))
        rc, rr = (summed_answer_log_prob(reference, ids, m) for ids, m in ((c_ids, c_mask), (r_ids, r_mask)))
        assert float(logps[i]) == pytest.approx(pc, abs=1e-4) and float(logps[3 + i]) == pytest.approx(pr, abs=1e-4)
        expected = published_dpo(pc, pr, rc, rr, 0.5, eps)
        assert [float(losses[i]), float(chosen[i]), float(rejected[i])] == pytest.approx(expected, abs=1e-5)


def test_rpo_adds_the_chosen_answers_mean_token_nll(fixed_batch):
    """RPO: loss = mean DPO loss + α (-Σ chosen answers' log-probs / their number of tokens)."""
    d, pairs = fixed_batch
    losses, _, _, _, dpo_only, _ = ours(d, pairs, beta=0.5)
    *_, loss, val_loss = ours(d, pairs, beta=0.5, rpo_alpha=0.7)
    policy = model(1)
    chosen_sum = sum(summed_answer_log_prob(policy, ids, m) for (ids, m), _ in pairs)
    tokens = sum(sum(m[1:]) for (_, m), _ in pairs)  # the targets: answer tokens and <eos>
    assert float(dpo_only) == pytest.approx(float(losses.mean()), abs=1e-6)
    assert float(loss) == pytest.approx(float(losses.mean()) + 0.7 * -chosen_sum / tokens, abs=1e-5)
    assert val_loss == pytest.approx(float(loss), abs=1e-5)  # the held-out loss is the same objective


def test_preference_metrics_name_their_loss_the_plain_dpo_loss(fixed_batch):
    """The demo's preferences.json: dpo_loss is equation 7 without label smoothing or RPO, whatever the run
    trained with, and no field claims to be the run's loss."""
    d, pairs = fixed_batch
    data = PreferenceData(SFTData.from_samples([s for pair in pairs for s in pair], max_seq_len=63, pad_id=0))
    got = preference_metrics(model(1), model(0), data, beta=0.5, batch_size=2)
    policy, reference = model(1), model(0)
    expected = []
    for (c_ids, c_mask), (r_ids, r_mask) in pairs:
        pc, pr = (summed_answer_log_prob(policy, ids, m) for ids, m in ((c_ids, c_mask), (r_ids, r_mask)))
        rc, rr = (summed_answer_log_prob(reference, ids, m) for ids, m in ((c_ids, c_mask), (r_ids, r_mask)))
        expected.append(published_dpo(pc, pr, rc, rr, 0.5, 0.0)[0])
    assert "loss" not in got and got["dpo_loss"] == pytest.approx(sum(expected) / 3, abs=1e-5)


@pytest.mark.parametrize("rpo_alpha", [0.0, 0.7])
def test_loss_and_metrics_equal_trls_dpo_trainer(fixed_batch, bpe_tokenizer, rpo_alpha):
    """TRL's DPOTrainer computes its loss on our models exported to Hugging Face, on the same token ids;
    RPO is TRL's loss_type ["sigmoid", "sft"] with loss_weights [1, α]."""
    pytest.importorskip("trl")
    transformers = pytest.importorskip("transformers")
    from datasets import Dataset
    from trl import DPOConfig
    from trl import DPOTrainer as TRLDPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from babyllama.export import export

    d, pairs = fixed_batch
    for name in ("ref", "policy"):
        export(d / name, d / f"{name}-hf")
    policy = transformers.AutoModelForCausalLM.from_pretrained(d / "policy-hf")
    reference = transformers.AutoModelForCausalLM.from_pretrained(d / "ref-hf")
    trl = TRLDPOTrainer(model=policy, ref_model=reference, train_dataset=Dataset.from_list([PAIRS_AS_TEXT]),
                        args=DPOConfig(output_dir=str(d / "trl"), beta=0.5, report_to=[], use_cpu=True,
                                       bf16=False,  # TRL's default runs the reference under bf16 autocast
                                       loss_type=["sigmoid", "sft"], loss_weights=[1.0, rpo_alpha]),
                        processing_class=transformers.AutoTokenizer.from_pretrained(d / "policy-hf"))
    examples = []
    for (c_ids, c_mask), (r_ids, _) in pairs:
        start = c_mask.index(1)  # the prompt: everything before the last answer
        examples.append({"prompt_ids": c_ids[:start], "chosen_ids": c_ids[start:], "rejected_ids": r_ids[start:]})
    policy.train()
    trl_loss = trl.compute_loss(policy, DataCollatorForPreference(pad_token_id=0)(examples))
    trl_metrics = {k: v[-1] for k, v in trl._metrics["train"].items()}
    losses, chosen, rejected, logps, loss, _ = ours(d, pairs, beta=0.5, rpo_alpha=rpo_alpha)
    assert float(trl_loss.detach()) == pytest.approx(float(loss), abs=1e-5)
    mine = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(), "rewards/margins": (chosen - rejected).mean(),
            "logps/chosen": logps[:3].mean(), "logps/rejected": logps[3:].mean()}
    for name, value in mine.items():
        assert trl_metrics[name] == pytest.approx(float(value), abs=1e-4), name


@pytest.fixture(scope="module")
def dpo_setup(tmp_path_factory, bpe_tokenizer):
    d = tmp_path_factory.mktemp("dpo")
    save_checkpoint(d / "init", model(0), bpe_tokenizer)
    pairs = [{"prompt": f"判断情感：{text}", "chosen": label, "rejected": "负面" if label == "正面" else "正面"}
             for i in range(100) for text, label in [(f"很好很喜欢{i}", "正面"), (f"太差了失望{i}", "负面")]]
    write(d / "pairs.jsonl", pairs)
    return d


def metrics(run) -> list[dict]:
    """metrics.jsonl without the speed and the line that marks a resume."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records if "resumed" not in r]


def test_dpo_learns_the_held_out_preferences(dpo_setup, tmp_path):
    d = dpo_setup
    dpo(load_config(None, ["--init", str(d / "init"), "--data", str(d / "pairs.jsonl"), "--out_dir", str(tmp_path),
                           "--max_steps", "12", "--batch_size", "8", "--lr", "3e-3", "--warmup_steps", "2",
                           "--val_fraction", "0.1", "--eval_every", "0", "--log_every", "1", "--data_workers", "1"]))
    logged = metrics(tmp_path)
    first, final = logged[0], logged[-1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as the reference
    assert first["rewards/margins"] == 0 and first["rewards/accuracies"] == 0
    assert set(first) >= {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"}
    assert final["final"] and final["val_rewards/accuracies"] > 0.9 and final["val_loss"] < 0.3, final
    assert final["val_rewards/chosen"] > 0 > final["val_rewards/rejected"]


def test_a_line_is_of_its_step_alone_whatever_log_every(dpo_setup, tmp_path, capsys):
    """rewards/* and logps/* were means over the steps since the last line while its loss was the step's: log_every
    1 and 3 logged the same loss at step 3 but other rewards. Every value of a line is now of its step. (The run's
    first line said "200 rows, 3 steps of 4 rows" of pairs: it says pairs.)"""
    d = dpo_setup
    args = ["--init", str(d / "init"), "--data", str(d / "pairs.jsonl"), "--max_steps", "3", "--batch_size", "4",
            "--lr", "3e-3", "--warmup_steps", "1", "--eval_every", "0", "--val_fraction", "0", "--data_workers", "1"]
    for every in ("1", "3"):
        dpo(load_config(None, [*args, "--log_every", every, "--out_dir", str(tmp_path / every)]))
        assert "dpo: 200 pairs, 3 steps of 4 pairs on 1 x cpu, torch.float32\n" in capsys.readouterr().out
    each, third = metrics(tmp_path / "1"), metrics(tmp_path / "3")
    assert [r["step"] for r in each] == [1, 2, 3, 3] and [r["step"] for r in third] == [3, 3]  # then the final line
    assert each[2] == third[0], (each, third)
    assert len({r["rewards/margins"] for r in each[:3]}) == 3  # the steps differ: a mean over them is none of them


def test_tokens_count_both_answers_ids_not_padding(dpo_setup, tmp_path):
    """A pair is two rows, each padded to the batch's longest: tokens counted 101 a pair where the cache held 71.1
    ids. It counts the positions that hold ids now: both rows', a row of n ids n - 1."""
    from babyllama.data.sft_tokens import open_split, read_sft_cache
    from tests.test_sft import logged_tokens, trained_tokens

    d = dpo_setup
    dpo(load_config(None, ["--init", str(d / "init"), "--data", str(d / "pairs.jsonl"), "--out_dir", str(tmp_path),
                           "--max_steps", "3", "--batch_size", "4", "--log_every", "1", "--eval_every", "0",
                           "--val_fraction", "0", "--data_workers", "1"]))
    cache = tmp_path / "dpo_tokens"
    _, _, lengths = open_split(cache, read_sft_cache(cache), "train")  # (2 * pairs,) ids: chosen, rejected, ...
    pair_positions = lambda i: int(lengths[2 * i] + lengths[2 * i + 1]) - 2
    assert logged_tokens(tmp_path) == trained_tokens(pair_positions, len(lengths) // 2, 3, 4)


def test_a_tokens_budget_counts_both_answers_as_the_log_does(dpo_setup, tmp_path):
    """--tokens N trained N / max_seq_len pairs; it ends now where the logged tokens (both rows of a pair) first
    reach N, as SFT's does."""
    d = dpo_setup
    dpo(load_config(None, ["--init", str(d / "init"), "--data", str(d / "pairs.jsonl"), "--out_dir", str(tmp_path),
                           "--tokens", "1000", "--batch_size", "4", "--log_every", "1", "--eval_every", "0",
                           "--val_fraction", "0", "--data_workers", "1"]))
    logged = [r["tokens"] for r in metrics(tmp_path) if not r.get("final")]
    assert logged[-1] >= 1000 > logged[-2]


def test_a_partial_last_step_counts_its_pairs_alone(dpo_setup, tmp_path):
    """A run of 3 pairs in steps of 4 x 2 micro-steps: the last step takes the 3 pairs left, and its empty
    micro-step a padding micro-batch whose pair counts in neither the loss nor the rewards: the step of one
    micro-batch of those pairs."""
    d = dpo_setup
    args = ["--init", str(d / "init"), "--data", str(d / "pairs.jsonl"), "--epochs", "0.015", "--lr", "3e-3",
            "--warmup_steps", "0", "--log_every", "1", "--eval_every", "0", "--val_fraction", "0",
            "--data_workers", "1"]
    for name, batch in (("one", ["--batch_size", "8"]), ("accum", ["--batch_size", "4", "--grad_accum", "2"])):
        dpo(load_config(None, [*args, *batch, "--out_dir", str(tmp_path / name)]))
    state = torch.load(tmp_path / "accum" / "checkpoints" / "step_000001" / "trainer_state.pt", weights_only=True)
    assert state["consumed_samples"] == 3
    one, accum = metrics(tmp_path / "one")[0], metrics(tmp_path / "accum")[0]
    assert one["step"] == 1 and one["tokens"] == accum["tokens"] and one.keys() == accum.keys()
    assert all(math.isclose(one[k], accum[k], rel_tol=1e-5, abs_tol=1e-7) for k in one if k != "lr"), (one, accum)


@pytest.mark.parametrize("extra", [[], ["--lora_rank", "4", "--lora_dropout", "0.1", "--precompute_ref_log_probs",
                                        "true"]], ids=["full", "lora-precomputed"])
def test_dpo_resumes_exactly(dpo_setup, tmp_path, extra):
    """log_every 2 and a checkpoint at step 3: the line of step 4 once covered steps 3 and 4 in the run not stopped,
    and step 4 alone in the resumed one."""
    d = dpo_setup
    args = ["--init", str(d / "init"), "--data", str(d / "pairs.jsonl"), "--max_steps", "6", "--batch_size", "4",
            "--lr", "3e-3", "--save_every", "3", "--log_every", "2", "--eval_every", "3", "--warmup_steps", "2",
            "--val_fraction", "0.1", "--eval_batches", "2", "--data_workers", "1", *extra]
    dpo(load_config(None, [*args, "--out_dir", str(tmp_path / "straight")]))
    simulate_death(tmp_path / "straight", tmp_path / "died", step=3)
    dpo(load_config(None, [*args, "--out_dir", str(tmp_path / "died")]), resume=True)
    assert metrics(tmp_path / "died") == metrics(tmp_path / "straight")
    if extra:
        assert (tmp_path / "straight" / "ref_logps.npz").is_file()
        assert (tmp_path / "died" / "final" / "adapter_model.safetensors").is_file()


def test_a_stopped_precompute_goes_on_from_its_last_whole_chunk(dpo_setup, tmp_path, monkeypatch, bpe_tokenizer):
    """A stopped precompute_ref_log_probs (Ctrl-C, SIGTERM) started from zero on the rerun: 31k pairs lost 4 minutes.
    Each chunk is saved as it is done, and the rerun computes the rest alone, into the ref_logps.npz of a run that
    never stopped; chunks made for another init are not used."""
    import numpy as np

    import babyllama.train.dpo as dpo_module

    d = dpo_setup
    save_checkpoint(tmp_path / "other", model(1), bpe_tokenizer)
    monkeypatch.setattr(dpo_module, "CHUNK_BATCHES", 1, raising=False)  # a chunk a batch
    real, calls, stop_at = dpo_module.answer_log_probs, [], [0]

    def counted(m, batch):  # every forward pass, the reference's first; raises KeyboardInterrupt at call stop_at
        calls.append(1)
        if len(calls) == stop_at[0]:
            raise KeyboardInterrupt
        return real(m, batch)

    monkeypatch.setattr(dpo_module, "answer_log_probs", counted)
    args = ["--data", str(d / "pairs.jsonl"), "--max_steps", "1", "--batch_size", "8", "--warmup_steps", "0",
            "--eval_every", "0", "--val_fraction", "0.1", "--data_workers", "1", "--precompute_ref_log_probs", "true"]
    run = lambda init, out: dpo(load_config(None, [*args, "--init", str(init), "--out_dir", str(out)]))
    run(d / "init", tmp_path / "straight")
    straight_calls = len(calls)
    stop_at[0] = 4  # after 3 chunks of 8 pairs
    for init in (tmp_path / "other", d / "init"):  # the other init's chunks first: the second run computes its own
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            run(init, tmp_path / "stopped")
        assert len(list((tmp_path / "stopped" / "ref_logps.parts").glob("train_*.npy"))) == 3
    calls.clear()
    stop_at[0] = 0
    run(d / "init", tmp_path / "stopped")
    assert len(calls) == straight_calls - 3  # the 3 chunks done are read, not computed again
    assert not (tmp_path / "stopped" / "ref_logps.parts").exists()
    straight, stopped = (np.load(tmp_path / run / "ref_logps.npz") for run in ("straight", "stopped"))
    assert sorted(straight) == sorted(stopped) == ["key", "train", "val"] and straight["train"].shape == (179, 2)
    assert all(np.array_equal(straight[k], stopped[k]) for k in straight)


def test_a_signal_as_the_precompute_saves_its_last_chunk_stops_before_a_training_step(dpo_setup, tmp_path,
                                                                                       monkeypatch):
    """A SIGINT after the last batch's stop check, as the last chunk was saved, only set stop_signal, and the run
    trained a step before it stopped: the precompute checks once more after its last chunk."""
    import babyllama.train.dpo as dpo_module

    d, real = dpo_setup, dpo_module.save_whole

    def signalled(path, save):  # Ctrl-C as the val pairs' last (only) chunk is saved
        real(path, save)
        if path.name.startswith("val_"):
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(dpo_module, "save_whole", signalled)
    with pytest.raises(KeyboardInterrupt):
        dpo(load_config(None, ["--init", str(d / "init"), "--data", str(d / "pairs.jsonl"), "--out_dir",
                               str(tmp_path), "--max_steps", "3", "--batch_size", "8", "--warmup_steps", "0",
                               "--eval_every", "0", "--val_fraction", "0.1", "--data_workers", "1",
                               "--precompute_ref_log_probs", "true"]))
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()
    assert not (tmp_path / "ref_logps.npz").exists()  # the chunks kept for the rerun
    assert len(list((tmp_path / "ref_logps.parts").glob("val_*.npy"))) == 1


def test_a_precompute_goes_on_only_from_the_chunks_of_its_batch_size(dpo_setup, tmp_path, monkeypatch, capsys):
    """The chunks' key left out batch_size, though a pair's reference log-probs change in their last digits with the
    batch they are computed in (padding to its longest row, the shapes of the matmuls): a precompute stopped at
    batch_size 8 and run again at 4 read the chunks of 8 and computed the rest at 4, the values of neither run. Chunks
    of another batch_size (or device type) are computed again now, as by a run that never stopped; ref_logps.npz,
    once whole, stays the run's on a resume with another batch (the values it started with)."""
    import babyllama.train.dpo as dpo_module

    monkeypatch.setattr(dpo_module, "CHUNK_BATCHES", 1, raising=False)  # a chunk a batch
    real, calls, stop_at = dpo_module.answer_log_probs, [], [0]

    def counted(m, batch):  # every forward pass; raises KeyboardInterrupt at call stop_at
        calls.append(1)
        if len(calls) == stop_at[0]:
            raise KeyboardInterrupt
        return real(m, batch)

    monkeypatch.setattr(dpo_module, "answer_log_probs", counted)
    args = ["--init", str(dpo_setup / "init"), "--data", str(dpo_setup / "pairs.jsonl"), "--warmup_steps", "0",
            "--eval_every", "0", "--val_fraction", "0.1", "--data_workers", "1", "--precompute_ref_log_probs", "true"]
    run = lambda out, batch, steps=1: dpo(load_config(None, [*args, "--out_dir", str(out), "--batch_size", str(batch),
                                                             "--max_steps", str(steps)]), resume=steps > 1)
    run(tmp_path / "straight", 4)
    straight_calls = len(calls)
    calls.clear()
    stop_at[0] = 4
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "stopped", 8)
    assert len(list((tmp_path / "stopped" / "ref_logps.parts").glob("train_*.npy"))) == 3  # 24 pairs, in 3 batches
    calls.clear()
    stop_at[0] = 0
    capsys.readouterr()
    run(tmp_path / "stopped", 4)
    assert len(calls) == straight_calls  # every batch of 4 computed: none of the chunks of 8 read
    parts = tmp_path / "stopped" / "ref_logps.parts"  # which, once silently recomputed, are said
    assert (f"note: the 3 chunks of reference log-probs in {parts} were made with batch_size 8 on cpu, not batch_size "
            "4 on cpu as now (the values change in their last digits with the batch), so they are not reused: "
            "computed again\n") in capsys.readouterr().out
    monkeypatch.setattr(dpo_module, "load_model", lambda *a, **k: pytest.fail("the reference was loaded"))
    run(tmp_path / "stopped", 8, steps=2)  # the whole ref_logps.npz is read
    assert json.loads((tmp_path / "stopped" / "final" / "config.json").read_text())["step"] == 2


SLOW_PRECOMPUTE = """import sys, time
import babyllama.train.dpo as dpo
real = dpo.answer_log_probs
dpo.CHUNK_BATCHES = 1  # a chunk a batch, each batch 0.2 s
dpo.answer_log_probs = lambda model, batch: (time.sleep(0.2), real(model, batch))[1]
from babyllama.cli import main
if __name__ == "__main__":  # not again in a worker that multiprocessing spawns
    sys.exit(main())
"""


def test_ctrl_c_stops_a_precompute_started_with_sigint_ignored(dpo_setup, tmp_path, monkeypatch):
    """`bash -c 'babyllama dpo ... --precompute_ref_log_probs true & sleep 5; kill -INT $!; wait'`: a background
    job of a shell script starts with SIGINT ignored, and the precompute went on to the end of the run (exit 0), where
    training stops on it (Trainer.fit sets its own handler). It stops now with exit 130, its chunks kept, and the rerun
    computes only the rest, into the ref_logps.npz of a run that never stopped."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import numpy as np

    import babyllama.train.dpo as dpo_module

    (tmp_path / "slow.py").write_text(SLOW_PRECOMPUTE)
    args = ["--init", str(dpo_setup / "init"), "--data", str(dpo_setup / "pairs.jsonl"), "--max_steps", "1",
            "--batch_size", "8", "--warmup_steps", "0", "--eval_every", "0", "--val_fraction", "0",
            "--data_workers", "1", "--precompute_ref_log_probs", "true"]
    out, parts = tmp_path / "stopped", tmp_path / "stopped" / "ref_logps.parts"
    proc = subprocess.Popen([sys.executable, tmp_path / "slow.py", "dpo", *args, "--out_dir", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 60
        while not list(parts.glob("train_*.npy")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert (proc.returncode, err.splitlines()[-1]) == (130, "babyllama: interrupted; run the same command to start "
                                                        "again (no checkpoint was saved yet; the reference log-probs "
                                                        "computed so far are kept)."), err
    kept = len(list(parts.glob("train_*.npy")))
    assert 1 <= kept < 25 and not (out / "ref_logps.npz").exists()  # 200 pairs: 25 batches
    real, calls = dpo_module.answer_log_probs, []
    monkeypatch.setattr(dpo_module, "answer_log_probs", lambda m, batch: calls.append(1) or real(m, batch))
    for run in ("stopped", "straight"):
        calls.clear()
        dpo(load_config(None, [*args, "--out_dir", str(tmp_path / run)]))
        assert len(calls) == {"stopped": 25 - kept, "straight": 25}[run] + 1  # + the step's policy
    straight, stopped = (np.load(tmp_path / run / "ref_logps.npz") for run in ("straight", "stopped"))
    assert np.array_equal(straight["train"], stopped["train"])


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize("stop", ["ctrl-c", "rank-1-killed"])
def test_a_precompute_under_torchrun_ends_as_training_does(dpo_setup, tmp_path, stop):
    """Under torchrun --nproc_per_node 2, kill -INT of torchrun during the reference precompute printed "babyllama:
    interrupted; ..." once per process, and kill -9 of rank 1 made rank 0 say "stopped by SIGTERM" (torchrun's stop)
    in place of "process 1 of the job ended". The ranks now agree on a stop after each batch, as training does after
    each step: one sentence for the job, the true one."""
    from tests.test_pretrain import alive

    (tmp_path / "slow.py").write_text(SLOW_PRECOMPUTE)
    out, parts = tmp_path / "run", tmp_path / "run" / "ref_logps.parts"
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              str(tmp_path / "slow.py"), "dpo", "--init", str(dpo_setup / "init"), "--data",
                              str(dpo_setup / "pairs.jsonl"), "--max_steps", "1", "--batch_size", "4",
                              "--val_fraction", "0", "--data_workers", "1", "--precompute_ref_log_probs", "true",
                              "--out_dir", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while not list(parts.glob("train_*.npy")) and time.monotonic() < deadline and agent.poll() is None:
            time.sleep(0.05)
        workers = {int(p.read_bytes().split(b"\0RANK=")[1].split(b"\0")[0]): int(p.parent.name)
                   for p in Path("/proc").glob("[0-9]*/environ") if alive(int(p.parent.name))
                   and Path(p.parent / "stat").read_text().split()[3] == str(agent.pid)}
        if stop == "ctrl-c":
            agent.send_signal(signal.SIGINT)
        else:
            os.kill(workers[1], signal.SIGKILL)
        err = agent.communicate(timeout=60)[1]
    finally:
        agent.kill()
    said = [line for line in err.splitlines() if line.startswith("babyllama:")]
    if stop == "ctrl-c":
        assert said == ["babyllama: interrupted; run the same command to start again (no checkpoint was saved yet; "
                        "the reference log-probs computed so far are kept)."], err[-3000:]
    else:
        assert len(said) == 1 and said[0].startswith("babyllama: error: process 0 of 2 stopped: process 1 of the job "
                                                     "ended ("), err[-3000:]
    assert list(parts.glob("train_*.npy")) and not (out / "ref_logps.npz").exists()


def test_a_damaged_reference_file_is_computed_again_as_a_missing_one(dpo_setup, tmp_path, capsys):
    """A cut ref_logps.npz (a disk that filled up) was a BadZipFile traceback on the resume. It is said in a note and
    computed again, to the values it held; a line before the precompute says how many pairs it computes and how many
    the run trains on (a short run computes them all: a resume may run longer)."""
    import numpy as np

    args = ["--init", str(dpo_setup / "init"), "--data", str(dpo_setup / "pairs.jsonl"), "--batch_size", "8",
            "--warmup_steps", "0", "--eval_every", "0", "--val_fraction", "0.1", "--data_workers", "1",
            "--precompute_ref_log_probs", "true", "--out_dir", str(tmp_path)]
    dpo(load_config(None, [*args, "--max_steps", "1"]))
    f = tmp_path / "ref_logps.npz"
    before = dict(np.load(f))
    f.write_bytes(f.read_bytes()[:300])
    capsys.readouterr()
    dpo(load_config(None, [*args, "--max_steps", "3"]), resume=True)
    out = capsys.readouterr().out
    assert (f"note: {f} is damaged (it cannot be read: BadZipFile: File is not a zip file); the reference log-probs "
            "are computed again\nreference log-probs: computing those of all 179 training pairs and the 21 held-out "
            "ones (once, kept for a resume); this run's 2 steps train on 16 of them\n") in out
    after = np.load(f)
    assert sorted(after) == sorted(before) and all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("damage", ["cut", "not-npz", "no-val", "shape", "strings", "nan", "inf"])
def test_a_reference_file_of_wrong_values_is_said_and_not_used(tmp_path, capsys, damage):
    """ref_logps.npz of its key with a wrong shape was a size-mismatch RuntimeError in collate, and one holding NaN
    trained on with loss nan, every step skipped without a word: each damage is a note and None (computed again)."""
    import numpy as np

    from babyllama.train.dpo import cached_reference

    f, good = tmp_path / "ref_logps.npz", np.full((3, 2), -1.5, dtype=np.float32)
    arrays = {"train": good, "val": good[:1]}
    if damage in ("shape", "strings", "nan", "inf"):
        arrays["train"] = {"shape": good[:2], "strings": np.array([["a", "b"]] * 3), "nan": good.copy(),
                           "inf": good.copy()}[damage]
        arrays["train"][1:, 1] = {"nan": np.nan, "inf": -np.inf}.get(damage, arrays["train"][1:, 1])
    if damage == "no-val":
        del arrays["val"]
    np.savez(f, key=np.array("k"), **arrays)
    if damage == "cut":
        f.write_bytes(f.read_bytes()[:-1])
    if damage == "not-npz":
        f.write_text("{}")
    assert cached_reference(f, "k", {"train": 3, "val": 1}, main=True) is None
    why = {"cut": "it cannot be read: BadZipFile: ",  # numpy's and zipfile's words, which change with the version
           "not-npz": "it cannot be read: ValueError: ",
           "no-val": "it cannot be read: KeyError: 'val is not a file in the archive'",
           "shape": "its train values are float32 of shape (2, 2), not float of shape (3, 2)",
           "strings": "its train values are <U1 of shape (3, 2), not float of shape (3, 2)",
           "nan": "its train log-probs of 2 of 3 pairs are NaN or Inf",
           "inf": "its train log-probs of 2 of 3 pairs are NaN or Inf"}[damage]
    message = re.escape(f"note: {f} is damaged ({why}") + (".+" if why.endswith(": ") else "") + \
        re.escape("); the reference log-probs are computed again\n")
    assert re.fullmatch(message, capsys.readouterr().out)
    np.savez(f, key=np.array("k"), train=good, val=good[:1])
    assert cached_reference(f, "other key", {"train": 3, "val": 1}, main=True) is None  # another init: no note
    assert np.array_equal(cached_reference(f, "k", {"train": 3, "val": 1}, main=False)["train"], good)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("damage", ["cut", "nan", "shape"])
def test_a_damaged_chunk_is_said_and_computed_again_from_it_on(tmp_path, capsys, damage):
    """A cut chunk (truncate -s 100 ref_logps.parts/train_4_8.npy) was a ValueError traceback; a chunk holding NaN
    was trained on. The chunks before it are used, it and those after it computed again, in a note."""
    import numpy as np

    from babyllama.train.dpo import saved_rows

    parts = tmp_path / "ref_logps.parts"
    parts.mkdir()
    for start in (0, 4, 8):
        np.save(parts / f"train_{start}_{start + 4}.npy", np.full((4, 2), -float(start + 1), dtype=np.float32))
    bad = parts / "train_4_8.npy"
    if damage == "cut":
        bad.write_bytes(bad.read_bytes()[:100])
    else:
        np.save(bad, np.full((4, 2) if damage == "nan" else (4, 3), np.nan if damage == "nan" else -5.0))
    out = np.zeros((12, 2), dtype=np.float32)
    assert saved_rows(parts, "train", out, main=True) == 4
    assert (out[:4] == -1).all() and (out[4:] == 0).all()
    why = {"cut": "it cannot be read: ValueError: EOF: reading array header, expected 118 bytes got 90",
           "nan": "log-probs of 4 of 4 pairs are NaN or Inf",
           "shape": "values are float64 of shape (4, 3), not float of shape (4, 2)"}[damage]
    assert capsys.readouterr().out == (f"note: {bad} is damaged ({why}); the reference log-probs from pair 4 on are "
                                       "computed again\n")


def test_a_reference_that_gives_nan_is_refused_before_training(dpo_setup, tmp_path, monkeypatch):
    """Reference log-probs computed as NaN (an overflow of the reference in its dtype) were trained on: loss nan,
    every step skipped. The precompute refuses them in one sentence, before a step."""
    import babyllama.train.dpo as dpo_module

    real = dpo_module.answer_log_probs
    monkeypatch.setattr(dpo_module, "answer_log_probs",
                        lambda m, batch: real(m, batch).index_fill(0, torch.tensor([1]), float("nan")))
    with pytest.raises(UserError, match=rf"^the reference {dpo_setup / 'init'} gives NaN or Inf log-probs to 23 of the "
                                        r"179 train pairs \(the first: pair 1\) in torch.float32; DPO cannot train on "
                                        r"them\.$"):
        dpo(load_config(None, ["--init", str(dpo_setup / "init"), "--data", str(dpo_setup / "pairs.jsonl"),
                               "--batch_size", "8", "--max_steps", "1", "--val_fraction", "0.1", "--data_workers",
                               "1", "--precompute_ref_log_probs", "true", "--out_dir", str(tmp_path)]))
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()


def test_a_precompute_going_on_removes_the_temporary_of_a_chunk_a_kill_left(tmp_path, capsys):
    """A kill -9 while a chunk was being saved left its temporary (save_whole's .NAME.tmp-PID) in ref_logps.parts
    until a precompute finished. A precompute that goes on from the chunks removes it first, as found_run removes a
    checkpoint's; the chunks stay, and so do a live process's temporary and any other file."""
    from babyllama.train.dpo import start_parts

    parts, dead = tmp_path / "ref_logps.parts", 2**22 + 12345  # above Linux's largest pid
    start_parts(parts, "key")
    for name in ("train_0_8.npy", f".train_8_16.npy.tmp-{dead}", ".train_8_16.npy.tmp-1", "notes.txt"):  # 1: alive
        (parts / name).write_bytes(b"x")
    capsys.readouterr()
    start_parts(parts, "key")
    assert sorted(p.name for p in parts.iterdir()) == [".train_8_16.npy.tmp-1", "key.json", "notes.txt",
                                                       "train_0_8.npy"]
    assert capsys.readouterr().out == (f"note: removed {parts / f'.train_8_16.npy.tmp-{dead}'} (left by a run that "
                                       "was stopped)\n")


def test_dpo_resume_refuses_another_reference_or_loss_before_the_cache_is_built(dpo_setup, tmp_path, capsys,
                                                                              bpe_tokenizer):
    """--init is DPO's reference: its checkpoints record it (path and SHA-256), so other weights stop --resume; the
    same weights at another path resume. beta, label_smoothing and rpo_alpha, the loss, may not change either;
    precompute_ref_log_probs (the same reference log-probs, computed once) may."""
    import shutil

    from babyllama.cli import main

    d, run, other, moved = dpo_setup, tmp_path / "run", tmp_path / "other", tmp_path / "moved"
    save_checkpoint(other, model(1), bpe_tokenizer)
    shutil.copytree(d / "init", moved)
    args = ["dpo", "--data", str(d / "pairs.jsonl"), "--out_dir", str(run), "--batch_size", "4", "--save_every", "2",
            "--eval_every", "0", "--warmup_steps", "1", "--data_workers", "1"]
    assert main([*args, "--init", str(d / "init"), "--max_steps", "2"]) == 0
    shutil.rmtree(run / "dpo_tokens")
    ckpt, ref = run / "checkpoints" / "step_000002", (d / "init").resolve()
    capsys.readouterr()
    for flags, error in (
        (["--init", str(other)], f"{ckpt} was trained against the reference model {ref}, not --init {other} (other "
                                 f"weights); resume with --init {ref} or use a new out_dir."),
        *[(["--init", str(d / "init"), flag, value], f"{ckpt} was trained with {setting}; resume with the same "
                                                      "settings or use a new out_dir.")
          for flag, value, setting in (("--beta", "0.2", "beta 0.1 (now 0.2)"),
                                       ("--label_smoothing", "0.1", "label_smoothing 0.0 (now 0.1)"),
                                       ("--rpo_alpha", "1", "rpo_alpha 0.0 (now 1.0)"))],
    ):
        assert main([*args, "--max_steps", "4", "--resume", *flags]) == 2
        assert capsys.readouterr().err == f"babyllama: error: {error}\n"
        assert not (run / "dpo_tokens").exists()
    assert main([*args, "--init", str(moved), "--max_steps", "4", "--resume", "--precompute_ref_log_probs",
                 "true"]) == 0
    assert json.loads((run / "final" / "config.json").read_text())["step"] == 4
    # the reference changed in place: said so, not "resume with --init" naming the same folder
    save_checkpoint(moved, model(1), bpe_tokenizer)
    shutil.rmtree(run / "dpo_tokens")
    capsys.readouterr()
    assert main([*args, "--init", str(moved), "--max_steps", "6", "--resume"]) == 2
    assert capsys.readouterr().err == (f"babyllama: error: {run / 'checkpoints' / 'step_000004'} was trained against "
                                       f"the reference model {moved.resolve()}, whose weights changed since; restore "
                                       "that model or use a new out_dir.\n")


def test_dpo_settings_out_of_range_are_one_sentence(dpo_setup, tmp_path):
    d = dpo_setup
    base = ["--init", str(d / "init"), "--data", str(d / "pairs.jsonl"), "--out_dir", str(tmp_path)]
    for flags, said in ((["--beta", "0"], "beta must be more than 0, got 0.0."),  # each its own sentence, not all
                        (["--beta", "-1", "--rpo_alpha", "-1"], "beta must be more than 0, got -1.0."),  # three in one
                        (["--label_smoothing", "0.5"], "label_smoothing must be in [0, 0.5), got 0.5."),
                        (["--label_smoothing", "-0.1"], "label_smoothing must be in [0, 0.5), got -0.1."),
                        (["--rpo_alpha", "-1"], "rpo_alpha must be 0 (no NLL term) or more, got -1.0.")):
        with pytest.raises(UserError) as e:
            dpo(load_config(None, [*base, *flags]))
        assert str(e.value) == said, flags
    for flag, reader in (("--pack", "SFT"), ("--doc_mask", "pretraining")):  # the reason is DPO's, not theirs
        with pytest.raises(UserError) as e:
            dpo(load_config(None, [*base, flag, "true"]))
        assert str(e.value) == (f"DPO does not read {flag[2:]}, a setting of {reader} only (DPO scores each answer "
                                "in a row of its own); drop it.")
    with pytest.raises(UserError) as e:
        dpo(load_config(None, [*base, "--pack", "true", "--doc_mask", "true", "--lora_dropout", "0.1"]))
    assert str(e.value) == ("DPO does not read doc_mask, a setting of pretraining only (DPO scores each answer in a "
                            "row of its own), nor pack, a setting of SFT only (DPO scores each answer in a row of its "
                            "own); drop them; also, lora_dropout needs --lora_rank: without it DPO trains every "
                            "weight, not LoRA adapters; set --lora_rank or drop it.")
    r = run_cli("dpo", "--data", str(d / "pairs.jsonl"), "--out_dir", str(tmp_path))
    assert r.returncode == 2 and "DPO needs the model to tune: pass --init" in r.stderr


def test_a_finished_run_resumed_loads_no_reference(dpo_setup, tmp_path, monkeypatch, capsys):
    """`dpo --resume` of a finished run loaded (or precomputed) the reference model before it found nothing to do."""
    import babyllama.train.dpo

    d = dpo_setup
    args = ["--init", str(d / "init"), "--data", str(d / "pairs.jsonl"), "--out_dir", str(tmp_path), "--max_steps",
            "2", "--batch_size", "4", "--warmup_steps", "1", "--eval_every", "0", "--data_workers", "1",
            "--precompute_ref_log_probs", "true"]
    dpo(load_config(None, args))
    monkeypatch.setattr(babyllama.train.dpo, "load_model", lambda *a, **k: pytest.fail("the reference was loaded"))
    capsys.readouterr()
    assert dpo(load_config(None, args), resume=True) == tmp_path / "final"
    assert f"note: the run in {tmp_path} is finished at step 2, so nothing was done" in capsys.readouterr().out


def test_a_finished_run_whose_init_is_gone_is_said_finished(dpo_setup, tmp_path, capsys):
    """dpo read --init's settings and tokenizer before it looked whether the run was finished: a finished run whose
    init (its reference) was since deleted was refused for the missing init; it is said finished now."""
    import shutil

    shutil.copytree(dpo_setup / "init", tmp_path / "init")
    args = ["--init", str(tmp_path / "init"), "--data", str(dpo_setup / "pairs.jsonl"), "--out_dir",
            str(tmp_path / "run"), "--max_steps", "1", "--batch_size", "4", "--eval_every", "0", "--data_workers", "1"]
    dpo(load_config(None, args))
    shutil.rmtree(tmp_path / "init")
    capsys.readouterr()
    assert dpo(load_config(None, args), resume=True) == tmp_path / "run" / "final"
    assert capsys.readouterr().out == (f"note: the run in {tmp_path / 'run'} is finished at step 1, so nothing was "
                                       f"done; its model is {tmp_path / 'run' / 'final'}\n")


def test_the_memory_check_counts_the_reference_model_unless_precomputed(dpo_setup, tmp_path, monkeypatch):
    """Without precompute_ref_log_probs the reference is a second full copy of the init (4 bytes a parameter) beside
    the trained weights, gradients and AdamW (16): a machine that holds the 16 but not the 20 refuses the run before
    anything is allocated, in sizes that show (not "0.0 GiB"), and names the setting that makes it fit."""
    import os

    d = dpo_setup
    params = tiny_config(vocab_size=600).num_params
    have = 16 * params + 1
    sysconf = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda k: {"SC_PAGE_SIZE": 1, "SC_PHYS_PAGES": have}.get(k) or sysconf(k))
    base = ["--init", str(d / "init"), "--data", str(d / "pairs.jsonl"), "--out_dir", str(tmp_path / "run"),
            "--max_steps", "1", "--batch_size", "4", "--data_workers", "1", "--eval_every", "0"]
    with pytest.raises(UserError) as e:
        dpo(load_config(None, base))
    assert str(e.value) == (f"the model has {params:,} parameters: training needs about 2.7 MiB for weights, "
                            "gradients and AdamW, and the reference model's weights, more than the 2.1 MiB of this "
                            "machine's memory; pass --precompute_ref_log_probs true, which frees the reference model "
                            "before training.")
    assert not (tmp_path / "run").exists()
    dpo(load_config(None, [*base, "--precompute_ref_log_probs", "true"]))  # the reference is freed: it fits
    assert (tmp_path / "run" / "final").is_dir()


@pytest.mark.parametrize("extra", [[], ["--lora_rank", "4", "--precompute_ref_log_probs", "true"]],
                         ids=["full", "lora-precomputed"])
def test_a_micro_batch_whose_activations_cannot_fit_is_one_sentence_before_the_model(dpo_setup, tmp_path,
                                                                                      monkeypatch, capsys, extra):
    """`dpo --batch_size 1000000` passed every memory check (pretraining's activation check was pretraining's alone),
    then died in the allocator or was killed with no word. Once the token cache is read the bound is pretraining's
    over what is known: the 200 training pairs, fewer than batch_size 1000, are 400 rows (chosen and rejected)
    padded to the longest, with the weights (LoRA's adapters too; the reference's unless precomputed, its forward
    keeping nothing under no_grad) and those rows' token ids; refused with exit 2 before any model is built. Memory
    is faked at 16 MiB; batch_size 4 fits it, and trains."""
    from babyllama.cli import main
    from babyllama.train import trainer

    d = dpo_setup
    monkeypatch.setattr(trainer, "cpu_memory", lambda: (16 << 20, "this machine's memory"))
    built = trainer.build_model
    monkeypatch.setattr(trainer, "build_model", lambda *a: pytest.fail("a model was built"))
    args = ["dpo", "--init", str(d / "init"), "--data", str(d / "pairs.jsonl"), "--eval_every", "0",
            "--warmup_steps", "0", "--val_fraction", "0", "--data_workers", "1", *extra]
    assert main([*args, "--batch_size", "1000", "--epochs", "1", "--out_dir", str(tmp_path / "big")]) == 2
    err = capsys.readouterr().err
    settings = SFTSettings(65, 0.0)
    sequences, _, _ = load_sft_data([d / "pairs.jsonl"], d / "init", tmp_path / "big" / "dpo_tokens", settings,
                                    False, Dist(), kind="dpo")  # the run's own cache
    pairs, T = len(sequences) // 2, int(sequences.lengths.max()) - 1
    assert pairs == 200 and T < 64
    m, lora = tiny_config(vocab_size=600), trainer.lora_of(load_config(None, extra).train)
    acts = (2 * (3 * m.dim + 2 * m.ffn_dim) + 2 * m.dim) * 400 * T * 4 + 2048 * 600 * 4
    weights = 4 * (m.num_params + (trainer.adapter_params(lora, m) if lora else 0)) + (0 if lora else 4 * m.num_params)
    total = acts + weights + 16 * 400 * T
    assert err.splitlines()[-1] == (  # after the cache's progress bar
        "babyllama: error: a micro-batch of batch_size 1000 pairs (counted as the 200 pairs the run trains on), "
        f"400 rows of chosen and rejected answers padded to the longest row's {T} tokens needs at least "
        f"{trainer.size_text(acts)} for its activations, {trainer.size_text(total)} with the weights and token ids, "
        "more than the 16 MiB of this machine's memory; lower --batch_size (and raise --grad_accum to keep the tokens "
        "a step).")
    assert not (tmp_path / "big" / "config.json").exists()
    monkeypatch.setattr(trainer, "build_model", built)
    assert main([*args, "--batch_size", "4", "--max_steps", "1", "--out_dir", str(tmp_path / "small")]) == 0
    assert (tmp_path / "small" / "final").is_dir()


def test_dpo_refuses_an_init_holding_nan_before_the_token_cache_is_built(dpo_setup, tmp_path, capsys):
    """`dpo --init CKPT` whose weights hold a NaN built the pairs' token cache first and refused them after."""
    import shutil

    from babyllama.cli import main

    init = tmp_path / "init"
    shutil.copytree(dpo_setup / "init", init)
    name = poison(init / "model.safetensors", float("inf"), part="tok_embeddings")
    run = tmp_path / "run"
    assert main(["dpo", "--init", str(init), "--data", str(dpo_setup / "pairs.jsonl"), "--out_dir", str(run),
                 "--max_steps", "1", "--data_workers", "1"]) == 2
    assert capsys.readouterr().err == not_finite(init / "model.safetensors", name)
    assert not run.exists()


def test_a_run_refused_for_its_data_leaves_no_empty_folder_behind(dpo_setup, tmp_path):
    """dpo (and sft: one token_cache) refused for its data, here a pair whose answers are equal, left an empty
    OUT_DIR/dpo_tokens (and so OUT_DIR) behind, which a rerun or report then found; the folders the run made are
    removed again, those that were there before stay (an empty out_dir, the folder of --sft_cache)."""
    data = tmp_path / "same.jsonl"
    write(data, [{"prompt": "a", "chosen": "b", "rejected": "b"}])
    args = ["dpo", "--init", dpo_setup / "init", "--data", data, "--max_steps", "1", "--data_workers", "1"]
    assert run_cli(*args, "--out_dir", tmp_path / "new" / "run").returncode == 2
    assert not (tmp_path / "new").exists()
    (tmp_path / "was").mkdir()
    assert run_cli(*args, "--out_dir", tmp_path / "was").returncode == 2
    assert run_cli(*args, "--out_dir", tmp_path / "run", "--sft_cache", tmp_path / "was" / "c" / "cache"
                   ).returncode == 2
    assert sorted(tmp_path.iterdir()) == [data, tmp_path / "was"] and list((tmp_path / "was").iterdir()) == []


def test_data_of_no_records_or_of_the_other_kind_leaves_no_folder(dpo_setup, tmp_path):
    """dpo --data EMPTY_FILE and sft --data PAIRS (preference records) are refused for their data: neither leaves its
    out_dir, nor a token cache in it, behind."""
    (tmp_path / "empty.jsonl").write_text("")
    for stage, data in (("dpo", tmp_path / "empty.jsonl"), ("sft", dpo_setup / "pairs.jsonl")):
        r = run_cli(stage, "--init", dpo_setup / "init", "--data", data, "--max_steps", "1", "--data_workers", "1",
                    "--out_dir", tmp_path / "runs" / stage)
        assert r.returncode == 2 and r.stderr.splitlines()[-1].endswith("nothing was written."), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]


def test_a_preference_cache_with_ids_beyond_the_models_vocabulary_is_refused_before_training(dpo_setup, tmp_path):
    """DPO reads its pairs through the SFT token cache, so its check too (test_sft): a cache holding an id at or above
    the model's vocab_size is refused, of the largest id its manifest records, before the reference's precompute."""
    d, cache = dpo_setup, tmp_path / "run" / "dpo_tokens"
    args = ["dpo", "--init", d / "init", "--data", d / "pairs.jsonl", "--max_steps", "1", "--batch_size", "8",
            "--eval_every", "0", "--data_workers", "1"]
    assert run_cli(*args, "--out_dir", tmp_path / "run").returncode == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["stats"]["max_id"] = 600
    (cache / "manifest.json").write_text(json.dumps(manifest))
    r = run_cli(*args, "--out_dir", tmp_path / "again", "--sft_cache", cache)
    assert (r.returncode, r.stderr) == (2, f"babyllama: error: the DPO token cache {cache} holds token id 600, but "
                                           f"the model's vocab_size is 600; delete {cache} to rebuild it with the "
                                           "model's tokenizer.\n")
    assert not (tmp_path / "again" / "checkpoints").exists()


def test_the_report_plots_a_dpo_runs_loss_schedule_and_reward_accuracies(dpo_setup, tmp_path):
    """A DPO run's metrics.jsonl holds loss and lr by step as pretraining's, and rewards/* (val_rewards/* on its eval
    lines): the report drew loss and learning rate alone, and said the rewards only as final numbers. It draws
    rewards/accuracies (train and val) against step in a third panel."""
    pytest.importorskip("matplotlib")
    from PIL import Image

    from babyllama.report import curves, make_report

    d = dpo_setup
    dpo(load_config(None, ["--init", str(d / "init"), "--data", str(d / "pairs.jsonl"), "--out_dir", str(tmp_path),
                           "--max_steps", "4", "--batch_size", "4", "--lr", "3e-3", "--warmup_steps", "1",
                           "--val_fraction", "0.1", "--eval_every", "2", "--log_every", "1", "--data_workers", "1"]))
    logged = metrics(tmp_path)
    panels = curves(logged)
    assert list(panels) == [("tokens", "loss"), ("step", "lr"), ("step", "rewards/accuracies")]
    train = [r for r in logged if "loss" in r]
    assert panels[("step", "rewards/accuracies")] == {
        "train": ([1, 2, 3, 4], [r["rewards/accuracies"] for r in train]),
        "val": ([2, 4], [r["val_rewards/accuracies"] for r in logged if "val_loss" in r])}
    assert panels[("tokens", "loss")]["train"] == ([r["tokens"] for r in train], [r["loss"] for r in train])
    text = make_report(tmp_path).read_text()
    assert f"### Run `{tmp_path.name}` (DPO)" in text and f"![curves](plots/{tmp_path.name}_curves.png)" in text
    assert Image.open(tmp_path / "plots" / f"{tmp_path.name}_curves.png").size == (1650, 396)  # 3 panels of 5 x 3.6 in


def test_lora_dpo_from_a_lora_init_resumes_exactly_with_dropout(dpo_setup, tmp_path):
    """LoRA DPO (lora_dropout 0.05, the reference run alongside) from a LoRA SFT init lost its resume's equality from
    step 5 on: loading the reference (the init's adapter onto its base) drew its random lora_A from torch's RNG, once
    in the run not stopped and again after the resume, so the dropout masks after it differed."""
    from babyllama.train.stages import sft

    d = dpo_setup
    records = [{"instruction": "判断情感：", "input": f"很好很喜欢{i}", "output": "正面"} for i in range(8)]
    write(tmp_path / "sft.jsonl", records)
    sft(load_config(None, ["--init", str(d / "init"), "--data", str(tmp_path / "sft.jsonl"), "--out_dir",
                           str(tmp_path / "sft"), "--max_steps", "1", "--batch_size", "4", "--warmup_steps", "0",
                           "--eval_every", "0", "--data_workers", "1", "--lora_rank", "4"]))
    args = ["--init", str(tmp_path / "sft" / "final"), "--data", str(d / "pairs.jsonl"), "--max_steps", "6",
            "--batch_size", "4", "--lr", "3e-3", "--save_every", "3", "--log_every", "1", "--eval_every", "3",
            "--warmup_steps", "2", "--val_fraction", "0.1", "--eval_batches", "2", "--data_workers", "1",
            "--lora_rank", "4", "--lora_dropout", "0.05"]
    dpo(load_config(None, [*args, "--out_dir", str(tmp_path / "straight")]))
    simulate_death(tmp_path / "straight", tmp_path / "died", step=3)
    dpo(load_config(None, [*args, "--out_dir", str(tmp_path / "died")]), resume=True)
    assert metrics(tmp_path / "died") == metrics(tmp_path / "straight")
