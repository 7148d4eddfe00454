"""The training loop, shared by pretraining and SFT: one process, one GPU, or torchrun.

    babyllama pretrain --config configs/demo.toml [--resume] [--key value ...]
    torchrun --standalone --nproc_per_node 4 -m babyllama pretrain --config configs/baby-92m.toml

Samples are numbered globally and visited in a per-epoch permutation drawn from the seed;
step s uses global positions [s*G, (s+1)*G) with G = batch_size * grad_accum * processes.
A checkpoint stores that position, so a run resumes at the same sample even on a different
number of processes. The loss of a step is the mean over every target token of the global
batch, however it is split over micro-batches and processes.

Run directory: config.json (effective settings), metrics.jsonl, checkpoints/step_000500/ (the
last `keep_last`), final/ (the model to evaluate, chat with or fine-tune).
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Protocol

import torch

from babyllama.checkpoint import (
    check_tokenizer_fits,
    load_model,
    load_train_state,
    model_tensors,
    read_config,
    save_checkpoint,
)
from babyllama.config import RunConfig
from babyllama.errors import UserError
from babyllama.model import Transformer, loss_positions
from babyllama.progress import progress
from babyllama.tokenizer import Tokenizer
from babyllama.train.distributed import Dist, all_reduce_sum, barrier, init_distributed, shutdown

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                   "L40": 181e12, "4090": 165e12, "A10": 125e12, "3090": 71e12}


class Dataset(Protocol):
    def __len__(self) -> int: ...
    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]: ...


class GlobalOrder:
    """Sample index at each global position: a fresh permutation of all samples every epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.epoch, self.perm = -1, torch.empty(0, dtype=torch.long)

    def __call__(self, position: int) -> int:
        epoch = position // self.n
        if epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self.epoch, self.perm = epoch, torch.randperm(self.n, generator=g)
        return int(self.perm[position % self.n])


def lr_at(step: int, cfg, total: int) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress_ = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress_, 1.0)))


def amp_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if setting not in dtypes:
        raise UserError(f"dtype must be auto, fp32, bf16 or fp16, not {setting!r}.")
    return dtypes[setting]


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def latest_checkpoint(out_dir: Path) -> Path | None:
    ckpts = sorted((out_dir / "checkpoints").glob("step_*"))
    return ckpts[-1] if ckpts else None


class MetricsLog:
    """metrics.jsonl, and TensorBoard when it is installed; rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.f = (out_dir / "metrics.jsonl").open("a") if enabled else None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                pass

    def write(self, record: dict) -> None:
        if self.f is None:
            return
        self.f.write(json.dumps(record) + "\n")
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


class Trainer:
    def __init__(self, cfg: RunConfig, train_data: Dataset, val_data: Dataset | None, tokenizer: Tokenizer,
                 dist: Dist, kind: str = "pretrain"):
        self.cfg, self.t = cfg, cfg.train
        self.train_data, self.val_data, self.tokenizer, self.dist, self.kind = (
            train_data, val_data, tokenizer, dist, kind)
        self.out = Path(self.t.out_dir)
        self.global_batch = self.t.batch_size * self.t.grad_accum * dist.world
        self.total_steps = self._total_steps()
        self.dtype = amp_dtype(self.t.dtype, dist.device)
        self.order = GlobalOrder(len(train_data), self.t.seed)
        self.step, self.position, self.bad_steps = 0, 0, 0  # position: global samples consumed
        self.tokens = 0
        self.average: dict[str, torch.Tensor] = {}  # running mean of the weights (average_last)
        self.averaged = 0  # steps in that mean
        self.stop_requested = False

    def _total_steps(self) -> int:
        t = self.t
        if t.max_steps > 0:
            return t.max_steps
        if t.tokens > 0:
            return math.ceil(t.tokens / (self.global_batch * self.cfg.model.max_seq_len))
        return max(1, math.ceil(t.epochs * len(self.train_data) / self.global_batch))

    # --- model, optimiser, state ---

    def build(self, resume_from: Path | None) -> None:
        torch.manual_seed(self.t.seed)
        self.model = Transformer(self.cfg.model).to(self.dist.device)
        if self.t.init and resume_from is None:
            self.model.load_state_dict(load_model(self.t.init).state_dict())
        state = None
        if resume_from is not None:
            saved = read_config(resume_from)["model"]
            if saved != self.cfg.model.to_dict():
                diff = sorted(k for k in saved if saved[k] != self.cfg.model.to_dict().get(k))
                raise UserError(f"{resume_from} was trained with other model settings ({', '.join(diff)}); "
                                "resume with the same settings or use a new out_dir.")
            self.model.load_state_dict(load_model(resume_from).state_dict())
            state = load_train_state(resume_from)
            if state is None:
                raise UserError(f"{resume_from} has no trainer state to resume from.")
        self.wrapped = self._wrap(self.model)
        self.optimizers = self._optimizers()
        self.scaler = torch.amp.GradScaler(enabled=self.dtype == torch.float16)
        if state is not None:
            self._load_state(state)

    def _wrap(self, model: Transformer) -> torch.nn.Module:
        if self.t.fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
            for block in model.layers:
                fully_shard(block, mp_policy=mp)
            wrapped = fully_shard(model, mp_policy=mp)
        elif self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            wrapped = DistributedDataParallel(model, device_ids=ids)
        else:
            wrapped = model
        return torch.compile(wrapped) if self.t.compile else wrapped

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        """AdamW for every parameter, or Muon for the blocks' weight matrices and AdamW for the rest.

        Muon orthogonalises each matrix's update (Newton-Schulz iterations); on the demo it ends 150
        steps 0.71 nats below AdamW, at ~20% more time per step (bench/RESULTS.md). "match_rms_adamw"
        scales its step like AdamW's, so one lr and weight decay serve both; its momentum is beta1.
        """
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.t.optimizer == "adamw":
            return [self._adamw([p for _, p in named])]
        if not hasattr(torch.optim, "Muon") or self.t.fsdp:
            raise UserError("optimizer = \"muon\" needs torch >= 2.9 and works without FSDP (DDP is fine); "
                            "use optimizer = \"adamw\" otherwise.")
        is_matrix = {n: n.startswith("layers.") and p.dim() == 2 for n, p in named}
        muon = torch.optim.Muon([p for n, p in named if is_matrix[n]], lr=self.t.lr, momentum=self.t.beta1,
                                weight_decay=self.t.weight_decay, adjust_lr_fn="match_rms_adamw")
        return [muon, self._adamw([p for n, p in named if not is_matrix[n]])]

    def _adamw(self, params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": self.t.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused = self.dist.device.type == "cuda" and not self.t.fsdp
        return torch.optim.AdamW(groups, lr=self.t.lr, betas=(self.t.beta1, self.t.beta2), fused=fused or None)

    def _state_options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def _train_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        optim = get_optimizer_state_dict(self.model, self.optimizers, options=self._state_options())
        return {"step": self.step, "position": self.position, "bad_steps": self.bad_steps, "tokens": self.tokens,
                "world": self.dist.world, "global_batch": self.global_batch, "optimizer": optim,
                "average": {k: v.cpu() for k, v in self.average.items()}, "averaged": self.averaged,
                "scaler": self.scaler.state_dict(), "rng_cpu": torch.get_rng_state()}

    def _load_state(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizers, state["optimizer"], options=self._state_options())
        self.step, self.position, self.bad_steps = state["step"], state["position"], state["bad_steps"]
        self.tokens = state["tokens"]
        self.average = {k: v.to(self.dist.device) for k, v in state.get("average", {}).items()}
        self.averaged = state.get("averaged", 0)
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if state["global_batch"] != self.global_batch and self.dist.main:
            print(f"note: global batch changed from {state['global_batch']} to {self.global_batch} samples")

    def _model_state(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        if self.t.fsdp:  # every rank takes part in gathering the shards
            return get_model_state_dict(self.model, options=self._state_options())
        return self.model.state_dict()

    def save(self, final: bool = False) -> Path:
        """A checkpoint of this step, to resume from; with final also final/, the weight average if any."""
        tensors, state = self._model_state(), self._train_state()
        path = self.out / "checkpoints" / f"step_{self.step:06d}"
        if self.dist.main:
            tensors = model_tensors(self.model, tensors)  # once, on the CPU, for both directories
            extra = {"run": self.cfg.to_dict(), "kind": self.kind, "step": self.step}
            save_checkpoint(path, self.model, self.tokenizer, state, extra, tensors)
            for old in sorted((self.out / "checkpoints").glob("step_*"))[: -self.t.keep_last]:
                shutil.rmtree(old)
            if final:
                if self.average:
                    tensors = model_tensors(self.model, self.average)
                save_checkpoint(self.out / "final", self.model, self.tokenizer, None, extra, tensors)
        barrier(self.dist)
        return path

    # --- one step ---

    def _micro_batches(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the current step, from the global order."""
        t, d = self.t, self.dist
        step = [self.order(self.position + i) for i in range(self.global_batch)]
        lengths = getattr(self.train_data, "lengths", None)
        if lengths is not None:  # samples of similar length share a micro-batch: little padding
            step.sort(key=lambda i: lengths[i])
        batches = []
        for m in range(t.grad_accum):
            first = (m * d.world + d.rank) * t.batch_size
            batch = self.train_data.collate(step[first : first + t.batch_size])
            batches.append({k: v.to(d.device, non_blocking=True) for k, v in batch.items()})
        return batches

    @staticmethod
    def _counted(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Number of target tokens that carry loss."""
        return loss_positions(batch["targets"], batch.get("loss_mask")).sum()

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        autocast = torch.autocast(self.dist.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        with autocast:
            _, loss = self.wrapped(batch["idx"], batch["targets"], batch.get("loss_mask"),
                                   attn_mask=batch.get("attn_mask"))
        return loss

    def train_step(self) -> tuple[float, float | None]:
        """One optimiser step; returns (mean loss, grad norm or None when the step was skipped)."""
        lr = lr_at(self.step, self.t, self.total_steps)
        for group in (g for o in self.optimizers for g in o.param_groups):
            group["lr"] = lr
        batches = self._micro_batches()
        counts = [self._counted(b) for b in batches]
        total = all_reduce_sum(torch.stack(counts).sum().float(), self.dist).clamp(min=1)
        loss_sum = torch.zeros((), device=self.dist.device)
        for i, (batch, n) in enumerate(zip(batches, counts, strict=True)):
            last = i == len(batches) - 1
            sync = nullcontext() if last or not hasattr(self.wrapped, "no_sync") else self.wrapped.no_sync()
            with sync:
                loss = self._forward(batch) * n  # the summed loss of this micro-batch
                self.scaler.scale(loss * self.dist.world / total).backward()  # DDP averages over ranks
            loss_sum += loss.detach().float()
        mean_loss = float(all_reduce_sum(loss_sum, self.dist) / total)
        self.tokens += sum(b["idx"].numel() for b in batches) * self.dist.world  # positions, padding included
        self.position += self.global_batch
        self.step += 1
        if not math.isfinite(mean_loss):
            self.model.zero_grad(set_to_none=True)
            self.bad_steps += 1
            if self.bad_steps >= self.t.max_bad_steps:
                raise UserError(f"the loss was not finite in {self.bad_steps} steps in a row (last at step "
                                f"{self.step}); lower the lr, use bf16 instead of fp16, or check the data.")
            return mean_loss, None
        self.bad_steps = 0
        for o in self.optimizers:
            self.scaler.unscale_(o)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.grad_clip or float("inf"))
        for o in self.optimizers:
            self.scaler.step(o)
        self.scaler.update()
        self.model.zero_grad(set_to_none=True)
        return mean_loss, float(norm)

    @torch.no_grad()
    def update_average(self) -> None:
        """Add the weights to the running mean once the last average_last of the steps has begun.

        The mean of the last steps' weights (stochastic weight averaging) smooths out where the
        final steps happened to leave them: on the demo's SFT, +0.9 and +0.5 points of held-out
        sentiment accuracy (two seeds, bench/RESULTS.md). The mean is part of the resumable state.
        """
        if self.step <= self.total_steps - round(self.t.average_last * self.total_steps):
            return
        self.averaged += 1
        for name, p in self.model.named_parameters():
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

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over the first eval_batches * batch_size validation samples, split over ranks."""
        if self.val_data is None:
            return None
        self.wrapped.eval()
        n = min(len(self.val_data), self.t.eval_batches * self.t.batch_size)
        loss_sum = torch.zeros((), device=self.dist.device)
        count = torch.zeros((), device=self.dist.device)
        mine = list(range(self.dist.rank * self.t.batch_size, n, self.dist.world * self.t.batch_size))
        for start in mine:
            batch = self.val_data.collate(list(range(start, min(start + self.t.batch_size, n))))
            batch = {k: v.to(self.dist.device) for k, v in batch.items()}
            c = self._counted(batch)
            loss_sum += self._forward(batch).float() * c
            count += c
        self.wrapped.train()
        return float(all_reduce_sum(loss_sum, self.dist) / all_reduce_sum(count, self.dist).clamp(min=1))

    # --- the loop ---

    def _on_signal(self, signum, frame) -> None:
        self.stop_requested = True

    def _stop_everywhere(self) -> bool:
        flag = torch.tensor(float(self.stop_requested), device=self.dist.device)
        return bool(all_reduce_sum(flag, self.dist) > 0)

    def fit(self) -> Path:
        t, main = self.t, self.dist.main
        log = MetricsLog(self.out, main)
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        peak, flops = peak_flops(self.dist.device), self.model.flops_per_token()
        bar = progress(total=self.total_steps, initial=self.step, desc=self.kind, unit=" step", disable=not main)
        self.wrapped.train()
        window_start, window_tokens = time.perf_counter(), self.tokens
        try:
            while self.step < self.total_steps:
                loss, norm = self.train_step()
                self.update_average()
                bar.update()
                record = {"step": self.step, "tokens": self.tokens, "loss": loss,
                          "lr": lr_at(self.step - 1, t, self.total_steps), "grad_norm": norm}
                logged = self.step % t.log_every == 0 or self.step == self.total_steps
                if logged:
                    if self.dist.device.type == "cuda":
                        torch.cuda.synchronize()
                    rate = (self.tokens - window_tokens) / (time.perf_counter() - window_start)
                    record["tokens_per_s"] = rate
                    if peak:
                        record["mfu"] = rate * flops / (peak * self.dist.world)
                    window_start, window_tokens = time.perf_counter(), self.tokens
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
                if t.eval_every and self.step % t.eval_every == 0 and self.step < self.total_steps:
                    record["val_loss"] = self.evaluate()
                if logged or "val_loss" in record:
                    log.write(record)
                if self._stop_everywhere():
                    path = self.save()
                    if main:
                        print(f"\nstopped by a signal at step {self.step}; resume with --resume ({path})")
                    return path
                if t.save_every and self.step % t.save_every == 0 and self.step < self.total_steps:
                    self.save()
            self.save(final=True)
            self.use_average()  # the final loss is final/'s
            log.write({"step": self.step, "tokens": self.tokens, "val_loss": self.evaluate(), "final": True})
            return self.out / "final"
        finally:
            bar.close()
            log.close()
            for s, h in handlers.items():
                signal.signal(s, h)


def run_training(cfg: RunConfig, train_data: Dataset, val_data: Dataset | None, tokenizer: Tokenizer,
                 dist: Dist, resume: bool, kind: str) -> Path:
    """Check the settings, write config.json, build the model and train."""
    out = Path(cfg.train.out_dir)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                        f"{cfg.model.vocab_size}; set --model.vocab_size {tokenizer.vocab_size} or more.")
    resume_from = latest_checkpoint(out) if resume else None
    for ckpt in (resume_from, cfg.train.init):
        if ckpt:
            check_tokenizer_fits(tokenizer, cfg.model, read_config(ckpt).get("tokenizer"), where=str(ckpt))
    if resume and resume_from is None and dist.main:
        print(f"note: nothing to resume in {out / 'checkpoints'}; starting from the beginning")
    if not resume and latest_checkpoint(out) is not None:
        raise UserError(f"{out} already has checkpoints; pass --resume to continue or choose another out_dir.")
    trainer = Trainer(cfg, train_data, val_data, tokenizer, dist, kind)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        print(f"{kind}: {len(train_data):,} rows, {trainer.total_steps:,} steps of {trainer.global_batch} "
              f"rows on {dist.world} x {dist.device.type}, {trainer.dtype}")  # a row: a window, sample or pack
    trainer.build(resume_from)
    return trainer.fit()


def pretrain(cfg: RunConfig, resume: bool = False) -> Path:
    """`babyllama pretrain`: train on the shards of cfg.train.data."""
    from babyllama.tokenizer import load_tokenizer
    from babyllama.train.pretrain_data import PretrainData

    if not cfg.train.data:
        raise UserError("pretraining needs data: set [train] data in the config or pass --data DIR.")
    dist = init_distributed(cfg.train.device)
    try:
        T = cfg.model.max_seq_len
        train_data = PretrainData(cfg.train.data, T, "train")
        has_val = any(s["split"] == "val" for s in train_data.manifest["shards"])
        val_data = PretrainData(cfg.train.data, T, "val") if has_val else None
        tok_path = cfg.train.tokenizer or (Path(cfg.train.data) / "tokenizer")
        tokenizer = load_tokenizer(tok_path)
        if tokenizer.fingerprint != train_data.fingerprint:
            raise UserError(f"the shards in {cfg.train.data} were made with another tokenizer "
                            f"({train_data.fingerprint}) than {tok_path} ({tokenizer.fingerprint}).")
        return run_training(cfg, train_data, val_data, tokenizer, dist, resume, "pretrain")
    finally:
        shutdown(dist)


def sft(cfg: RunConfig, resume: bool = False) -> Path:
    """`babyllama sft`: fine-tune cfg.train.init on the instruction or chat files of cfg.train.data."""
    from babyllama.config import config_from_dict
    from babyllama.tokenizer import load_tokenizer
    from babyllama.train.sft_data import build_sft_data

    t = cfg.train
    if not t.init:
        raise UserError("SFT needs a model to start from: pass --init CHECKPOINT (e.g. runs/demo/pretrain/final).")
    if not t.data:
        raise UserError("SFT needs data: pass --data FILE... (alpaca/BELLE JSON, sft_data.csv, conversations).")
    cfg.model = config_from_dict(read_config(t.init)).model  # the architecture is the checkpoint's
    dist = init_distributed(t.device)
    try:
        tokenizer = load_tokenizer(t.tokenizer or t.init)
        paths = [t.data] if isinstance(t.data, str) else t.data
        filters = {"min_prompt": t.min_prompt_chars, "max_prompt": t.max_prompt_chars,
                   "min_answer": t.min_answer_chars, "max_answer": t.max_answer_chars}
        train_data, val_data, stats = build_sft_data(paths, tokenizer, cfg.model.max_seq_len, t.val_fraction,
                                                     t.pack, **filters)
        if dist.main:
            print(f"sft data: {stats.records} records, {stats.bad} bad, {stats.filtered} filtered by length, "
                  f"{stats.truncated} truncated; {stats.samples} train / {stats.val_samples} val samples")
        return run_training(cfg, train_data, val_data, tokenizer, dist, resume, "sft")
    finally:
        shutdown(dist)
