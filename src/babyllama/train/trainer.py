"""The training loop, one for every stage (pretraining, SFT, DPO): one process, one GPU, or torchrun.

    trainer = Trainer(cfg, train_data, val_data, tokenizer, dist, stage="pretrain")
    final = trainer.fit()          # RUN/final, the model for the next stage

Samples are numbered globally and visited in a per-epoch permutation drawn from the seed.
`consumed_samples` counts the samples of all steps so far (Megatron's term): step s uses the
global positions [s*G, (s+1)*G) with G = batch_size * grad_accum * processes. A checkpoint
stores it, so a run resumes at the same sample even on a different number of processes, and
the run's length (tokens or epochs) is kept in samples, so it ends after the same data whatever
the global batch after a resume: its last step takes the samples left, fewer than G where the
length is no multiple of it (a rank or micro-step left without rows runs a padding micro-batch
that counts nothing). The loss of a step is the mean over every target token of the
global batch, however it is split over micro-batches and processes. A step whose loss or
gradient norm is not finite changes nothing, and weights that are not finite are never saved.

Run directory: config.json (effective settings), metrics.jsonl, checkpoints/step_000500/ (the
last `keep_last`), final/ (the model to evaluate, chat with or fine-tune). With lora_rank the init
is frozen under peft's LoRA adapters, and checkpoints hold the adapter and name the init as base.
A stage with another objective (DPO) overrides `units`, `forward`, `step_metrics` and `validation`.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from babyllama.checkpoint import (
    base_record,
    is_base,
    load_model,
    model_tensors,
    prune_checkpoints,
    read_config,
    recorded_base,
    save_checkpoint,
    step_checkpoint,
    weights_sha256,
)
from babyllama.config import RunConfig, TrainConfig
from babyllama.errors import CannotWrite, Stopped, UserError, agree, write_whole, writing
from babyllama.evaluate import loss_sums, padding_batch
from babyllama.lora import (
    adapter_config,
    adapter_params,
    adapter_tensors,
    add_lora,
    is_adapter,
    load_adapter,
    lora_config,
)
from babyllama.model import LOSS_CHUNK, Transformer
from babyllama.progress import progress, read_metrics
from babyllama.tokenizer import Tokenizer
from babyllama.train.distributed import Dist, all_reduce_sum, barrier, fsdp_mesh
from babyllama.weights_file import finite

if TYPE_CHECKING:
    from tqdm import tqdm

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                   "L40": 181e12, "4090": 165e12, "A10": 125e12, "3090": 71e12}


class Dataset(Protocol):
    """What the trainer needs of a dataset: rows by index, each row's length, and its positions."""

    lengths: Sequence[int] | None  # tokens per row, to group rows of like length; None: all rows alike
    row_positions: np.ndarray | None  # (n,) each row's positions of collate's idx that hold ids, padding not
    # counted: what `tokens` counts; None: max_seq_len each (pretraining's windows)

    def __len__(self) -> int: ...

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """idx and targets (B, T) int64, targets -1 where there is no loss; optional segments (B, T),
        a document id per position (model.document_mask)."""
        ...


class GlobalOrder:
    """Sample index at each global position: a fresh permutation of all samples every epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.epoch, self.perm = -1, torch.empty(0, dtype=torch.long)

    def __call__(self, position: int) -> int:
        epoch = position // self.n
        if epoch != self.epoch:
            self.epoch, self.perm = epoch, epoch_order(self.n, self.seed, epoch)
        return int(self.perm[position % self.n])


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """(n,) the rows in the order that an epoch visits them: a permutation drawn from seed + epoch."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


def micro_batches(rows: list[int], lengths: Sequence[int] | None, batch_size: int, grad_accum: int,
                  dist: Dist) -> list[list[int]]:
    """This rank's grad_accum micro-batches of one step's rows (batch_size each; fewer, or none, in a
    partial last step).

    Rows of like length share a micro-batch (little padding); micro-step m of rank r takes the
    (m * world + r)-th slice, so the ranks' rows are disjoint and together are the step's.
    """
    if lengths is not None:
        rows = sorted(rows, key=lambda i: lengths[i])
    firsts = [(m * dist.world + dist.rank) * batch_size for m in range(grad_accum)]
    return [rows[f : f + batch_size] for f in firsts]


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress_ = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress_, 1.0)))


def amp_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: auto is bf16 on GPUs that have it, fp16 on older ones, fp32 elsewhere."""
    if setting == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[setting]  # TrainConfig checked it


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 FLOP/s of a known GPU (for MFU), else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def lora_of(t: TrainConfig):
    """peft's LoraConfig of the settings, or None without lora_rank."""
    return lora_config(t.lora_rank, t.lora_alpha, t.lora_dropout, t.lora_targets) if t.lora_rank else None


def size_text(n: float) -> str:
    """A size of n bytes in words that show it: in the largest binary unit it reaches (B, KiB, MiB, GiB, TiB), with
    2 significant digits or more (a tiny model's "0.0 GiB ... more than the 0.0 GiB" said nothing)."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:,.1f} {units[i]}" if n < 10 and i else f"{n:,.0f} {units[i]}"


CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))  # v2, v1


def cpu_memory() -> tuple[float, str]:
    """(bytes, words naming them): the memory one training process on the CPU may use, the least of the physical
    RAM, the cgroup's limit (v2 memory.max, v1 memory.limit_in_bytes) and what RLIMIT_AS (ulimit -v) leaves of this
    process's address space. The torchrun processes on this host (LOCAL_WORLD_SIZE) share the RAM and the cgroup's
    limit; RLIMIT_AS is each process's own. The words follow "the 2.0 GiB of" in a refusal."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    shared = [(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory")]
    for path in CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # v2 says "max" when there is none
            shared.append((int(text), f"memory that the cgroup limit ({path}) allows"))
    limits = [(n / local, f"{words}, for each of the {local} torchrun processes on this host (LOCAL_WORLD_SIZE)"
               if local > 1 else words) for n, words in shared]
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft != resource.RLIM_INFINITY:
        try:  # the address space this process maps already (torch's libraries: hundreds of MiB)
            used = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # no /proc (macOS)
            used = 0
        left = max(soft - used, 0)
        limits.append((left, "address space that ulimit -v (RLIMIT_AS) leaves this process"))
    return min(limits, key=lambda limit: limit[0])


def device_memory(device: torch.device) -> tuple[float, str]:
    """(bytes, words naming them) of the memory one training process may use: a GPU's whole memory (words: the
    device, "cuda:0"), else cpu_memory's."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, str(device)
    return cpu_memory()


def model_bytes(cfg: RunConfig, stage: str) -> tuple[float, float, float]:
    """(trained, reference, weights): the bytes that one process holds of the model (FSDP shards the trained model
    over WORLD_SIZE). trained: the trained weights, their gradients and AdamW's two moments, 16 bytes a parameter in
    fp32, with LoRA 4 for each of the frozen base's and 16 for each adapter parameter; reference: for DPO without
    precompute_ref_log_probs a second full copy of the init's weights, 4 bytes a parameter in each process, else 0;
    weights: those present through every step, the model's weights (4 bytes a parameter) and the reference."""
    t = cfg.train
    world = int(os.environ.get("WORLD_SIZE", 1)) if t.fsdp else 1
    lora = lora_of(t)
    base = cfg.model.num_params
    adapters = adapter_params(lora, cfg.model) if lora else 0
    reference = 4 * base if stage == "dpo" and not t.precompute_ref_log_probs else 0
    trained = ((4 if lora else 16) * base + 16 * adapters) / world
    return trained, reference, 4 * (base + adapters) / world + reference


def check_memory(cfg: RunConfig, device: torch.device, stage: str) -> None:
    """UserError, before anything is allocated, when the trained weights, their gradients and AdamW's two
    moments, with LoRA the frozen base's weights and the adapters', and for DPO without precompute_ref_log_probs the
    reference model (model_bytes) exceed the device's memory (a model of a million dims, or lora_rank 100000, would
    otherwise allocate for minutes, then be killed), or a step's token ids alone do, or, pretraining, a micro-batch's
    activations do (check_activations; SFT's and DPO's rows, which may be shorter and fewer than batch_size x
    max_seq_len, are checked by check_rows_memory once the token cache is read)."""
    t = cfg.train
    lora = lora_of(t)
    base = cfg.model.num_params
    adapters = adapter_params(lora, cfg.model) if lora else 0
    trained, reference, _ = model_bytes(cfg, stage)
    need = trained + reference
    have, of = device_memory(device)
    if need > have:
        what = ("the weights and the adapters' gradients and AdamW" if lora else "weights, gradients and AdamW") + \
            (", and the reference model's weights" if reference else "")
        fix = ("choose a smaller lora_rank or fewer lora_targets" if lora else
               "choose a smaller model (or shard it with fsdp over the processes of torchrun)")
        if reference and trained <= have:  # the reference is freed before the first step when its log-probs are
            fix = "pass --precompute_ref_log_probs true, which frees the reference model before training"
        params = f"{base:,} parameters" + (f" and its LoRA adapters {adapters:,}" if lora else "")
        raise UserError(f"the model has {params}: training needs about {size_text(need)} for {what}, more than "
                        f"the {size_text(have)} of {of}; {fix}.")
    ids = 16 * t.batch_size * t.grad_accum * (cfg.model.max_seq_len + 1)  # a step's idx and targets, int64
    if ids > have:
        raise UserError(f"batch_size {t.batch_size} x grad_accum {t.grad_accum} rows of {cfg.model.max_seq_len} "
                        f"tokens need {size_text(ids)} for their token ids alone, more than the "
                        f"{size_text(have)} of {of}; lower them.")
    if stage == "pretrain":
        T = cfg.model.max_seq_len
        check_activations(cfg, device, stage, t.batch_size * T, ids, f"batch_size {t.batch_size} rows of {T} tokens",
                          t.batch_size > 1)


def check_rows_memory(cfg: RunConfig, device: torch.device, stage: str, data: Dataset, world: int = 1,
                      state: dict | None = None) -> None:
    """check_activations for SFT's and DPO's training rows (data: SFTData, or DPO's PreferenceData of pairs), once
    the token cache is read: the micro-batch that holds the longest row the run visits (visited_lengths: from the
    consumed samples of state, the trainer state resumed, or 0) has batch_size rows, counted as a process's share of
    the samples the run trains on when they are fewer (world: the processes; a max_steps run's micro-batches are
    full, its steps' rows wrapping around the epochs; a DPO pair is two rows, its chosen and rejected answers), each
    padded to at least that row's length (packed rows: to max_seq_len), whatever they are. A lower bound, as
    check_activations counts. Raises UserError."""
    t, T = cfg.train, cfg.model.max_seq_len
    if not len(data):
        return
    step, first = (state["step"], consumed_samples(state)) if state is not None else (0, 0)
    planned = planned_samples(t, T, len(data), data.row_positions)  # None with max_steps: every step is full
    end = first + max(0, t.max_steps - step) * t.batch_size * t.grad_accum * world if planned is None else planned
    if end <= first:  # nothing left to train on
        return
    rows = min(t.batch_size, math.ceil((end - first) / world))
    longest = int(np.max(visited_lengths(data.lengths, first, end, t.seed)))
    length = T if t.pack else min(longest - 1, T)  # collate's T: the longest row's ids less one
    unit = "pairs" if stage == "dpo" else "rows"
    trains = "the run trains on" if world == 1 else f"each of the {world} processes trains on"
    fewer = f" (counted as the {rows} {unit} {trains})" if rows < t.batch_size else ""
    batch, several = f"batch_size {t.batch_size} {unit}{fewer}", rows > 1
    if stage == "dpo":
        rows, batch = 2 * rows, f"{batch}, {2 * rows} rows of chosen and rejected answers"
    padded = f" of {T} tokens (packed)" if t.pack else f" padded to the longest row's {length} tokens"
    check_activations(cfg, device, stage, rows * length, 16 * rows * length, batch + padded, several)


def visited_lengths(lengths: Sequence[int], first: int, end: int, seed: int) -> np.ndarray:
    """The lengths (of lengths, (n,) each row's) of the rows that a run trains on at the positions [first, end) of the
    global order (GlobalOrder of seed: epoch_order's epochs in turn; first: the samples consumed before a resume), all
    of them where that is an epoch or more."""
    lengths, n = np.asarray(lengths), len(lengths)
    if end - first >= n:
        return lengths
    rows = [epoch_order(n, seed, epoch)[max(first - epoch * n, 0) : end - epoch * n]
            for epoch in range(first // n, (end - 1) // n + 1)]
    return lengths[torch.cat(rows).numpy()]


def check_activations(cfg: RunConfig, device: torch.device, stage: str, positions: int, ids: float,
                      batch: str, several: bool) -> None:
    """UserError when the activations of a micro-batch of `positions` positions (rows x their padded length; batch:
    it in words, "batch_size 8 rows of 512 tokens"; several: it holds more than one row, or DPO pair, so a lower
    batch_size shrinks it), counted low (activation_bytes), with the weights (model_bytes) and `ids` bytes of token
    ids exceed the device's memory (device_memory). Its remedies, those that apply: activation_checkpointing when it
    is off and the micro-batch fits with it, a lower batch_size when there are several rows, else a shorter
    max_seq_len (pretraining), or --pack false (packed SFT rows: max_seq_len long whatever their samples) or else
    shorter samples (SFT, DPO), or a smaller model."""
    t = cfg.train
    acts = activation_bytes(cfg, device, positions, t.activation_checkpointing)
    resident = model_bytes(cfg, stage)[2] + ids
    have, of = device_memory(device)
    if resident + acts <= have:
        return
    fixes = []
    if not t.activation_checkpointing and resident + activation_bytes(cfg, device, positions, True) <= have:
        fixes.append("pass --activation_checkpointing true (each block recomputed in the backward pass)")
    if several:
        fixes.append("lower --batch_size (and raise --grad_accum to keep the tokens a step)")
    if not fixes and stage == "pretrain":
        fixes.append("choose a smaller --model.max_seq_len or model")
    elif not fixes:  # packed rows are max_seq_len long, whatever their samples
        fixes.append("pass --pack false (rows as long as their samples, not max_seq_len) or use a smaller model"
                     if t.pack else "use shorter samples (--max_prompt_chars, --max_answer_chars) or a smaller model")
    raise UserError(f"a micro-batch of {batch} needs at least {size_text(acts)} for its activations, "
                    f"{size_text(resident + acts)} with the weights and token ids, more than the "
                    f"{size_text(have)} of {of}; {', or '.join(fixes)}.")


def activation_bytes(cfg: RunConfig, device: torch.device, positions: int, checkpointing: bool) -> float:
    """A lower bound of the bytes of a micro-batch's activations, `positions` positions (rows x their padded
    length), with activation_checkpointing or without. Counted, per position at the autocast dtype's itemsize:
    what autograd surely keeps of each block for the backward pass, the inputs of wqkv, wo and w13 (dim each, or a
    tensor of dim they are recomputed from: with LoRA's frozen base the norms' inputs and attention's q) and w13's
    output (2 ffn_dim), from which SwiGLU's backward and w2's input are computed (torch.compile may recompute w2's
    input, so it is not counted); with activation_checkpointing each block's input instead (dim) and one block's
    recomputed; then the final norm's output and the head's input gradient (dim each), and one chunk's fp32 logits
    (the loss never forms them all: model.linear_cross_entropy). Gradients, AdamW's moments, attention's own buffers,
    the norms' copies and DPO's reference forward (no_grad: it keeps nothing) are left out, so a step that fits is
    never refused (batch_size 100000 was killed, with no word, by the kernel's out-of-memory killer)."""
    m = cfg.model
    block = 3 * m.dim + 2 * m.ffn_dim  # a block's kept tensors per position
    kept = m.n_layers * m.dim + block if checkpointing else m.n_layers * block
    itemsize = amp_dtype(cfg.train.dtype, device).itemsize
    return (kept + 2 * m.dim) * positions * itemsize + min(positions, LOSS_CHUNK) * m.vocab_size * 4


# what a resume may not change: the checkpoint's optimizer state and adapter are of the first four; seed and pack
# decide which sample or pack each global position is; beta, label_smoothing and rpo_alpha are DPO's loss
RESUME_SETTINGS = ("optimizer", "lora_rank", "lora_alpha", "lora_targets", "seed", "pack", "beta",
                   "label_smoothing", "rpo_alpha")


def check_resume(cfg: RunConfig, resume_from: Path) -> None:
    """UserError when the checkpoint to resume was trained with other model settings, or other RESUME_SETTINGS,
    or, for LoRA, on another base than --init, or, for DPO, against another reference model than --init (is_base:
    the weights its config.json names, by stat or SHA-256, as chat and eval check), or on the --init folder whose
    weights changed since (said so: "resume with --init" named that same folder); older checkpoints, which do
    not record these, are checked for what they record (a LoRA one's rank and alpha: its adapter_config.json's)."""
    config = read_config(resume_from)
    saved = config["model"]
    diff = sorted(k for k in saved if saved[k] != cfg.model.to_dict().get(k))
    if diff:
        raise UserError(f"{resume_from} was trained with other model settings ({', '.join(diff)}); "
                        "resume with the same settings or use a new out_dir.")
    train = config.get("run", {}).get("train", {})
    if "lora_rank" not in train:  # a checkpoint from before runs were recorded: its files say whether it is LoRA's
        lora = adapter_config(resume_from) if is_adapter(resume_from) else None
        train = {**train, "lora_rank": 0} if lora is None else {**train, "lora_rank": lora.r,
                                                                 "lora_alpha": lora.lora_alpha}
    diff = [f"{k} {train[k]} (now {getattr(cfg.train, k)})" for k in RESUME_SETTINGS
            if k in train and train[k] != getattr(cfg.train, k)]
    if diff:
        raise UserError(f"{resume_from} was trained with {', '.join(diff)}; resume with the same settings or use "
                        "a new out_dir.")
    for key, trained, model in (("base", "is an adapter of the base", "base"),
                                ("reference", "was trained against the reference model", "model")):
        source = recorded_base(config, key, resume_from)  # a LoRA run's base, a DPO run's reference: base_record's
        if not source or (key == "base" and not cfg.train.lora_rank) or is_base(source, cfg.train.init):
            continue
        if Path(source["path"]).resolve() == Path(cfg.train.init).resolve():  # --init is that folder: changed since
            raise UserError(f"{resume_from} {trained} {source['path']}, whose weights changed since; restore that "
                            f"{model} or use a new out_dir.")
        raise UserError(f"{resume_from} {trained} {source['path']}, not --init {cfg.train.init} (other weights); "
                        f"resume with --init {source['path']} or use a new out_dir.")


def planned_samples(t: TrainConfig, seq_len: int, rows: int, row_positions: np.ndarray | None = None) -> int | None:
    """The samples a run trains on: of a tokens budget, the first ones of the global order whose positions, what
    `tokens` logs, add up to it (samples_of_tokens; row_positions (n,): each row's, None: seq_len each, pretraining's
    windows, so tokens / seq_len of them rounded up), so that the run ends at the step where the logged tokens first
    reach it; of epochs, epochs times the rows; None with max_steps, which counts steps."""
    if t.max_steps > 0:
        return None
    if t.tokens > 0 and row_positions is not None:
        return samples_of_tokens(t.tokens, row_positions, t.seed)
    if t.tokens > 0:
        return math.ceil(t.tokens / seq_len)
    return math.ceil(t.epochs * rows)


def samples_of_tokens(tokens: int, row_positions: np.ndarray, seed: int) -> int:
    """The fewest samples at the start of the global order of rows (GlobalOrder of seed) whose positions
    (row_positions (n,), each row's) add up to tokens or more."""
    n, per_epoch = len(row_positions), int(row_positions.sum())
    epochs = (tokens - 1) // per_epoch  # the whole epochs before the one in which the count reaches tokens
    counted = np.cumsum(row_positions[epoch_order(n, seed, epochs).numpy()], dtype=np.int64)
    return epochs * n + int(np.searchsorted(counted, tokens - epochs * per_epoch)) + 1


def planned_steps(t: TrainConfig, samples: int | None, step: int, consumed: int, global_batch: int) -> int:
    """The step at which a run at step, with consumed samples behind it, ends: max_steps, else when its samples
    (planned_samples) are consumed, in steps of global_batch rows.

    The length is kept in samples, so a run resumed with another global batch (batch_size,
    grad_accum or processes) ends after the same data, in steps of its new batch, the last of
    them with the samples left (Trainer.step_rows).
    """
    if samples is None:
        return t.max_steps
    return step + max(0, math.ceil((samples - consumed) / global_batch))


def check_average(t: TrainConfig, resume_from: Path, step: int, averaged: int, total_steps: int,
                  steps_before: int) -> None:
    """UserError when the weight average resumed from (averaged steps at step) holds other steps than average_last
    asks of the run's length of total_steps (turned on, or changed, after its steps began: the mean was of the steps
    after the resume alone); nothing without average_last, which drops the mean. steps_before: the length in steps
    of the global batch before the resume: a tokens or epochs run resumed with another batch (other processes) has
    its steps counted anew, and its mean goes on from there."""
    if not t.average_last:
        return
    first = total_steps - round(t.average_last * total_steps)  # the steps after it are averaged
    due = max(0, step - first)
    if averaged not in (due, max(0, step - steps_before + round(t.average_last * steps_before))):
        last = agree(averaged, "step", f"{averaged} steps")
        had = f"the mean of the weights of its last {last}" if averaged else "no mean of the weights"
        raise UserError(f"{resume_from} holds {had}, but average_last {t.average_last:g} of {total_steps} "
                        f"{agree(total_steps, 'step', 'steps')} averages the steps after step {first}, {due} of them "
                        f"by step {step}; resume with the average_last and length the run had, or use a new out_dir.")


def consumed_samples(state: dict) -> int:
    """The samples of all steps so far of a trainer state ("position" in older checkpoints)."""
    return state.get("consumed_samples", state.get("position"))


def build_model(cfg: RunConfig, device: torch.device, resume_from: Path | None) -> Transformer:
    """A fresh model from the seed, then the weights of the checkpoint to resume (checked by check_resume),
    else of init.

    With lora_rank: init's weights, frozen, under LoRA adapters: new ones, or the checkpoint's to resume.
    """
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model).to(device)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    lora = lora_of(cfg.train)
    source = cfg.train.init if lora else resume_from or cfg.train.init
    if source:
        model.load_state_dict(load_model(source).state_dict())
    if lora:
        model = add_lora(model, lora)
        if resume_from is not None:
            load_adapter(model, resume_from)
    return model


def wrap_model(model: Transformer, t: TrainConfig, dist: Dist, dtype: torch.dtype) -> torch.nn.Module:
    """FSDP2 (fully_shard, each block then the whole) or DDP across processes; torch.compile on top."""
    if t.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp, mesh = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32), fsdp_mesh(dist)
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        wrapped = fully_shard(model, mesh=mesh, mp_policy=mp)
    elif dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    else:
        wrapped = model
    return torch.compile(wrapped) if t.compile else wrapped


FUSED_ADAMW_DEVICES = {"cuda"}  # one kernel for all parameters, which can skip a step on the GPU (device_step)


def check_optimizer(t: TrainConfig) -> None:
    """UserError for Muon with a torch that lacks it (before 2.9); with FSDP TrainConfig refuses it."""
    if t.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
        raise UserError(f"optimizer = \"muon\" needs torch >= 2.9, this is {torch.__version__}; use "
                        "optimizer = \"adamw\" or a newer torch.")


def check_dtype(t: TrainConfig, device: torch.device) -> None:
    """UserError for dtype fp16 on a device other than a CUDA GPU: fp16 trains with a GradScaler, which runs on CUDA
    alone (elsewhere torch warned that it is disabled, and trained fp16 unscaled, where small gradients underflow)."""
    if t.dtype == "fp16" and device.type != "cuda":
        raise UserError(f"dtype fp16 trains on CUDA GPUs only (its GradScaler runs there); on {device.type} use "
                        "bf16 or fp32 (auto: fp32).")


def build_optimizers(model: Transformer, t: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW for every parameter, or Muon for the blocks' weight matrices and AdamW for the rest.

    Muon (Jordan et al., 2024) orthogonalises each matrix's update (Newton-Schulz iterations); on
    the demo it ends 150 steps 0.71 nats below AdamW, at ~20% more time per step (bench/RESULTS.md).
    "match_rms_adamw" scales its step like AdamW's, so one lr and weight decay serve both; its
    momentum is beta1. AdamW decays the matrices only (not norms), as nanoGPT does. Empty groups are left
    out (with LoRA under Muon every trainable matrix is Muon's): a checkpoint's optimizer state cannot be
    loaded into more than one empty group (torch.distributed.checkpoint's set_optimizer_state_dict).
    """
    muon = t.optimizer == "muon"  # check_optimizer refused it where it cannot run
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    in_muon = {n: muon and n.startswith("layers.") and p.dim() == 2 for n, p in named}
    rest = [p for n, p in named if not in_muon[n]]
    groups = [g for g in ({"params": [p for p in rest if p.dim() >= 2], "weight_decay": t.weight_decay},
                          {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}) if g["params"]]
    fused = device.type in FUSED_ADAMW_DEVICES and not t.fsdp
    adamw = [torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused or None)] if groups else []
    if not muon:
        return adamw
    matrices = [p for n, p in named if in_muon[n]]
    return [torch.optim.Muon(matrices, lr=t.lr, momentum=t.beta1, weight_decay=t.weight_decay,
                             adjust_lr_fn="match_rms_adamw"), *adamw]


class MetricsLog:
    """metrics.jsonl (strict JSON: a non-finite number is null), and TensorBoard when installed; rank 0 only.

    A resumed run first drops the lines past the step it resumes from (written after that
    checkpoint, they are about to be redone) and the last line if a kill cut it, then marks the
    resume with {"step", "resumed": true, "global_batch"}: each step appears once. A run that
    starts from the beginning (resumed_at None) starts both afresh: the lines and events of a run
    killed before its first checkpoint are of steps it is about to redo.
    """

    def __init__(self, out_dir: Path, enabled: bool, resumed_at: int | None = None):
        self.path = path = out_dir / "metrics.jsonl"
        if enabled and path.is_file():
            kept = [] if resumed_at is None else [r for r in read_metrics(path)[0]
                                                  if r["step"] <= resumed_at and not r.get("final")]
            write_whole(path, "".join(strict_json(r) + "\n" for r in kept))
        with writing(path):
            self.f = path.open("a") if enabled else None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
            if resumed_at is None:
                shutil.rmtree(out_dir / "tensorboard", ignore_errors=True)
            # a resume drops the events of the steps after its checkpoint, as it drops their lines
            self.tb = SummaryWriter(str(out_dir / "tensorboard"),
                                    purge_step=None if resumed_at is None else resumed_at + 1)

    def write(self, record: dict) -> None:
        if self.f is None:
            return
        with writing(self.path, file=self.f):  # CannotWrite where the disk refuses it
            self.f.write(strict_json(record) + "\n")
            self.f.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        if self.tb is not None:
            self.tb.close()


def strict_json(record: dict) -> str:
    """One line of JSON that every parser reads: NaN and infinities become null (RFC 8259 has neither)."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()},
                      allow_nan=False)


def state_dict_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


class Trainer:
    """Builds the model, its wrapper and optimisers in __init__, then `fit` runs the steps."""

    def __init__(self, cfg: RunConfig, train_data: Dataset, val_data: Dataset | None, tokenizer: Tokenizer | None,
                 dist: Dist, stage: str = "pretrain", resume_from: Path | None = None, data: dict | None = None,
                 state: dict | None = None):
        """resume_from: the checkpoint to resume (None: start at step 0), state its trainer state (RunStart's, which
        resumable_checkpoint read); data: what checkpoints record of the data (token cache or shards)."""
        t = self.t = cfg.train
        self.cfg, self.train_data, self.val_data, self.tokenizer, self.dist, self.stage = (
            cfg, train_data, val_data, tokenizer, dist, stage)
        self.out = Path(t.out_dir)
        self.global_batch = t.batch_size * t.grad_accum * dist.world  # rows per step
        self.global_batch_before = self.global_batch  # a resumed run's before the resume (load_state_dict)
        self.order = GlobalOrder(len(train_data), t.seed)
        self.dtype = amp_dtype(t.dtype, dist.device)
        self.model = build_model(cfg, dist.device, resume_from)
        self.lora = lora_of(t)
        if self.lora is not None:  # what the checkpoints name as their base
            self.base = {"path": str(Path(t.init).resolve()), "sha256": weights_sha256(t.init)}
        self.wrapped = wrap_model(self.model, t, dist, self.dtype)
        self.optimizers = build_optimizers(self.model, t, dist.device)
        self.scaler = torch.amp.GradScaler(enabled=self.dtype == torch.float16)
        # a GPU step that never waits for the GPU: fused AdamW skips non-finite steps itself (device_step)
        self.skip_on_device = not self.scaler.is_enabled() and all(o.defaults.get("fused") for o in self.optimizers)
        # tokens: the positions trained on, padding not counted (Dataset.row_positions), summed over the ranks
        self.step, self.consumed_samples, self.tokens, self.bad_steps = 0, 0, 0, 0
        self.average: dict[str, torch.Tensor] = {}  # running mean of the weights (average_last)
        self.averaged = 0  # steps in that mean
        self.stop_signal = 0  # the signal that asked the run to stop, 0: none
        self.gave_up_at = 0  # the step that ended max_bad_steps skipped steps in a row, 0: none
        self.resumed = resume_from is not None
        self.data = data  # what checkpoints record of the data, to check a resume against
        self.reference_record: dict | None = None  # DPO's reference model (--init), {"path", "sha256"}: they record it
        if resume_from is not None:
            self.load_state_dict(state)
        self.samples = planned_samples(t, cfg.model.max_seq_len, len(train_data), train_data.row_positions)
        self.total_steps = planned_steps(t, self.samples, self.step, self.consumed_samples, self.global_batch)
        if not t.average_last:  # without average_last a resumed mean is dropped, and final/ holds the last weights
            self.average, self.averaged = {}, 0

    def step_rows(self) -> int:
        """The rows of the next step: a global batch, or the fewer that the run's samples leave for its last step
        (a partial step, so that the run ends after its samples whatever the global batches before)."""
        if self.samples is None:
            return self.global_batch
        return min(self.global_batch, self.samples - self.consumed_samples)

    # --- one step ---

    def units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the loss is a mean over: the target tokens that carry loss."""
        return (batch["targets"] != -1).sum()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's mean loss over its targets that are not -1, under autocast."""
        with torch.autocast(self.dist.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            _, loss = self.wrapped(batch["idx"], batch["targets"], segments=batch.get("segments"))
        return loss

    def train_step(self) -> tuple[float | torch.Tensor, float | torch.Tensor | None]:
        """One optimiser step; returns (mean loss, grad norm or None when the loss was not finite), as
        floats, or as 0-dim tensors on the GPU when skip_on_device (read them when logging)."""
        t, d = self.t, self.dist
        lr = lr_at(self.step, t, self.total_steps)
        for group in (g for o in self.optimizers for g in o.param_groups):
            group["lr"] = lr
        size = self.step_rows()
        rows = [self.order(self.consumed_samples + i) for i in range(size)]
        pin = d.device.type == "cuda"  # a copy from pinned memory does not wait for the GPU
        mine = micro_batches(rows, self.train_data.lengths, t.batch_size, t.grad_accum, d)  # [] past a partial step's
        # a rank dealt no rows of a micro-step (a partial last step) runs a padding batch: every rank makes as many
        # passes as the others, as FSDP (which gathers the weights in each) and DDP (synced in the last) need
        cpu = [self.train_data.collate(m) if m else padding_batch(self.train_data, rows[0]) for m in mine]
        batches = [{k: (v.pin_memory() if pin else v).to(d.device, non_blocking=True) for k, v in b.items()}
                   for b in cpu]
        counts = [self.units(b) if m else torch.zeros((), dtype=torch.long, device=d.device)  # target tokens that
                  for b, m in zip(batches, mine, strict=True)]  # carry loss; none in a padding micro-batch
        each, T = self.train_data.row_positions, self.cfg.model.max_seq_len  # each None: T positions a row
        positions = float(sum(len(m) * T if each is None else each[m].sum() for m in mine))  # this rank's, padding
        # not counted; none in a padding micro-batch
        # one all_reduce for both; torch.full fills on the device, no copy that would wait for the GPU
        sums = all_reduce_sum(torch.stack([torch.stack(counts).sum().float(),
                                           torch.full((), positions, device=d.device)]), d)
        total = sums[0].clamp(min=1)
        loss_sum = torch.zeros((), device=d.device)
        for i, (batch, n) in enumerate(zip(batches, counts, strict=True)):
            last = i == len(batches) - 1
            sync = nullcontext() if last or not d.enabled or t.fsdp else self.wrapped.no_sync()  # DDP: sync once
            with sync:
                loss = (self.forward(batch) if mine[i] else self.padding_loss(batch)) * n  # the summed loss
                self.scaler.scale(loss * d.world / total).backward()  # DDP averages over ranks
            loss_sum += loss.detach().float()
        loss = all_reduce_sum(loss_sum, d) / total  # (), on the device
        self.step_tokens = sums[1]  # every rank's positions; settle adds them to self.tokens (read on the host)
        self.consumed_samples += size
        self.step += 1
        if self.skip_on_device:
            return self.device_step(loss)
        mean_loss, norm = float(loss), None
        if math.isfinite(mean_loss):
            for o in self.optimizers:
                self.scaler.unscale_(o)
            norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip or float("inf")))
        if norm is None or not math.isfinite(norm):
            self.skip_step(norm is not None)
            return mean_loss, norm
        self.bad_steps = 0
        for o in self.optimizers:
            self.scaler.step(o)
        self.scaler.update()
        self.model.zero_grad(set_to_none=True)
        return mean_loss, norm

    def padding_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """forward of a padding micro-batch, for a stage whose forward keeps more than the loss (DPO's metrics)."""
        return self.forward(batch)

    def device_step(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The optimiser step with no host synchronisation: fused AdamW leaves weights, moments and its
        step count untouched when `found_inf` is 1 (torch.amp's mechanism), which a non-finite loss or
        gradient norm sets on the GPU. Skipped steps are counted when the step is logged (fit)."""
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.grad_clip or float("inf"))
        found_inf = (~(torch.isfinite(loss) & torch.isfinite(norm))).float()
        for o in self.optimizers:
            o.found_inf = found_inf
            o.step()
        self.model.zero_grad(set_to_none=True)
        return loss, norm

    def skip_step(self, unscaled: bool) -> None:
        """A step with a non-finite loss or gradient norm changes nothing: no optimiser step, moments untouched.

        With fp16 the GradScaler halves its scale (torch.amp's own skip); such an overflow counts
        towards max_bad_steps only once the scale is down to 1, since the first steps of an fp16
        run overflow while it finds its scale. Every other skipped step counts.
        """
        if unscaled:
            self.scaler.update()  # with fp16: back off the scale; otherwise nothing
        self.model.zero_grad(set_to_none=True)
        if self.scaler.is_enabled() and unscaled and self.scaler.get_scale() > 1:
            return
        self.bad_steps += 1
        if self.bad_steps >= self.t.max_bad_steps:
            self.gave_up_at = self.gave_up_at or self.step  # fit stops once the step's line is written

    @torch.no_grad()
    def update_average(self) -> None:
        """Add the weights to the running mean once the last average_last of the steps has begun.

        The mean of the last steps' weights (stochastic weight averaging, Izmailov et al., 2018)
        smooths out where the final steps happened to leave them: on the demo's SFT, +0.9 and +0.5
        points of held-out sentiment accuracy (two seeds, bench/RESULTS.md). The mean is part of
        the resumable state.
        """
        if self.step <= self.total_steps - round(self.t.average_last * self.total_steps):
            return
        self.averaged += 1
        for name, p in self.model.named_parameters():
            if not p.requires_grad:  # LoRA's frozen base
                continue
            if name in self.average:
                self.average[name].lerp_(p, 1 / self.averaged)  # mean += (p - mean) / n
            else:
                self.average[name] = p.detach().clone()

    @torch.no_grad()
    def use_average(self) -> None:
        """Put the averaged weights into the model (nothing to do without average_last)."""
        params = dict(self.model.named_parameters())
        for name, mean in self.average.items():
            params[name].copy_(mean)

    def step_metrics(self) -> dict[str, float]:
        """What a stage logs beside the loss at a logged step, of that step alone as its loss (DPO: its rewards);
        on every rank."""
        return {}

    def validation(self) -> dict[str, float | None]:
        """The held-out metrics of metrics.jsonl."""
        return {"val_loss": self.evaluate()}

    def evaluate(self) -> float | None:
        """Mean loss over the first eval_batches * global_batch validation rows (val_batches), their sums of nats and
        tokens added up over the ranks: the loss is the one process's, whatever the number of ranks."""
        if self.val_data is None:
            return None
        mine, padding = self.val_batches()
        self.wrapped.eval()
        nats, tokens, _ = loss_sums(self.forward, self.val_data, [i for b in mine for i in b], self.t.batch_size,
                                    self.dist.device, padding_batches=padding)
        self.wrapped.train()
        sums = all_reduce_sum(torch.tensor([nats, tokens], dtype=torch.float32, device=self.dist.device), self.dist)
        return float(sums[0] / sums[1].clamp(min=1))

    def val_batches(self) -> tuple[list[list[int]], int]:
        """This rank's batches of the first eval_batches * global_batch validation rows (the same rows whatever the
        number of processes, batch_size and grad_accum that make that global batch), in batches of batch_size dealt
        out to the ranks; and the padding batches (0 or 1) it runs more, whose targets are all masked: every rank runs
        as many forward passes as the others, as FSDP (which gathers the weights in each) and DDP (which syncs
        buffers) need."""
        B, d = self.t.batch_size, self.dist
        n = min(len(self.val_data), self.t.eval_batches * self.global_batch)
        batches = [list(range(s, min(s + B, n))) for s in range(0, n, B)]
        mine = batches[d.rank :: d.world]
        return mine, -(-len(batches) // d.world) - len(mine)

    # --- state and checkpoints ---

    def state_dict(self) -> dict:
        """Everything but the weights that a resume needs: optimisers, data position, RNG, weight average."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        optim = get_optimizer_state_dict(self.model, self.optimizers, options=state_dict_options())
        budget = {"tokens": self.t.tokens, "samples": self.samples} if self.t.tokens and not self.t.max_steps else None
        return {"step": self.step, "consumed_samples": self.consumed_samples, "bad_steps": self.bad_steps,
                "tokens": self.tokens, "world": self.dist.world, "global_batch": self.global_batch,
                "optimizer": optim, "average": {k: v.cpu() for k, v in self.average.items()},
                "averaged": self.averaged, "scaler": self.scaler.state_dict(), "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(self.dist.device) if self.dist.device.type == "cuda" else None,
                # an epochs run's length before the data is read (resumed_length): its rows; a tokens run's: the
                "rows": len(self.train_data), "tokens_budget": budget,  # samples its budget came to
                "total_steps": self.total_steps}  # the length its schedule had, to say a resume changed it

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizers, state["optimizer"], options=state_dict_options())
        self.step, self.bad_steps, self.tokens = state["step"], state["bad_steps"], state["tokens"]
        self.consumed_samples = consumed_samples(state)
        self.global_batch_before = state["global_batch"]
        self.average = {k: v.to(self.dist.device) for k, v in state.get("average", {}).items()}
        self.averaged = state.get("averaged", 0)
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if state.get("rng_cuda") is not None and self.dist.device.type == "cuda":  # dropout's masks on a GPU
            torch.cuda.set_rng_state(state["rng_cuda"], self.dist.device)  # every rank's: all start from one seed
        if state["global_batch"] != self.global_batch and self.dist.main:
            print(f"note: global batch changed from {state['global_batch']} to {self.global_batch} "
                  f"{agree(self.global_batch, 'sample', 'samples')}")

    def save(self, final: bool = False) -> Path:
        """A checkpoint of this step, to resume from; with final final/ instead, the model as it is (fit puts the
        weight average in first, use_average)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        self.check_finite()
        # every rank takes part in gathering FSDP's shards
        weights = get_model_state_dict(self.model, options=state_dict_options()) if self.t.fsdp else None
        state = None if final else self.state_dict()
        path = self.out / "final" if final else step_checkpoint(self.out, self.step)
        if self.dist.main:
            extra = {"run": self.cfg.to_dict(), "stage": self.stage, "step": self.step}
            tensors_of = model_tensors if self.lora is None else adapter_tensors  # LoRA: the adapter only
            if self.lora is not None:
                extra["base"] = self.base
            if self.data is not None:
                extra["data"] = self.data
            if self.reference_record is not None:
                extra["reference"] = base_record(self.reference_record, path)
            tensors = tensors_of(self.model, weights)  # once, on the CPU, for both directories
            try:
                save_checkpoint(path, self.model, self.tokenizer, state, extra, tensors, self.lora)
                if not final:
                    prune_checkpoints(self.out, self.t.keep_last)
            except CannotWrite as e:  # the step checkpoints saved before are whole
                raise CannotWrite(e.code, e.path, " (the checkpoints before it are intact)") from None
        barrier(self.dist)
        return path

    @torch.no_grad()
    def check_finite(self) -> None:
        """Refuse to save weights (or a weight average) that are not finite, on every rank at once."""
        tensors = [*self.model.parameters(), *self.average.values()]
        bad = sum(not finite(p.to_local() if hasattr(p, "to_local") else p) for p in tensors)  # as a load checks
        if all_reduce_sum(torch.tensor(float(bad), device=self.dist.device), self.dist) > 0:
            raise UserError(f"the weights are not finite after step {self.step}, so nothing was saved; resume "
                            "from the last checkpoint with a lower lr, or use bf16 instead of fp16.")

    # --- the loop ---

    def fit(self) -> Path:
        """Train to total_steps and return final/; SIGTERM or SIGINT saves a checkpoint and raises Stopped."""
        log = MetricsLog(self.out, self.dist.main, self.step if self.resumed else None)
        if self.resumed:
            log.write({"step": self.step, "resumed": True, "global_batch": self.global_batch})
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        bar = progress(total=self.total_steps, initial=self.step, desc=self.stage, unit=" step",
                       disable=not self.dist.main)
        self.wrapped.train()
        self.window = time.perf_counter(), self.tokens  # where tokens_per_s is measured from
        start = self.step
        try:
            pending: list[dict] = []  # steps whose numbers are still on the GPU (skip_on_device)
            while self.step < self.total_steps:
                loss, norm = self.train_step()
                self.update_average()
                bar.update()
                pending.append({"step": self.step, "tokens": self.step_tokens, "loss": loss,
                                "lr": lr_at(self.step - 1, self.t, self.total_steps), "grad_norm": norm})
                logged, evaluated, saved = self.due()
                settled = logged or evaluated or saved or not self.skip_on_device
                if settled:
                    self.log_settled(pending, log, bar, logged, evaluated)
                    pending = []
                self.check_bad_steps()
                self.stop_if_signalled(settled)
                if saved:
                    self.save()
            if self.step > start:  # else the checkpoint resumed from is this step's
                self.save()
            self.use_average()  # the final loss is final/'s
            log.write({"step": self.step, "tokens": self.tokens, **self.validation(), "final": True})
            # final/ last: a run counts as finished once it is there (run_training), so its final line is written
            # by then; a kill before final/ is written redoes the line (a resume drops it) and final/
            return self.save(final=True)
        finally:
            bar.close()
            log.close()
            for s, h in handlers.items():
                signal.signal(s, h)

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def due(self) -> tuple[bool, bool, bool]:
        """Whether the step just taken is logged, evaluated and checkpointed. The last step is always
        logged, and never evaluated or checkpointed here: fit saves final/ and evaluates it after the loop."""
        t, last = self.t, self.step == self.total_steps
        logged = self.step % t.log_every == 0 or last
        evaluated = bool(t.eval_every) and self.step % t.eval_every == 0 and not last
        saved = bool(t.save_every) and self.step % t.save_every == 0 and not last
        return logged, evaluated, saved

    def log_settled(self, pending: list[dict], log: MetricsLog, bar: tqdm, logged: bool, evaluated: bool) -> None:
        """Write the pending steps' lines: the last step's when it is logged (with its throughput and the
        stage's step metrics) or evaluated (with the validation metrics), and every skipped step's."""
        records = self.settle(pending)
        record = records[-1]
        if logged:
            record |= self.throughput()
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)
            record |= self.step_metrics()
        if evaluated:
            record |= self.validation()
        for r in records:
            if r is record and (logged or evaluated) or r.get("skipped"):
                log.write(r)

    def settle(self, pending: list[dict]) -> list[dict]:
        """Read the steps' loss, grad norm and tokens (one host sync for all of them on a GPU; tokens then counts
        them up to the last of them) and mark skipped
        steps; with skip_on_device, count them here (max_bad_steps in a row stop the run)."""
        for r in pending:
            self.tokens += round(float(r["tokens"]))  # the step's tokens over all ranks
            r["tokens"] = self.tokens
            loss, norm = (float(v) if isinstance(v, torch.Tensor) else v for v in (r["loss"], r["grad_norm"]))
            r["loss"], r["grad_norm"] = loss, norm
            finite = math.isfinite(loss) and norm is not None and math.isfinite(norm)
            if not finite:
                r["skipped"] = True
            if self.skip_on_device:  # other steps were counted as they ran (skip_step)
                self.bad_steps = 0 if finite else self.bad_steps + 1
                if self.bad_steps >= self.t.max_bad_steps:
                    self.gave_up_at = self.gave_up_at or r["step"]
        return pending

    def throughput(self) -> dict[str, float]:
        """tokens_per_s since the last logged step, and mfu (the share of a known GPU's peak FLOP/s, as in
        the PaLM paper's appendix B): the FLOPs of the tokens counted (not padding, whose work lowers it), each at
        flops_per_token of max_seq_len; the next measurement starts here."""
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize()
        start, tokens = self.window
        rate = (self.tokens - tokens) / (time.perf_counter() - start)
        self.window = time.perf_counter(), self.tokens
        peak = peak_flops(self.dist.device)
        if not peak:
            return {"tokens_per_s": rate}
        return {"tokens_per_s": rate, "mfu": rate * self.model.flops_per_token() / (peak * self.dist.world)}

    def check_bad_steps(self) -> None:
        """UserError once max_bad_steps steps in a row were skipped (their lines are written by then)."""
        if self.gave_up_at:
            n, at = self.t.max_bad_steps, self.gave_up_at
            when = agree(n, f"at step {at}", f"in {n} steps in a row (last at step {at})")
            raise UserError(f"the loss or its gradient was not finite {when}; lower the lr, use bf16 instead of fp16, "
                            "or check the data.")

    def stop_if_signalled(self, settled: bool) -> None:
        """Save a checkpoint and raise Stopped when SIGTERM or SIGINT reached any rank."""
        signum = self._stop_everywhere(settled)
        if signum:
            path = self.save()
            raise Stopped(f"stopped by {signal.Signals(signum).name} at step {self.step} of "
                          f"{self.total_steps}, checkpoint {path}", signum)

    def _stop_everywhere(self, settled: bool) -> int:
        """The signal that stopped any rank (the largest number when several did), else 0. Ranks agree
        at settled steps only (the same steps on every rank) when the step itself never syncs."""
        if not self.dist.enabled:
            return self.stop_signal
        if self.skip_on_device and not settled:
            return 0
        flag = torch.tensor(float(self.stop_signal), device=self.dist.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag)
