"""SFT: exact loss masks, inference prompts equal training prefixes, truncation, packing, learning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from babyllama.chat_format import Conversation, render_conversation, render_prompt, truncate_conversation
from babyllama.checkpoint import load_model, save_checkpoint
from babyllama.config import load_config
from babyllama.data.sft_tokens import SFTSettings
from babyllama.errors import UserError
from babyllama.tokenizer import load_tokenizer
from babyllama.train.distributed import Dist
from babyllama.train.sft_data import SFTData, load_sft_data, pack_rows
from babyllama.train.stages import sft
from tests.conftest import logged_losses, not_finite, poison, sharp_model, simulate_death, tiny_config

ONE = Conversation([("床前明月光，下一句是什么？", "疑是地上霜。")])
THREE = Conversation([("你好", "你好！有什么可以帮你？"), ("1+1等于几", "等于2。"), ("谢谢", "不客气。")],
                     system="你是一个助手。")


def loss_positions(tok, conv):
    data = SFTData.from_samples([render_conversation(tok, conv)], max_seq_len=256, pad_id=tok.pad_id)
    batch = data.collate([0])
    return batch, (batch["targets"][0] != -1).nonzero().flatten()


@pytest.mark.parametrize("conv", [ONE, THREE], ids=["one-turn", "three-turn"])
def test_loss_falls_exactly_on_answers_and_their_eos(bpe_tokenizer, conv):
    tok = bpe_tokenizer
    batch, where = loss_positions(tok, conv)
    targets = batch["targets"][0, where].tolist()
    # decode the loss-carrying targets: the answers, each closed by its <eos>, nothing else
    expected = [i for _, answer in conv.turns for i in tok.encode(answer) + [tok.eos_id]]
    assert targets == expected
    assert tok.decode(targets) == "".join(a for _, a in conv.turns)
    assert targets.count(tok.eos_id) == len(conv.turns)
    ids = batch["idx"][0].tolist()
    assert ids.count(tok.bos_id) == len(conv.turns) and ids[0] != tok.bos_id  # user first, then <bos>
    assert tok.decode(ids).startswith(conv.system + "\n" if conv.system else conv.turns[0][0])


def test_only_answer_targets_change_the_loss(bpe_tokenizer):
    model = sharp_model(tiny_config(vocab_size=600, max_seq_len=128))
    batch, where = loss_positions(bpe_tokenizer, THREE)
    idx, targets = batch["idx"], batch["targets"]
    _, base = model(idx, targets)
    prompt_pos = int((targets[0] == -1).nonzero()[3])
    changed = targets.clone()
    changed[0, prompt_pos] = 7  # a prompt position given a target: now it counts
    assert model(idx, changed)[1].item() != base.item()
    changed = targets.clone()
    changed[0, int(where[1])] = (changed[0, int(where[1])] + 7) % 600
    assert model(idx, changed)[1].item() != base.item()
    assert model(idx, targets.clone())[1].item() == base.item()


def test_inference_prompt_is_the_training_prefix(bpe_tokenizer):
    for conv in (ONE, THREE):
        train_ids, mask = render_conversation(bpe_tokenizer, conv)
        prompt = render_prompt(bpe_tokenizer, conv)
        assert prompt[-1] == bpe_tokenizer.bos_id
        assert train_ids[: len(prompt)] == prompt  # token for token
        assert mask[len(prompt)] == 1 and mask[len(prompt) - 1] == 0  # the answer starts right after


def test_truncation_keeps_the_answer_eos(bpe_tokenizer):
    tok = bpe_tokenizer
    long_prompt = Conversation([("很长的问题" * 40 + "结尾问句？", "短答。")])
    ids, mask = truncate_conversation(tok, long_prompt, 40)
    full, _ = render_conversation(tok, long_prompt)
    assert len(ids) == 40 and ids == full[-40:]  # the prompt's beginning was cut, the end kept
    long_answer = Conversation([("问？", "回答很长" * 50)])
    ids, mask = truncate_conversation(tok, long_answer, 40)
    assert len(ids) == 40 and ids[-1] == tok.eos_id and mask[-1] == 1  # the end of the answer went, <eos> stayed
    ids, mask = truncate_conversation(tok, THREE, len(render_conversation(tok, THREE)[0]) - 1)
    assert tok.decode(ids).startswith("你是一个助手。\n1+1")  # the oldest turn went, the system text stayed
    assert ids[-1] == tok.eos_id


def test_build_sft_data_truncates_and_counts_only_the_long_samples(bpe_tokenizer, tmp_path):
    tok = bpe_tokenizer
    write(tmp_path / "sft.jsonl", [{"instruction": "问？", "input": "", "output": "回答很长" * 50},
                                   {"instruction": "好", "input": "", "output": "好的。"}])
    train, stats = cached([tmp_path / "sft.jsonl"], tok, tmp_path / "cache", max_seq_len=39)
    long = Conversation([("问？", "回答很长" * 50)])
    short = Conversation([("好", "好的。")])
    assert samples(train) == [truncate_conversation(tok, long, 40), render_conversation(tok, short)]
    assert stats.truncated == 1


def test_sft_samples_cut_on_the_left_begin_with_a_whole_character(bpe_tokenizer, tmp_path):
    """SFT trained on prompts whose beginning the cut to max_seq_len + 1 ids left inside a 4-byte character:
    '\ufffd\ufffd😀...'. Through the token cache, each sample of questions 0 to 3 ids longer (so that the cut falls
    at each offset into a 😀, 4 byte-level tokens) now begins with a whole character."""
    from tests.test_chat_format import assert_longest_whole_end

    tok, answer = bpe_tokenizer, [*bpe_tokenizer.encode("好"), bpe_tokenizer.eos_id]
    questions = ["😀" * 12 + "好" * k for k in range(4)]
    assert len(tok.encode("😀")) == 4 and len(answer) == 2
    write(tmp_path / "sft.jsonl", [{"instruction": q, "input": "", "output": "好"} for q in questions])
    train, stats = cached([tmp_path / "sft.jsonl"], tok, tmp_path / "cache", max_seq_len=23)
    assert stats.truncated == 4 and len(samples(train)) == 4
    for question, (ids, mask) in zip(questions, samples(train), strict=True):
        full = render_prompt(tok, Conversation([(question, "")]))
        assert_longest_whole_end(tok, full, ids[: -len(answer)], 24 - len(answer), question)
        assert ids[-len(answer) :] == answer and mask == [0] * (len(ids) - 2) + [1, 1]


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_packed_row_loss_equals_samples_alone(bpe_tokenizer, backend, monkeypatch):
    if backend == "flex":  # its forward runs on a CPU (not its backward): the same losses as the dense mask
        pytest.importorskip("torch.nn.attention.flex_attention")
        monkeypatch.setattr("babyllama.model.FLEX_DEVICES", {"cpu"})
    model = sharp_model(tiny_config(vocab_size=600, max_seq_len=128, n_kv_heads=2))
    samples = [render_conversation(bpe_tokenizer, c) for c in (ONE, THREE, Conversation([("好", "好的。")]))]
    packed = SFTData.from_samples(samples, max_seq_len=127, pad_id=0, pack=True)
    assert len(packed) == 1 and packed.collate([0])["segments"][0, -1] == -1  # padded at the end
    assert packed.collate([0])["idx"].shape == (1, 127)  # always max_seq_len: one shape to compile

    def summed_loss(batch):
        with torch.no_grad():
            _, mean = model(batch["idx"], batch["targets"], segments=batch.get("segments"))
        return mean * (batch["targets"] != -1).sum()

    alone = SFTData.from_samples(samples, max_seq_len=127, pad_id=0)
    total_alone = sum(summed_loss(alone.collate([i])) for i in range(3))
    torch.testing.assert_close(summed_loss(packed.collate([0])), total_alone, rtol=1e-5, atol=1e-4)
    convs = (ONE, THREE, Conversation([("好", "好的。")]))
    answers = sum(len(bpe_tokenizer.encode(a)) + 1 for c in convs for _, a in c.turns)
    assert (packed.collate([0])["targets"] != -1).sum() == answers  # no sample predicts the next one's start


def rows_of(lengths, capacity):
    order, starts = pack_rows(np.array(lengths), capacity)
    return [order[starts[r] : starts[r + 1]].tolist() for r in range(len(starts) - 1)]


def test_pack_rows_fills_rows_best_fit_decreasing():
    assert rows_of([150, 150, 100, 100], 250) == [[0, 2], [1, 3]]  # closing at the first misfit: 3 rows
    assert rows_of([60, 200, 60, 60, 60], 250) == [[1], [0, 2, 3, 4]]  # the tightest row takes all it can
    lengths = [(i * 37) % 90 + 10 for i in range(2000)]  # 10..99 ids, like the demo's SFT samples
    rows = rows_of(lengths, 257)
    assert sorted(i for row in rows for i in row) == list(range(2000))
    assert all(sum(lengths[i] for i in row) <= 257 for row in rows)
    assert sum(lengths) / (257 * len(rows)) > 0.99
    rng = np.random.default_rng(0)  # against sample-by-sample best fit decreasing, the textbook way
    lengths = rng.integers(5, 120, 300).tolist()
    bins: list[list[int]] = []
    for i in sorted(range(300), key=lambda i: -lengths[i]):
        fitting = [b for b in bins if 257 - sum(lengths[j] for j in b) >= lengths[i]]
        if fitting:
            min(fitting, key=lambda b: 257 - sum(lengths[j] for j in b)).append(i)
        else:
            bins.append([i])
    assert len(rows_of(lengths, 257)) == len(bins)


def write(path, records):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records), encoding="utf-8")
    return path


def test_readers_filters_and_bad_records(tmp_path, bpe_tokenizer, caplog):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "把这句话翻译成英文：", "input": "你好", "output": "Hello"},
                                  {"instruction": "短", "input": "", "output": "答案很好"}], ensure_ascii=False))
    belle = write(tmp_path / "belle.jsonl", [{"instruction": "写一首诗", "input": "", "output": "春眠不觉晓"},
                                              {"instruction": 5, "output": "x"}])
    (tmp_path / "sft_data.csv").write_text("prompt,answer\n介绍一下北京,北京是中国的首都。\n", encoding="utf-8")
    chat = write(tmp_path / "chat.jsonl", [
        {"conversations": [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好呀朋友"},
                           {"role": "assistant", "content": "你好！"}]},
        {"conversations": [{"from": "human", "value": "问题一二三"}, {"from": "gpt", "value": "回答"}]},
        {"conversations": [{"role": "assistant", "content": "答在前"}, {"role": "user", "content": "问在后"}]},
    ])
    data, stats = cached([alpaca, belle, tmp_path / "sft_data.csv", chat], bpe_tokenizer, tmp_path / "cache",
                         min_prompt_chars=3)
    expected = [Conversation([("把这句话翻译成英文：你好", "Hello")]), Conversation([("写一首诗", "春眠不觉晓")]),
                Conversation([("介绍一下北京", "北京是中国的首都。")]),
                Conversation([("你好呀朋友", "你好！")], "你是助手"), Conversation([("问题一二三", "回答")])]
    assert samples(data) == [render_conversation(bpe_tokenizer, c) for c in expected]
    assert (stats.records, stats.bad, stats.filtered) == (8, 2, 1)
    assert "belle.jsonl:2: its 'instruction' is a number, not a string" in caplog.text
    assert "chat.jsonl:3: the conversation starts with the assistant" in caplog.text


def cached(paths, tok, cache, max_seq_len=64, val_fraction=0.0, pack=False, workers=1, **filters):
    """Train SFTData and stats through the token cache (built on first use)."""
    tok.save(cache.parent / "tok")
    settings = SFTSettings(max_seq_len + 1, val_fraction, **filters)
    train, _, stats = load_sft_data(paths, cache.parent / "tok", cache, settings, pack, Dist(), workers)
    return train, stats


def test_a_read_only_cache_is_read_once_and_a_rank_that_cannot_see_rank_0s_cache_is_told_so(
        tmp_path, bpe_tokenizer, monkeypatch):
    """A read-only cache's manifest was read twice (once to see that it is there, once to check it); and a rank
    other than 0 that found no cache (rank 0 built it, so the rank cannot see rank 0's folder: another machine with
    an --sft_cache that is not shared) was told to "see the first process's error", which there is none of."""
    from babyllama.train import sft_data

    path = write(tmp_path / "sft.jsonl", [{"instruction": "写一首诗", "input": "", "output": "春眠不觉晓"}])
    cache = tmp_path / "cache"
    cached([path], bpe_tokenizer, cache)
    reads, read = [], sft_data.read_sft_cache
    monkeypatch.setattr(sft_data, "read_sft_cache", lambda d: reads.append(d) or read(d))
    monkeypatch.setattr(sft_data.os, "access", lambda p, mode: False)  # as a read-only mount, whoever runs it
    data, _ = cached([path], bpe_tokenizer, cache)
    assert len(data) == 1 and reads == [cache]
    monkeypatch.undo()
    with pytest.raises(UserError) as e:
        sft_data.opened_cache([path], tmp_path / "tok", tmp_path / "elsewhere", SFTSettings(65, 0.0), 1, "sft", {},
                              build=False)
    assert str(e.value) == (f"the SFT token cache {tmp_path / 'elsewhere'} that the first process built is not there "
                            "on this machine; with several machines, --sft_cache must be a folder that all of them "
                            "see (shared storage).")


def samples(data):
    return [tuple(x.tolist() for x in data.sample(i)) for i in range(len(data.offsets) - 1)]


@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory, bpe_tokenizer):
    d = tmp_path_factory.mktemp("sft")
    torch.manual_seed(0)
    save_checkpoint(d / "init", sharp_model(tiny_config(vocab_size=600, max_seq_len=64)), bpe_tokenizer)
    records = [{"instruction": "判断情感：", "input": text, "output": label}
               for i in range(200) for text, label in [(f"很好很喜欢{i}", "正面"), (f"太差了失望{i}", "负面")]]
    write(d / "sft.jsonl", records)
    return d


def held_out_loss(checkpoint, data):
    model = load_model(checkpoint)
    batch = data.collate(list(range(len(data))))
    with torch.no_grad():
        return model(batch["idx"], batch["targets"])[1].item()


def test_sft_lowers_held_out_answer_loss(sft_setup, bpe_tokenizer, tmp_path):
    d = sft_setup
    cfg = load_config(None, ["--init", str(d / "init"), "--data", str(d / "sft.jsonl"), "--out_dir", str(tmp_path),
                             "--max_steps", "40", "--batch_size", "16", "--lr", "3e-3", "--warmup_steps", "5",
                             "--val_fraction", "0.1", "--eval_every", "0", "--log_every", "5"])
    final = sft(cfg)
    _, val, stats = load_sft_data([d / "sft.jsonl"], d / "init", tmp_path / "sft_tokens", SFTSettings(65, 0.1),
                                  False, Dist())  # the run's own cache
    assert stats.val_samples > 20
    before, after = held_out_loss(d / "init", val), held_out_loss(final, val)
    assert after < before / 3, (before, after)


def test_sft_refuses_missing_init_and_other_tokenizer(sft_setup, tmp_path):
    from babyllama.tokenizer import train_bpe
    from tests.conftest import generated_corpus

    d = sft_setup
    base = ["--data", str(d / "sft.jsonl"), "--out_dir", str(tmp_path / "run"), "--max_steps", "2"]
    with pytest.raises(UserError, match="does not exist"):  # an init not inside out_dir: that is said first
        sft(load_config(None, [*base, "--init", str(tmp_path / "missing")]))
    other = train_bpe(generated_corpus(40, seed=8), 500)
    other.save(tmp_path / "tok")
    with pytest.raises(UserError, match="not the one the model"):
        sft(load_config(None, [*base, "--init", str(d / "init"), "--tokenizer", str(tmp_path / "tok")]))
    assert not (tmp_path / "run" / "sft_tokens").exists()  # refused before any data was tokenized


@pytest.mark.parametrize("extra", [[], ["--lora_rank", "4"]], ids=["full", "lora"])
def test_an_init_holding_nan_is_refused_before_the_token_cache_is_built(sft_setup, tmp_path, capsys, extra):
    """`sft --init CKPT` whose model.safetensors holds a NaN built the whole token cache (minutes at BELLE size)
    and only then refused the weights; a LoRA run's base (its --init) as well."""
    import shutil

    from babyllama.cli import main

    init = tmp_path / "init"
    shutil.copytree(sft_setup / "init", init)
    name = poison(init / "model.safetensors", part="layers.1.")
    run = tmp_path / "run"
    assert main(["sft", "--init", str(init), "--data", str(sft_setup / "sft.jsonl"), "--out_dir", str(run),
                 "--max_steps", "1", "--data_workers", "1", *extra]) == 2
    assert capsys.readouterr().err == not_finite(init / "model.safetensors", name)
    assert not run.exists()


@pytest.mark.parametrize("extra", [[], ["--optimizer", "muon", "--lora_rank", "4"]], ids=["full", "lora-muon"])
def test_sft_resumes_bitwise(sft_setup, tmp_path, extra):
    """LoRA under Muon (as configs/sft-demo.toml) could not resume: AdamW had two empty groups."""
    d = sft_setup
    args = ["--init", str(d / "init"), "--data", str(d / "sft.jsonl"), "--max_steps", "6", "--batch_size", "8",
            "--save_every", "3", "--log_every", "1", "--eval_every", "0", "--warmup_steps", "2", *extra]
    sft(load_config(None, [*args, "--out_dir", str(tmp_path / "straight")]))
    simulate_death(tmp_path / "straight", tmp_path / "died", step=3)
    sft(load_config(None, [*args, "--out_dir", str(tmp_path / "died")]), resume=True)
    assert logged_losses(tmp_path / "died") == logged_losses(tmp_path / "straight")


def test_sft_resume_refuses_a_tokenizer_changed_since_the_run_started(sft_setup, tmp_path, capsys):
    """The init's tokenizer edited (bos and eos swapped in babyllama_tokenizer.json: the same vocabulary, so
    the same fingerprint) or replaced after the run started: --resume stops before anything is written."""
    import shutil

    from babyllama.cli import main
    from babyllama.tokenizer import train_bpe
    from tests.conftest import generated_corpus

    d, init, run = sft_setup, tmp_path / "init", tmp_path / "run"
    shutil.copytree(d / "init", init)
    args = ["sft", "--init", str(init), "--data", str(d / "sft.jsonl"), "--out_dir", str(run), "--max_steps", "2",
            "--save_every", "2", "--batch_size", "8", "--eval_every", "0", "--warmup_steps", "1", "--data_workers", "1"]
    assert main(args) == 0
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    step = run / "checkpoints" / "step_000002"
    fingerprint = load_tokenizer(init).fingerprint
    (init / "babyllama_tokenizer.json").write_text(json.dumps({"bos_id": 2, "eos_id": 1, "pad_id": 0}))
    capsys.readouterr()
    assert main([*args, "--max_steps", "4", "--resume"]) == 2
    assert capsys.readouterr().err == (f"babyllama: error: the tokenizer {init} (bos_id 2, eos_id 1) is not the one "
                                       f"the model at {step} was trained with (bos_id 1, eos_id 2).\n")
    other = train_bpe(generated_corpus(40, seed=8), 500)
    other.save(init)
    assert main([*args, "--max_steps", "4", "--resume"]) == 2
    assert capsys.readouterr().err == (
        f"babyllama: error: the tokenizer {init} (fingerprint {other.fingerprint}, vocab_size 500) is not the one the "
        f"model at {step} was trained with (fingerprint {fingerprint}, vocab_size 600).\n")
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # nothing written


@pytest.mark.parametrize("flags, message", [
    (["--lora_alpha", "16"], "lora_alpha needs --lora_rank: without it SFT trains every weight, not LoRA adapters; "
                             "set --lora_rank or drop it."),
    (["--lora_targets", "wq"], "lora_targets needs --lora_rank: without it SFT trains every weight, not LoRA "
                               "adapters; set --lora_rank or drop it."),
    (["--lora_dropout", "1.5", "--lora_alpha", "16"], "lora_alpha and lora_dropout need --lora_rank: without it SFT "
                                                      "trains every weight, not LoRA adapters; set --lora_rank or "
                                                      "drop them."),
    (["--doc_mask", "true", "--lora_dropout", "0.1"],  # both kinds at once, not the second on the next try
     "SFT does not read doc_mask, a setting of pretraining only (SFT keeps samples apart with pack); drop it; also, "
     "lora_dropout needs --lora_rank: without it SFT trains every weight, not LoRA adapters; set --lora_rank or drop "
     "it."),
])
def test_sft_refuses_lora_settings_without_lora_rank(sft_setup, tmp_path, capsys, flags, message):
    """LoRA's other settings without lora_rank were ignored: the run was a full fine-tune."""
    from babyllama.cli import main

    d = sft_setup
    code = main(["sft", "--init", str(d / "init"), "--data", str(d / "sft.jsonl"), "--out_dir", str(tmp_path / "run"),
                 "--max_steps", "1", *flags])
    assert (code, capsys.readouterr().err) == (2, f"babyllama: error: {message}\n")
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("toml, flags, message", [
    ("lora_rank = 8\nlora_alpha = 16\n", ["--lora_rank", "0"],
     "lora_alpha (from {toml}) needs lora_rank, which --lora_rank 0 turns off: SFT trains every weight, not LoRA "
     "adapters; drop it from {toml}."),
    ("lora_rank = 0\nlora_alpha = 16\nlora_dropout = 0.1\n", [],
     "lora_alpha and lora_dropout (from {toml}) need lora_rank, which lora_rank = 0 in {toml} turns off: SFT trains "
     "every weight, not LoRA adapters; drop them from {toml}."),
    ("lora_alpha = 16\n", ["--lora_dropout", "0.1"],
     "lora_alpha (from {toml}) and --lora_dropout need --lora_rank: without it SFT trains every weight, not LoRA "
     "adapters; set --lora_rank or drop them."),
])
def test_lora_settings_of_the_config_file_without_lora_rank_are_said_to_be_from_it(sft_setup, tmp_path, capsys,
                                                                                    toml, flags, message):
    """A config's lora_alpha with `--lora_rank 0` was said as if it were a flag ("set --lora_rank or drop it")."""
    from babyllama.cli import main

    d = sft_setup
    (tmp_path / "lora.toml").write_text(f"[train]\n{toml}")
    code = main(["sft", "--config", str(tmp_path / "lora.toml"), "--init", str(d / "init"), "--data",
                 str(d / "sft.jsonl"), "--out_dir", str(tmp_path / "run"), "--max_steps", "1", *flags])
    assert (code, capsys.readouterr().err) == (2, f"babyllama: error: {message.format(toml=tmp_path / 'lora.toml')}\n")
    assert not (tmp_path / "run").exists()


def test_sft_resumes_in_a_moved_folder_on_its_token_cache(sft_setup, tmp_path, capsys):
    """runs/ (init, data, run with its token cache) moved elsewhere: --resume reuses the cache, whose manifest
    names the inputs by absolute paths that are gone, by their paths relative to it; a changed input still
    stops the run as before, with nothing written."""
    import shutil

    from babyllama.cli import main

    d, runs = sft_setup, tmp_path / "runs"
    shutil.copytree(d / "init", runs / "init")
    shutil.copy2(d / "sft.jsonl", runs / "sft.jsonl")

    def args(where, steps):
        return ["sft", "--init", str(where / "init"), "--data", str(where / "sft.jsonl"), "--out_dir",
                str(where / "run"), "--max_steps", str(steps), "--save_every", "2", "--batch_size", "8",
                "--eval_every", "0", "--warmup_steps", "1", "--data_workers", "1"]

    assert main(args(runs, 2)) == 0
    cache = {f.name: f.read_bytes() for f in (runs / "run" / "sft_tokens").iterdir() if f.is_file()}
    moved = tmp_path / "elsewhere" / "runs"
    shutil.move(runs, moved)  # mv: the same files, mtimes kept
    capsys.readouterr()
    assert main([*args(moved, 4), "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"sft cache: using {moved / 'run' / 'sft_tokens'}" in out and "building" not in out
    assert f"resuming from {moved / 'run' / 'checkpoints' / 'step_000002'} (step 2 of 4)\n" in out
    assert {f.name: f.read_bytes() for f in (moved / "run" / "sft_tokens").iterdir() if f.is_file()} == cache
    assert (moved / "run" / "checkpoints" / "step_000004").is_dir()
    data = moved / "sft.jsonl"
    text = data.read_bytes()
    data.write_bytes(text.replace("很好".encode(), "很棒".encode(), 1))  # one character, the same size
    before = {p: p.stat().st_mtime_ns for p in (moved / "run").rglob("*")}
    changed = (f"babyllama: error: the run started with other inputs ({data} differs); resuming needs the same "
               "inputs and settings, so restore them, or start a new run without --resume in a new --out_dir.\n")
    assert main([*args(moved, 6), "--resume"]) == 2
    assert capsys.readouterr().err == changed
    assert {p: p.stat().st_mtime_ns for p in (moved / "run").rglob("*")} == before  # nothing written
    shutil.rmtree(moved / "run" / "sft_tokens")  # a rebuilt cache would resume the run on other samples
    assert main([*args(moved, 6), "--resume"]) == 2
    assert capsys.readouterr().err == changed
    assert not (moved / "run" / "sft_tokens").exists() and not (moved / "run" / "checkpoints" / "step_000006").exists()


def test_sft_resumes_on_an_input_downloaded_again_and_refuses_one_changed(sft_setup, tmp_path, capsys):
    """The --data file replaced by the same bytes (a new mtime, as cp without -p or a new download give):
    --resume goes on with the token cache as it was; the same size with one character changed stops it."""
    import os
    import shutil

    from babyllama.cli import main

    d, data, run = sft_setup, tmp_path / "sft.jsonl", tmp_path / "run"
    shutil.copy2(d / "sft.jsonl", data)
    args = ["sft", "--init", str(d / "init"), "--data", str(data), "--out_dir", str(run), "--save_every", "2",
            "--batch_size", "8", "--eval_every", "0", "--warmup_steps", "1", "--data_workers", "1"]
    assert main([*args, "--max_steps", "2"]) == 0
    cache = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (run / "sft_tokens").iterdir()}
    data.unlink()
    shutil.copyfile(d / "sft.jsonl", data)
    os.utime(data, ns=(1, 1))
    capsys.readouterr()
    assert main([*args, "--max_steps", "4", "--resume"]) == 0
    out = capsys.readouterr().out
    assert out.count(f"note: {data} has a new mtime but the same bytes; using it\n") == 1
    assert f"sft cache: using {run / 'sft_tokens'}" in out
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (run / "sft_tokens").iterdir()
            if p.name != "manifest.json"} == {k: v for k, v in cache.items() if k != "manifest.json"}  # not rebuilt
    assert json.loads((run / "sft_tokens" / "manifest.json").read_text())["inputs"][0]["mtime_ns"] == 1  # recorded
    assert (run / "checkpoints" / "step_000004").is_dir()
    data.write_bytes(data.read_bytes().replace("很好".encode(), "很棒".encode(), 1))  # one character, the same size
    os.utime(data, ns=(2, 2))
    assert main([*args, "--max_steps", "6", "--resume"]) == 2
    assert capsys.readouterr().err == (
        f"babyllama: error: the run started with other inputs ({data} differs); resuming needs the same inputs and "
        "settings, so restore them, or start a new run without --resume in a new --out_dir.\n")


def test_a_run_whose_cache_is_of_an_older_version_says_to_finish_it_with_that_version(sft_setup, tmp_path, capsys):
    """A run in progress when a new cache VERSION came was told to "restore" its inputs and settings, which it cannot
    do: what changed is babyllama. The sentence says to finish it with that version or start a new run."""
    import json

    from babyllama.cli import main

    d, run = sft_setup, tmp_path / "run"
    args = ["sft", "--init", str(d / "init"), "--data", str(d / "sft.jsonl"), "--out_dir", str(run), "--save_every",
            "2", "--batch_size", "8", "--eval_every", "0", "--warmup_steps", "1", "--data_workers", "1"]
    assert main([*args, "--max_steps", "2"]) == 0
    config = run / "checkpoints" / "step_000002" / "config.json"
    record = json.loads(config.read_text())
    record["data"]["version"] -= 1  # the run started under the version before this one
    config.write_text(json.dumps(record))
    capsys.readouterr()
    assert main([*args, "--max_steps", "4", "--resume"]) == 2
    assert capsys.readouterr().err == (
        "babyllama: error: the run started with an older version of babyllama, whose SFT/DPO samples this version "
        "makes otherwise; finish it with that version, or start a new run without --resume in a new --out_dir.\n")


@pytest.mark.parametrize("flags, differ", [
    (["--model.dropout", "0.1"], "other model settings (dropout)"),
    (["--optimizer", "muon"], "optimizer adamw (now muon)"),
    (["--lora_rank", "4"], "lora_rank 0 (now 4)"),
    (["--seed", "7"], "seed 1337 (now 7)"),
    (["--pack", "true"], "pack False (now True)"),
])
def test_sft_resume_with_other_settings_is_refused_before_the_cache_is_built(sft_setup, tmp_path, capsys, flags,
                                                                            differ):
    """Settings a checkpoint cannot resume with (the model's, whose weights it holds; the optimizer and the LoRA
    adapter, whose state it holds; seed and pack, which decide the sample at each position) stop --resume before
    the token cache is built (minutes at full size)."""
    import shutil

    from babyllama.cli import main

    d, run = sft_setup, tmp_path / "run"
    args = ["sft", "--init", str(d / "init"), "--data", str(d / "sft.jsonl"), "--out_dir", str(run), "--save_every",
            "2", "--batch_size", "8", "--eval_every", "0", "--warmup_steps", "1", "--data_workers", "1"]
    assert main([*args, "--max_steps", "2"]) == 0
    shutil.rmtree(run / "sft_tokens")
    capsys.readouterr()
    assert main([*args, "--max_steps", "4", "--resume", *flags]) == 2
    assert capsys.readouterr().err == (f"babyllama: error: {run / 'checkpoints' / 'step_000002'} was trained with "
                                       f"{differ}; resume with the same settings or use a new out_dir.\n")
    assert not (run / "sft_tokens").exists()


def test_sft_resume_of_a_finished_run_changes_no_file(sft_setup, tmp_path, capsys):
    """With nothing left to do (the run's length reached, with other settings that may change), --resume writes
    nothing: config.json, the checkpoints, final/ and metrics.jsonl stay as they were, byte for byte."""
    from babyllama.cli import main

    d, run = sft_setup, tmp_path / "run"
    args = ["sft", "--init", str(d / "init"), "--data", str(d / "sft.jsonl"), "--out_dir", str(run), "--save_every",
            "2", "--batch_size", "8", "--eval_every", "0", "--warmup_steps", "1", "--data_workers", "1"]
    assert main([*args, "--max_steps", "4"]) == 0
    files = lambda: {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    before = files()
    assert run / "checkpoints" / "step_000004" / "config.json" in before
    for steps in ("4", "3"):
        capsys.readouterr()
        assert main([*args, "--max_steps", steps, "--lr", "1e-3", "--batch_size", "4", "--resume"]) == 0
        assert (f"note: the run in {run} is finished at step 4, so nothing was done; its model is {run / 'final'}\n"
                in capsys.readouterr().out)
        assert files() == before


def test_a_finished_run_whose_init_is_gone_is_said_finished(sft_setup, tmp_path, capsys):
    """sft read --init's settings and tokenizer before it looked whether the run was finished, so a finished run
    whose init was since deleted was refused for its missing init, though pretrain leaves a finished run before any
    other check; it is said finished now, its files as they were. Unfinished, the missing init is said."""
    import shutil

    from babyllama.cli import main

    d, run, init = sft_setup, tmp_path / "run", tmp_path / "init"
    shutil.copytree(d / "init", init)
    args = ["sft", "--init", str(init), "--data", str(d / "sft.jsonl"), "--out_dir", str(run), "--batch_size", "8",
            "--eval_every", "0", "--warmup_steps", "1", "--data_workers", "1", "--resume"]
    assert main([*args, "--max_steps", "2"]) == 0
    shutil.rmtree(init)
    files = lambda: {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    before = files()
    capsys.readouterr()
    assert main([*args, "--max_steps", "2"]) == 0
    assert capsys.readouterr().out == (f"note: the run in {run} is finished at step 2, so nothing was done; its model "
                                       f"is {run / 'final'}\ndone: {run / 'final'}\n")
    assert files() == before
    assert main([*args, "--max_steps", "3"]) == 2
    assert capsys.readouterr().err == f"babyllama: error: checkpoint {init} does not exist.\n"


def test_an_epochs_run_resumed_with_another_average_last_is_left_when_finished_and_refused_before_the_cache(
        sft_setup, tmp_path, capsys):
    """A finished run resumed with another average_last was refused (after its token cache was built again), though
    a finished run is left as it was; it is now said finished, every file as it was and no cache built. An unfinished
    epochs run resumed with it was refused only once the cache was built (its length in steps needs the rows): the
    checkpoint records them, so the refusal comes before."""
    import shutil

    from babyllama.cli import main
    from tests.conftest import simulate_death

    d, run = sft_setup, tmp_path / "run"
    args = ["sft", "--init", str(d / "init"), "--data", str(d / "sft.jsonl"), "--save_every", "2", "--keep_last",
            "10", "--batch_size", "64", "--epochs", "1", "--eval_every", "0", "--warmup_steps", "1", "--data_workers",
            "1"]
    assert main([*args, "--out_dir", str(run)]) == 0
    last = json.loads((run / "final" / "config.json").read_text())["step"]
    assert last > 4
    shutil.rmtree(run / "sft_tokens")
    files = lambda: {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    before = files()
    capsys.readouterr()
    assert main([*args, "--out_dir", str(run), "--average_last", "0.5", "--resume"]) == 0
    assert capsys.readouterr().out == (f"note: the run in {run} is finished at step {last}, so nothing was done; its "
                                       f"model is {run / 'final'}\ndone: {run / 'final'}\n")
    assert files() == before
    simulate_death(run, tmp_path / "died", step=4)
    first = last - round(0.5 * last)
    assert main([*args, "--out_dir", str(tmp_path / "died"), "--average_last", "0.5", "--resume"]) == 2
    assert capsys.readouterr().err == (
        f"babyllama: error: {tmp_path / 'died' / 'checkpoints' / 'step_000004'} holds no mean of the weights, but "
        f"average_last 0.5 of {last} steps averages the steps after step {first}, {4 - first} of them by step 4; "
        "resume with the average_last and length the run had, or use a new out_dir.\n")
    assert not (tmp_path / "died" / "sft_tokens").exists()


def test_the_counts_of_a_run_of_one_record_agree(sft_setup, tmp_path, capsys, caplog):
    """The lines of a run said "1 records", "1 steps", "the 1 training rows" and "the whole run of 1 steps"."""
    from babyllama.cli import main

    write(tmp_path / "one.jsonl", [{"instruction": "判断情感：", "input": "很好很喜欢", "output": "正面"}])
    assert main(["sft", "--init", str(sft_setup / "init"), "--data", str(tmp_path / "one.jsonl"), "--val_fraction", "0",
                 "--max_steps", "1", "--batch_size", "2", "--eval_every", "0", "--warmup_steps", "1", "--lr", "1e-3",
                 "--data_workers", "1", "--out_dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:3] == ["sft data: 1 record, 0 bad, 0 with an empty answer, 0 filtered by length, 0 truncated; 1 train "
                       "/ 0 val samples",
                       "warning: warmup_steps 1 cover the whole run of 1 step: the learning rate reaches lr 0.001 only "
                       "at the last step and never decays to min_lr 1e-05; set --warmup_steps to a small part of the "
                       "steps (the configs use 1-10%)."]
    assert out[4].startswith("sft: 1 row, 1 step of 2 rows on 1 x cpu, ")
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "a step's 2 rows (batch_size x grad_accum x processes) are more than the 1 training row, so each step repeats "
        "some; lower --batch_size or use more data"]


def test_a_global_batch_beyond_the_training_rows_warns_once(sft_setup, tmp_path, caplog):
    """30 samples in steps of 100 rows repeat each about 3 times a step: one warning naming both numbers; a batch
    of all 30 rows gives none."""
    from babyllama.cli import main

    d = sft_setup
    write(tmp_path / "s30.jsonl", [{"instruction": "判断情感：", "input": f"很好很喜欢{i}", "output": "正面"}
                                   for i in range(30)])
    args = ["sft", "--init", str(d / "init"), "--data", str(tmp_path / "s30.jsonl"), "--val_fraction", "0",
            "--max_steps", "1", "--eval_every", "0", "--warmup_steps", "0", "--data_workers", "1"]
    for batch_size, warnings in (("100", ["a step's 100 rows (batch_size x grad_accum x processes) are more than "
                                          "the 30 training rows, so each step repeats some; lower --batch_size or "
                                          "use more data"]), ("30", [])):
        caplog.clear()
        assert main([*args, "--batch_size", batch_size, "--out_dir", str(tmp_path / batch_size)]) == 0
        assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == warnings


def test_fsdp_names_every_setting_it_cannot_run_with_in_one_sentence():
    """`--fsdp true` with configs/sft-demo.toml was refused for average_last, then, once that was set to 0, for Muon,
    whose sentence said "needs torch >= 2.9 and works without FSDP" though the torch had Muon: one sentence names
    both now, and only the reason that applies."""
    config = str(Path(__file__).resolve().parents[1] / "configs" / "sft-demo.toml")
    with pytest.raises(UserError) as e:
        load_config(config, ["--fsdp", "true"])
    assert str(e.value) == ('average_last and optimizer = "muon" work without FSDP (DDP is fine); set average_last = 0 '
                            'and optimizer = "adamw" with fsdp.')
    with pytest.raises(UserError) as e:
        load_config(config, ["--fsdp", "true", "--average_last", "0"])
    assert str(e.value) == 'optimizer = "muon" works without FSDP (DDP is fine); set optimizer = "adamw" with fsdp.'
    assert load_config(config, ["--fsdp", "true", "--average_last", "0", "--optimizer", "adamw"]).train.fsdp


def test_muon_without_it_in_torch_says_only_that(monkeypatch):
    """Muon's refusal said "needs torch >= 2.9 and works without FSDP" whichever applied: without FSDP it names the
    torch version alone."""
    from babyllama.config import TrainConfig
    from babyllama.train.trainer import check_optimizer

    monkeypatch.delattr(torch.optim, "Muon", raising=False)
    with pytest.raises(UserError) as e:
        check_optimizer(TrainConfig(optimizer="muon"))
    assert str(e.value) == (f'optimizer = "muon" needs torch >= 2.9, this is {torch.__version__}; use optimizer = '
                            '"adamw" or a newer torch.')


def test_sft_refuses_model_settings_it_cannot_honour(sft_setup, tmp_path):
    d = sft_setup
    base = ["--init", str(d / "init"), "--data", str(d / "sft.jsonl"), "--max_steps", "1", "--eval_every", "0"]
    with pytest.raises(UserError, match="cannot change dim, n_layers"):
        sft(load_config(None, [*base, "--out_dir", str(tmp_path / "a"), "--model.dim", "32", "--model.n_layers", "1"]))
    for preset in (["--preset", "baby-92m"], ["--model.preset", "baby-92m", "--model.dropout", "0.1"]):
        with pytest.raises(UserError) as e:  # it named dim and the rest, which the user never gave
            sft(load_config(None, [*base, "--out_dir", str(tmp_path / "b"), *preset]))
        assert str(e.value) == (f"SFT takes its model's shape from --init {d / 'init'}, so --model.preset cannot be "
                                "set for it (baby-92m is not the init's model: its dim, max_seq_len, multiple_of, "
                                "n_heads, n_layers, vocab_size differ); drop --model.preset.")
    tiny = ["--preset", "demo", "--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "4",
            "--model.n_kv_heads", "none", "--model.vocab_size", "600", "--model.multiple_of", "16"]
    with pytest.raises(UserError, match="; it cannot change dim \\(only dropout\\); drop those settings.$"):
        sft(load_config(None, [*base, "--out_dir", str(tmp_path / "b"), *tiny, "--model.max_seq_len", "64",
                               "--model.dim", "32"]))  # the init's own preset, a setting changed: that setting
    with pytest.raises(UserError, match="^batch_size 1000000000 x grad_accum 1 rows of 64 tokens need "):
        sft(load_config(None, [*base, "--out_dir", str(tmp_path / "e"), "--batch_size", "1000000000"]))
    assert not (tmp_path / "e").exists()  # refused before the token cache was built
    with pytest.raises(UserError, match='^optimizer = "muon" works without FSDP \\(DDP is fine\\); set optimizer = '):
        sft(load_config(None, [*base, "--out_dir", str(tmp_path / "e"), "--optimizer", "muon", "--fsdp", "true"]))
    assert not (tmp_path / "e").exists()
    with pytest.raises(UserError) as e:
        sft(load_config(None, [*base, "--out_dir", str(tmp_path / "e"), "--doc_mask", "true"]))
    assert str(e.value) == ("SFT does not read doc_mask, a setting of pretraining only (SFT keeps samples apart with "
                            "pack); drop it.")
    for flag, value in (("--rpo_alpha", "1"), ("--beta", "0.5"), ("--precompute_ref_log_probs", "true")):
        with pytest.raises(UserError) as e:
            sft(load_config(None, [*base, "--out_dir", str(tmp_path / "e"), flag, value]))
        assert str(e.value) == f"SFT does not read {flag[2:]}, a setting of DPO only; drop it."
    with pytest.raises(UserError) as e:
        sft(load_config(None, [*base, "--out_dir", str(tmp_path / "e"), "--beta", "0.5", "--rpo_alpha", "1",
                               "--doc_mask", "true"]))
    assert str(e.value) == ("SFT does not read doc_mask, a setting of pretraining only (SFT keeps samples apart with "
                            "pack), nor beta and rpo_alpha, settings of DPO only; drop them.")
    # the init's own values (one by one, or as the preset it was made from), and dropout, are fine
    final = sft(load_config(None, [*base, *tiny, "--out_dir", str(tmp_path / "c"), "--model.max_seq_len", "64",
                                   "--model.dropout", "0.1"]))
    assert json.loads((final / "config.json").read_text())["model"]["dropout"] == 0.1


@pytest.mark.parametrize("stage, flags, message", [
    ("sft", ["--beta", "0.1"], "SFT does not read beta, a setting of DPO only; drop it."),
    ("sft", ["--label_smoothing", "0", "--precompute_ref_log_probs", "false"],
     "SFT does not read label_smoothing and precompute_ref_log_probs, settings of DPO only; drop them."),
    ("dpo", ["--pack", "false"], "DPO does not read pack, a setting of SFT only (DPO scores each answer in a row of "
                                 "its own); drop it."),
    ("pretrain", ["--val_fraction", "0.02"], "pretraining does not read val_fraction, a setting of SFT and DPO only "
                                             "(pretraining reads the token shards that pretokenize split and wrote); "
                                             "drop it."),
    ("sft", ["--lora_alpha", "32"], "lora_alpha needs --lora_rank: without it SFT trains every weight, not LoRA "
                                    "adapters; set --lora_rank or drop it."),
])
def test_a_setting_of_other_stages_is_refused_when_given_at_its_default(stage, flags, message):
    """`sft --beta 0.1` was taken silently, `sft --beta 5` refused: a stage-only setting was refused only at a value
    other than its default. Given at all, by a flag or the config file, it is refused alike."""
    cfg = load_config(None, flags)
    with pytest.raises(UserError) as e:
        cfg.train.check_stage(stage, cfg.sources)
    assert str(e.value) == message


def test_a_setting_of_other_stages_from_the_config_file_is_refused(tmp_path):
    """A config file's beta = 0.1 (dpo-demo.toml's, at the default) given to sft is refused as a flag is."""
    (tmp_path / "c.toml").write_text("[train]\nbeta = 0.1\n")
    cfg = load_config(tmp_path / "c.toml", [])
    with pytest.raises(UserError, match="^SFT does not read beta, a setting of DPO only; drop it.$"):
        cfg.train.check_stage("sft", cfg.sources)
    cfg.train.check_stage("dpo", cfg.sources)  # its own stage reads it


def test_sft_writes_beside_its_init_and_never_resumes_another_stage(sft_setup, tmp_path):
    from babyllama.settings import default_out_dir

    d = sft_setup
    base = tmp_path / "runs" / "base"  # a pretraining run: its final model and a step checkpoint
    model = load_model(d / "init")
    tok = load_tokenizer(d / "init")
    save_checkpoint(base / "final", model, tok, extra_config={"stage": "pretrain"})
    save_checkpoint(base / "checkpoints" / "step_000002", model, tok, {"step": 2}, {"stage": "pretrain"})
    before = {p: p.stat().st_mtime_ns for p in base.rglob("*")}
    args = ["--data", str(d / "sft.jsonl"), "--max_steps", "2", "--batch_size", "8", "--eval_every", "0",
            "--warmup_steps", "1", "--data_workers", "1"]
    final = sft(load_config(None, [*args, "--init", str(base / "final")]))
    assert final == tmp_path / "runs" / "base-sft" / "final" and (final / "model.safetensors").is_file()
    assert json.loads((final / "config.json").read_text())["stage"] == "sft"
    assert {p: p.stat().st_mtime_ns for p in base.rglob("*")} == before  # the base run is untouched
    with pytest.raises(UserError, match=rf"^{base} holds a pretraining run \(step_000002\), which SFT cannot resume; "
                                        r"choose another out_dir\.$"):
        sft(load_config(None, [*args, "--init", str(d / "init"), "--out_dir", str(base)]), resume=True)
    with pytest.raises(UserError, match=rf"^out_dir {base} holds --init {base / 'final'}, which the run would "
                                        r"overwrite; choose another out_dir\.$"):
        sft(load_config(None, [*args, "--init", str(base / "final"), "--out_dir", str(base)]), resume=True)
    assert {p: p.stat().st_mtime_ns for p in base.rglob("*")} == before
    assert default_out_dir("pretrain", "") == "runs/pretrain"
    assert default_out_dir("sft", "runs/demo/pretrain/final") == "runs/demo/pretrain-sft"
    assert default_out_dir("sft", "runs/x/checkpoints/step_000100") == "runs/x-sft"
    assert default_out_dir("sft", "models/base") == "models/base-sft"


@pytest.mark.parametrize("asked, used", [(0, 1), (1, 1), (100_000, 1)])
def test_data_workers_are_at_most_one_per_core(sft_setup, tmp_path, monkeypatch, caplog, asked, used):
    """data_workers (of SFT's and DPO's token cache) is capped to the CPU cores, here 1, as pretokenize --workers
    is: more processes only share the cores, each with its own memory."""
    import babyllama.data.pretokenize as pt
    import babyllama.data.sft_tokens as st

    started = []

    def spy(func, batches, tokenizer_path, workers):
        started.append(workers)
        return in_workers(func, batches, tokenizer_path, 1)

    in_workers = pt.in_workers
    monkeypatch.setattr(pt, "cpu_cores", lambda: 1)
    monkeypatch.setattr(st, "in_workers", spy)
    d = sft_setup
    sft(load_config(None, ["--init", str(d / "init"), "--data", str(d / "sft.jsonl"), "--out_dir", str(tmp_path),
                           "--max_steps", "1", "--eval_every", "0", "--data_workers", str(asked)]))
    assert started == [used]
    warned = f"data_workers {asked} is more than the 1 CPU core of this machine; using 1 worker process"
    assert (warned in caplog.text) == (asked > 1)


def trained_tokens(positions_of_row, rows: int, steps: int, global_batch: int, seed: int = 1337) -> list[int]:
    """The tokens metric after each step: positions_of_row(r) summed over the rows the steps train on (the global
    positions [s*G, (s+1)*G) of step s in the seed's order)."""
    from babyllama.train.trainer import GlobalOrder

    order, expected, tokens = GlobalOrder(rows, seed), [], 0
    for step in range(steps):
        tokens += sum(positions_of_row(order(p)) for p in range(step * global_batch, (step + 1) * global_batch))
        expected.append(tokens)
    return expected


def row_positions(data: SFTData, r: int) -> int:
    """The positions of row r that hold ids: its samples' ids, one fewer (the last id is no input), no padding."""
    return sum(len(data.sample(i)[0]) for i in data.row(r)) - 1


def logged_tokens(out) -> list[int]:
    return [x["tokens"] for x in map(json.loads, (out / "metrics.jsonl").open()) if not x.get("final")]


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_tokens_count_the_positions_that_hold_ids_not_padding(sft_setup, tmp_path, pack):
    """Rows are padded to their batch's longest (packed ones to max_seq_len), and tokens counted the padding: a DPO
    run logged 42% more tokens than its pairs hold. It counts the positions that hold ids now, exactly."""
    d = sft_setup
    sft(load_config(None, ["--init", str(d / "init"), "--data", str(d / "sft.jsonl"), "--out_dir", str(tmp_path),
                           "--max_steps", "3", "--batch_size", "8", "--log_every", "1", "--eval_every", "0",
                           "--val_fraction", "0", "--pack", str(pack), "--data_workers", "1"]))
    train, _, _ = load_sft_data([d / "sft.jsonl"], d / "init", tmp_path / "sft_tokens", SFTSettings(65, 0.0), pack,
                                Dist())
    assert logged_tokens(tmp_path) == trained_tokens(lambda r: row_positions(train, r), len(train), 3, 8)


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_a_tokens_budget_ends_where_the_logged_tokens_reach_it(sft_setup, tmp_path, capsys, pack):
    """--tokens N trained N / max_seq_len rows (rounded up) while `tokens` logs the positions that hold ids: with
    rows shorter than max_seq_len, a run asked for 1500 tokens logged 658 (packed: 1336). The budget counts what the
    log counts now: the run ends at the step where the logged tokens first reach N; one stopped and resumed ends at
    the same step with the same lines; one resumed when finished is said to be so before its token cache is read."""
    import shutil

    d, n = sft_setup, 1500
    args = ["--init", str(d / "init"), "--data", str(d / "sft.jsonl"), "--tokens", str(n), "--batch_size", "4",
            "--log_every", "1", "--save_every", "2", "--eval_every", "0", "--val_fraction", "0", "--warmup_steps", "0",
            "--keep_last", "30", "--pack", str(pack), "--data_workers", "1"]

    def lines(out) -> list[tuple[int, int]]:
        return [(r["step"], r["tokens"]) for r in map(json.loads, (out / "metrics.jsonl").open()) if "loss" in r]

    sft(load_config(None, [*args, "--out_dir", str(tmp_path / "straight")]))
    logged = lines(tmp_path / "straight")
    assert logged[-1][1] >= n > logged[-2][1] and [s for s, _ in logged] == list(range(1, len(logged) + 1))
    simulate_death(tmp_path / "straight", tmp_path / "died", step=2)
    sft(load_config(None, [*args, "--out_dir", str(tmp_path / "died")]), resume=True)
    assert lines(tmp_path / "died") == logged
    shutil.rmtree(tmp_path / "died" / "sft_tokens")
    capsys.readouterr()
    sft(load_config(None, [*args, "--out_dir", str(tmp_path / "died")]), resume=True)
    assert f"is finished at step {len(logged)}" in capsys.readouterr().out
    assert not (tmp_path / "died" / "sft_tokens").exists()


def test_torchrun_logs_the_tokens_of_every_rank(sft_setup, tmp_path):
    """Rows of SFT differ in length: tokens is the sum of the ranks' positions, not rank 0's times the ranks."""
    from tests.test_pretrain import torchrun

    d = sft_setup
    r = torchrun(["sft", "--init", d / "init", "--data", d / "sft.jsonl", "--out_dir", tmp_path, "--max_steps", "2",
                  "--batch_size", "4", "--log_every", "1", "--eval_every", "0", "--save_every", "0",
                  "--ddp_timeout", "60", "--val_fraction", "0.1"], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    train, _, _ = load_sft_data([d / "sft.jsonl"], d / "init", tmp_path / "sft_tokens", SFTSettings(65, 0.1),
                                False, Dist())
    assert logged_tokens(tmp_path) == trained_tokens(lambda r: row_positions(train, r), len(train), 2, 8)


@pytest.mark.parametrize("extra", [[], ["--lora_rank", "4"], ["--pack", "true"]], ids=["full", "lora", "pack"])
def test_a_micro_batch_whose_activations_cannot_fit_is_one_sentence_before_the_model(sft_setup, tmp_path,
                                                                                      monkeypatch, capsys, extra):
    """`sft --batch_size 1000000` passed every memory check (pretraining's activation check was pretraining's alone:
    SFT's rows may be fewer and shorter than batch_size x max_seq_len), then died in the allocator or was killed
    with no word. Once the token cache is read the bound is pretraining's over what is known: the 400 training
    rows, fewer than batch_size 1000, padded to the longest (packed: to max_seq_len 64), with the weights (LoRA's
    adapters too) and those rows' token ids; refused with exit 2 before any model is built. Memory is faked at
    16 MiB; batch_size 8 fits it, and trains."""
    from babyllama.cli import main
    from babyllama.train import trainer

    d = sft_setup
    monkeypatch.setattr(trainer, "cpu_memory", lambda: (16 << 20, "this machine's memory"))
    built = trainer.build_model
    monkeypatch.setattr(trainer, "build_model", lambda *a: pytest.fail("a model was built"))
    args = ["sft", "--init", str(d / "init"), "--data", str(d / "sft.jsonl"), "--eval_every", "0",
            "--warmup_steps", "0", "--val_fraction", "0", "--data_workers", "1", *extra]
    assert main([*args, "--batch_size", "1000", "--epochs", "1", "--out_dir", str(tmp_path / "big")]) == 2
    err = capsys.readouterr().err
    pack = "--pack" in extra
    train, _, _ = load_sft_data([d / "sft.jsonl"], d / "init", tmp_path / "big" / "sft_tokens", SFTSettings(65, 0.0),
                                pack, Dist())  # the run's own cache
    m, lora = tiny_config(vocab_size=600), trainer.lora_of(load_config(None, extra).train)
    rows, T = len(train), 64 if pack else int(train.lengths.max()) - 1
    assert (rows, T < 64) == ((len(train), False) if pack else (400, True))  # packs; samples shorter than 64
    acts = (2 * (3 * m.dim + 2 * m.ffn_dim) + 2 * m.dim) * rows * T * 4 + 2048 * 600 * 4
    weights = 4 * (m.num_params + (trainer.adapter_params(lora, m) if lora else 0))
    total = acts + weights + 16 * rows * T
    padded = "of 64 tokens (packed)" if pack else f"padded to the longest row's {T} tokens"
    assert err.splitlines()[-1] == (  # after the cache's progress bar
        f"babyllama: error: a micro-batch of batch_size 1000 rows (counted as the {rows} rows the run trains on) "
        f"{padded} "
        f"needs at least {trainer.size_text(acts)} for its activations, {trainer.size_text(total)} with the weights "
        "and token ids, more than the 16 MiB of this machine's memory; lower --batch_size (and raise --grad_accum to "
        "keep the tokens a step).")
    assert not (tmp_path / "big" / "config.json").exists()
    assert main([*args, "--batch_size", "1000", "--max_steps", "1", "--out_dir", str(tmp_path / "steps")]) == 2
    rows = "of 64 tokens (packed)" if pack else "padded to"  # max_steps: each step's rows wrap around the epochs
    assert f"a micro-batch of batch_size 1000 rows {rows}" in capsys.readouterr().err
    monkeypatch.setattr(trainer, "build_model", built)
    assert main([*args, "--batch_size", "8", "--max_steps", "1", "--out_dir", str(tmp_path / "small")]) == 0
    assert (tmp_path / "small" / "final").is_dir()


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "read"])
def test_a_token_cache_with_ids_beyond_the_models_vocabulary_is_refused_before_training(sft_setup, tmp_path, capsys,
                                                                                       recorded):
    """A cache holding a token id at or above the model's vocab_size (built by other code or its manifest edited: a
    cache keyed by the run's tokenizer holds none) stopped the run at its first step with an IndexError in the
    embedding (a CUDA assert on a GPU). It is refused in one sentence before training: of the largest id its
    manifest records, the cache unread, or for a cache from before the manifest recorded it, of its ids read once."""
    from babyllama.cli import main

    d, run = sft_setup, tmp_path / "run"
    args = ["sft", "--init", str(d / "init"), "--data", str(d / "sft.jsonl"), "--max_steps", "1", "--data_workers",
            "1", "--log_every", "1", "--eval_every", "0"]
    assert main([*args, "--out_dir", str(run)]) == 0
    cache = run / "sft_tokens"
    manifest = json.loads((cache / "manifest.json").read_text())
    assert 0 < manifest["stats"]["max_id"] < 600
    if recorded:  # the record is what is checked: the ids are not read
        manifest["stats"]["max_id"] = 700
    else:
        del manifest["stats"]["max_id"]
        ids = np.memmap(cache / "train.ids.bin", dtype=manifest["dtype"], mode="r+")
        ids[::50] = 650  # in most samples
        ids.flush()
    (cache / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main([*args, "--out_dir", str(tmp_path / "again"), "--sft_cache", str(cache)]) == 2
    assert capsys.readouterr().err == (f"babyllama: error: the SFT token cache {cache} holds token id "
                                       f"{700 if recorded else 650}, but the model's vocab_size is 600; delete "
                                       f"{cache} to rebuild it with the model's tokenizer.\n")
    assert not (tmp_path / "again" / "checkpoints").exists()


def test_a_cache_whose_stats_a_newer_babyllama_wrote_is_used(sft_setup, tmp_path):
    """A manifest whose stats held a field this babyllama does not know (a newer one's: max_id was one) was a
    TypeError traceback, SFTStats(**stats): the fields known are read, the others left out."""
    from babyllama.cli import main

    d, run = sft_setup, tmp_path / "run"
    args = ["sft", "--init", str(d / "init"), "--data", str(d / "sft.jsonl"), "--max_steps", "1", "--data_workers",
            "1", "--log_every", "1", "--eval_every", "0"]
    assert main([*args, "--out_dir", str(run)]) == 0
    manifest = json.loads((run / "sft_tokens" / "manifest.json").read_text())
    manifest["stats"]["a_later_count"] = 3
    (run / "sft_tokens" / "manifest.json").write_text(json.dumps(manifest))
    assert main([*args, "--out_dir", str(tmp_path / "again"), "--sft_cache", str(run / "sft_tokens")]) == 0
    assert (tmp_path / "again" / "final").is_dir()


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_an_init_whose_vocabulary_is_smaller_than_its_tokenizer_is_refused_before_the_cache(sft_setup, tmp_path,
                                                                                              bpe_tokenizer, capsys,
                                                                                              stage):
    """An --init with a smaller vocab_size than the tokenizer that builds the data could build a cache of ids beyond
    it: the tokenizer is refused against the model (check_tokenizer_fits) before any data is tokenized."""
    from babyllama.cli import main

    save_checkpoint(tmp_path / "init", sharp_model(tiny_config(vocab_size=300, max_seq_len=64)), bpe_tokenizer)
    run = tmp_path / "run"
    assert main([stage, "--init", str(tmp_path / "init"), "--data", str(sft_setup / "sft.jsonl"), "--out_dir",
                 str(run), "--max_steps", "1", "--data_workers", "1"]) == 2
    assert capsys.readouterr().err == ("babyllama: error: the tokenizer has 600 ids but the model at "
                                       f"{tmp_path / 'init'} only 300; use the tokenizer the model was trained with.\n")
    assert not run.exists()
