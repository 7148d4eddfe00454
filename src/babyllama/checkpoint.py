"""Checkpoints: a directory a person can inspect, written atomically, read without unpickling.

    ckpt/
      model.safetensors    the weights (a tied output head is stored once, as tok_embeddings), or for LoRA:
      adapter_config.json + adapter_model.safetensors   peft's adapter; config.json's "base" names its base
      config.json          {"model": ModelConfig, "tokenizer": {...}, plus whatever the trainer adds}
      tokenizer.json | tokenizer.model (+ babyllama_tokenizer.json)
      trainer_state.pt     optional: optimizer, step, RNG, data position (torch.load weights_only=True)

    save_checkpoint("runs/x/step_000100", model, tokenizer, train_state={...})
    model, tokenizer, config = load_checkpoint("runs/x/step_000100")

A training run keeps its step checkpoints in RUN/checkpoints/step_000100 ... (the newest
`keep_last`, ordered by step number; `resumable_checkpoint` finds where to resume, the newest whole one, of finite
weights and trainer state, and a resume moves the damaged ones it skipped aside, `set_aside`, to
step_000100.damaged (.damaged.2 ... for a step damaged again), which pruning removes once it is older than every
checkpoint kept) and the model to use next in RUN/final. A writer killed at any moment leaves whole directories
and temporaries named .NAME.tmp-PID, .NAME.old-PID or .NAME.pruned-PID, which `remove_stale_temporaries` clears.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from babyllama.errors import UserError, agree, check_folder, discard, not_a_file, writing
from babyllama.lora import (
    ADAPTER_CONFIG,
    ADAPTER_FILE,
    adapter_config,
    check_adapter_shapes,
    is_adapter,
    load_adapter,
    merge_lora,
    save_adapter,
)
from babyllama.model import ModelConfig, Transformer
from babyllama.tokenizer import Tokenizer, load_tokenizer
from babyllama.weights_file import (
    FOUND_FINITE,
    check_finite,
    check_finite_file,
    file_sha256,
    held,
    read_safetensors,
    save_safetensors,
    save_torch,
    stat_key,
    unreadable,
)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "trainer_state.pt"
FORMAT_VERSION = 1  # config.json's "version": raise it when a change makes older code misread checkpoints


class NewerFormat(UserError):
    """A checkpoint written by a newer babyllama: not damaged, so never skipped as damaged."""


def step_checkpoint(run_dir: str | Path, step: int) -> Path:
    """Where a run keeps the checkpoint of a step: RUN/checkpoints/step_000100."""
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's step checkpoints, oldest first by step number (step_1000000 after step_999999)."""
    found = [(int(m[1]), p) for p in (Path(run_dir) / "checkpoints").glob("step_*")
             if (m := re.fullmatch(r"step_(\d+)", p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's newest step checkpoint, or None."""
    ckpts = step_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resumable_checkpoint(run_dir: str | Path) -> tuple[Path | None, dict | None, list[tuple[Path, str]]]:
    """The newest step checkpoint that is whole (config, weights' header and trainer state read back, its weights
    and trainer state finite: check_finite_file, load_train_state, as a diverged run's or a disk fault's NaN is no
    checkpoint to resume) and its
    trainer state (load_train_state's, its tensors memory-mapped: what the resume reads of it, read once), or None
    and None when there is none; and each newer one that is damaged, with why. Raises UserError when every one is
    damaged."""
    damaged = []
    for ckpt in reversed(step_checkpoints(run_dir)):
        try:
            check_whole(ckpt)
            state = load_train_state(ckpt, mmap=True)
            if state is None:
                raise UserError(f"{ckpt} has no {STATE_FILE}.")
            return ckpt, state, damaged
        except NewerFormat:
            raise
        except UserError as e:
            damaged.append((ckpt, str(e).rstrip(".")))
    if damaged:
        ckpt, why = damaged[0]
        raise UserError(f"every checkpoint in {Path(run_dir) / 'checkpoints'} is damaged ({ckpt.name}: {why}); "
                        "delete them to start again.")
    return None, None, damaged


def check_whole(ckpt: Path) -> None:
    """UserError unless the checkpoint at ckpt is whole: its config.json read and borne out by its weights' header
    (model_config), its weights finite (check_finite_file; a LoRA checkpoint's: its adapter's). NewerFormat, a
    UserError, for one a newer babyllama wrote."""
    model_config(ckpt)
    check_finite_file(_weights_file(ckpt))


def set_aside(ckpt: Path) -> Path:
    """Move a damaged step checkpoint out of the run's order (step_000031 -> step_000031.damaged, or .damaged.2,
    .damaged.3 ... when the step was damaged before: an earlier one set aside is evidence, never replaced), so that
    keep_last pruning neither counts nor keeps it in place of a whole one (it kept a damaged step 31 and deleted the
    step 30 that the run had resumed from); returns where it went."""
    aside, n = ckpt.with_name(f"{ckpt.name}.damaged"), 1
    while aside.exists() or aside.is_symlink():
        n += 1
        aside = ckpt.with_name(f"{ckpt.name}.damaged.{n}")
    ckpt.rename(aside)
    return aside


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Remove all but the newest keep_last step checkpoints of a run, and the damaged ones set aside (set_aside) of
    a step before the oldest kept, which pruning would have removed whole: each is renamed away, then deleted, so
    that a kill in the middle never leaves a half-deleted step_* directory."""
    ckpts = step_checkpoints(run_dir)
    oldest = int(ckpts[-keep_last].name.removeprefix("step_")) if len(ckpts) >= keep_last else 0
    damaged = [p for p in (Path(run_dir) / "checkpoints").glob("step_*.damaged*")
               if (m := re.fullmatch(r"step_(\d+)\.damaged(\.\d+)?", p.name)) and int(m[1]) < oldest]
    for old in [*ckpts[:-keep_last], *damaged]:
        doomed = old.parent / f".{old.name}.pruned-{os.getpid()}"
        old.rename(doomed)
        discard(doomed)  # what a failure leaves, remove_stale_temporaries clears


def remove_stale_temporaries(*folders: Path, name: str | None = None) -> list[str]:
    """Clear what killed writers left in folders (a run's RUN/ and RUN/checkpoints/, an export's folder): of NAME
    (every name, or name alone), .NAME.tmp-PID (being written) and .NAME.pruned-PID (being deleted), files or
    folders, are removed; .NAME.old-PID (the previous NAME, moved aside while the new one took its place) is put
    back when NAME is missing, else removed. Temporaries of live processes other than this one are left alone.
    Returns what was done, in words."""
    done = []
    for folder in folders:
        for tmp in sorted(folder.glob(".*-*")):
            m = re.fullmatch(r"\.(.+)\.(tmp|old|pruned)-(\d+)", tmp.name)
            if not m or (name is not None and m[1] != name) or process_alive(int(m[3])):
                continue
            if m[2] == "old" and not (folder / m[1]).exists():
                tmp.rename(folder / m[1])
                done.append(f"restored {folder / m[1]} from {tmp.name}")
            else:
                discard(tmp)
                done.append(f"removed {tmp}")
    return done


def process_alive(pid: int) -> bool:
    """Whether another process with this id is running (this one's own id may be a dead run's too)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    adapter=None,
) -> Path:
    """Write a checkpoint directory; a crash at any moment leaves the old one or the new one whole.

    tensors: the full state dict when the model itself is sharded (FSDP); default: model's.
    adapter: for LoRA, the LoraConfig: tensors are then the adapter's (lora.adapter_tensors), written as
    peft's files in place of model.safetensors, and extra_config["base"] = {"path", "sha256"} names the base
    (config.json adds where it is from path and its file's stat: base_record).
    Raises CannotWrite (its temporary removed) where the disk is full or the folder not writable.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with writing(path, tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if adapter is not None:
            save_adapter(tmp, adapter, tensors, extra_config["base"]["path"])
        else:
            save_safetensors(model_tensors(model) if tensors is None else tensors, tmp / MODEL_FILE)
        config = {"format": "babyllama", "version": FORMAT_VERSION, "model": model.cfg.to_dict(),
                  **(extra_config or {})}
        if adapter is not None:
            config["base"] = base_record(extra_config["base"], path)
        if tokenizer is not None:
            tokenizer.save(tmp)
            config["tokenizer"] = tokenizer.record()
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        if train_state is not None:
            save_torch(train_state, tmp / STATE_FILE)
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
    """A checkpoint's config.json: an object whose `model` (and `tokenizer`, if any) are objects, and
    whose format `version` (1 when absent) is one this code reads: NewerFormat for a newer one. UserError for a
    folder that is no checkpoint (a training run, check_not_a_run, or a Hugging Face model among them) or a
    damaged one."""
    from babyllama.data.sources import HF_MODEL, is_transformers_config, output_kind, own_output

    path = Path(path)
    check_folder(path, "checkpoint", "a checkpoint's folder (a run's final/ or checkpoints/step_NNNNNN/)")
    config, damaged = None, None
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except FileNotFoundError:
        pass
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        config, damaged = {}, e
    check_not_a_run(path, config)
    if config is None and (kind := output_kind(path) or own_output(path)) not in (None, "a checkpoint"):
        raise UserError(f"{path} is {kind}, not a checkpoint; pass a checkpoint's folder (a run's final/ or "
                        "checkpoints/step_NNNNNN/).")  # what it is, as a data command says it of a non-data folder
    if config is None:
        raise UserError(f"{path} is not a checkpoint: it has no {CONFIG_FILE}.")
    if damaged is not None:
        raise UserError(f"{path / CONFIG_FILE} is not valid JSON ({damaged}); the checkpoint is damaged.")
    if is_transformers_config(config):
        raise UserError(f"{path} is {HF_MODEL}, as `babyllama export --format hf` writes, not a babyllama "
                        "checkpoint; pass the checkpoint it was exported from (a run's final/ or "
                        "checkpoints/step_NNNNNN/), or load this one with transformers.")
    tokenizer = config.get("tokenizer") if isinstance(config, dict) else None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or not (
            tokenizer is None or isinstance(tokenizer, dict) and isinstance(tokenizer.get("fingerprint"), str)):
        raise UserError(f"{path / CONFIG_FILE} lacks its model or tokenizer settings; the checkpoint is damaged.")
    version = config.get("version", 1)
    if type(version) is not int or version < 1:  # true is no version
        raise UserError(f"{path / CONFIG_FILE} has version {version!r}, not a whole number from 1; "
                        "the checkpoint is damaged.")
    if version > FORMAT_VERSION:
        raise NewerFormat(f"checkpoint {path} has format version {version}, newer than the version {FORMAT_VERSION} "
                          "this babyllama reads; upgrade babyllama to load it.")
    return config


def check_not_a_run(path: Path, config) -> None:
    """UserError when path, passed as a checkpoint, is a training run's folder (its config.json is the run's, or
    it holds final/ or checkpoints/), whose run config has the model's settings but no weights or tokenizer, or
    the checkpoints/ folder of one, or a folder of runs (the demo's). The sentence names a checkpoint of the run:
    final/, else the newest step; of a folder of runs, the newest final/. config: path's config.json as read_config
    read it (None: there is none)."""
    from babyllama.data.sources import is_run_settings

    if path.name == "checkpoints" and (steps := step_checkpoints(path.parent)):
        raise UserError(f"{path} holds a run's step checkpoints, not one; pass one of them, e.g. {steps[-1]}.")
    if not (is_run_settings(config) or (path / "final").is_dir() or (path / "checkpoints").is_dir()):
        if config is None and (finals := sorted((f for f in path.glob("*/final") if f.is_dir()),
                                                key=lambda f: f.stat().st_mtime)):  # the demo's, any folder of runs
            raise UserError(f"{path} holds training runs, not a checkpoint; pass one of their checkpoints, e.g. "
                            f"{finals[-1]} (the newest).")
        return
    example = path / "final" if (path / "final").is_dir() else latest_checkpoint(path)
    if example is None:
        raise UserError(f"{path} is a training run, not a checkpoint, and has saved none yet; pass a checkpoint "
                        "(a run's final/ or checkpoints/step_NNNNNN/).")
    raise UserError(f"{path} is a training run, not a checkpoint; pass one of its checkpoints, e.g. {example}.")


def model_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint, every value checked (ModelConfig), and checked against the
    names and shapes of the tensors in model.safetensors, read from the file's header: a config that
    the weights do not bear out stops before anything large is allocated. Raises UserError."""
    path = Path(path)
    settings = read_config(path)["model"]
    try:
        cfg = ModelConfig.from_dict(settings)
    except UserError as e:
        raise UserError(f"{path / CONFIG_FILE}: {e}") from None
    if is_adapter(path):  # LoRA: adapter_config.json's fields checked, and borne out by the adapter's tensors'
        check_adapter_shapes(adapter_config(path), _stored_shapes(path, ADAPTER_FILE), path)  # names and ranks;
        return cfg  # their base's shapes are checked on loading them onto it
    shapes = _stored_shapes(path)
    layers = {k.split(".")[1] for k in shapes if k.startswith("layers.")}
    embedding = shapes.get("tok_embeddings.weight")
    if len(layers) != cfg.n_layers or embedding != (cfg.vocab_size, cfg.dim):
        raise UserError(f"{path / MODEL_FILE} does not match its config.json: it holds {len(layers)} "
                        f"{agree(len(layers), 'layer', 'layers')} and an embedding of {embedding}, the config needs "
                        f"{cfg.n_layers} and {(cfg.vocab_size, cfg.dim)}.")
    with torch.device("meta"):  # cheap now: no more layers than the file holds
        expected = model_tensors_shapes(Transformer(cfg))
    if shapes != expected:
        diff = sorted(k for k in expected.keys() | shapes.keys() if expected.get(k) != shapes.get(k))
        raise UserError(f"{path / MODEL_FILE} does not match its config.json: tensor {diff[0]} is "
                        f"{shapes.get(diff[0], 'missing')}, the config needs {expected.get(diff[0], 'none')} "
                        f"({len(diff)} differ).")
    return cfg


def _stored_shapes(path: Path, name: str = MODEL_FILE) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the tensors in path/model.safetensors (or another file), from its header alone."""
    from safetensors import SafetensorError, safe_open

    if not (path / name).is_file():
        raise no_weights(path, name)
    try:
        with safe_open(str(path / name), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise unreadable(path / name, e) from None


def model_name(path: str | Path) -> str:
    """The name of the model in a checkpoint: its run's folder and its own, "sft/final", as serve answers it
    (/v1/models) and export names it (GGUF's general.name); "final" alone is every run's."""
    path = Path(path).resolve()
    return f"{path.parent.name}/{path.name}"


def pick_device(name: str | torch.device = "auto") -> torch.device:
    """auto | cpu | cuda | cuda:N | mps as a torch.device that this machine has (auto: cuda, else mps,
    else cpu); cpu:N, which torch accepts, is cpu (safetensors refuses "cpu:0"). Raises UserError, in one sentence,
    for a device that is not there or not known."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available()
                            else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cpu":
        return torch.device("cpu")
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


def load_model(path: str | Path, device: str | torch.device = "cpu", cfg: ModelConfig | None = None) -> Transformer:
    """The model of a checkpoint, after checking config.json and that the tensors match it
    (model_config, or cfg: what it returned for path when the caller checked it already; UserError
    for a device that is not there, see pick_device, and for weights that cannot be read or are not finite,
    see read_safetensors)."""
    device = pick_device(device)
    path = Path(path)
    if is_adapter(path):
        return load_lora(path, device)
    cfg = cfg or model_config(path)
    tensors = read_safetensors(path / MODEL_FILE, str(device))
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device)
    model.tie_weights()
    model.load_state_dict(tensors, strict=False)  # strict=False: a tied output.weight is not stored
    model.init_rope()
    return model.eval()


def load_lora(path: Path, device: torch.device) -> Transformer:
    """A LoRA checkpoint's model: its base (a LoRA checkpoint too, perhaps: lora_chain) with the adapters merged in;
    each adapter_config.json checked against its tensors' header before its base is looked for (model_config), as a
    full checkpoint's. Raises UserError as lora_chain."""
    chain = []
    for where in lora_chain(path):
        if is_adapter(where):
            model_config(where)
        chain.append(where)
    model = load_model(chain[-1], device)
    for adapter in reversed(chain[:-1]):
        model = merge_lora(load_adapter(model, adapter))
    return model.eval()


def lora_chain(path: str | Path) -> Iterator[Path]:
    """path, then while the last is a LoRA checkpoint its base (lora_base), each as it is found: a full checkpoint
    last. Raises UserError as lora_base, and naming the loop where a base is a LoRA checkpoint of the chain already
    (two whose config.json name each other: it recursed until RecursionError)."""
    chain = [Path(path)]
    yield chain[0]
    while is_adapter(chain[-1]):
        base = lora_base(chain[-1])
        seen = [i for i, p in enumerate(chain) if _exists(p) and os.path.samefile(p, base)]
        if seen:
            loop = " -> ".join(map(str, [*chain[seen[0]:], base]))
            raise UserError(f"the LoRA checkpoints {loop} are each other's base, a loop with no full model under it; "
                            "restore their config.json from copies of the checkpoints.")
        chain.append(base)
        yield base


def base_record(base: dict, adapter_dir: Path) -> dict:
    """config.json's "base" of a LoRA checkpoint written to adapter_dir: the base's absolute path and the
    SHA-256 of its weights (as given), its path relative to adapter_dir (so that a run folder moved with its
    base, or copied to another machine, still finds it) and, when the weights still hash to that SHA-256,
    their file's size, mtime and ctime: a load that finds them unchanged need not hash the base again."""
    record = {"path": base["path"], "sha256": base["sha256"],
              "relative_path": os.path.relpath(base["path"], adapter_dir.resolve())}
    sha256, stat = _hashed(base["path"])
    return record | ({"stat": stat} if sha256 == base["sha256"] else {})


def lora_base(path: str | Path) -> Path:
    """The base checkpoint that a LoRA checkpoint's config.json names (recorded_base): at its absolute path, else at
    its path relative to the LoRA checkpoint (both moved together). Its weights are hashed unless their file's stat
    (size, mtime, ctime) is the one recorded. Raises UserError when config.json names none or is damaged there, when
    the base is missing, is no checkpoint (a file, a training run: said as read_config says it, with the LoRA
    checkpoint named) or is not the model the adapter was trained on."""
    path = Path(path)
    base = recorded_base(read_config(path), "base", path)
    if base is None:
        raise UserError(f"the LoRA checkpoint {path} cannot be loaded: its {CONFIG_FILE} records no base model (the "
                        "one its adapter was trained on); restore that file from a copy of the checkpoint.")
    places = [Path(base["path"])]
    if base.get("relative_path"):
        places.append((path.resolve() / base["relative_path"]).resolve())
    if edited := _edited_base(path, base["path"]):
        places = [edited]
    there = [p for p in dict.fromkeys(places) if _exists(p)]
    if not there and edited:
        raise UserError(f"the LoRA checkpoint {path} needs its base model {edited}, which its {ADAPTER_CONFIG} names "
                        f"(base_model_name_or_path) and is not there; correct that path, or set it back to "
                        f"{base['path']}.")
    if not there:
        beside = f" (nor at {places[1]})" if len(places) > 1 and places[1] != places[0] else ""
        raise UserError(f"the LoRA checkpoint {path} needs its base model {base['path']}, which is not there"
                        f"{beside}; restore it at that path.")
    changed, wrong = [], []
    for where in there:
        try:
            if where.resolve() == path.resolve():
                raise UserError(f"{where} is the LoRA checkpoint itself; its {CONFIG_FILE} is damaged.")
            read_config(where)  # a file, a training run, a folder of no checkpoint: said so, not "missing"
            if is_base(base, where):
                return where
            changed.append(where)
        except NewerFormat:
            raise
        except UserError as e:
            wrong.append(e)
    if not changed:
        raise UserError(f"the base of the LoRA checkpoint {path}: {wrong[0]}")
    raise UserError(f"the base model {changed[-1]} is not the one the LoRA checkpoint {path} was trained on "
                    "(its weights changed); restore that base.")


_SAID_EDITED: set[tuple[str, str]] = set()  # (LoRA checkpoint, base) whose note _edited_base printed


def _edited_base(path: Path, recorded: str) -> Path | None:
    """The base that path's adapter_config.json names (base_model_name_or_path, as peft reads it: relative to the
    working folder) where a user edited it to differ from config.json's recorded one (to point at a moved base): it
    wins, as it does in peft, said once in a note line. None where it is the same, absent or unreadable (model_config
    says why)."""
    try:
        named = json.loads((path / ADAPTER_CONFIG).read_bytes().decode("utf-8-sig")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(named, str) or not named or "\0" in named or Path(named) == Path(recorded):
        return None
    edited = Path(named).absolute()
    if (str(path), named) not in _SAID_EDITED:
        _SAID_EDITED.add((str(path), named))
        print(f"note: the LoRA checkpoint {path} loads its base from {edited}, which its {ADAPTER_CONFIG} names "
              f"(base_model_name_or_path), not from {recorded}, which its {CONFIG_FILE} records")
    return edited


def _exists(path: Path) -> bool:
    """path.exists(), False for a path the system cannot look up (a name over its length limit: ENAMETOOLONG)."""
    try:
        return path.exists()
    except OSError:
        return False


RECORD_FIELDS = {  # a model's record in config.json (base_record's: a LoRA run's base, a DPO run's reference)
    "path": (lambda v: isinstance(v, str) and os.path.isabs(v) and "\0" not in v, "an absolute path"),  # base_record's
    "sha256": (lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v), "a SHA-256 in hex"),
    "relative_path": (lambda v: v is None or isinstance(v, str) and v != "" and "\0" not in v, "a path"),  # null: none
    "stat": (lambda v: v is None or isinstance(v, dict) and set(v) == {"size", "mtime_ns", "ctime_ns"} and all(
        type(x) is int for x in v.values()), "an object of size, mtime_ns and ctime_ns, whole numbers"),
}


def recorded_base(config: dict, key: str, path: Path) -> dict | None:
    """config.json's record of a model (key "base": a LoRA checkpoint's base, "reference": a DPO run's), checked
    field by field (RECORD_FIELDS), or None when it records none (no key, null or {}). path: the checkpoint.
    Raises UserError naming the field of a record edited by hand or damaged: where to look and what to compare
    cannot be read from it (it raised AttributeError and TypeError)."""
    record = config.get(key)
    if record is None or record == {}:
        return None
    f = path / CONFIG_FILE
    if not isinstance(record, dict):
        raise UserError(f"{f}: {key} must be an object ({', '.join(RECORD_FIELDS)}), not "
                        f"{json.dumps(record, ensure_ascii=False)}; the checkpoint is damaged.")
    for name, (ok, wanted) in RECORD_FIELDS.items():
        if not ok(record.get(name)):
            got = f"not {json.dumps(record[name], ensure_ascii=False)}" if name in record else "but it is missing"
            raise UserError(f"{f}: {key}.{name} must be {wanted}, {got}; the checkpoint is damaged.")
    return record


def is_base(base: dict, path: str | Path) -> bool:
    """Whether the checkpoint at path holds the weights that a LoRA checkpoint's config.json "base" (base_record's)
    names: their file has the stat recorded, or else hashes to the SHA-256 recorded. Raises UserError when path
    has no weights file."""
    return base.get("stat") == _stat(_weights_file(path).stat()) or weights_sha256(path) == base.get("sha256")


def check_init_weights(path: str | Path) -> None:
    """What loading the checkpoint at path reads, checked without loading the model: its weights finite
    (check_finite_file; a full checkpoint's, a LoRA checkpoint's adapter), and for a LoRA checkpoint its base, there
    and unchanged (lora_base), its config borne out by its weights (model_config), its weights finite, and so on down
    a chain of LoRA checkpoints. A run checks its --init so before it builds its data (minutes). Raises UserError."""
    check_finite_file(_weights_file(path))
    for base in list(lora_chain(path))[1:]:
        model_config(base)
        check_finite_file(_weights_file(base))


def weights_sha256(path: str | Path) -> str:
    """SHA-256 of a checkpoint's weights file (its adapter's, for LoRA): what a LoRA checkpoint's base must
    match. A process hashes a file once while its stat (device, inode, size, mtime, ctime) stays the same."""
    return _hashed(path)[0]


_HASHED: dict[tuple, str] = {}  # stat_key (device, inode, size, mtime_ns, ctime_ns) -> the file's SHA-256


def _hashed(path: str | Path) -> tuple[str, dict]:
    """(SHA-256, stat) of a checkpoint's weights file; the stat is the one of the file hashed (held)."""
    with held(_weights_file(path)) as (st, name):
        if (key := stat_key(st)) not in _HASHED:
            _HASHED[key] = file_sha256(name)
    return _HASHED[key], _stat(st)


def _stat(st: os.stat_result) -> dict:
    """What base_record records of a weights file's stat; the ctime changes with any write to the file, even
    one that puts its mtime back, and with a copy or a move."""
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def _weights_file(path: str | Path) -> Path:
    f = Path(path) / (ADAPTER_FILE if is_adapter(path) else MODEL_FILE)
    if not f.is_file():
        raise no_weights(Path(path), f.name)
    return f


def no_weights(path: Path, name: str) -> UserError:
    """The UserError for a checkpoint at path without its weights file `name`. One without model.safetensors that
    is a LoRA checkpoint but for its adapter_config.json (its adapter_model.safetensors is there, or its config.json
    names a base) is said to lack that: "has no model.safetensors" sent its owner looking for the wrong file."""
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        config = None
    named = isinstance(config, dict) and "base" in config
    for f in (path / name, path / ADAPTER_CONFIG):  # there, but a folder: not missing
        if f.exists() and not f.is_file():
            return UserError(f"checkpoint {path}'s {f.name} {not_a_file(f)}; restore the file from a copy of the "
                             "checkpoint.")
    if name != MODEL_FILE or not ((path / ADAPTER_FILE).is_file() or named):
        return UserError(f"checkpoint {path} has no {name}.")
    if (path / ADAPTER_FILE).is_file():
        sign, missing, it = f"it has {ADAPTER_FILE}", f"no {ADAPTER_CONFIG}", "it"
    else:
        sign, missing, it = f"its {CONFIG_FILE} names a base", f"neither {ADAPTER_CONFIG} nor {ADAPTER_FILE}", "them"
    return UserError(f"checkpoint {path} is a LoRA checkpoint ({sign}) but has {missing}; restore {it} from a copy "
                     "of the checkpoint.")


def model_tensors_shapes(model: Transformer) -> dict[str, tuple[int, ...]]:
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        shapes.pop("output.weight")
    return shapes


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, Tokenizer, dict]:
    """Model, tokenizer (tokenizer_dir's) and config.json of a checkpoint; the tokenizer must be the one it
    was trained with. Everything is checked before the weights are read (checked_tokenizer)."""
    tokenizer, cfg, config = checked_tokenizer(path)
    return load_model(path, device, cfg), tokenizer, config


def checked_tokenizer(path: str | Path) -> tuple[Tokenizer, ModelConfig, dict]:
    """Tokenizer (tokenizer_dir's), ModelConfig (model_config's) and config.json of a checkpoint, or of a LoRA
    checkpoint (its own tokenizer files, if it has them), without reading the weights. Raises UserError when the
    tokenizer is not the one the checkpoint records (check_tokenizer_fits) or does not load."""
    config = read_config(path)
    source = tokenizer_dir(path)
    tokenizer = load_tokenizer(source, remedy="copy into it the tokenizer that the model was trained with")
    cfg = model_config(path)
    check_tokenizer_fits(tokenizer, cfg, config.get("tokenizer"), str(path), str(source))
    return tokenizer, cfg, config


def tokenizer_dir(path: str | Path) -> Path:
    """Where a checkpoint's tokenizer is: in it, or for a LoRA checkpoint without one in its base (lora_base,
    down a chain of them), which holds the same one (a LoRA run trains with its base's tokenizer:
    stages.checked_run), as export --adapter exports the base's. Raises UserError as lora_base."""
    return next(p for p in lora_chain(path)
                if not is_adapter(p) or any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model")))


def check_tokenizer_fits(tokenizer: Tokenizer, cfg: ModelConfig, recorded: dict | None, where: str,
                         source: str = "") -> None:
    """UserError when the tokenizer (loaded from `source`) has more ids than the model at `where`, or is not
    the one that model's config.json records (`recorded`: fingerprint and special ids, Tokenizer.differences)."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model at {where} only {cfg.vocab_size}; "
            "use the tokenizer the model was trained with."
        )
    differ = tokenizer.differences(recorded)
    if differ:
        raise UserError(f"the tokenizer {source + ' ' if source else ''}({differ[0]}) is not the one the model at "
                        f"{where} was trained with ({differ[1]}).")


def load_train_state(path: str | Path, mmap: bool = False) -> dict | None:
    """The trainer state of a checkpoint, or None; tensors and plain data only, never code.
    mmap: map the tensors instead of reading them (to check that the file is whole). Raises UserError where the file
    cannot be read, is no trainer state, or a floating-point tensor in it (optimizer moments, the weight average)
    holds NaN or Inf (check_finite, the weights' rule and memo): a resume from moments holding one NaN made every
    weight NaN at its first step and stopped at its next save, the damaged checkpoint still the newest."""
    f = Path(path) / STATE_FILE
    if not f.is_file():
        return None
    try:
        with held(f) as (st, name):
            key, state = stat_key(st), torch.load(name, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # objects other than tensors and plain data
        raise UserError(f"refusing {f}: it is not a plain trainer state ({type(e).__name__}).") from None
    except Exception as e:  # RuntimeError for a cut-off file, and whatever else damage brings
        raise UserError(f"{f} cannot be read ({type(e).__name__}); it is damaged or was cut off.") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise UserError(f"{f} is not a trainer state (no step); it is damaged.")
    if key not in FOUND_FINITE:
        check_finite(f, key, state_tensors(state))
    return state


def state_tensors(state, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of each tensor in a trainer state's nested dicts and lists, named by its path of keys joined by
    dots: optimizer.state.layers.0.attention.wq.weight.exp_avg."""
    if isinstance(state, torch.Tensor):
        yield prefix, state
    elif isinstance(state, dict | list | tuple):
        for k, v in state.items() if isinstance(state, dict) else enumerate(state):
            yield from state_tensors(v, f"{prefix}.{k}" if prefix else str(k))
