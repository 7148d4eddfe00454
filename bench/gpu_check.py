"""One table of GPU figures: pretraining tokens/s and MFU, packed SFT with FlexAttention against the
dense mask, KV-cache decoding, host syncs in a training step, and a one-process FSDP2 step.

    bash bench/gpu_check.sh                       # on a GPU machine: under 8 minutes on an H100/H200
    python bench/gpu_check.py --device cpu --smoke  # the same code on tiny shapes, to check the script

Goals (bench/RESULTS.md): MFU >= 45% for baby-92m pretraining in bf16 on an H100/H200-class GPU,
decoding >= 2,000 tokens/s at batch 1 for baby-92m, no host sync inside a training step, and
FlexAttention's gradients equal to the dense mask's.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch

from babyllama.config import RunConfig, TrainConfig
from babyllama.model import KVCache, Transformer, preset
from babyllama.train.distributed import Dist
from babyllama.train.trainer import Trainer, peak_flops, size_text

ROWS: list[tuple[str, str, str]] = []  # (what, figure, note)


def row(what: str, figure: str, note: str = "") -> None:
    ROWS.append((what, figure, note))
    print(f"  {what:44s} {figure:>22s}  {note}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call after warm-up calls (which include compilation)."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def peak_memory(device: torch.device) -> str:
    if device.type != "cuda":
        return "-"
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    return size_text(peak)


def optimizer_step(model: Transformer, loss_fn, dtype: torch.dtype, device: torch.device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def pretraining(name: str, batch: int, args, device: torch.device, dtype: torch.dtype) -> None:
    cfg = preset(name, **args.shape)
    T = cfg.max_seq_len
    idx = torch.randint(0, cfg.vocab_size, (batch, T + 1), device=device)
    peak = peak_flops(device)
    for compile_ in (False, True):
        model = Transformer(cfg).to(device)
        forward = torch.compile(model) if compile_ else model
        step = optimizer_step(model, lambda f=forward: f(idx[:, :-1], idx[:, 1:])[1], dtype, device)
        secs = timed(step, args.steps, 3 if compile_ else 1, device)
        tokens_s = batch * T / secs
        mfu = f"MFU {tokens_s * model.flops_per_token(T) / peak:.1%}" if peak else "MFU -"
        row(f"pretrain {name} {'compiled' if compile_ else 'eager'} ({batch}x{T})", f"{tokens_s:,.0f} tok/s",
            f"{mfu}, peak {peak_memory(device)}")
        del model, forward, step


def packed_segments(batch: int, T: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, T) sample ids of rows packed with samples of 16..min(256, T/2) tokens (SFT-like), padding last."""
    rows = []
    for _ in range(batch):
        lengths, total = [], 0
        while True:
            n = int(torch.randint(16, min(256, T // 2) + 1, (1,), generator=generator))
            if total + n > T:
                break
            lengths.append(n)
            total += n
        seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))
        rows.append(torch.cat([seg, torch.full((T - total,), -1)]))
    return torch.stack(rows)


def packed_sft(args, device: torch.device, dtype: torch.dtype) -> None:
    import babyllama.model as M

    cfg = preset("baby-92m", **args.shape)
    T, B = cfg.max_seq_len, args.sft_batch
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    segments = packed_segments(B, T, g).to(device)
    targets = torch.where(segments >= 0, torch.roll(idx, -1, 1), -1)
    model = Transformer(cfg).to(device)
    grads = {}
    for backend in ("flex", "dense"):
        M.FLEX_DEVICES = {device.type} if backend == "flex" else set()
        if backend == "flex" and M.flex_attention is None:
            row("packed SFT flex", "unavailable", f"torch {torch.__version__}")
            continue
        if device.type == "cpu" and backend == "flex":
            row("packed SFT flex", "skipped", "no FlexAttention backward on a CPU")
            continue
        step = optimizer_step(model, lambda: model(idx, targets, segments=segments)[1], dtype, device)
        secs = timed(step, args.steps, 2, device)
        row(f"packed SFT baby-92m {backend} mask ({B}x{T})", f"{B * T / secs:,.0f} tok/s",
            f"peak {peak_memory(device)}")
        model.zero_grad()
        small = slice(0, 2)  # gradient equality in fp32 on two rows
        model(idx[small], targets[small], segments=segments[small])[1].backward()
        grads[backend] = [p.grad.float().clone() for p in model.parameters()]
        model.zero_grad()
    M.FLEX_DEVICES = {"cuda"}
    if len(grads) == 2:
        diff = max((a - b).abs().max().item() for a, b in zip(grads["flex"], grads["dense"], strict=True))
        row("flex vs dense max |grad difference| (fp32)", f"{diff:.2e}", "goal: < 1e-4")


def decoding(args, device: torch.device, dtype: torch.dtype) -> None:
    cfg = preset("baby-92m", **args.shape)
    model = Transformer(cfg).to(device=device, dtype=dtype if device.type == "cuda" else torch.float32).eval()
    new = min(args.new_tokens, cfg.max_seq_len - 16)
    for batch in (1, 16):
        prompt = torch.randint(3, cfg.vocab_size, (batch, 16), device=device)

        @torch.no_grad()
        def run(prompt=prompt, batch=batch):
            cache = KVCache(cfg, batch, 16 + new, device, next(model.parameters()).dtype)
            logits = model(prompt, cache=cache, last_only=True)[0]
            for _ in range(new):
                nxt = logits[:, -1].argmax(-1, keepdim=True)  # (batch, 1)
                logits = model(nxt, cache=cache, last_only=True)[0]

        secs = timed(run, 1, 1, device)
        row(f"decode baby-92m KV cache, batch {batch}", f"{batch * new / secs:,.0f} tok/s",
            f"{new} new tokens" + (", goal >= 2,000 tok/s" if batch == 1 else ""))


class RandomWindows:
    """A stand-in for the token shards (data.shards.TokenWindows, a trainer.Dataset): fixed random windows."""

    lengths = None  # all rows alike
    row_positions = None  # max_seq_len each, all of them ids

    def __init__(self, n: int, T: int, vocab: int):
        self.rows = torch.randint(0, vocab, (n, T + 1))

    def __len__(self) -> int:
        return len(self.rows)

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = self.rows[indices]
        return {"idx": rows[:, :-1], "targets": rows[:, 1:]}


def host_syncs(args, device: torch.device) -> None:
    """Synchronisations the Trainer's step makes with the GPU (torch.cuda.set_sync_debug_mode); on a CPU the
    Trainer takes a step on RandomWindows, which checks that they are still the Dataset it needs."""
    cfg = RunConfig(model=preset("baby-92m", **args.shape),
                    train=TrainConfig(device=str(device), batch_size=4, grad_accum=2, max_steps=100,
                                      out_dir=os.devnull))
    data = RandomWindows(64, cfg.model.max_seq_len, cfg.model.vocab_size)
    trainer = Trainer(cfg, data, None, None, Dist(device=device))
    trainer.train_step()  # warm-up
    if device.type != "cuda":
        row("host syncs in a training step", "-", "counted on a GPU only")
        return
    sync(device)
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train_step()
    torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    where = sorted({f"{os.path.basename(w.filename)}:{w.lineno}" for w in syncs})
    row("host syncs in a training step", str(len(syncs)), ", ".join(where[:4]) or "goal: 0")


def fsdp_smoke(args, device: torch.device, dtype: torch.dtype) -> None:
    """One FSDP2 step in a one-process group: the sharding path runs and gives a finite loss."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        cfg = preset("baby-92m", **args.shape)
        model = Transformer(cfg).to(device)
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        idx = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len + 1), device=device)
        losses = []
        step = optimizer_step(model, lambda: losses.append(model(idx[:, :-1], idx[:, 1:])[1]) or losses[-1],
                              torch.float32, device)
        step()
        step()
        row("FSDP2 one-process steps", f"loss {losses[0].item():.3f} -> {losses[1].item():.3f}",
            "finite and falling" if losses[1] < losses[0] else "CHECK")
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (checks the script, not the GPU)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--only", nargs="*", default=None,
                        help="sections: pretrain sft decode syncs fsdp (default: all)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.shape = dict(dim=64, n_layers=2, n_heads=4, max_seq_len=128, vocab_size=512) if args.smoke else {}
    args.sft_batch = 2 if args.smoke else 16
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, {dtype}", flush=True)
    sections = {
        "pretrain": lambda: (pretraining("baby-92m", 2 if args.smoke else 32, args, device, dtype),
                             pretraining("baby-218m", 2 if args.smoke else 16, args, device, dtype)),
        "sft": lambda: packed_sft(args, device, dtype),
        "decode": lambda: decoding(args, device, dtype),
        "syncs": lambda: host_syncs(args, device),
        "fsdp": lambda: fsdp_smoke(args, device, dtype),
    }
    for key, section in sections.items():
        if args.only is None or key in args.only:
            try:
                section()
            except Exception as e:  # one failing section must not hide the others' figures
                row(key, "FAILED", f"{type(e).__name__}: {str(e)[:120]}")
    print("\n| what | figure | note |\n|---|---|---|")
    for what, figure, note in ROWS:
        print(f"| {what} | {figure} | {note} |")


if __name__ == "__main__":
    main()
