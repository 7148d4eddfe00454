"""Checkpoints: exact round-trip, clear errors on damage and mismatch, no unpickling."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from babyllama.checkpoint import load_checkpoint, load_model, load_train_state, save_checkpoint
from babyllama.errors import UserError
from babyllama.model import Transformer
from tests.conftest import sharp_model, tiny_config


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
