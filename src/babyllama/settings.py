"""The settings of a training run as written, read without torch: a TOML file's [model] and [train] tables and
`--key value` flags. config.py makes a RunConfig of them; the CLI finds a run's out_dir in them (run_out_dir) and holds
that folder (lock.py) before it imports torch, so that a second run into it is refused at once, not seconds later.
The ranges that pretokenize's flags share with those settings are checked here too (check_fraction,
check_char_limits), for both.

    flags = parse_overrides(["--lr", "1e-3", "--model.dim=128"])   # {"train": {"lr": "1e-3"}, "model": {"dim": "128"}}
    run_out_dir("sft", "configs/sft-demo.toml", [], "runs/demo/pretrain/final")   # "runs/demo/pretrain-sft"
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from babyllama.errors import UserError, not_a_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


TABLES = ("model", "train")  # a config file's tables; config.check_tables refuses any other top-level key
PATHS = ("data", "out_dir", "init", "tokenizer", "sft_cache")  # the settings that name files or folders
REFERENCE_PARTS = "ref_logps.parts"  # in a DPO run's out_dir: the chunks of reference log-probs computed so far


def stray_keys(data: dict) -> list[str]:
    """The top-level keys of a config file (read_toml's data) other than its [model] and [train] tables, in order:
    other tables, settings written above any table, and `model` or `train` given a value instead of a table."""
    return [k for k in data if k not in TABLES or not isinstance(data[k], dict)]


class TomlFloat(float):
    """A TOML float with its text as the file writes it (`text`: "1e3", "2.0"), so that an integer setting can take
    1e3 and refuse 2.0, which tomllib reads as the same kind of value."""

    text: str

    def __new__(cls, text: str) -> TomlFloat:
        value = super().__new__(cls, text)
        value.text = text
        return value


def read_toml(path: str | Path | None) -> dict:
    """The top-level keys of the TOML file at path ({} without one): its [model] and [train] tables and any other
    key, which config.check_tables refuses. A UTF-8 byte-order mark (Notepad's) is skipped. UserError for a missing
    file, bytes that are not UTF-8 (a GBK comment, a binary file) or invalid TOML."""
    if not path:
        return {}
    p = Path(path)
    if p.is_dir():
        raise UserError(f"config file {p} is a folder, not a file; pass a TOML file (e.g. configs/demo.toml).")
    if not p.is_file():
        raise UserError(f"config file {p} {not_a_file(p)}.")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:  # e.object: the bytes after a byte-order mark
        line = e.object.count(b"\n", 0, e.start) + 1
        raise UserError(f"{p} is not UTF-8 text (byte 0x{e.object[e.start]:02x} on line {line}), as a TOML file "
                        "must be; save it as UTF-8.") from None
    try:
        return tomllib.loads(text, parse_float=TomlFloat)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{p} is not valid TOML ({e}).") from None


def parse_overrides(args: list[str]) -> dict[str, dict]:
    """`--lr 1e-3 --model.dim=128` -> {"train": {"lr": "1e-3"}, "model": {"dim": "128"}}. A setting given again
    replaces the value before (`--max_steps 20 --max_steps 4`: 4), as the flags replace the config file's, except a
    path (PATHS: `--out_dir a --out_dir b`), which is refused: the first would be ignored silently. UserError for
    that and for a flag without its value (the flag named: the next argument is another --key, or there is none)."""
    out: dict[str, dict] = {"train": {}, "model": {}}
    given: dict[str, str] = {}  # a path setting -> the flag and value that gave it
    args = [part for a in args for part in (a.split("=", 1) if a.startswith("--") and "=" in a else [a])]
    for i in range(0, len(args), 2):
        if not args[i].startswith("--"):
            raise UserError(f"expected a --key, got {args[i]!r}.")
        if i + 1 == len(args) or args[i + 1].startswith("--"):
            raise UserError(f"setting {args[i]} has no value; settings come in pairs `--key value`.")
    for flag, value in zip(args[::2], args[1::2], strict=True):
        key = flag[2:]
        section, _, name = key.rpartition(".")
        if name == "preset":
            section = "model"
        section = section or "train"
        if section == "train" and name in PATHS:
            if name in given:
                raise UserError(f"setting {name} given twice ({given[name]}, then {flag} {value}); give it once.")
            given[name] = f"{flag} {value}"
        out.setdefault(section, {})[name] = value
    if set(out) - {"train", "model"}:
        unknown = sorted(set(out) - {"train", "model"})
        raise UserError(f"settings are --key, --train.key or --model.key; got sections {unknown}.")
    return out


def check_fraction(value: float, name: str) -> None:
    """UserError for a fraction (val_fraction, beta1, ...) outside [0, 1), NaN too; name: the setting or flag as
    the user gave it ("val_fraction", "--val_fraction")."""
    if not 0.0 <= value < 1.0:
        raise UserError(f"{name} must be in [0, 1), got {value}.")


def check_char_limits(limit: Callable[[str], int | None], dash: str = "") -> None:
    """UserError for a min_prompt_chars or min_answer_chars above its max_*_chars, which no record passes (0 or None:
    no limit); limit(name) gives each value, and dash is "--" where flags gave them (pretokenize --sft's)."""
    for part in ("prompt", "answer"):
        low, high = limit(f"min_{part}_chars"), limit(f"max_{part}_chars")
        if low and high and low > high:
            raise UserError(f"{dash}min_{part}_chars {low} is above {dash}max_{part}_chars {high}, so no record would "
                            "pass; lower the one or raise the other.")


def default_out_dir(stage: str, init: str) -> str:
    """Where a stage writes without --out_dir: runs/STAGE from scratch; from --init, a directory beside
    the init's run (runs/demo/pretrain/final -> runs/demo/pretrain-sft), never inside it."""
    if not init:
        return f"runs/{stage}"
    p = Path(init)
    run = p.parent if p.name == "final" else p.parent.parent if p.parent.name == "checkpoints" else p
    return str(run.parent / f"{run.name}-{stage}")


def run_out_dir(stage: str, path: str | Path | None, overrides: list[str], init: str = "") -> str | None:
    """The folder that `babyllama STAGE` (pretrain, sft or dpo) writes, as load_config and the stage find it: out_dir
    of the flags, else of the TOML file at path, else default_out_dir of init (sft's and dpo's --init flag, else the
    init setting). None where the stage refuses its settings before it writes: sft or dpo without an init, a value
    that is no text, a config file with keys outside its tables. Raises read_toml's and parse_overrides' UserErrors."""
    toml = read_toml(path)
    if stray_keys(toml):
        return None
    train = {**toml.get("train", {}), **parse_overrides(overrides)["train"]}
    init, out = init or train.get("init", ""), train.get("out_dir", "")
    if not (isinstance(init, str) and isinstance(out, str)) or not (init or stage == "pretrain"):
        return None
    return out or default_out_dir(stage, init)
