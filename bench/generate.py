"""Tokens/s of generate() with the KV cache against recomputing the whole sequence at every step.

    python bench/generate.py [--new-tokens 256] [--presets demo baby-92m] [--device cpu]

Both runs use the same random model, prompt and greedy decoding in one process; the ratio is
what matters (target: >= 5x at 256 new tokens). Results go in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time

import torch

from babyllama.model import Transformer, preset


def tokens_per_second(model: Transformer, prompt: list[int], new_tokens: int, use_cache: bool) -> tuple[float, list]:
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, use_cache=use_cache)
    return len(out) / (time.perf_counter() - start), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--presets", nargs="+", default=["demo", "baby-92m"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    for name in args.presets:
        model = Transformer(preset(name)).to(args.device).eval()
        tokens_per_second(model, [3, 4, 5], 8, True)  # warm-up
        for n in args.prompt_tokens:
            prompt = torch.randint(3, model.cfg.vocab_size, (n,)).tolist()
            cached, a = tokens_per_second(model, prompt, args.new_tokens, True)
            full, b = tokens_per_second(model, prompt, args.new_tokens, False)
            assert a == b, "the KV cache changed the greedy tokens"
            print(
                f"{name:9s} {model.num_params() / 1e6:5.1f}M params, prompt {n:4d}, {args.new_tokens} new: "
                f"KV cache {cached:6.1f} tok/s, full recompute {full:6.1f} tok/s, ratio {cached / full:4.1f}x"
            )


if __name__ == "__main__":
    main()
