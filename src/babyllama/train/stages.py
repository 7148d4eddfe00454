"""The stage entry points: `babyllama pretrain` and `babyllama sft` build their data, then train.

    babyllama pretrain --config configs/demo.toml [--resume] [--key value ...]
    babyllama sft --init runs/demo/pretrain/final --data sft.jsonl --config configs/sft-demo.toml
    torchrun --standalone --nproc_per_node 4 -m babyllama pretrain --config configs/baby-92m.toml

Both run on one CPU, one GPU or N processes under torchrun, with the same Trainer.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from babyllama.checkpoint import (
    CONFIG_FILE,
    check_init_weights,
    check_tokenizer_fits,
    latest_checkpoint,
    model_config,
    read_config,
    remove_stale_temporaries,
    resumable_checkpoint,
    set_aside,
    tokenizer_dir,
)
from babyllama.config import INIT_MODEL_SETTINGS, STAGE_NAMES, RunConfig, TrainConfig
from babyllama.data.pretokenize import cpu_workers
from babyllama.data.sft_tokens import SFTSettings, SFTStats, equal_words, filtered_words, read_sft_cache
from babyllama.data.shards import (
    TokenWindows,
    read_manifest,
    shards_difference,
    split_shards,
    token_record,
    val_missed,
)
from babyllama.data.sources import check_output_folder
from babyllama.errors import UserError, agree, write_whole
from babyllama.lora import check_rank
from babyllama.model import ModelConfig
from babyllama.settings import default_out_dir
from babyllama.tokenizer import Tokenizer, load_tokenizer
from babyllama.train.distributed import Dist, barrier, check_fsdp, check_same_checkpoint, held_by_main, process_group
from babyllama.train.sft_data import SFTData, check_ids_fit, load_sft_data
from babyllama.train.trainer import (
    Dataset,
    Trainer,
    check_average,
    check_dtype,
    check_memory,
    check_optimizer,
    check_resume,
    check_rows_memory,
    consumed_samples,
    lora_of,
    lr_at,
    planned_samples,
    planned_steps,
)

TOKENIZER_OF_INIT = "pass --tokenizer, the one that --init was trained with"  # what sft and dpo say without one
A_RUN = {"pretrain": "a pretraining run", "sft": "an SFT run", "dpo": "a DPO run"}
VOCAB_MULTIPLE = 64  # a model's vocab_size up to the tokenizer's ids rounded up to this multiple gets no note
ROWS = {"pretrain": ("window", "windows"), "sft": ("row", "rows"), "dpo": ("pair", "pairs")}  # a stage's training rows

log = logging.getLogger(__name__)


@dataclass
class RunStart:
    """Where found_run found a run to start: resume_from (None: at step 0) and its trainer state (read once, by
    resumable_checkpoint); the damaged checkpoints newer than it, each with why, which run_training moves aside once
    every check has passed; length: the resumed run's last step in steps of this run's global batch and of the one
    before (resumed_length), None where found_run could not tell it before the data is read (then run_training
    checks what needs it); finished: the run resumed is finished, so nothing is to be done."""
    resume_from: Path | None = None
    state: dict | None = None
    damaged: list[tuple[Path, str]] = field(default_factory=list)
    length: tuple[int, int] | None = None
    finished: bool = False


def found_run(cfg: RunConfig, dist: Dist, resume: bool, stage: str) -> RunStart:
    """Check the run directory and find where the run starts, reading neither --init, the tokenizer nor the data: a
    run directory holds one stage's checkpoints, so `--resume` refuses another stage's, and out_dir may not hold the
    --init model it would overwrite (that it is no file held_by_main checked, taking it); a run it finds finished
    (is_finished: of its length in resumed_length, from what its checkpoint records) is said and left as it was,
    whatever settings changed or files went since, with no other check. Nothing is written but the temporaries of a
    killed run removed; the damaged checkpoints are moved aside by run_training. Raises UserError."""
    out = Path(cfg.train.out_dir)
    check_output_folder(out, "a training run", ("a training run",), "out_dir")  # not a checkpoint, data, ...
    init = Path(cfg.train.init).resolve() if cfg.train.init else None
    if init is not None and (init == out.resolve() or out.resolve() in init.parents):
        raise UserError(f"out_dir {out} holds --init {cfg.train.init}, which the run would overwrite; "
                        "choose another out_dir.")
    if dist.main:  # what a killed run left: temporaries of checkpoints being written or deleted
        for done in remove_stale_temporaries(out, out / "checkpoints"):
            print(f"note: {done} (left by a run that was stopped)")
    barrier(dist)
    latest = latest_checkpoint(out)
    check_same_checkpoint(out, latest, dist)  # before a check that one process alone could fail
    try:
        made_by = read_config(latest).get("stage", stage) if latest is not None else stage
    except UserError:  # a damaged newest checkpoint: resumable_checkpoint below skips it, saying so
        made_by = stage
    if made_by != stage:
        raise UserError(f"{out} holds {A_RUN[made_by]} ({latest.name}), which {STAGE_NAMES[stage]} cannot "
                        f"{'resume' if resume else 'continue'}; choose another out_dir.")
    if not resume and latest is not None:
        raise UserError(f"{out} already has checkpoints; pass --resume to continue or choose another out_dir.")
    resume_from, state, damaged = resumable_checkpoint(out) if resume else (None, None, [])
    check_same_checkpoint(out, resume_from, dist)  # the newest whole one: damage seen alike
    length = resumed_length(cfg, dist, state) if state is not None else None
    if length is not None and is_finished(out, state["step"], length[0]):  # finished: nothing to do, whatever length
        say_finished(out, state["step"], dist)
        return RunStart(resume_from, state, finished=True)
    if length is not None:
        check_not_shorter(cfg.train, resume_from, state["step"], consumed_samples(state),
                          planned_samples_of(cfg, state), state["tokens"], state.get("rows") or 0)
    return RunStart(resume_from, state, damaged, length)


def checked_run(cfg: RunConfig, tokenizer: Tokenizer, dist: Dist, resume: bool, tok_path: str | Path,
                start: RunStart, stage: str) -> None:
    """Check the settings of a run found unfinished (found_run's start) against the tokenizer (loaded from tok_path)
    and the model (--init's for sft and dpo), before any data is built: it refuses settings that cannot run here
    (check_settings), a tokenizer other than the one its checkpoint records (files replaced or edited since the run
    started), other model settings, RESUME_SETTINGS or base (check_resume), and a weight average that average_last
    does not take on (check_average). Raises UserError."""
    for ckpt in (start.resume_from, cfg.train.init):  # first: a model from --init cannot take check_settings' remedy,
        if ckpt:  # --model.vocab_size (init_model refuses it), where this sentence names the model and its tokenizer
            check_tokenizer_fits(tokenizer, cfg.model, read_config(ckpt).get("tokenizer"), str(ckpt), str(tok_path))
    check_settings(cfg, tokenizer, dist, stage)
    if start.resume_from is not None:
        check_resume(cfg, start.resume_from)
    if start.length is not None:
        check_average(cfg.train, start.resume_from, start.state["step"], start.state.get("averaged", 0), *start.length)
    if resume and start.resume_from is None and dist.main:
        print(f"note: nothing to resume in {Path(cfg.train.out_dir) / 'checkpoints'}; starting from the beginning")


def check_settings(cfg: RunConfig, tokenizer: Tokenizer, dist: Dist, stage: str) -> None:
    """UserError for settings that cannot run here: LoRA's out of range, a model or batch beyond the machine, Muon
    or fp16 where they cannot run, FSDP without torchrun, a tokenizer beyond the vocabulary."""
    if lora := lora_of(cfg.train):  # LoRA settings out of range stop here
        check_rank(lora, cfg.model)
    check_memory(cfg, dist.device, stage)  # and a model or batch beyond the machine
    check_optimizer(cfg.train)  # and Muon where it cannot run
    check_dtype(cfg.train, dist.device)  # and fp16 off a CUDA GPU
    check_fsdp(cfg.train.fsdp)  # and FSDP without torchrun's processes
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                        f"{cfg.model.vocab_size}; set --model.vocab_size {tokenizer.vocab_size} or more.")


def resumed_length(cfg: RunConfig, dist: Dist, state: dict) -> tuple[int, int] | None:
    """The last step of a run resumed from the trainer state, in steps of this run's global batch and of the one
    before the resume (planned_steps), or None where that needs the training data and the checkpoint does not
    record what it needs (one from before it did): then run_training checks once the data is read. The checkpoint
    records its rows ("rows", for an epochs run) and the samples that a tokens budget came to ("tokens_budget", which
    the lengths of the rows decide: planned_samples), so that no stage reads its data (or --init) to find a finished
    run."""
    t, budget = cfg.train, state.get("tokens_budget")
    if t.tokens and not t.max_steps and (not budget or budget["tokens"] != t.tokens):
        return None  # another budget: its samples need the rows' lengths
    if not (t.max_steps or t.tokens) and state.get("rows") is None:
        return None
    samples = planned_samples_of(cfg, state)
    now, before = (planned_steps(t, samples, state["step"], consumed_samples(state), batch)
                   for batch in (t.batch_size * t.grad_accum * dist.world, state["global_batch"]))
    return now, before


def planned_samples_of(cfg: RunConfig, state: dict) -> int | None:
    """The samples a resumed run trains on, from what its trainer state records (resumed_length can tell them)."""
    t, budget = cfg.train, state.get("tokens_budget")
    if t.tokens and not t.max_steps:
        return budget["samples"]
    return planned_samples(t, cfg.model.max_seq_len, state.get("rows") or 0)


def check_not_shorter(t: TrainConfig, resume_from: Path, step: int, consumed: int, samples: int | None, tokens: int,
                      rows: int) -> None:
    """UserError where the length asks a run resumed at step (consumed samples, tokens logged, behind it) to end before
    it: a max_steps below step, or a tokens or epochs length (of rows each) of fewer samples (samples,
    planned_samples) than it has consumed; it would otherwise write its checkpoint as final/ at step, longer than
    asked, without a word. The sentence names the length setting given and the least of it that reaches step: a run
    given --tokens was told to pass --max_steps. A finished run is said finished before (its final/ is there: nothing
    is written)."""
    if samples is None and t.max_steps < step:
        asked, enough = f"--max_steps {t.max_steps}", f"--max_steps {step}"
    elif samples is not None and samples < consumed:
        length = f"--tokens {t.tokens}" if t.tokens else f"--epochs {t.epochs:g}"
        asked = f"{length} ({samples} {agree(samples, 'sample', 'samples')}, it has trained on {consumed})"
        enough = f"--tokens {tokens}" if t.tokens else f"--epochs {math.ceil(consumed / rows * 100) / 100:g}"
    else:
        return
    raise UserError(f"{resume_from} is at step {step}, past the end that {asked} asks for, and a resumed run cannot "
                    f"end before the step its checkpoint reached; pass a longer length ({enough} or more) or start a "
                    "new run in another out_dir.")


def say_schedule_changed(t: TrainConfig, before: int | None, step: int, steps: int) -> None:
    """Say that a resume changed the run's length from before steps (what its checkpoint records; None: from before
    it did: no note) to steps, which moves the learning rate at step: the cosine runs to the new last step (lr_at),
    so a finished run extended climbs back from min_lr to the new cosine's value at step, near lr only where the run
    is made many times longer (8 -> 12 steps of lr 0.004 went 0.0001 -> 0.00145)."""
    if before is None or before == steps:
        return
    was, now = lr_at(step, t, before), lr_at(step, t, steps)
    print(f"note: the run was {before} {agree(before, 'step', 'steps')} long and is now {steps}, so the learning rate "
          f"follows the cosine of the new length: {now:.3g} at step {step}, where it was {was:.3g}.")


def is_finished(out: Path, step: int, last_step: int) -> bool:
    """Whether a run in out resumed at step is finished: its length asks for no more steps (last_step) and final/ is
    there, written at this step (a kill before final/ was written leaves it to write)."""
    final = out / "final"
    return step >= last_step and (final / CONFIG_FILE).is_file() and read_config(final).get("step") == step


def say_finished(out: Path, step: int, dist: Dist) -> None:
    if dist.main:
        print(f"note: the run in {out} is finished at step {step}, so nothing was done; its model is {out / 'final'}")


def run_training(cfg: RunConfig, train_data: Dataset, val_data: Dataset | None, tokenizer: Tokenizer,
                 dist: Dist, start: RunStart, stage: str, trainer_cls: type[Trainer] = Trainer,
                 data: dict | None = None) -> Path:
    """Write config.json, build the Trainer (or the stage's own, DPO's) and train. data: what the checkpoints
    record of the data, to check a resume against (token_cache's, token_record's). A resume whose length found_run
    could not tell before the data was read (start.length None) is said finished here, writing nothing, or has its
    weight average checked, as checked_run does the others'; a resume moves the damaged checkpoints newer than the
    one it resumes from aside (set_aside, once every check has passed) and says where it picks up."""
    out, t = Path(cfg.train.out_dir), cfg.train
    trainer = trainer_cls(cfg, train_data, val_data, tokenizer, dist, stage, start.resume_from, data, start.state)
    steps = trainer.total_steps
    if trainer.resumed and start.length is None:  # the length needed the rows
        if is_finished(out, trainer.step, steps):
            say_finished(out, trainer.step, dist)
            return out / "final"
        check_not_shorter(t, start.resume_from, trainer.step, trainer.consumed_samples, trainer.samples,
                          trainer.tokens, len(train_data))
        before = planned_steps(t, trainer.samples, trainer.step, trainer.consumed_samples, trainer.global_batch_before)
        check_average(t, start.resume_from, trainer.step, trainer.averaged, steps, before)
    barrier(dist)  # every rank has read the checkpoints (found_run) before rank 0 moves the damaged ones aside
    for ckpt, why in start.damaged if dist.main else []:
        aside = set_aside(ckpt)
        print(f"note: {ckpt.name} is damaged and skipped: {why}; resuming from {start.resume_from.name}, and "
              f"{ckpt.name} is moved to {aside.name} (keep_last counts whole checkpoints)")
    if dist.main and trainer.resumed:
        print(f"resuming from {start.resume_from} (step {trainer.step} of {steps})")
        say_schedule_changed(t, start.state.get("total_steps"), trainer.step, steps)
    noun = ROWS[stage] if stage == "dpo" else ("row", "rows")  # a DPO row is a pair: its batch counts pairs
    if dist.main and trainer.global_batch > len(train_data):
        log.warning("a step's %d %s (batch_size x grad_accum x processes) are more than the %d training %s, so "
                    "each step repeats some; lower --batch_size or use more data", trainer.global_batch, noun[1],
                    len(train_data), agree(len(train_data), *ROWS[stage]))
    if dist.main and t.warmup_steps >= steps:  # lr_at: the run's last step has lr * steps / warmup_steps
        end = (f"ends at {steps}/{t.warmup_steps} of lr {t.lr:g}" if t.warmup_steps > steps
               else f"reaches lr {t.lr:g} only at the last step")
        print(f"warning: warmup_steps {t.warmup_steps} cover the whole run of {steps} {agree(steps, 'step', 'steps')}: "
              f"the learning rate {end} and never decays to min_lr {t.min_lr:g}; set --warmup_steps to a small part "
              "of the steps (the configs use 1-10%).")
    if dist.main and val_data is None:  # its lines' val_loss was null without a word
        print(f"note: {no_validation(cfg, stage, data)}")
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        write_whole(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        rows, batch = len(train_data), trainer.global_batch  # a row: a window, sample or pack; DPO's a pair
        print(f"{stage}: {rows:,} {agree(rows, *noun)}, {steps:,} {agree(steps, 'step', 'steps')} of {batch} "
              f"{agree(batch, *noun)} on {dist.world} x {dist.device.type}, {trainer.dtype}")
    return trainer.fit()


def no_validation(cfg: RunConfig, stage: str, data: dict | None) -> str:
    """The note of a stage's run that has no validation data, and why: pretraining shards (data: their token_record)
    without a val split, of --val_fraction 0 or of a hash that put none of their documents there (val_missed), or
    token-cache data that val_fraction leaves no validation samples."""
    measures = "so the run measures no validation loss"
    if stage != "pretrain":
        return f"val_fraction {cfg.train.val_fraction:g} leaves no validation {ROWS[stage][1]} of the data, {measures}."
    missed = val_missed(data or {})
    if missed:
        return f"{cfg.train.data} has no validation split, {measures}: {missed}."
    return f"{cfg.train.data} has no validation split (pretokenize --val_fraction 0), {measures}."


def pretrain(cfg: RunConfig, resume: bool = False) -> Path:
    """`babyllama pretrain`: train on the token shards of cfg.train.data."""
    t = cfg.train
    t.data = shards_folder(t.data)
    if not t.data:
        raise UserError("pretraining needs data: set [train] data in the config or pass --data DIR.")
    t.check_stage("pretrain", cfg.sources)
    t.out_dir = t.out_dir or default_out_dir("pretrain", t.init)
    with process_group(t.device, t.ddp_timeout) as dist, held_by_main(t.out_dir, "pretrain", dist):
        # A finished run is left before its data or --init is read (either may be gone since), as sft's and dpo's:
        # its checkpoint's recorded rows tell its length
        start = found_run(cfg, dist, resume, "pretrain")
        if start.finished:
            return Path(t.out_dir) / "final"
        if t.init:  # continued pretraining: the model is the init's, said before the data as by sft and dpo
            cfg.model = init_model(cfg, "pretraining")
        manifest = read_manifest(t.data)
        T = cfg.model.max_seq_len
        tok_path = t.tokenizer or (Path(t.data) / "tokenizer")
        tokenizer = load_tokenizer(tok_path, remedy="pass --tokenizer, the one that made the shards")
        checked_run(cfg, tokenizer, dist, resume, tok_path, start, "pretrain")
        if dist.main and not t.init and start.resume_from is None and (note := unused_rows(tokenizer, cfg.model)):
            print(note)  # a model from --init or resumed keeps its vocab_size
        differ = tokenizer.differences(manifest["tokenizer"])
        if differ:
            raise UserError(f"the shards in {t.data} were made with another tokenizer ({differ[1]}) than {tok_path} "
                            f"({differ[0]}).")
        train_data = TokenWindows(t.data, T, "train", manifest)
        val_data = TokenWindows(t.data, T, "val", manifest) if split_shards(manifest, "val") else None
        data = token_record(manifest)  # what the checkpoints record
        check_same_shards(data, start.resume_from, t.data)
        if t.doc_mask:
            for windows in (train_data, val_data):
                if windows is not None:
                    windows.doc_eos = tokenizer.eos_id
        return run_training(cfg, train_data, val_data, tokenizer, dist, start, "pretrain", data=data)


def shards_folder(data: str | list[str]) -> str:
    """Pretraining's data, one folder of token shards, as a path: a one-element list (`data = ["runs/demo/tokens"]`,
    as SFT's files are written) is that folder. UserError for more than one: the windows come from one manifest."""
    if isinstance(data, str) or len(data) <= 1:
        return data if isinstance(data, str) else "".join(data)
    raise UserError(f"pretraining reads one folder of token shards, got {len(data)} in data ({', '.join(data)}); "
                    "pretokenize all the inputs into one folder (pretokenize --input takes several).")


def unused_rows(tokenizer: Tokenizer, model: ModelConfig) -> str:
    """The note for a model whose vocab_size is above the tokenizer's ids rounded up to VOCAB_MULTIPLE (a size padded
    for the GPU's matrix tiles is fine): rows of the embedding and output that no id reaches, trained for nothing
    (the demo preset's 8,192 with the smoke tokenizer's 1,024); "" when it fits."""
    n, m = tokenizer.vocab_size, model.vocab_size
    if m <= -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE:
        return ""
    return (f"note: the tokenizer has {n} ids; the model's vocab_size {m} leaves {m - n} embedding rows unused; "
            f"set --model.vocab_size {n}")


def check_same_shards(data: dict, resume_from: Path | None, data_dir: str) -> None:
    """UserError when the run to resume started on other token shards (its checkpoint's `data`, token_record's)
    than those of data_dir (`data`): added, removed, of another size or tokenizer (shards_difference). A
    checkpoint from before the record is resumed as it was."""
    started_with = read_config(resume_from).get("data") if resume_from is not None else None
    differ = shards_difference(started_with, data, data_dir) if started_with is not None else None
    if differ:
        raise UserError(f"the inputs changed since the run started: other shards in {data_dir} ({differ}); resuming "
                        "needs the same inputs, so restore them, or start a new run without --resume in a new "
                        "--out_dir.")


def init_model(cfg: RunConfig, stage: str) -> ModelConfig:
    """The model of cfg.train.init, with the model settings a run from it can honour; settings that
    differ are refused. A preset counts as all of its settings: `preset = "demo"` is fine for a model
    trained as the demo, and another preset is refused by name, not by the settings it sets."""
    init = model_config(cfg.train.init)
    check_init_weights(cfg.train.init)  # NaN weights, a LoRA init's base missing or changed: now, not after the data
    given = cfg.model_settings
    keys = init.to_dict() if "preset" in given else given
    refused = sorted(k for k in keys if k not in INIT_MODEL_SETTINGS and getattr(cfg.model, k) != getattr(init, k))
    by_preset = [k for k in refused if k not in given]  # the preset's values, not the user's to name: the preset is
    if by_preset:
        raise UserError(f"{stage} takes its model's shape from --init {cfg.train.init}, so --model.preset cannot be "
                        f"set for it ({cfg.preset} is not the init's model: its {', '.join(by_preset)} differ); drop "
                        "--model.preset.")
    if refused:
        raise UserError(f"{stage} takes its model from --init {cfg.train.init}; it cannot change "
                        f"{', '.join(refused)} (only {', '.join(sorted(INIT_MODEL_SETTINGS))}); drop those settings.")
    return replace(init, **{k: v for k, v in given.items() if k in INIT_MODEL_SETTINGS})


def token_cache(cfg: RunConfig, tokenizer_path: str | Path, dist: Dist, kind: str, resume_from: Path | None):
    """(train, val, data) of cfg.train.data through the token cache of SFT (kind "sft") or DPO ("dpo"):
    sft_cache, else OUT_DIR/{kind}_tokens, built first when there is none (train.sft_data.load_sft_data), whose
    records, samples and those left out the first process says (data_line). data: the cache's manifest less its
    stats, which the run's checkpoints record, so that a resume refuses other inputs or settings even when the cache
    was deleted and rebuilt from them."""
    t = cfg.train
    paths = [t.data] if isinstance(t.data, str) else t.data
    settings = SFTSettings(cfg.model.max_seq_len + 1, t.val_fraction, t.min_prompt_chars, t.max_prompt_chars,
                           t.min_answer_chars, t.max_answer_chars)
    cache = t.sft_cache or Path(t.out_dir) / f"{kind}_tokens"
    started_with = read_config(resume_from).get("data") if resume_from is not None else None  # None: older run
    train, val, stats = load_sft_data(paths, tokenizer_path, cache, settings, t.pack, dist,
                                      cpu_workers(t.data_workers, "data_workers"), kind, started_with)
    check_ids_fit(cache, kind, stats, [d for d in (train, val) if d is not None], cfg.model.vocab_size)
    if dist.main:
        print(data_line(kind, stats))
    data = {k: v for k, v in read_sft_cache(cache).items() if k != "stats"}  # what the checkpoints record
    return train, val, data


def data_line(kind: str, stats: SFTStats) -> str:
    """What the token cache of kind ("sft", "dpo") holds: its records, those left out and why, and the samples of
    each split (DPO's: pairs, of two samples each)."""
    dpo = kind == "dpo"
    equal, per, noun = (f"{equal_words(stats)}, ", 2, ("pair", "pairs")) if dpo else ("", 1, ("sample", "samples"))
    val = stats.val_samples // per
    return (f"{kind} data: {stats.records} {agree(stats.records, 'record', 'records')}, {stats.bad} bad, {equal}"
            f"{stats.empty_answers} with an empty answer, {filtered_words(stats)}, {stats.truncated} truncated; "
            f"{stats.samples // per} train / {val} val {agree(val, *noun)}")


def fine_tune(cfg: RunConfig, resume: bool, stage: str, trainer_cls: type[Trainer] = Trainer,
              rows: Callable[[SFTData], Dataset] | None = None) -> Path:
    """sft and dpo, once each has checked that it has an init and data: a finished run is said and left before
    --init is read (found_run: it may be gone since), else the model of --init, the run checked (checked_run) before
    the token cache is built (minutes), a micro-batch's activations once it is read (check_rows_memory), then
    trained; returns final/. rows: the trainer's rows of the cache's samples (DPO's pairs), default the samples."""
    t = cfg.train
    t.check_stage(stage, cfg.sources)
    t.out_dir = t.out_dir or default_out_dir(stage, t.init)
    with process_group(t.device, t.ddp_timeout) as dist, held_by_main(t.out_dir, stage, dist):
        start = found_run(cfg, dist, resume, stage)  # a finished run is left before --init is read
        if start.finished:
            return Path(t.out_dir) / "final"
        cfg.model = init_model(cfg, STAGE_NAMES[stage])
        tok_path = t.tokenizer or tokenizer_dir(t.init)  # a LoRA init without one: its base's
        tokenizer = load_tokenizer(tok_path, remedy=TOKENIZER_OF_INIT)
        checked_run(cfg, tokenizer, dist, resume, tok_path, start, stage)
        train, val, data = token_cache(cfg, tok_path, dist, stage, start.resume_from)
        if rows is not None:
            train, val = rows(train), None if val is None else rows(val)
        check_rows_memory(cfg, dist.device, stage, train, dist.world, start.state)  # the rows' lengths known
        return run_training(cfg, train, val, tokenizer, dist, start, stage, trainer_cls, data)


def sft(cfg: RunConfig, resume: bool = False) -> Path:
    """`babyllama sft`: fine-tune cfg.train.init on the instruction or chat files of cfg.train.data."""
    if not cfg.train.init:
        raise UserError("SFT needs a model to start from: pass --init CHECKPOINT (e.g. runs/demo/pretrain/final).")
    if not cfg.train.data:
        raise UserError("SFT needs data: pass --data FILE... (alpaca/BELLE JSON, sft_data.csv, conversations or "
                        "messages JSONL).")
    return fine_tune(cfg, resume, "sft")
