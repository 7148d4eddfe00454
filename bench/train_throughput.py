"""Training-step throughput: our Transformer against transformers' LlamaForCausalLM, same shape and batch.

    python bench/train_throughput.py [--preset demo] [--batch 16] [--steps 10]
    python bench/train_throughput.py --preset baby-92m --device cuda --dtype bf16 --compile   # GPU: + MFU

Both models get the same config, batch, AdamW and precision, in one process, timed in
interleaved rounds (the median counts); the ratio of tokens/s is what matters (target >= 1.2x
at the demo shape on CPU). On a GPU it also prints MFU against the chip's dense bf16 peak
(target >= 40% for baby-92m on an H200).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from babyllama.model import Transformer, preset
from babyllama.train.trainer import peak_flops


def hf_llama(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(hf)


def measure(step, steps: int, warmup: int, device: str) -> float:
    """Seconds per step, after warm-up steps (which include compilation)."""
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def make_step(model, forward, dtype, device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda" or None)

    def step():
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            loss = forward()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median counts")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="also time our model under torch.compile")
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = preset(args.preset)
    T, dev = cfg.max_seq_len, args.device
    torch.manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (args.batch, T + 1), device=dev)
    x, y = idx[:, :-1], idx[:, 1:]
    tokens = args.batch * T
    print(f"{args.preset}: batch {args.batch} x {T} tokens, {dev}, {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    ours = Transformer(cfg).to(dev)
    steps = {"babyllama": make_step(ours, lambda: ours(x, y)[1], dtype, dev)}
    if args.compile:
        compiled = torch.compile(ours)
        steps["babyllama + compile"] = make_step(ours, lambda: compiled(x, y)[1], dtype, dev)
    if not args.skip_hf:
        hf = hf_llama(cfg).to(dev)
        steps["transformers Llama"] = make_step(hf, lambda: hf(input_ids=x, labels=idx[:, :-1]).loss, dtype, dev)
    for step in steps.values():  # warm-up, compilation included
        measure(step, 1, args.warmup, dev)
    rounds = {name: [] for name in steps}
    for _ in range(args.rounds):  # interleaved, so a slow moment of the machine hits every candidate
        for name, step in steps.items():
            rounds[name].append(measure(step, args.steps, 0, dev))
    results = {name: statistics.median(times) for name, times in rounds.items()}
    ref = results.get("transformers Llama")
    peak = peak_flops(torch.device(dev))
    for name, secs in results.items():
        line = f"{name:22s} {tokens / secs:10,.0f} tokens/s"
        if ref:  # the spread: the ratio in each round (a slow moment of the machine hits a round whole)
            ratios = [r / s for r, s in zip(rounds["transformers Llama"], rounds[name], strict=True)]
            line += f"   {ref / secs:4.2f}x transformers (rounds {min(ratios):.2f}-{max(ratios):.2f}x)"
        if peak and name.startswith("babyllama"):
            line += f"   MFU {tokens / secs * ours.flops_per_token(T) / peak:.1%}"
        print(line)


if __name__ == "__main__":
    main()
