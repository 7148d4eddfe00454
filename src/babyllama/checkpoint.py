"""Checkpoints: a directory a person can inspect, written atomically, read without unpickling.

    ckpt/
      model.safetensors    the weights (a tied output head is stored once, as tok_embeddings)
      config.json          {"model": ModelConfig, "tokenizer": {...}, plus whatever the trainer adds}
      tokenizer.json | tokenizer.model (+ babyllama_tokenizer.json)
      trainer_state.pt     optional: optimizer, step, RNG, data position (torch.load weights_only=True)

    save_checkpoint("runs/x/step_000100", model, tokenizer, train_state={...})
    model, tokenizer, config = load_checkpoint("runs/x/step_000100")

A training run keeps its step checkpoints in RUN/checkpoints/step_000100 ... (the newest
`keep_last`; `latest_checkpoint` finds where to resume) and the model to use next in RUN/final.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from babyllama.errors import UserError
from babyllama.model import ModelConfig, Transformer
from babyllama.tokenizer import Tokenizer, load_tokenizer

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "trainer_state.pt"


def step_checkpoint(run_dir: str | Path, step: int) -> Path:
    """Where a run keeps the checkpoint of a step: RUN/checkpoints/step_000100."""
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's newest step checkpoint, or None."""
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step_*"))
    return ckpts[-1] if ckpts else None


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Remove all but the newest keep_last step checkpoints of a run."""
    for old in sorted((Path(run_dir) / "checkpoints").glob("step_*"))[:-keep_last]:
        shutil.rmtree(old)


def model_tensors(model: Transformer, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """The state dict to store: every tensor once, contiguous, on the CPU."""
    sd = dict(model.state_dict() if state_dict is None else state_dict)
    if model.cfg.tie_embeddings:
        sd.pop("output.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def save_checkpoint(
    path: str | Path,
    model: Transformer,
    tokenizer: Tokenizer | None = None,
    train_state: dict | None = None,
    extra_config: dict | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint directory; a crash at any moment leaves the old one or the new one whole.

    tensors: the full state dict when the model itself is sharded (FSDP); default: model's.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if tensors is None:
        tensors = model_tensors(model)
    save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
    config = {"format": "babyllama", "version": 1, "model": model.cfg.to_dict(), **(extra_config or {})}
    if tokenizer is not None:
        tokenizer.save(tmp)
        config["tokenizer"] = {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size}
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    if train_state is not None:
        torch.save(train_state, tmp / STATE_FILE)
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if path.exists():  # swap: the old directory is removed only after the new one is in place
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
    _fsync(path.parent)
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist or is not a directory.")
    try:
        return json.loads((path / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is not a checkpoint: it has no {CONFIG_FILE}.") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path / CONFIG_FILE} is not valid JSON ({e}); the checkpoint is damaged.") from None


def pick_device(name: str | torch.device = "auto") -> torch.device:
    """auto | cpu | cuda | cuda:N | mps as a torch.device that this machine has (auto: cuda, else mps,
    else cpu). Raises UserError, in one sentence, for a device that is not there or not known."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available()
                            else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA GPU visible"
        raise UserError(f"--device {name}: this machine has {build}; use --device cpu or auto.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices, cuda:0 to "
                        f"cuda:{torch.cuda.device_count() - 1}.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS (Apple silicon, macOS 12.3+) is not available here; use cpu or auto.")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: babyllama runs on auto, cpu, cuda, cuda:N or mps.")
    return dev


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """The model of a checkpoint, after checking that its tensors match config.json (UserError for a
    device that is not there, see pick_device)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    device = pick_device(device)
    path = Path(path)
    cfg = ModelConfig.from_dict(read_config(path)["model"])
    try:
        tensors = load_file(str(path / MODEL_FILE), device=str(device))
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} has no {MODEL_FILE}.") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path / MODEL_FILE} cannot be read ({e}); it is damaged or was cut off.") from None
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model_tensors_shapes(model)
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        diff = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
        k = diff[0]
        raise UserError(
            f"{path / MODEL_FILE} does not match its config.json: tensor {k} is "
            f"{got.get(k, 'missing')}, the config needs {expected.get(k, 'none')} ({len(diff)} differ)."
        )
    model = model.to_empty(device=device)
    model.tie_weights()
    model.load_state_dict(tensors, strict=False)  # strict=False: a tied output.weight is not stored
    model.init_rope()
    return model.eval()


def model_tensors_shapes(model: Transformer) -> dict[str, tuple[int, ...]]:
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        shapes.pop("output.weight")
    return shapes


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, Tokenizer, dict]:
    """Model, tokenizer and config.json of a checkpoint; the tokenizer must be the one it was trained with."""
    config = read_config(path)
    model = load_model(path, device)
    tokenizer = load_tokenizer(path)
    check_tokenizer_fits(tokenizer, model.cfg, config.get("tokenizer"), where=str(path))
    return model, tokenizer, config


def check_tokenizer_fits(tokenizer: Tokenizer, cfg: ModelConfig, recorded: dict | None, where: str) -> None:
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model at {where} only {cfg.vocab_size}; "
            "use the tokenizer the model was trained with."
        )
    if recorded and recorded.get("fingerprint") not in (None, tokenizer.fingerprint):
        raise UserError(
            f"the tokenizer (fingerprint {tokenizer.fingerprint}) is not the one the model at {where} "
            f"was trained with ({recorded['fingerprint']})."
        )


def load_train_state(path: str | Path) -> dict | None:
    """The trainer state of a checkpoint, or None; tensors and plain data only, never code."""
    f = Path(path) / STATE_FILE
    if not f.is_file():
        return None
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for foreign objects, RuntimeError for cut-off files
        raise UserError(f"refusing {f}: it is not a plain trainer state ({type(e).__name__}).") from None
