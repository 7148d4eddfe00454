"""LoRA with peft: only adapters learn, merging is exact, checkpoints name their base, peft and HF read them."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch

from babyllama.chat_format import Conversation, render_prompt
from babyllama.checkpoint import load_model, save_checkpoint
from babyllama.config import load_config
from babyllama.errors import UserError
from babyllama.lora import ADAPTER_FILE, TARGETS, adapter_tensors, add_lora, lora_config, merge_lora, save_adapter
from babyllama.model import Transformer
from babyllama.train.stages import pretrain, sft
from tests.conftest import not_finite, poison, run_cli, tiny_config
from tests.test_sft import write

peft = pytest.importorskip("peft")
IDS = torch.tensor([[5, 17, 230, 41, 99, 3, 150, 7, 64, 12]])


def plain_model(seed: int = 0, **kw) -> Transformer:
    """A tiny model as initialised for training: logits near 0, where fp32 rounding stays under 1e-6."""
    torch.manual_seed(seed)
    return Transformer(tiny_config(vocab_size=600, **kw)).eval()


def lora_model(rank: int = 4, targets: str = ",".join(TARGETS), seed: int = 0) -> Transformer:
    """A tiny model under LoRA adapters whose B is not zero, so they change the logits."""
    model = add_lora(plain_model(), lora_config(rank, 2.0 * rank, 0.0, targets))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


def test_only_adapter_parameters_receive_gradients():
    base = plain_model()
    linears = {n: m for n, m in base.named_modules() if n.rsplit(".", 1)[-1] in TARGETS}
    expected = sum(4 * (m.in_features + m.out_features) for m in linears.values())  # r (in + out) each
    model = lora_model(rank=4)
    _, loss = model(IDS, IDS.roll(-1, 1))
    loss.backward()
    with_grad = {n: p for n, p in model.named_parameters() if p.grad is not None}
    assert len(with_grad) == 2 * len(linears) == 16  # lora_A and lora_B of 4 layers in each of 2 blocks
    assert all("lora_" in n for n in with_grad)
    assert sum(p.numel() for p in with_grad.values()) == expected == 8320
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert all(p.grad.abs().sum() > 0 for p in with_grad.values())


def test_merged_weights_give_the_logits_of_base_plus_adapter():
    model = lora_model().eval()
    with torch.no_grad():
        adapted = model(IDS)[0]
        merged = merge_lora(copy.deepcopy(model))
        assert (adapted - plain_model()(IDS)[0]).abs().max() > 1e-2  # the adapter matters
        torch.testing.assert_close(merged(IDS)[0], adapted, atol=1e-5, rtol=0)
    plain = Transformer(tiny_config(vocab_size=600)).state_dict()
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in plain.items()}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, bpe_tokenizer):
    """A LoRA SFT run of 8 steps on a tiny model: init/ and run/final/."""
    d = tmp_path_factory.mktemp("lora")
    save_checkpoint(d / "init", plain_model(max_seq_len=64), bpe_tokenizer)
    records = [{"instruction": "判断情感：", "input": f"很好很喜欢{i}", "output": "正面"} for i in range(40)]
    write(d / "sft.jsonl", records)
    sft(load_config(None, ["--init", str(d / "init"), "--data", str(d / "sft.jsonl"), "--out_dir", str(d / "run"),
                           "--max_steps", "8", "--batch_size", "8", "--lr", "1e-2", "--warmup_steps", "1",
                           "--eval_every", "0", "--data_workers", "1", "--lora_rank", "4", "--lora_alpha", "8"]))
    return d


def test_lora_checkpoint_holds_peft_files_and_names_its_base(lora_run):
    final = lora_run / "run" / "final"
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json"} <= {p.name for p in final.iterdir()}
    assert not (final / "model.safetensors").exists()
    base = json.loads((final / "config.json").read_text())["base"]
    assert base["path"] == str((lora_run / "init").resolve())
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == base["path"]
    ours = load_model(final)  # what chat, serve, eval and export load: base + adapter, merged
    init = load_model(lora_run / "init")
    with torch.no_grad():
        assert (ours(IDS)[0] - init(IDS)[0]).abs().max() > 1e-3  # the adapter learned something
        by_peft = peft.PeftModel.from_pretrained(init, final).eval()  # peft reads our checkpoint as its own
        torch.testing.assert_close(by_peft(IDS)[0], ours(IDS)[0], atol=1e-5, rtol=0)


def test_chat_answers_with_base_plus_adapter(lora_run, bpe_tokenizer):
    final = lora_run / "run" / "final"
    r = run_cli("chat", final, "--max_new_tokens", "6", "--repetition_penalty", "1.0", stdin="很好很喜欢\n")
    assert r.returncode == 0, r.stderr
    prompt = render_prompt(bpe_tokenizer, Conversation([("很好很喜欢", "")]))
    expected = bpe_tokenizer.decode(load_model(final).generate(prompt, max_new_tokens=6, eos_id=2))
    assert r.stdout.splitlines()[0] == expected


def test_a_lora_checkpoint_without_its_tokenizer_uses_its_bases_as_export_adapter_does(lora_run, tmp_path):
    lora = tmp_path / "lora"  # the adapter's files and config.json alone: the tokenizer is its base's
    shutil.copytree(lora_run / "run" / "final", lora, ignore=shutil.ignore_patterns("*tokenizer*", "trainer_state.pt"))
    assert not list(lora.glob("*tokenizer*"))

    def chat(checkpoint, text):
        return run_cli("chat", checkpoint, "--max_new_tokens", "6", stdin=text)

    with_tokenizer = chat(lora_run / "run" / "final", "很好很喜欢\n")
    r = chat(lora, "很好很喜欢\n")
    assert (r.returncode, r.stdout) == (0, with_tokenizer.stdout), r.stderr
    assert run_cli("export", str(lora), "--format", "hf", "--adapter", "--out", str(tmp_path / "hf")).returncode == 0
    r = run_cli("sft", "--init", str(lora), "--data", str(lora_run / "sft.jsonl"), "--out_dir", str(tmp_path / "more"),
                "--max_steps", "1", "--batch_size", "4", "--eval_every", "0", "--data_workers", "1")  # and trains on
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "more" / "final" / "tokenizer.json").read_bytes() == \
        (lora_run / "init" / "tokenizer.json").read_bytes()
    base = tmp_path / "base"  # a base without a tokenizer either: the sentence names where to put it
    shutil.copytree(lora_run / "init", base, ignore=shutil.ignore_patterns("*tokenizer*"))
    rebase(lora, path=str(base))
    r = chat(lora, "你好\n")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        f"babyllama: error: {base} has neither tokenizer.json nor tokenizer.model; copy into it the tokenizer that "
        "the model was trained with.")


def test_a_missing_or_changed_base_is_one_sentence(lora_run, tmp_path):
    shutil.copytree(lora_run / "init", tmp_path / "init")
    shutil.copytree(lora_run / "run" / "final", tmp_path / "lora")
    rebase(tmp_path / "lora", path=str(tmp_path / "init"))
    assert load_model(tmp_path / "lora") is not None
    save_checkpoint(tmp_path / "init", plain_model(seed=3, max_seq_len=64))
    with pytest.raises(UserError, match="is not the one the LoRA checkpoint .* was trained on"):
        load_model(tmp_path / "lora")
    shutil.rmtree(tmp_path / "init")
    r = run_cli("eval", str(tmp_path / "lora"), "--out_dir", str(tmp_path / "eval"))
    assert r.returncode == 2 and "needs its base model" in r.stderr and "Traceback" not in r.stderr


def test_a_run_moved_with_its_base_loads_and_a_changed_base_is_still_refused(lora_run, tmp_path, monkeypatch):
    """runs/ moved (or copied to another machine): the base is found beside the adapter, by its relative
    path; an unchanged base (the stat config.json records) is not hashed again, a changed one is refused."""
    import os

    import babyllama.checkpoint as ck

    shutil.copytree(lora_run / "init", tmp_path / "a" / "init")
    sft(load_config(None, ["--init", str(tmp_path / "a" / "init"), "--data", str(lora_run / "sft.jsonl"),
                           "--out_dir", str(tmp_path / "a" / "run"), "--max_steps", "2", "--batch_size", "8",
                           "--lr", "1e-2", "--warmup_steps", "1", "--eval_every", "0", "--data_workers", "1",
                           "--lora_rank", "4", "--lora_alpha", "8"]))
    with torch.no_grad():
        before = load_model(tmp_path / "a" / "run" / "final")(IDS)[0]
    base = json.loads((tmp_path / "a" / "run" / "final" / "config.json").read_text())["base"]
    assert base["path"] == str(tmp_path / "a" / "init") and base["relative_path"] == "../../init"
    (tmp_path / "a").rename(tmp_path / "b")  # the absolute path is gone
    final = tmp_path / "b" / "run" / "final"
    monkeypatch.setattr(ck, "weights_sha256", lambda path: pytest.fail(f"{path} hashed again"))
    with torch.no_grad():
        assert torch.equal(load_model(final)(IDS)[0], before)
    monkeypatch.undo()
    r = run_cli("chat", final, "--max_new_tokens", "4", stdin="很好很喜欢\n")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    weights = tmp_path / "b" / "init" / "model.safetensors"
    data, st = bytearray(weights.read_bytes()), weights.stat()
    data[-1] ^= 1  # the last byte of the last tensor: the same size, the mtime put back
    weights.write_bytes(data)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(UserError, match=f"^the base model {tmp_path / 'b' / 'init'} is not the one the LoRA "
                                        f"checkpoint {final} was trained on \\(its weights changed\\); restore"):
        load_model(final)
    shutil.rmtree(tmp_path / "b" / "init")
    with pytest.raises(UserError, match=f"^the LoRA checkpoint {final} needs its base model {tmp_path / 'a' / 'init'}, "
                                        f"which is not there \\(nor at {tmp_path / 'b' / 'init'}\\); restore it at "
                                        "that path\\.$"):
        load_model(final)


def test_a_missing_base_at_one_path_is_named_once_and_export_adapter_checks_the_tokenizer(lora_run, tmp_path,
                                                                                           capsys):
    """The missing base said "not there (nor at P)" of its own path P; export --adapter took a LoRA checkpoint's
    tokenizer files as they were, which chat, eval and plain export refuse when they are not the recorded ones."""
    from babyllama.cli import main

    shutil.copytree(lora_run / "init", tmp_path / "init")
    lora = tmp_path / "run" / "final"  # as in lora_run: the base at ../../init, by either path
    shutil.copytree(lora_run / "run" / "final", lora)
    rebase(lora, path=str(tmp_path / "init"))
    (lora / "babyllama_tokenizer.json").write_text(json.dumps({"bos_id": 1, "eos_id": 0, "pad_id": 2}))
    for args in (["export", str(lora), "--out", str(tmp_path / "hf")],
                 ["export", str(lora), "--adapter", "--out", str(tmp_path / "hf")]):
        assert main(args) == 2
        assert capsys.readouterr().err.startswith(f"babyllama: error: the tokenizer {lora} (eos_id 0, pad_id 2) is "
                                                  f"not the one the model at {lora} was trained with (")
    assert not (tmp_path / "hf").exists()
    shutil.rmtree(tmp_path / "init")
    (lora / "babyllama_tokenizer.json").write_bytes((lora_run / "run" / "final" / "babyllama_tokenizer.json")
                                                    .read_bytes())
    assert main(["export", str(lora), "--adapter", "--out", str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == (f"babyllama: error: the LoRA checkpoint {lora} needs its base model "
                                       f"{tmp_path / 'init'}, which is not there; restore it at that path.\n")


def test_sft_from_a_lora_checkpoint_refuses_a_changed_or_missing_base_before_building_data(lora_run, tmp_path,
                                                                                           capsys):
    """`sft --init LORA` whose base changed built the whole token cache (minutes at 1M records), then refused."""
    from babyllama.cli import main

    shutil.copytree(lora_run / "init", tmp_path / "init")
    lora = tmp_path / "lora"
    shutil.copytree(lora_run / "run" / "final", lora)
    rebase(lora, path=str(tmp_path / "init"), stat=None)
    save_checkpoint(tmp_path / "init", plain_model(seed=3, max_seq_len=64))  # other weights: not the base
    args = ["sft", "--init", str(lora), "--data", str(lora_run / "sft.jsonl"), "--out_dir", str(tmp_path / "run"),
            "--max_steps", "1", "--data_workers", "1"]
    assert main(args) == 2
    assert capsys.readouterr().err == (f"babyllama: error: the base model {tmp_path / 'init'} is not the one the LoRA "
                                       f"checkpoint {lora} was trained on (its weights changed); restore that base.\n")
    shutil.rmtree(tmp_path / "init")
    assert main(args) == 2
    assert capsys.readouterr().err.startswith(f"babyllama: error: the LoRA checkpoint {lora} needs its base model "
                                              f"{tmp_path / 'init'}, which is not there")
    assert not (tmp_path / "run").exists()  # no token cache built, nothing written


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_lora_resume_on_another_init_is_refused_before_the_cache_is_built(lora_run, bpe_tokenizer, tmp_path, capsys,
                                                                         stage):
    """`--resume` with another --init of the same shapes put the saved adapter on it silently. The same weights
    at another path resume; other weights stop the run, naming both bases, before the token cache is built."""
    from babyllama.cli import main

    shutil.copytree(lora_run / "init", tmp_path / "copy")
    save_checkpoint(tmp_path / "other", plain_model(seed=3, max_seq_len=64), bpe_tokenizer)
    data = lora_run / "sft.jsonl"
    if stage == "dpo":
        data = tmp_path / "pairs.jsonl"
        write(data, [{"prompt": f"很好很喜欢{i}", "chosen": "正面", "rejected": "负面"} for i in range(16)])
    run = tmp_path / "run"
    args = [stage, "--data", str(data), "--out_dir", str(run), "--save_every", "2", "--batch_size", "4",
            "--eval_every", "0", "--warmup_steps", "1", "--data_workers", "1", "--lora_rank", "4", "--lora_alpha", "8"]
    assert main([*args, "--init", str(lora_run / "init"), "--max_steps", "2"]) == 0
    assert main([*args, "--init", str(tmp_path / "copy"), "--max_steps", "4", "--resume"]) == 0
    shutil.rmtree(run / f"{stage}_tokens")
    capsys.readouterr()
    assert main([*args, "--init", str(tmp_path / "other"), "--max_steps", "6", "--resume"]) == 2
    copy = (tmp_path / "copy").resolve()
    assert capsys.readouterr().err == (f"babyllama: error: {run / 'checkpoints' / 'step_000004'} is an adapter of the "
                                       f"base {copy}, not --init {tmp_path / 'other'} (other weights); resume with "
                                       f"--init {copy} or use a new out_dir.\n")
    assert not (run / f"{stage}_tokens").exists()
    # the base changed in place: said so, not "resume with --init" naming the same folder
    save_checkpoint(tmp_path / "copy", plain_model(seed=3, max_seq_len=64), bpe_tokenizer)
    assert main([*args, "--init", str(tmp_path / "copy"), "--max_steps", "6", "--resume"]) == 2
    assert capsys.readouterr().err == (f"babyllama: error: {run / 'checkpoints' / 'step_000004'} is an adapter of the "
                                       f"base {copy}, whose weights changed since; restore that base or use a new "
                                       "out_dir.\n")
    assert not (run / f"{stage}_tokens").exists()


def test_hf_export_merges_or_writes_a_peft_adapter(lora_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    final = lora_run / "run" / "final"
    ours, init = load_model(final), load_model(lora_run / "init")
    assert run_cli("export", str(final), "--format", "hf", "--out", str(tmp_path / "merged")).returncode == 0
    r = run_cli("export", str(final), "--format", "hf", "--adapter", "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, ours(IDS)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(base(IDS).logits, init(IDS)[0], atol=1e-5, rtol=0)  # hf/ is the base
        adapted = peft.PeftModel.from_pretrained(base, tmp_path / "hf" / "adapter").eval()
        torch.testing.assert_close(adapted(IDS).logits, ours(IDS)[0], atol=1e-5, rtol=0)
    adapter = json.loads((tmp_path / "hf" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((tmp_path / "hf").resolve())
    assert sorted(adapter["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                  "v_proj"]
    r = run_cli("export", str(lora_run / "init"), "--format", "hf", "--adapter", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "is not a LoRA checkpoint" in r.stderr


def test_export_adapter_reads_the_config_again_only_for_a_folder_that_is_no_lora_checkpoint(lora_run, tmp_path,
                                                                                            monkeypatch):
    """export --adapter read the checkpoint's config.json (read_config) before anything else, so that a training
    run is named as one rather than as "not a LoRA checkpoint"; a LoRA checkpoint's loads read it anyway. It is read
    for that now only where the folder is no LoRA checkpoint."""
    import babyllama.export as ex

    read, read_config = [], ex.read_config
    monkeypatch.setattr(ex, "read_config", lambda path: read.append(path) or read_config(path))
    ex.export(lora_run / "run" / "final", tmp_path / "hf", "hf", adapter=True)
    assert read == [] and (tmp_path / "hf" / "adapter" / ADAPTER_FILE).is_file()
    with pytest.raises(UserError, match="is not a LoRA checkpoint"):
        ex.export(lora_run / "init", tmp_path / "x", "hf", adapter=True)
    assert read == [lora_run / "init"]


@pytest.mark.parametrize("field, value, wanted", [
    ("lora_alpha", "x", 'lora_alpha must be a number > 0, not "x"'),  # TypeError in peft's scaling
    ("lora_alpha", None, "lora_alpha must be a number > 0, not null"),
    ("lora_alpha", float("nan"), "lora_alpha must be a number > 0, not NaN"),  # NaN weights, no word
    ("r", 0, "r must be a whole number >= 1, not 0"),  # peft's ValueError
    ("r", -3, "r must be a whole number >= 1, not -3"),
    ("r", 4.0, "r must be a whole number >= 1, not 4.0"),
    ("r", ..., "r must be a whole number >= 1, but it is missing"),
    ("lora_dropout", 2, "lora_dropout must be a number in [0, 1), not 2"),
    ("target_modules", ["foo"], 'target_modules must be a list of layers among wqkv, wo, w13, w2, not ["foo"]'),
    ("target_modules", "wqkv", 'target_modules must be a list of layers among wqkv, wo, w13, w2, not "wqkv"'),
    ("bias", "foo", 'bias must be peft\'s default "none", not "foo"'),  # peft's NotImplementedError
    ("rank_pattern", {"wqkv": 2}, 'rank_pattern must be peft\'s default {}, not {"wqkv": 2}'),
    ("fan_in_fan_out", True, "fan_in_fan_out must be peft's default false, not true"),  # peft's raw UserWarning
    ("peft_type", ..., 'peft_type must be peft\'s default "LORA", but it is missing'),  # PeftModel's KeyError
])
def test_a_bad_field_of_adapter_config_json_is_one_sentence(lora_run, tmp_path, capsys, field, value, wanted):
    """A value of adapter_config.json that peft chokes on (a traceback, exit 1, in chat, serve, eval and export) or
    that builds other layers than the adapter's: one sentence naming the file and the field, exit 2, before the base
    is loaded."""
    from babyllama.cli import main

    lora = tmp_path / "lora"
    shutil.copytree(lora_run / "run" / "final", lora)
    data = json.loads((lora / "adapter_config.json").read_text())
    if value is ...:
        del data[field]
    else:
        data[field] = value
    (lora / "adapter_config.json").write_text(json.dumps(data))
    sentence = f"{lora / 'adapter_config.json'}: {wanted}; the LoRA checkpoint is damaged."
    assert main(["export", str(lora), "--out", str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == f"babyllama: error: {sentence}\n"
    with pytest.raises(UserError) as e:
        load_model(lora)
    assert str(e.value) == sentence
    assert not (tmp_path / "hf").exists()


def test_a_lora_checkpoint_without_adapter_config_json_is_said_to_lack_it(lora_run, tmp_path):
    """Without adapter_config.json a LoRA checkpoint reads as a full one, and was said to have no model.safetensors."""
    lora = tmp_path / "lora"
    shutil.copytree(lora_run / "run" / "final", lora)
    (lora / "adapter_config.json").unlink()
    with pytest.raises(UserError) as e:
        load_model(lora)
    assert str(e.value) == (f"checkpoint {lora} is a LoRA checkpoint (it has adapter_model.safetensors) but has no "
                            "adapter_config.json; restore it from a copy of the checkpoint.")
    (lora / ADAPTER_FILE).unlink()
    with pytest.raises(UserError) as e:
        load_model(lora)
    assert str(e.value) == (f"checkpoint {lora} is a LoRA checkpoint (its config.json names a base) but has neither "
                            "adapter_config.json nor adapter_model.safetensors; restore them from a copy of the "
                            "checkpoint.")
    shutil.copytree(lora_run / "init", tmp_path / "full")
    (tmp_path / "full" / "model.safetensors").unlink()  # a full checkpoint's sentence is as it was
    with pytest.raises(UserError, match=f"^checkpoint {tmp_path / 'full'} has no model.safetensors.$"):
        load_model(tmp_path / "full")


def test_an_adapter_file_gone_while_it_loads_is_said_to_be_gone(lora_run, tmp_path):
    """As a full checkpoint's weights pruned after they were checked: gone, not "damaged"."""
    from babyllama.lora import load_adapter

    lora = tmp_path / "lora"
    shutil.copytree(lora_run / "run" / "final", lora)
    base = load_model(lora_run / "init")
    (lora / ADAPTER_FILE).unlink()
    with pytest.raises(UserError) as e:
        load_adapter(base, lora)
    assert str(e.value) == (f"{lora / ADAPTER_FILE} no longer exists (a training run may have pruned it: a run keeps "
                            "only its newest keep_last checkpoints).")


def files_of(folder) -> dict[str, bytes]:
    """{path in folder: bytes} of every file below folder but its hidden ones (the lock)."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*"))
            if f.is_file() and not f.name.startswith(".")}


def test_an_export_replaces_every_file_of_an_earlier_one(lora_run, tmp_path):
    """A tester exported --adapter, then the merged weights, into one --out: OUT/adapter stayed beside the merged
    weights, so PeftModel.from_pretrained(OUT, OUT/adapter) applied the LoRA twice (logits off by 0.04); a full
    checkpoint's export there kept it too. The new export leaves what a fresh one leaves, and the user's own files."""
    pytest.importorskip("transformers")
    from babyllama.export import HF_FILES, export

    final, init, out = lora_run / "run" / "final", lora_run / "init", tmp_path / "out"
    for checkpoint, adapter in ((final, False), (init, False), (final, True)):
        export(checkpoint, out, adapter=adapter)
        fresh = files_of(out)  # what an export of it into a new --out leaves
        assert {name.split("/")[0] for name in fresh} <= set(HF_FILES)
        shutil.rmtree(out)
        export(final, out, adapter=True)
        (out / "README.md").write_text("a model card of the user's")
        (out / "adapter" / "notes.txt").write_text("the user's, in adapter/")  # it went with the folder
        export(checkpoint, out, adapter=adapter)
        assert files_of(out) == fresh | {"README.md": b"a model card of the user's",
                                         "adapter/notes.txt": b"the user's, in adapter/"}, (checkpoint, adapter)
        shutil.rmtree(out)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_adapter_files_get_the_umasks_mode(lora_run, tmp_path, umask):
    pytest.importorskip("transformers")
    from babyllama.export import export

    old = os.umask(umask)
    try:
        (tmp_path / "ck").mkdir()  # what save_checkpoint writes a LoRA run's step checkpoints with
        save_adapter(tmp_path / "ck", lora_config(4, 8.0, 0.0, "wqkv"), adapter_tensors(lora_model()), "base")
        export(lora_run / "run" / "final", tmp_path / "hf", adapter=True)
    finally:
        os.umask(old)
    for f in (tmp_path / "ck" / ADAPTER_FILE, tmp_path / "hf" / "adapter" / ADAPTER_FILE):
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f  # 0o644 or 0o600


def test_lora_settings_out_of_range_are_refused(lora_run, tmp_path):
    base = ["--init", str(lora_run / "init"), "--data", str(lora_run / "sft.jsonl"), "--out_dir", str(tmp_path),
            "--max_steps", "1"]
    for flags in (["--lora_rank", "4", "--lora_targets", "wqkv,output"], ["--lora_rank", "-1"],
                  ["--lora_rank", "4", "--lora_dropout", "1"]):
        with pytest.raises(UserError, match="LoRA needs lora_rank >= 1"):
            sft(load_config(None, [*base, *flags]))
    with pytest.raises(UserError, match="LoRA adapts a trained model"):
        pretrain(load_config(None, ["--data", str(tmp_path), "--out_dir", str(tmp_path), "--lora_rank", "4"]))
    assert not (tmp_path / "sft_tokens").exists()  # refused before any data was tokenized


@pytest.mark.parametrize("lora", [True, False], ids=["lora-resumed-without", "full-resumed-with-lora"])
def test_a_checkpoint_without_run_settings_resumed_as_the_other_kind_is_one_sentence(lora_run, tmp_path, capsys, lora):
    """A checkpoint from before runs were recorded (no "run" in config.json): a LoRA one resumed without --lora_rank
    failed after loading, in the optimizer state (a traceback); its adapter_config.json says its rank and alpha."""
    from babyllama.cli import main

    run, lora_flags = tmp_path / "run", ["--lora_rank", "4", "--lora_alpha", "8"]
    args = ["sft", "--init", str(lora_run / "init"), "--data", str(lora_run / "sft.jsonl"), "--out_dir", str(run),
            "--save_every", "2", "--batch_size", "4", "--eval_every", "0", "--warmup_steps", "1", "--data_workers", "1"]
    assert main([*args, "--max_steps", "2", *(lora_flags if lora else [])]) == 0
    ckpt = run / "checkpoints" / "step_000002"
    config = json.loads((ckpt / "config.json").read_text())
    del config["run"]
    (ckpt / "config.json").write_text(json.dumps(config))
    shutil.rmtree(run / "sft_tokens")
    capsys.readouterr()
    assert main([*args, "--max_steps", "4", "--resume", *([] if lora else lora_flags)]) == 2
    trained = "lora_rank 4 (now 0), lora_alpha 8.0 (now 32.0)" if lora else "lora_rank 0 (now 4)"
    assert capsys.readouterr().err == (f"babyllama: error: {ckpt} was trained with {trained}; resume with the same "
                                       "settings or use a new out_dir.\n")
    assert not (run / "sft_tokens").exists()  # before the token cache is built


def test_target_shapes_and_adapter_params_are_the_built_model_s():
    from babyllama.lora import adapter_params, target_shapes

    cfg = tiny_config(vocab_size=600)
    linears = {n.rsplit(".", 1)[-1]: (m.in_features, m.out_features) for n, m in Transformer(cfg).named_modules()
               if n.rsplit(".", 1)[-1] in TARGETS}
    assert target_shapes(cfg) == linears == {"wqkv": (64, 192), "wo": (64, 64), "w13": (64, 352), "w2": (176, 64)}
    assert adapter_params(lora_config(4, 8, 0.0, ",".join(TARGETS)), cfg) == 8320  # as the built adapters count
    assert adapter_params(lora_config(3, 8, 0.0, "wo"), cfg) == 2 * 3 * 128


@pytest.mark.parametrize("flags, sentence", [
    (["--lora_rank", "65"], "lora_rank 65 is more than 64, the smaller side of target w13 (64 x 352), so the "
                            "adapter would not be low-rank; choose lora_rank 64 or less."),
    (["--lora_rank", "100000", "--lora_targets", "wo"], "lora_rank 100000 is more than 64, the smaller side of "
                                                        "target wo (64 x 64), so the adapter would not be low-rank; "
                                                        "choose lora_rank 64 or less."),
])
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_a_lora_rank_above_a_target_layer_s_smaller_side_is_refused(lora_run, tmp_path, flags, sentence, stage):
    """--lora_rank 100000 on the demo model allocated 19.5 GB and was killed: a rank above min(in, out) of a target
    layer is no low-rank adapter, and is refused before anything is allocated or tokenized."""
    r = run_cli(stage, "--init", lora_run / "init", "--data", lora_run / "sft.jsonl", "--out_dir", tmp_path / "o",
                "--max_steps", "1", *flags)
    assert (r.returncode, r.stderr) == (2, f"babyllama: error: {sentence}\n")
    assert not (tmp_path / "o").exists()


def test_the_memory_check_counts_the_adapters(lora_run, tmp_path, monkeypatch):
    """The frozen base needs its weights (4 bytes a parameter), the adapters their weights, gradients and AdamW's
    moments (16): a rank whose adapters do not fit is refused before anything is allocated, where the check of
    the base alone (16 bytes a parameter) passed."""
    from babyllama.lora import adapter_params

    cfg = tiny_config(vocab_size=600)
    adapters = adapter_params(lora_config(64, 8, 0.0, ",".join(TARGETS)), cfg)
    have = 16 * cfg.num_params + 1  # the base as if fully trained fits; with the adapters it does not
    assert 4 * cfg.num_params + 16 * adapters > have
    sysconf = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda k: {"SC_PAGE_SIZE": 1, "SC_PHYS_PAGES": have}.get(k) or sysconf(k))
    base = ["--init", str(lora_run / "init"), "--data", str(lora_run / "sft.jsonl"), "--out_dir", str(tmp_path),
            "--max_steps", "1"]
    with pytest.raises(UserError) as e:
        sft(load_config(None, [*base, "--lora_rank", "64"]))
    assert str(e.value) == (f"the model has {cfg.num_params:,} parameters and its LoRA adapters {adapters:,}: "
                            "training needs about 2.6 MiB for the weights and the adapters' gradients and AdamW, "
                            "more than the 2.1 MiB of this machine's memory; choose a smaller lora_rank or fewer "
                            "lora_targets.")
    assert not (tmp_path / "sft_tokens").exists()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", ["chat", "serve", "eval", "export", "export --adapter", "sft --init"])
def test_an_adapter_holding_nan_is_refused_wherever_it_loads(lora_run, tmp_path, monkeypatch, command):
    """One NaN in a lora_B tensor of adapter_model.safetensors: chat answered nothing, eval --qa scored 0 and export
    wrote 64 NaNs into the merged weights, each with exit code 0 and not a word."""
    import babyllama.serve

    monkeypatch.setattr(babyllama.serve, "build_app", lambda *a: pytest.fail("the model loaded: serve would serve it"))
    lora = tmp_path / "lora"
    shutil.copytree(lora_run / "run" / "final", lora)
    name = poison(lora / ADAPTER_FILE, part="lora_B")
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "很好很喜欢", "answer": "正面"}, ensure_ascii=False))
    out = tmp_path / "out"
    args = {"chat": ["chat", lora], "serve": ["serve", lora, "--port", free_port()],
            "eval": ["eval", lora, "--qa", tmp_path / "qa.jsonl", "--out_dir", out],
            "export": ["export", lora, "--format", "hf", "--out", out],
            "export --adapter": ["export", lora, "--format", "hf", "--adapter", "--out", out],
            "sft --init": ["sft", "--init", lora, "--data", lora_run / "sft.jsonl", "--out_dir", out, "--max_steps",
                           "1", "--data_workers", "1"]}[command]
    r = run_cli(*args, stdin="很好很喜欢\n")
    assert r.returncode == 2 and (r.stdout == "" or command == "sft --init")  # sft says its data first, loads after
    assert r.stderr.endswith(not_finite(lora / ADAPTER_FILE, name))
    assert not (out / "model.safetensors").exists() and not (out / "eval.json").exists()
    assert not (out / "checkpoints").exists()


def test_a_lora_run_resumed_from_an_adapter_holding_inf_is_refused(lora_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_run / "run", run)
    name = poison(run / "checkpoints" / "step_000008" / ADAPTER_FILE, float("inf"), part="lora_A")
    r = run_cli("sft", "--init", lora_run / "init", "--data", lora_run / "sft.jsonl", "--out_dir", run, "--max_steps",
                "10", "--batch_size", "8", "--lr", "1e-2", "--warmup_steps", "1", "--eval_every", "0",
                "--data_workers", "1", "--lora_rank", "4", "--lora_alpha", "8", "--resume")
    assert r.returncode == 2  # its only checkpoint: none to fall back to (test_checkpoint: a NaN one is skipped)
    assert r.stderr.startswith(f"babyllama: error: every checkpoint in {run / 'checkpoints'} is damaged (step_000008: ")
    assert f"its tensor {name} holds NaN or Inf" in r.stderr
    assert not (run / "checkpoints" / "step_000010").exists()


def lora_copy(lora_run, tmp_path, config=None, adapter=None):
    """A copy of lora_run's final/ at tmp_path/lora, its base at its absolute path; config(c) and adapter(a) edit its
    config.json and adapter_config.json (their JSON) in place. A base path that config changes is
    base_model_name_or_path too, unless adapter is given (rebase)."""
    lora = tmp_path / "lora"
    shutil.copytree(lora_run / "run" / "final", lora)
    for name, edit in (("config.json", config), ("adapter_config.json", adapter)):
        if edit is not None:
            data = json.loads((lora / name).read_text())
            edit(data)
            (lora / name).write_text(json.dumps(data))
    base = json.loads((lora / "config.json").read_text()).get("base")
    if adapter is None and isinstance(base, dict) and isinstance(base.get("path"), str):
        rebase(lora)
    return lora


def rebase(lora, **fields):
    """lora's config.json "base" with fields changed, and its adapter_config.json's base_model_name_or_path made its
    path: a checkpoint whose base is elsewhere as both files say (base_model_name_or_path, where it differs, wins)."""
    config = json.loads((lora / "config.json").read_text())
    config["base"].update(fields)
    (lora / "config.json").write_text(json.dumps(config))
    adapter = json.loads((lora / "adapter_config.json").read_text())
    adapter["base_model_name_or_path"] = config["base"]["path"]
    (lora / "adapter_config.json").write_text(json.dumps(adapter))


@pytest.mark.parametrize("edit, wanted", [
    (lambda b: "x", 'base must be an object (path, sha256, relative_path, stat), not "x"'),  # AttributeError
    (lambda b: [1], "base must be an object (path, sha256, relative_path, stat), not [1]"),
    (lambda b: {**b, "path": 5}, "base.path must be an absolute path, not 5"),  # TypeError
    (lambda b: {**b, "path": "."}, 'base.path must be an absolute path, not "."'),  # the working directory's
    (lambda b: {**b, "relative_path": 5}, "base.relative_path must be a path, not 5"),  # TypeError
    (lambda b: {**b, "path": "/work/\0x"}, 'base.path must be an absolute path, not "/work/\\u0000x"'),  # ValueError
    (lambda b: {**b, "relative_path": "a\0b"}, 'base.relative_path must be a path, not "a\\u0000b"'),
    (lambda b: {k: v for k, v in b.items() if k != "sha256"}, "base.sha256 must be a SHA-256 in hex, but it is "
                                                              "missing"),  # said to be another base
    (lambda b: {**b, "stat": "x"}, 'base.stat must be an object of size, mtime_ns and ctime_ns, whole numbers, not '
                                   '"x"'),
])
def test_a_damaged_base_in_config_json_is_one_sentence(lora_run, tmp_path, capsys, edit, wanted):
    """A LoRA checkpoint's config.json "base" edited by hand: a traceback (exit 1) or another base's sentence."""
    from babyllama.cli import main

    lora = lora_copy(lora_run, tmp_path, config=lambda c: c.update(base=edit(c["base"])))
    sentence = f"{lora / 'config.json'}: {wanted}; the checkpoint is damaged."
    with pytest.raises(UserError) as e:
        load_model(lora)
    assert str(e.value) == sentence
    assert main(["export", str(lora), "--out", str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == f"babyllama: error: {sentence}\n"


def test_a_base_path_too_long_to_look_up_is_said_not_there(lora_run, tmp_path):
    """A base path of 5,000 characters raised OSError (ENAMETOOLONG: File name too long) from its lookup."""
    lora = lora_copy(lora_run, tmp_path, config=lambda c: c["base"].update(path="/" + "a" * 5000,
                                                                             relative_path="b" * 5000))
    with pytest.raises(UserError, match=f"^the LoRA checkpoint {lora} needs its base model /a{{5000}}, which is not "
                                        "there"):
        load_model(lora)


@pytest.mark.parametrize("edit", [lambda c: c.pop("base"), lambda c: c.update(base=None), lambda c: c.update(base={})])
def test_a_lora_checkpoint_that_records_no_base_says_so(lora_run, tmp_path, edit):
    """It was said to need "its base model None, which is not there; restore it at that path"."""
    lora = lora_copy(lora_run, tmp_path, config=edit)
    with pytest.raises(UserError) as e:
        load_model(lora)
    assert str(e.value) == (f"the LoRA checkpoint {lora} cannot be loaded: its config.json records no base model (the "
                            "one its adapter was trained on); restore that file from a copy of the checkpoint.")


def test_a_base_that_is_there_but_no_checkpoint_is_said_to_be_what_it_is(lora_run, tmp_path):
    """A base path that is a file, a data file, a training run or the LoRA checkpoint itself, and an
    adapter_model.safetensors that is a folder, were each said to be missing."""
    run = tmp_path / "run"
    shutil.copytree(lora_run / "init", run / "final")
    (tmp_path / "file").write_text("x")

    def based_on(where):
        return lambda c: c.update(base={**c["base"], "path": str(where), "relative_path": None})

    for where, why in ((tmp_path / "file", f"checkpoint {tmp_path / 'file'} is a file, not a folder; pass a "
                                           "checkpoint's folder (a run's final/ or checkpoints/step_NNNNNN/)."),
                       (lora_run / "sft.jsonl", f"checkpoint {lora_run / 'sft.jsonl'} is a file, not a folder; pass a "
                                                "checkpoint's folder (a run's final/ or checkpoints/step_NNNNNN/)."),
                       (run, f"{run} is a training run, not a checkpoint; pass one of its checkpoints, e.g. "
                             f"{run / 'final'}."),
                       (tmp_path / "lora", f"{tmp_path / 'lora'} is the LoRA checkpoint itself; its config.json is "
                                           "damaged.")):
        lora = lora_copy(lora_run, tmp_path, config=based_on(where))
        with pytest.raises(UserError) as e:
            load_model(lora)
        assert str(e.value) == f"the base of the LoRA checkpoint {lora}: {why}"
        shutil.rmtree(lora)
    lora = lora_copy(lora_run, tmp_path)
    (lora / ADAPTER_FILE).unlink()
    (lora / ADAPTER_FILE).mkdir()
    with pytest.raises(UserError) as e:
        load_model(lora)
    assert str(e.value) == (f"checkpoint {lora}'s {ADAPTER_FILE} is a folder, not a file; restore the file from a "
                            "copy of the checkpoint.")


@pytest.mark.parametrize("field, value, wanted", [
    ("r", 2, "r is 2, but the adapters in {weights} have rank 4"),
    ("target_modules", ["wqkv", "wo"], "target_modules lists wqkv, wo, but {weights} holds adapters of wqkv, wo, "
                                       "w13, w2"),
])
def test_adapter_config_unlike_the_adapter_s_tensors_names_the_field(lora_run, tmp_path, capsys, field, value,
                                                                     wanted):
    """An r or target_modules that the tensors do not bear out was "does not fit the model it is loaded onto (other
    targets, rank or base shapes)": the field is named, in chat as in every load, before the base is read."""
    from babyllama.cli import main

    lora = lora_copy(lora_run, tmp_path, adapter=lambda a: a.update({field: value}))
    sentence = (f"{lora / 'adapter_config.json'}: {wanted.format(weights=lora / ADAPTER_FILE)}; the LoRA checkpoint "
                "is damaged.")
    assert main(["export", str(lora), "--out", str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == f"babyllama: error: {sentence}\n"
    with pytest.raises(UserError) as e:
        load_model(lora)
    assert str(e.value) == sentence


def test_transposed_adapter_tensors_are_said_not_to_fit_without_blaming_r(lora_run, tmp_path):
    """lora_A tensors stored as (in, r): their first sides are of several sizes, so the file is damaged, not r."""
    from safetensors.torch import load_file, save_file

    lora = lora_copy(lora_run, tmp_path)
    tensors = load_file(lora / ADAPTER_FILE)
    save_file({k: v.T.contiguous() if "lora_A" in k else v for k, v in tensors.items()}, lora / ADAPTER_FILE)
    with pytest.raises(UserError) as e:
        load_model(lora)
    assert str(e.value) == (f"{lora / ADAPTER_FILE} does not fit the model it is loaded onto (other targets, rank or "
                            "base shapes).")


def test_adapter_config_with_a_bom_or_unknown_keys_loads_without_peft_s_warning(lora_run, tmp_path, recwarn):
    """A UTF-8 byte-order mark was refused ("Unexpected UTF-8 BOM"); a key this peft does not know loaded with peft's
    raw UserWarning (its site-packages path): it is left out, as peft leaves it out."""
    lora = lora_copy(lora_run, tmp_path, adapter=lambda a: a.update(zzz_new_field=1))
    (lora / "adapter_config.json").write_bytes(b"\xef\xbb\xbf" + (lora / "adapter_config.json").read_bytes())
    with torch.no_grad():
        torch.testing.assert_close(load_model(lora)(IDS), load_model(lora_run / "run" / "final")(IDS), atol=0, rtol=0)
    assert [str(w.message) for w in recwarn if "peft" in w.filename] == []


def test_a_resume_checks_the_adapter_config_against_its_tensors(lora_run, tmp_path, capsys):
    """`--resume` from a step checkpoint whose adapter_config.json r was edited (its tensors of the run's rank)
    resumed silently, where chat refused it: it is damaged, skipped and set aside, as any other damage. A damaged
    "base" in its config.json was a traceback."""
    from babyllama.cli import main

    run = tmp_path / "run"
    args = ["sft", "--init", str(lora_run / "init"), "--data", str(lora_run / "sft.jsonl"), "--out_dir", str(run),
            "--save_every", "2", "--batch_size", "4", "--eval_every", "0", "--warmup_steps", "1", "--data_workers",
            "1", "--lora_rank", "4", "--lora_alpha", "8"]
    assert main([*args, "--max_steps", "4"]) == 0
    steps = [run / "checkpoints" / f"step_00000{i}" for i in (2, 4)]
    adapter = json.loads((steps[1] / "adapter_config.json").read_text())
    (steps[1] / "adapter_config.json").write_text(json.dumps({**adapter, "r": 2}))
    capsys.readouterr()
    assert main([*args, "--max_steps", "6", "--resume"]) == 0
    out = capsys.readouterr().out
    assert (f"note: step_000004 is damaged and skipped: {steps[1] / 'adapter_config.json'}: r is 2, but the adapters "
            f"in {steps[1] / ADAPTER_FILE} have rank 4; the LoRA checkpoint is damaged; resuming from step_000002"
            in out), out
    newest = run / "checkpoints" / "step_000006"
    config = json.loads((newest / "config.json").read_text())
    (newest / "config.json").write_text(json.dumps({**config, "base": "x"}))
    assert main([*args, "--max_steps", "8", "--resume"]) == 2
    assert capsys.readouterr().err == (f"babyllama: error: {newest / 'config.json'}: base must be an object (path, "
                                       'sha256, relative_path, stat), not "x"; the checkpoint is damaged.\n')


def test_lora_targets_with_an_empty_or_repeated_item_are_refused_and_a_toml_list_is_taken(lora_run, tmp_path):
    """`--lora_targets wqkv,,wo` dropped the empty item and `wo,wo` named one layer twice, silently; a TOML list was
    refused ("expects str"), where data takes a list."""
    base = ["--init", str(lora_run / "init"), "--data", str(lora_run / "sft.jsonl"), "--out_dir", str(tmp_path / "o"),
            "--max_steps", "1", "--lora_rank", "4"]
    for targets, sentence in (("wqkv,,wo", "lora_targets 'wqkv,,wo' has an empty item; separate the layers with one "
                                           "comma each, e.g. wqkv,wo."),
                              ("wqkv,wo,", "lora_targets 'wqkv,wo,' ends in a comma; remove the trailing comma "
                                           "(wqkv,wo)."),  # the README writes none: not taken silently, but said
                              (",wo", "lora_targets ',wo' has an empty item; separate the layers with one comma each, "
                                      "e.g. wqkv,wo."),
                              ("wo,wqkv,wo", "lora_targets 'wo,wqkv,wo' names wo twice; name each layer once.")):
        with pytest.raises(UserError) as e:
            sft(load_config(None, [*base, "--lora_targets", targets]))
        assert str(e.value) == sentence
    assert not (tmp_path / "o").exists()
    (tmp_path / "lora.toml").write_text('[train]\nlora_rank = 4\nlora_targets = ["wqkv", "wo"]\n')
    assert load_config(tmp_path / "lora.toml").train.lora_targets == "wqkv,wo"  # as the flag gives it
    (tmp_path / "lora.toml").write_text('[train]\nlora_rank = 4\nlora_targets = ["wqkv", "wqkv"]\n')
    with pytest.raises(UserError, match="^lora_targets 'wqkv,wqkv' names wqkv twice; name each layer once.$"):
        sft(load_config(tmp_path / "lora.toml", base[:-2]))


def test_loading_an_adapter_leaves_torchs_rng_as_it_was(lora_run):
    """DPO loads its reference (a LoRA init) at its first step, again after a resume: a draw from torch's RNG there
    changed every dropout mask after it."""
    before = torch.get_rng_state()
    load_model(lora_run / "run" / "final")
    assert torch.equal(torch.get_rng_state(), before)


def test_lora_checkpoints_that_are_each_others_base_are_said_to_loop(lora_run, tmp_path):
    """Two LoRA checkpoints whose config.json name each other as base recursed until RecursionError (load_model,
    tokenizer_dir) or looped for ever (check_init_weights, of sft --init)."""
    from babyllama.checkpoint import check_init_weights, tokenizer_dir, weights_sha256

    a, b = tmp_path / "a", tmp_path / "b"
    for x in (a, b):
        shutil.copytree(lora_run / "run" / "final", x, ignore=shutil.ignore_patterns("*tokenizer*"))
    sha = weights_sha256(a)  # b's adapter is the same file's copy
    for x, other in ((a, b), (b, a)):
        rebase(x, path=str(other), sha256=sha, relative_path=None, stat=None)
    sentence = (f"the LoRA checkpoints {a} -> {b} -> {a} are each other's base, a loop with no full model under it; "
                "restore their config.json from copies of the checkpoints.")
    for load in (load_model, tokenizer_dir, check_init_weights):
        with pytest.raises(UserError) as e:
            load(a)
        assert str(e.value) == sentence
    r = run_cli("chat", a, stdin="你好\n")
    assert (r.returncode, r.stderr.strip().splitlines()[-1]) == (2, f"babyllama: error: {sentence}")


def test_a_base_model_name_or_path_edited_to_a_moved_base_wins_with_a_note(lora_run, tmp_path, capsys):
    """A base moved and named anew in adapter_config.json, as peft's users do, was looked for at config.json's path
    alone ("not there"). Where the two differ base_model_name_or_path wins, as in peft, said in a note line."""
    old, moved = tmp_path / "init", tmp_path / "moved"
    lora = lora_copy(lora_run, tmp_path, config=lambda c: c["base"].update(path=str(old), relative_path=None),
                     adapter=lambda a: a.update(base_model_name_or_path=str(moved)))
    shutil.copytree(lora_run / "init", moved)
    with torch.no_grad():
        assert torch.equal(load_model(lora)(IDS)[0], load_model(lora_run / "run" / "final")(IDS)[0])
        load_model(lora)
    assert capsys.readouterr().out == (f"note: the LoRA checkpoint {lora} loads its base from {moved}, which its "
                                       f"adapter_config.json names (base_model_name_or_path), not from {old}, which "
                                       "its config.json records\n")  # once
    shutil.copytree(lora_run / "init", old)  # config.json's base there too: the edited one still wins
    save_checkpoint(moved, plain_model(seed=3, max_seq_len=64))
    with pytest.raises(UserError, match=f"^the base model {moved} is not the one the LoRA checkpoint {lora} was "
                                        "trained on"):
        load_model(lora)
    shutil.rmtree(moved)
    with pytest.raises(UserError) as e:
        load_model(lora)
    assert str(e.value) == (f"the LoRA checkpoint {lora} needs its base model {moved}, which its adapter_config.json "
                            f"names (base_model_name_or_path) and is not there; correct that path, or set it back to "
                            f"{old}.")
