"""Training settings: one dataclass holds every default; a TOML file and `--key value` flags override it.

    cfg = load_config("configs/demo.toml", ["--lr", "1e-3", "--model.dim", "128"])
    cfg.model        # ModelConfig, from a preset plus the [model] table
    cfg.train        # TrainConfig

A TOML file has a [model] table (`preset = "demo"` and any ModelConfig field) and a [train]
table (any TrainConfig field). Flags: `--lr 1e-3` or `--train.lr 1e-3` for training,
`--model.dim 128` for the model.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import get_args, get_type_hints

from babyllama.errors import UserError, agree
from babyllama.model import ModelConfig, preset
from babyllama.sampling import DEVICE
from babyllama.settings import (
    TABLES,
    TomlFloat,
    check_char_limits,
    check_fraction,
    parse_overrides,
    read_toml,
    stray_keys,
)

log = logging.getLogger(__name__)

DTYPES = ("auto", "fp32", "bf16", "fp16")
AT_LEAST_ONE = ("batch_size", "grad_accum", "log_every", "eval_batches", "keep_last", "max_bad_steps")
OFF_AT_ZERO = {  # settings where 0 means: ...
    "max_steps": "the length comes from tokens or epochs", "tokens": "the length comes from epochs",
    "warmup_steps": "no warmup", "weight_decay": "no decay", "grad_clip": "no clipping",
    "eval_every": "evaluate only at the end", "save_every": "checkpoint only at the end or on a signal",
    "data_workers": "one per CPU core", "min_prompt_chars": "no limit", "max_prompt_chars": "no limit",
    "min_answer_chars": "no limit", "max_answer_chars": "no limit",
}
EMPTY_MEANS = {  # settings whose empty default is worked out when the run starts: what it stands for, by stage
    "data": dict.fromkeys(("pretrain", "sft", "dpo"), "none: pass --data"),
    "out_dir": {"pretrain": "runs/pretrain, or beside the --init run: runs/x/final -> runs/x-pretrain",
                "sft": "beside the --init run: runs/x/final -> runs/x-sft",
                "dpo": "beside the --init run: runs/x/final -> runs/x-dpo"},
    "tokenizer": {"pretrain": "the one saved with the data", "sft": "the one saved with --init",
                  "dpo": "the one saved with --init"},
    "init": {"pretrain": "none: random weights", "sft": "none: pass --init, the model to fine-tune",
             "dpo": "none: pass --init, the model to tune and the reference"},
    "sft_cache": {"sft": "OUT_DIR/sft_tokens", "dpo": "OUT_DIR/dpo_tokens"},
}
LORA_SETTINGS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")  # the rest are read only with lora_rank
ONE_ROW_EACH = "DPO scores each answer in a row of its own"
STAGE_SETTINGS = {  # settings that only some stages read: (their readers, {a stage that refuses them: why})
    "doc_mask": (("pretrain",), {"sft": "SFT keeps samples apart with pack", "dpo": ONE_ROW_EACH}),
    "pack": (("sft",), {"pretrain": "pretraining windows are always full; doc_mask keeps documents apart",
                        "dpo": ONE_ROW_EACH}),
    **{name: (("sft", "dpo"), {"pretrain": "LoRA adapts a trained model; pretraining trains every weight"})
       for name in LORA_SETTINGS},
    **{name: (("dpo",), {}) for name in ("beta", "label_smoothing", "rpo_alpha", "precompute_ref_log_probs")},
    **{name: (("sft", "dpo"), {"pretrain": "pretraining reads the token shards that pretokenize split and wrote"})
       for name in ("val_fraction", "sft_cache", "data_workers", "min_prompt_chars", "max_prompt_chars",
                    "min_answer_chars", "max_answer_chars")},  # the token cache's
}
STAGE_NAMES = {"pretrain": "pretraining", "sft": "SFT", "dpo": "DPO"}
DEFAULT_PRESET = "demo"  # the model without a preset setting; --model.key values override the preset's
MODEL_NONE_MEANS = {  # model settings whose None default is worked out from the others
    "n_kv_heads": "as many as n_heads", "hidden_dim": "LLaMA's 2/3 * 4 * dim, rounded up to multiple_of",
}
INIT_MODEL_SETTINGS = ("dropout",)  # what a run from --init can change: they leave the weights' shapes alone
FRACTIONS = ("beta1", "beta2", "average_last", "val_fraction")  # in [0, 1); average_last 0: off
MAX_LR = 10.0  # above it no optimiser here trains; it catches 1e30 and a misplaced exponent
MAX_DDP_TIMEOUT = 10**9  # seconds (~32 years): a larger timedelta overflows
BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
FLAG_BOOLS = "true or false (or yes/no, on/off, 1/0)"  # a bool flag's words; TOML writes true or false
WHOLE = re.compile(r"[+-]?[0-9][0-9_]*([eE]\+?[0-9]+)?")  # an integer's text: 1000, 1_000, 1e3; not 2.0 nor 1e-3


@dataclass
class TrainConfig:
    data: str | list[str] = ""  # pretraining: a pretokenized directory; SFT: instruction/chat files
    out_dir: str = ""  # the empty defaults: see EMPTY_MEANS
    tokenizer: str = ""
    init: str = ""  # a checkpoint to start from (sft and dpo need one)
    # how long: max_steps wins, then tokens, then epochs
    max_steps: int = 0
    tokens: int = 0  # positions trained on, padding not counted, as the logged tokens count them
    epochs: float = 1.0
    # batch: global batch = batch_size * grad_accum * processes samples of max_seq_len + 1 tokens
    batch_size: int = 16
    grad_accum: int = 1
    # optimiser and schedule (the recipe's): linear warmup, cosine decay to min_lr
    lr: float = 3e-4
    min_lr: float = 1e-5
    warmup_steps: int = 1000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    optimizer: str = "adamw"  # or "muon": Muon for the blocks' matrices, AdamW for the rest (torch >= 2.9)
    average_last: float = 0.0  # final/ holds the mean of the weights over this last fraction of steps; 0: off
    # numerics and speed
    device: str = DEVICE
    dtype: str = "auto"  # auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU
    compile: bool = False
    fsdp: bool = False
    activation_checkpointing: bool = False  # recompute each block in the backward: less memory, ~1/3 more compute
    doc_mask: bool = False  # pretraining: attention stays within documents (an <eos> starts the next one)
    # bookkeeping
    seed: int = 1337
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20  # validation rows: this many global batches (batch_size x grad_accum x processes)
    save_every: int = 500
    keep_last: int = 3
    max_bad_steps: int = 5  # this many non-finite losses in a row stop the run
    ddp_timeout: int = 1800  # seconds a collective waits for the other processes before the run stops
    # SFT data (lengths in characters, 0: no limit; the recipe used 10 / 256 / 5 / 256)
    val_fraction: float = 0.02
    pack: bool = False
    sft_cache: str = ""  # the token cache (data/sft_tokens.py)
    data_workers: int = 0  # processes that build it, at most one per CPU core; 0: one per core
    min_prompt_chars: int = 0
    max_prompt_chars: int = 0
    min_answer_chars: int = 0
    max_answer_chars: int = 0
    # LoRA with peft (sft, dpo): rank 0 trains every weight; else adapters on lora_targets, the init frozen
    lora_rank: int = 0
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: str | list[str] = "wqkv,wo,w13,w2"  # comma-separated (or a TOML list), of the blocks' linear layers
    # DPO (Rafailov et al., 2023): the sigmoid loss; the reference is the init, or its log-probs computed once
    beta: float = 0.1
    label_smoothing: float = 0.0  # the chance that a pair's preference is flipped (conservative DPO), < 0.5
    precompute_ref_log_probs: bool = False
    rpo_alpha: float = 0.0  # weight of the chosen answers' NLL added to the DPO loss (RPO; TRL loss_type sigmoid+sft)

    def __post_init__(self) -> None:
        """Every setting in its range, before anything runs; each mistake is one sentence. Every float setting is
        checked for finiteness here, once (check_finite), so the range checks below need not say it. A TOML list of
        lora_targets is kept as the comma-separated text a flag gives (its items are checked by lora.lora_config)."""
        if isinstance(self.lora_targets, list):
            self.lora_targets = ",".join(self.lora_targets)
        check_finite(self)
        for name in AT_LEAST_ONE:
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name, zero in OFF_AT_ZERO.items():
            value = getattr(self, name)
            if value < 0:
                raise UserError(f"{name} must be 0 ({zero}) or more, got {value}.")
        for name in FRACTIONS:
            check_fraction(getattr(self, name), name)
        if self.epochs <= 0:
            raise UserError(f"epochs must be more than 0, got {self.epochs}.")
        if not 0 < self.lr <= MAX_LR:
            raise UserError(f"lr must be in (0, {MAX_LR:g}], got {self.lr}.")
        if not 0 <= self.min_lr <= self.lr:
            raise UserError(f"min_lr must be in [0, lr = {self.lr}], got {self.min_lr}.")
        if self.lr * self.weight_decay >= 1:
            raise UserError(f"lr * weight_decay must be below 1 (each step multiplies the weights by 1 - lr * "
                            f"weight_decay), got {self.lr} * {self.weight_decay}.")
        if not 1 <= self.ddp_timeout <= MAX_DDP_TIMEOUT:
            raise UserError(f"ddp_timeout must be in [1, {MAX_DDP_TIMEOUT:,}] seconds, got {self.ddp_timeout}.")
        if not 0 <= self.seed < 2**63:
            raise UserError(f"seed must be in [0, 2**63), got {self.seed}.")
        check_char_limits(lambda name: getattr(self, name))
        if self.optimizer not in ("adamw", "muon"):
            raise UserError(f"optimizer must be adamw or muon, got {self.optimizer!r}.")
        if self.dtype not in DTYPES:
            raise UserError(f"dtype must be {', '.join(DTYPES[:-1])} or {DTYPES[-1]}, got {self.dtype!r}.")
        self.check_fsdp_conflicts()
        if self.beta <= 0:
            raise UserError(f"beta must be more than 0, got {self.beta}.")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}.")
        if self.rpo_alpha < 0:
            raise UserError(f"rpo_alpha must be 0 (no NLL term) or more, got {self.rpo_alpha}.")

    def check_fsdp_conflicts(self) -> None:
        """UserError naming every setting that FSDP cannot run with, in one sentence (they came one per run):
        average_last (its average of whole weights) and Muon (its whole-matrix updates), each fine with DDP."""
        if not self.fsdp:
            return
        conflicts = [(name, fix) for name, fix, given in (
            ("average_last", "average_last = 0", self.average_last),
            ('optimizer = "muon"', 'optimizer = "adamw"', self.optimizer == "muon")) if given]
        if conflicts:
            names, fixes = (" and ".join(c[i] for c in conflicts) for i in (0, 1))
            raise UserError(f"{names} {agree(len(conflicts), 'works', 'work')} without FSDP (DDP is fine); set "
                            f"{fixes} with fsdp.")

    def check_stage(self, stage: str, sources: dict[str, str | None] | None = None) -> None:
        """UserError for the settings that only other stages read (STAGE_SETTINGS) and for LoRA settings without
        lora_rank, given (a flag or the config file, even at the default value: `sft --beta 0.1` was taken silently,
        `sft --beta 5` refused) or set to other than the default, all of them in one sentence: a run that silently
        ignored them would not be the run asked for. sources: where each setting given came from (RunConfig's), so
        that one from the config file is said to be from there, and a lora_rank 0 given to turn LoRA off is said to
        do so."""
        sources = sources or {}

        def given(name: str) -> bool:
            return name in sources or getattr(self, name) != getattr(TrainConfig, name)

        refused: dict[tuple, list[str]] = {}  # (readers, why) -> the settings given
        for f in dataclasses.fields(self):
            readers, why = STAGE_SETTINGS.get(f.name, ((stage,), {}))
            if stage not in readers and given(f.name):
                refused.setdefault((readers, why.get(stage, "")), []).append(f.name)
        faults = []
        if refused:
            groups = [f"{spoken(names)}, {'a setting' if len(names) == 1 else 'settings'} of "
                      f"{spoken([STAGE_NAMES[r] for r in readers])} only{f' ({why})' if why else ''}"
                      for (readers, why), names in refused.items()]
            faults.append(f"{STAGE_NAMES[stage]} does not read {', nor '.join(groups)}; drop "
                          f"{'it' if sum(map(len, refused.values())) == 1 else 'them'}")
        said = {n for names in refused.values() for n in names}  # refused above already
        unread = [n for n in LORA_SETTINGS[1:] if given(n) and n not in said]
        if unread and not self.lora_rank:
            faults.append(lora_off(unread, STAGE_NAMES[stage], sources))
        if faults:
            raise UserError("; also, ".join(faults) + ".")


def lora_off(unread: list[str], stage: str, sources: dict[str, str | None]) -> str:
    """Why LoRA settings other than lora_rank (unread: set to other than their defaults) are refused without it, in
    words; stage: its name ("SFT"); sources: where each setting given came from (None: a flag, else the config
    file), so that those from the file are said to be (a flag among them is said as --KEY). A lora_rank 0 given turns
    LoRA off: then the settings that the file gives are to be dropped from it."""
    file = next((sources[n] for n in unread if sources.get(n)), None)
    if file is None:
        named = spoken(unread)
    elif all(sources.get(n) for n in unread):
        named = f"{spoken(unread)} (from {file})"
    else:
        named = spoken([f"{n} (from {file})" if sources.get(n) else f"--{n}" for n in unread])
    them = "it" if len(unread) == 1 else "them"
    drop = f"drop {them} from {file}" if file and all(sources.get(n) for n in unread) else f"drop {them}"
    need = f"{named} need{'s' if len(unread) == 1 else ''}"
    full = f"{stage} trains every weight, not LoRA adapters"
    if "lora_rank" in sources:
        off = f"lora_rank = 0 in {sources['lora_rank']}" if sources["lora_rank"] else "--lora_rank 0"
        return f"{need} lora_rank, which {off} turns off: {full}; {drop}"
    return f"{need} --lora_rank: without it {full}; set --lora_rank or {drop}"


def check_finite(t: TrainConfig) -> None:
    """UserError for the first float setting of t that is NaN or infinite: no setting means anything there, and one
    that slipped through (lora_alpha nan) skipped every step, then wrote NaN weights and invalid JSON."""
    for f in dataclasses.fields(t):
        value = getattr(t, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{f.name} must be a finite number, got {value}.")


def spoken(names: list[str]) -> str:
    """["a", "b", "c"] -> "a, b and c"."""
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = ""
    model_settings: dict = field(default_factory=dict)  # the model settings given (TOML and flags), not defaults
    sources: dict = field(default_factory=dict)  # each train setting given -> its config file, or None for a flag

    def to_dict(self) -> dict:
        return {"preset": self.preset, "model": self.model.to_dict(), "train": asdict(self.train)}


def _convert(value, tp, key: str, path: str | Path | None = None):
    """A flag's string (or, path given, a value of the TOML file at path) as the field's type `tp`: bool, int, float,
    str, list[str], X | None. A flag's text is read as the type (`--max_steps 5`); a TOML value must be of it, as
    TOML writes it (`max_steps = 5`, not "5"). An integer is written without a point (1000 or 1e3, in a flag or in
    TOML; 2.0 and 1.5 are refused); a bool flag takes BOOLS' words, TOML true or false. UserError naming the key, the
    kind in words (for a bool flag: the words it takes) and the value given."""
    options = [a for a in get_args(tp) if a is not type(None)] or [tp]  # int | None -> [int]; int -> [int]
    if type(None) in get_args(tp) and (value is None or str(value).lower() == "none"):
        return None
    if isinstance(value, list) and list[str] in options and all(isinstance(v, str) for v in value):  # paths
        return value
    kind = options[0]
    try:
        if isinstance(value, bool) != (kind is bool) and not isinstance(value, str):  # TOML: true is no number
            raise TypeError(value)
        if path is not None and isinstance(value, str) and kind is not str:  # TOML: "5" is no number
            raise TypeError(value)
        if kind is bool:
            return value if isinstance(value, bool) else BOOLS[value.lower()]
        if kind is int:  # 1000, "1000", 1e3 and "1e3" alike; 1.5 and 2.0 are no int in a flag or in TOML
            text = value.text if isinstance(value, TomlFloat) else value
            if isinstance(value, int):
                return value
            if not (isinstance(text, str) and WHOLE.fullmatch(text)):
                raise ValueError(value)
            return int(float(text)) if "e" in text.lower() else int(text)
        if kind is str and not isinstance(value, str):
            raise TypeError(value)
        return kind(value)
    except (ValueError, KeyError, TypeError, OverflowError, AttributeError):
        given = f"{toml_value(value)} in {path}" if path is not None else repr(value)
        words = FLAG_BOOLS if kind is bool and path is None else kind_words(tp)
        raise UserError(f"setting {key} expects {words}, got {given}.") from None


KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list[str]: "a list of strings"}


def kind_words(tp) -> str:
    """A field's type in words: int -> "an integer", str | list[str] -> "a string or a list of strings"; Python's
    own text ("str | list[str]") was what the user read."""
    words = [KINDS[a] for a in get_args(tp) if a is not type(None)] or [KINDS[tp]]
    return " or ".join([*words, *(["none"] if type(None) in get_args(tp) else [])])


def toml_value(value) -> str:
    """A value of a TOML file in words, as the file writes it: the string "5", the integer 3, true, the list [1]."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, TomlFloat):
        return f"the number {value.text}"
    if isinstance(value, (str, list)):
        kind = "string" if isinstance(value, str) else "list"
        return f"the {kind} {json.dumps(value, ensure_ascii=False, default=str)}"
    if isinstance(value, dict):
        return "a table"
    return f"the {'integer' if isinstance(value, int) else 'number' if isinstance(value, float) else 'value'} {value}"


def _apply(cls: type, values: dict, section: str, path: str | Path | None = None) -> dict:
    """values converted to the types of dataclass cls's fields (path: the TOML file they are from, None: flags);
    unknown keys are refused."""
    types = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        if key not in names:
            close = closest(key, names)
            raise UserError(f"unknown {section} setting {key!r}{f' (did you mean {close}?)' if close else ''}; "
                            f"known: {', '.join(sorted(names))}.")
        out[key] = _convert(value, types[key], f"{section}.{key}", path)
    return out


def closest(key: str, names: set[str]) -> str | None:
    """The name a mistyped key most likely meant (difflib's closest, cutoff 0.6), also with its words in
    another order: "batchsize" -> "batch_size", "lr_min" -> "min_lr"; None when none is close."""
    words = {"_".join(sorted(n.split("_"))): n for n in names}
    close = difflib.get_close_matches(key, sorted(names), 1) or \
        [words[w] for w in difflib.get_close_matches("_".join(sorted(key.split("_"))), sorted(words), 1)]
    return close[0] if close else None


def check_tables(data: dict, path: str | Path) -> None:
    """UserError naming the top-level keys of the config file at path (read_toml's data) other than its [model] and
    [train] tables (settings.stray_keys): settings written above any table (their table said, e.g. "put max_steps
    under [train]"), other tables, unknown keys and `model = "demo"` (a value, not the table)."""
    stray = stray_keys(data)
    if not stray:
        return
    names = {"train": {f.name for f in dataclasses.fields(TrainConfig)},
             "model": {"preset", *(f.name for f in dataclasses.fields(ModelConfig))}}
    moves = {t: [k for k in stray if not isinstance(data[k], dict) and k in names[t]] for t in TABLES}
    others = [f"[{k}]" if isinstance(data[k], dict) else f"{k} as a value" if k in TABLES else k
              for k in stray if not any(k in m for m in moves.values())]
    not_these = f", not {' or '.join(others)}" if others else ""
    put = ", ".join(f"{spoken(keys)} under [{t}]" for t, keys in moves.items() if keys)
    raise UserError(f"{path}: only [model] and [train] tables are allowed{not_these}{f'; put {put}' if put else ''}.")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the TOML file, then the flags. A preset stands for all of its model settings: one in the flags
    replaces the file's [model] table (a warning names the settings it replaced), and --model.key flags change it."""
    data = read_toml(path)
    check_tables(data, path)
    flags = parse_overrides(overrides or [])
    model_values = {**data.get("model", {}), **flags["model"]}
    if "preset" in flags["model"]:
        replaced = sorted(k for k in data.get("model", {}) if k not in flags["model"])
        if replaced and os.environ.get("RANK", "0") == "0":
            log.warning("--model.preset %s replaces the [model] settings of %s (%s); pass --model.KEY to change "
                        "the preset's", flags["model"]["preset"], path, ", ".join(replaced))
        model_values = dict(flags["model"])
    preset_name = str(model_values.get("preset", DEFAULT_PRESET))
    model_file = {k: v for k, v in model_values.items() if k != "preset" and k not in flags["model"]}
    settings = {**_apply(ModelConfig, model_file, "model", path),
                **_apply(ModelConfig, {k: v for k, v in flags["model"].items() if k != "preset"}, "model")}
    train_file = {k: v for k, v in data.get("train", {}).items() if k not in flags["train"]}
    train = TrainConfig(**_apply(TrainConfig, train_file, "train", path),
                        **_apply(TrainConfig, flags["train"], "train"))
    given = settings | ({"preset": preset_name} if "preset" in model_values else {})
    sources = {k: str(path) for k in data.get("train", {})} | dict.fromkeys(flags["train"])
    return RunConfig(preset(preset_name, **settings), train, preset_name, given, sources)

