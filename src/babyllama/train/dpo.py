"""DPO (Rafailov et al., 2023): `babyllama dpo`, preference tuning of an SFT model on the one Trainer.

    babyllama dpo --init runs/demo/sft/final --data pairs.jsonl --out_dir runs/dpo [--beta 0.1 --lora_rank 16]
    torchrun --standalone --nproc_per_node 4 -m babyllama dpo --init ... --data ... --precompute_ref_log_probs true

For a pair of answers to one prompt x, y_w chosen and y_l rejected, log π(y|x) sums the log-probs
of the answer's tokens and its <eos>, in SFT's chat format and truncation (data/preferences.py).
π is the model being trained, π_ref the frozen reference: the init, or its log-probs computed once
before training (precompute_ref_log_probs, kept in OUT_DIR/ref_logps.npz; while they are computed, each chunk
of CHUNK_BATCHES batches a rank goes to OUT_DIR/ref_logps.parts/, so that a stopped run goes on from there). With
the implicit rewards r(y) = β (log π(y|x) - log π_ref(y|x)), the loss of a pair is

    h = r(y_w) - r(y_l)                                the DPO paper's equation 7 is -log σ(h)
    loss = -(1 - ε) log σ(h) - ε log σ(-h)             ε = label_smoothing: the chance that a pair's
                                                       preference is flipped (conservative DPO)
         + α NLL(y_w)                                  α = rpo_alpha: the chosen answers' mean token NLL
                                                       (RPO, Pang et al. 2024; TRL's loss_type
                                                       ["sigmoid", "sft"], loss_weights [1, α])

Metrics, named as TRL logs them (means over the step's pairs): rewards/chosen, rewards/rejected,
rewards/accuracies (the share with r(y_w) > r(y_l)), rewards/margins (h), logps/chosen,
logps/rejected; on the held-out split val_loss, val_rewards/accuracies and so on.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import signal
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F

from babyllama.checkpoint import load_model, remove_stale_temporaries, weights_sha256
from babyllama.config import RunConfig
from babyllama.errors import Terminated, UserError, agree, discard, write_whole, writing
from babyllama.evaluate import padding_batch
from babyllama.progress import progress
from babyllama.settings import REFERENCE_PARTS
from babyllama.train.distributed import all_reduce_sum, barrier
from babyllama.train.sft_data import SFTData
from babyllama.train.stages import fine_tune
from babyllama.train.trainer import Trainer

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
REFERENCE_FILE = "ref_logps.npz"
READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)  # np.load's of a cut or damaged file
CHUNK_BATCHES = 64  # batches of each rank in a chunk of the reference log-probs, saved as it is done: a stop (Ctrl-C,
# SIGTERM, a crash) loses at most one chunk of the precompute (seconds on a CPU), not the whole of it


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO loss of each pair, and the chosen and rejected rewards (detached), all (B,), from the
    summed answer log-probs (B,) of the policy and of the reference.

    Rafailov et al. 2023, equation 7, with conservative DPO's label smoothing (Mitchell, 2023; TRL's
    sigmoid loss before TRL 1.0): -(1 - ε) log σ(h) - ε log σ(-h), h = β (Δ chosen - Δ rejected).
    """
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    h = chosen_rewards - rejected_rewards
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def answer_log_probs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N,) fp32: each row's summed log-probs of its targets that are not -1 (its answer and <eos>)."""
    _, nll = model(batch["idx"], batch["targets"], reduction="none")  # (N, T)
    return -nll.sum(dim=1)


def chosen_nll(logps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(): the mean NLL per answer token of the chosen half of a batch of pairs (RPO's SFT term, as TRL's
    "sft" loss: summed over the chosen answers' tokens, divided by their number). logps (2B,) from
    answer_log_probs, targets (2B, T) with -1 off the answers."""
    chosen, _ = logps.chunk(2)
    tokens = (targets[: len(chosen)] != -1).sum().clamp(min=1)
    return -chosen.sum() / tokens


def pair_sums(losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
              logps: torch.Tensor) -> torch.Tensor:
    """(len(METRICS) + 1,): the sums over the pairs of each metric, then the number of pairs."""
    chosen_logps, rejected_logps = logps.detach().chunk(2)
    columns = (losses.detach(), chosen_rewards, rejected_rewards, (chosen_rewards > rejected_rewards).float(),
               chosen_rewards - rejected_rewards, chosen_logps, rejected_logps)
    return torch.stack([c.sum() for c in columns] + [torch.tensor(float(len(losses)), device=losses.device)])


def means(sums: torch.Tensor) -> dict[str, float]:
    """METRICS -> their means over the pairs counted in sums."""
    n = float(sums[-1]) or 1.0
    return {name: float(s) / n for name, s in zip(METRICS, sums[:-1], strict=True)}


class PreferenceData:
    """Preference pairs for the trainer: row i is pair i of the DPO token cache, whose samples 2i and
    2i + 1 are its chosen and rejected answers; ref_logps (n, 2): the reference's, once computed."""

    def __init__(self, sequences: SFTData):
        self.sequences = sequences
        self.lengths = np.maximum(sequences.lengths[0::2], sequences.lengths[1::2])  # (n,) the longer of the two
        self.row_positions = sequences.row_positions[0::2] + sequences.row_positions[1::2]  # (n,) both rows'
        self.ref_logps: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.sequences) // 2

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """idx, targets (2B, T): the B chosen samples, then the B rejected ones; ref_logps (2B,) once computed."""
        batch = self.sequences.collate([2 * i for i in indices] + [2 * i + 1 for i in indices])
        if self.ref_logps is not None:
            batch["ref_logps"] = torch.from_numpy(self.ref_logps[indices].T.reshape(-1).copy())
        return batch

    def fingerprint(self) -> str:
        """SHA-256 of the pairs' ids and masks: what cached reference log-probs were computed on."""
        h = hashlib.sha256()
        for array in (self.sequences.ids, self.sequences.mask, self.sequences.offsets):
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()


class DPOTrainer(Trainer):
    """The Trainer with the DPO objective: a step's loss is the mean over its pairs."""

    def __init__(self, cfg: RunConfig, train_data: PreferenceData, val_data: PreferenceData | None, tokenizer,
                 dist, stage: str = "dpo", resume_from: Path | None = None, data: dict | None = None,
                 state: dict | None = None):
        super().__init__(cfg, train_data, val_data, tokenizer, dist, stage, resume_from, data, state)
        self.reference_record = {"path": str(Path(cfg.train.init).resolve()), "sha256": weights_sha256(cfg.train.init)}
        self.sums = torch.zeros(len(METRICS) + 1, device=dist.device)  # over this step's pairs so far

    @functools.cached_property
    def reference(self) -> torch.nn.Module | None:
        """The frozen init, loaded at its first use: a finished run resumed (run_training does nothing) never loads
        it; None once precompute_reference has its log-probs."""
        return load_model(self.t.init, self.dist.device).requires_grad_(False)

    def fit(self) -> Path:
        """Trainer.fit, the reference's log-probs first computed (or read) when precompute_ref_log_probs is set.
        Ctrl-C (SIGINT) or SIGTERM stops the precompute after the batch under way, on every rank alike, with
        KeyboardInterrupt or Terminated (stop_precompute_if_signalled), the chunks saved kept for the rerun to go on
        from."""
        if self.t.precompute_ref_log_probs:
            self.precompute_reference()
        return super().fit()

    def train_step(self) -> tuple[float | torch.Tensor, float | torch.Tensor | None]:
        """Trainer.train_step, its pairs' metrics summed afresh: a line's rewards/* and logps/* are of its step alone,
        as its loss, whatever log_every and wherever a run was stopped and resumed."""
        self.sums.zero_()
        return super().train_step()

    def units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.tensor(batch["idx"].size(0) // 2, device=batch["idx"].device)  # pairs

    def pair_losses(self, batch: dict[str, torch.Tensor]):
        """(losses, chosen rewards, rejected rewards) (B,) and the policy's log-probs (2B,) of a batch of pairs."""
        with torch.autocast(self.dist.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            logps = answer_log_probs(self.wrapped, batch)
            if "ref_logps" in batch:
                ref = batch["ref_logps"]
            else:
                with torch.no_grad():
                    ref = answer_log_probs(self.reference, batch)
        (chosen, rejected), (ref_chosen, ref_rejected) = logps.chunk(2), ref.float().chunk(2)
        return *dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.t.beta, self.t.label_smoothing), logps

    def forward(self, batch: dict[str, torch.Tensor], counted: bool = True) -> torch.Tensor:
        """The mean DPO loss of the batch's pairs (+ rpo_alpha times the chosen answers' NLL); their metrics
        add up in self.sums, unless not counted (a padding micro-batch: padding_loss)."""
        *parts, logps = self.pair_losses(batch)
        if counted:
            self.sums += pair_sums(*parts, logps)
        return parts[0].mean() + self.rpo_term(logps, batch)

    def padding_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """forward of a padding micro-batch, its pairs left out of the step's metrics (self.sums)."""
        return self.forward(batch, counted=False)

    def rpo_term(self, logps: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor | float:
        """rpo_alpha times the chosen answers' mean token NLL (0 without RPO): the loss's second term."""
        return self.t.rpo_alpha * chosen_nll(logps, batch["targets"]) if self.t.rpo_alpha else 0.0

    def step_metrics(self) -> dict[str, float]:
        step = means(all_reduce_sum(self.sums, self.dist))  # the step's pairs, on every rank
        return {k: v for k, v in step.items() if k != "loss"}  # the loss is logged already

    @torch.no_grad()
    def validation(self) -> dict[str, float]:
        """val_loss (with the RPO term, as the training loss) and val_rewards/... over the first
        eval_batches * global_batch held-out pairs (Trainer.val_batches, as Trainer.evaluate)."""
        if self.val_data is None:
            return {}
        d = self.dist
        mine, padding = self.val_batches()
        sums = torch.zeros_like(self.sums)
        self.wrapped.eval()
        for rows in mine:
            batch = {k: v.to(d.device) for k, v in self.val_data.collate(rows).items()}
            *parts, logps = self.pair_losses(batch)
            part = pair_sums(*parts, logps)
            part[0] += self.rpo_term(logps, batch) * part[-1]  # val_loss is the training loss's objective
            sums += part
        for _ in range(padding):  # counts nothing
            self.pair_losses({k: v.to(d.device) for k, v in padding_batch(self.val_data, 0).items()})
        self.wrapped.train()
        return {f"val_{k}": v for k, v in means(all_reduce_sum(sums, d)).items()}

    @torch.no_grad()
    def reference_log_probs(self, data: PreferenceData, name: str, parts: Path) -> np.ndarray:
        """(n, 2): the reference's summed answer log-probs of every pair (chosen, rejected), the ranks sharing the
        work. They are computed in chunks of CHUNK_BATCHES batches a rank, each saved whole in parts as
        NAME_START_END.npy (rows START to END) as it is done; the chunks already there (a stopped run's) are read,
        not computed again. Batches start at multiples of batch_size wherever a run stopped, so the values are those
        of a run that never stopped. A stop (stop_precompute_if_signalled) is agreed after each batch and once more
        after the last chunk is saved, so a signal then does not wait for a training step."""
        B, d = self.t.batch_size, self.dist
        out = np.zeros((len(data), 2), dtype=np.float32)
        start, rows = saved_rows(parts, name, out, d.main), d.world * B * CHUNK_BATCHES
        bar = progress(total=-(-len(data) // (d.world * B)), initial=start // (d.world * B),
                       desc="reference log-probs", unit=" batch", disable=not d.main)
        with bar, self.signals_flagged():
            for c in range(start, len(data), rows):
                end = min(c + rows, len(data))
                chunk = torch.zeros(end - c, 2, device=d.device)
                for i in range(-(-(end - c) // (d.world * B))):  # as many on every rank, each then agreeing on a stop
                    if (s := c + (i * d.world + d.rank) * B) < end:
                        batch = {k: v.to(d.device) for k, v in data.collate(list(range(s, min(s + B, end)))).items()}
                        with torch.autocast(d.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                            logps = answer_log_probs(self.reference, batch).float()
                        chunk[s - c : s - c + len(logps) // 2] = torch.stack(logps.chunk(2), dim=1)
                        bar.update()
                    self.stop_precompute_if_signalled()
                out[c:end] = all_reduce_sum(chunk, d).cpu().numpy()
                if d.main:
                    save_whole(parts / f"{name}_{c}_{end}.npy", functools.partial(np.save, arr=out[c:end]))
            self.stop_precompute_if_signalled()  # a signal as the last chunk was saved: before training's first step
        return out

    @contextmanager
    def signals_flagged(self) -> Iterator[None]:
        """For the body, SIGTERM and SIGINT only set stop_signal, as in training (Trainer.fit), for the ranks to agree
        on (stop_precompute_if_signalled); their handlers back after it."""
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)

    def stop_precompute_if_signalled(self) -> None:
        """Raise KeyboardInterrupt (SIGINT) or Terminated (SIGTERM) on every rank once the signal reached any
        (_stop_everywhere, a collective after each batch): under torchrun each process said "interrupted" (each
        got torchrun's SIGINT), and one that torchrun stopped as another died said "stopped by SIGTERM" where the
        collective now says that the other ended (distributed.process_group). Raises those, or UserError."""
        signum = self._stop_everywhere(True)
        if signum:
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated

    def precompute_reference(self) -> None:
        """Give the train and val pairs the reference's log-probs, from OUT_DIR/ref_logps.npz when it was made
        for the same init, pairs and dtype (whatever the batch or device: a resume goes on with the values it started
        with), else computed now (reference_log_probs, going on from the chunks in OUT_DIR/ref_logps.parts made for
        the same and with the same batch_size and device type, which change the values in their last digits) and
        kept there; then free the reference. A damaged ref_logps.npz or chunk (cut, of another shape, holding NaN or
        Inf) is said in a note and computed again, as a missing one; UserError where the reference itself gives NaN
        or Inf (check_finite): DPO never trains on those."""
        data = {"train": self.train_data, "val": self.val_data}
        data = {k: v for k, v in data.items() if v is not None}
        made_for = {"init": weights_sha256(self.t.init), "dtype": str(self.dtype),
                    **{k: v.fingerprint() for k, v in data.items()}}
        key = json.dumps(made_for)
        f, parts = self.out / REFERENCE_FILE, self.out / REFERENCE_PARTS
        cached = cached_reference(f, key, {k: len(v) for k, v in data.items()}, self.dist.main)
        if cached is not None:
            for name, d in data.items():
                d.ref_logps = cached[name]
        else:
            if self.dist.main:
                self.say_precompute()
                start_parts(parts, json.dumps({**made_for, "batch_size": self.t.batch_size,
                                               "device": self.dist.device.type}))
            barrier(self.dist)  # every rank reads the chunks there once they are of this key
            for name, d in data.items():
                d.ref_logps = self.reference_log_probs(d, name, parts)
                check_finite(d.ref_logps, name, self.t.init, self.dtype)
            if self.dist.main:
                arrays = {name: d.ref_logps for name, d in data.items()}
                save_whole(f, functools.partial(np.savez, key=np.array(key), **arrays))
                shutil.rmtree(parts)
            barrier(self.dist)
        self.reference = None

    def say_precompute(self) -> None:
        """Say how many pairs the precompute computes (all: a resume may train longer, and the file is of all the
        pairs) and how many of them this run's steps train on, so that a short run's long precompute is no surprise."""
        n, steps = len(self.train_data), self.total_steps - self.step
        trained = steps * self.global_batch
        if self.samples is not None:  # a tokens or epochs length: its last step may be partial
            trained = min(trained, self.samples - self.consumed_samples)
        val = f" and the {len(self.val_data)} held-out ones" if self.val_data is not None else ""
        print(f"reference log-probs: computing those of all {n} training {agree(n, 'pair', 'pairs')}{val} (once, kept "
              f"for a resume); this run's {steps} {agree(steps, 'step trains', 'steps train')} on {min(trained, n)} of "
              "them")


def cached_reference(f: Path, key: str, rows: dict[str, int], main: bool) -> dict[str, np.ndarray] | None:
    """The reference log-probs (rows[name], 2) of each split name that f (ref_logps.npz) holds for key (the init,
    pairs and dtype); None where f is missing, of another key, or damaged: cut, not an npz, lacking a split, of
    another shape, or holding NaN or Inf, which a note says (on the main rank) as they are computed again."""
    if not f.is_file():
        return None
    try:
        with np.load(f) as cached:
            if str(cached["key"]) != key:
                return None
            arrays = {name: cached[name] for name in rows}
    except READ_ERRORS as e:
        why = f"it cannot be read: {type(e).__name__}: {e}"
    else:
        why = next((f"its {name} {w}" for name, n in rows.items() if (w := not_log_probs(arrays[name], n))), None)
        if why is None:
            return arrays
    if main:
        print(f"note: {f} is damaged ({why}); the reference log-probs are computed again")
    return None


def not_log_probs(values: np.ndarray, rows: int) -> str | None:
    """Why values are not the reference log-probs (rows, 2) of rows pairs (chosen, rejected): another shape or type,
    or NaN or Inf; None when they are."""
    if values.shape != (rows, 2) or values.dtype.kind != "f":
        return f"values are {values.dtype} of shape {values.shape}, not float of shape ({rows}, 2)"
    if not np.isfinite(values).all():
        return f"log-probs of {int((~np.isfinite(values)).any(axis=1).sum())} of {rows} pairs are NaN or Inf"
    return None


def check_finite(ref_logps: np.ndarray, name: str, init: str, dtype: torch.dtype) -> None:
    """UserError when the reference log-probs (n, 2) just computed of the name split hold NaN or Inf: every step
    with such a pair would be skipped for its non-finite loss."""
    if not np.isfinite(ref_logps).all():
        bad = np.flatnonzero(~np.isfinite(ref_logps).all(axis=1))
        raise UserError(f"the reference {init} gives NaN or Inf log-probs to {len(bad)} of the {len(ref_logps)} "
                        f"{name} pairs (the first: pair {bad[0]}) in {dtype}; DPO cannot train on them.")


def start_parts(parts: Path, key: str) -> None:
    """Make parts the folder of the chunks of reference log-probs for key (the init's weights, the dtype, the pairs,
    the batch size and the device type): the chunks a stopped run left for the same key stay, less the temporary of
    the chunk it was saving (a kill -9's: save_whole's .NAME.tmp-PID of a dead process), and those for another (a
    changed init, data or batch_size) are removed, in a note that says what they were made with."""
    record = parts / "key.json"
    if record.is_file() and record.read_text(encoding="utf-8") == key:
        for done in remove_stale_temporaries(parts):
            print(f"note: {done} (left by a run that was stopped)")
        return
    if chunks := list(parts.glob("*.npy")) if parts.is_dir() else []:
        print(f"note: the {len(chunks)} {agree(len(chunks), 'chunk', 'chunks')} of reference log-probs in {parts} "
              f"{made_with(record, json.loads(key))}, so they are not reused: computed again")
    discard(parts)
    parts.mkdir(parents=True)
    write_whole(record, key)


def made_with(record: Path, key: dict) -> str:
    """What the chunks whose key.json is record were made with, against key (start_parts's, as a dict), in words."""
    try:
        old = json.loads(record.read_text(encoding="utf-8"))
        same = {k: v for k, v in old.items() if k not in ("batch_size", "device")} == \
            {k: v for k, v in key.items() if k not in ("batch_size", "device")}
        with_ = f"batch_size {old['batch_size']} on {old['device']}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "have no key.json that can be read"
    if not same:
        return f"were made for another init, pairs or dtype (with {with_})"
    return (f"were made with {with_}, not batch_size {key['batch_size']} on {key['device']} as now (the values change "
            "in their last digits with the batch)")


def saved_rows(parts: Path, name: str, out: np.ndarray, main: bool) -> int:
    """The rows of out (n, 2) that the chunks NAME_START_END.npy in parts hold from row 0 on without a gap, copied
    into out; returns the row where they end (0: none). A damaged chunk (cut, of another shape, holding NaN or Inf)
    ends them there, as a missing one, said in a note on the main rank: it and those after it are computed again."""
    chunks = {}
    for file in parts.glob(f"{name}_*_*.npy"):
        if m := re.fullmatch(rf"{re.escape(name)}_(\d+)_(\d+)\.npy", file.name):
            chunks[int(m[1])] = (int(m[2]), file)
    done = 0
    while done in chunks and done < len(out):
        end, file = chunks[done]
        if end > len(out):
            break
        try:
            values = np.load(file)
            why = not_log_probs(values, end - done)
        except READ_ERRORS as e:
            why = f"it cannot be read: {type(e).__name__}: {e}"
        if why:
            if main:
                print(f"note: {file} is damaged ({why}); the reference log-probs from pair {done} on are computed "
                      "again")
            break
        out[done:end] = values
        done = end
    return done


def save_whole(path: Path, save: Callable[[BinaryIO], None]) -> None:
    """path written by save (np.save, np.savez to an open file) whole or not at all: to a temporary beside it, then
    renamed over it (errors.writing: CannotWrite where the disk refuses it, the temporary removed on any failure)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path, tmp):
        with tmp.open("wb") as f:
            save(f)
        tmp.replace(path)


@torch.no_grad()
def preference_metrics(policy: torch.nn.Module, reference: torch.nn.Module, data: PreferenceData, beta: float,
                       batch_size: int = 32) -> dict[str, float]:
    """METRICS of policy against reference over every pair of data, and logps/accuracies: the share of
    pairs whose chosen answer the policy alone finds likelier (the demo's before and after).

    The loss is named dpo_loss: the DPO paper's equation 7, -log σ(h), without the label smoothing or
    the RPO term that the run may have trained with, so it is not that run's loss or val_loss."""
    sums, likelier = torch.zeros(len(METRICS) + 1), 0
    for s in range(0, len(data), batch_size):
        batch = data.collate(list(range(s, min(s + batch_size, len(data)))))
        logps, ref = answer_log_probs(policy, batch), answer_log_probs(reference, batch)
        (chosen, rejected), (ref_chosen, ref_rejected) = logps.chunk(2), ref.chunk(2)
        sums += pair_sums(*dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta), logps)
        likelier += int((chosen > rejected).sum())
    metrics = means(sums)
    return {"dpo_loss": metrics.pop("loss"), **metrics, "logps/accuracies": likelier / max(1, len(data))}


def dpo(cfg: RunConfig, resume: bool = False) -> Path:
    """`babyllama dpo`: tune cfg.train.init on the preference pairs of cfg.train.data; returns final/."""
    if not cfg.train.init:
        raise UserError("DPO needs the model to tune: pass --init CHECKPOINT (an SFT model, e.g. runs/demo/sft/final).")
    if not cfg.train.data:
        raise UserError("DPO needs preference pairs: pass --data FILE... ({prompt, chosen, rejected} records or "
                        "another shape the README lists).")
    return fine_tune(cfg, resume, "dpo", DPOTrainer, PreferenceData)  # check_stage refuses pack
