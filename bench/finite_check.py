"""What the check that a checkpoint's weights are finite (weights_file.read_safetensors) adds to their load.

    python bench/finite_check.py [--preset baby-218m] [--rounds 5] [--dir /tmp]

A model.safetensors of the preset's tensors (random fp32, as a training run saves them; the check's time does not
depend on the values) is written once to --dir, then loaded into a model as checkpoint.load_model does (safetensors'
load_file, which maps the file, then load_state_dict, which copies it in; the page cache warm), in turns without a
check, with torch.isfinite(t).all() per tensor before the copy, and with weights_file.finite's (torch.aminmax: one
pass, no copy); the median of the rounds. Results go in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from babyllama.checkpoint import model_tensors
from babyllama.model import Transformer, preset
from babyllama.weights_file import finite

CHECKS = {"none": lambda t: True, "isfinite(t).all()": lambda t: bool(torch.isfinite(t).all()),
          "finite (aminmax)": finite}


def load(model: Transformer, file: Path, check: str) -> float:
    """Seconds to load file into model, each tensor checked first by CHECKS[check]."""
    start = time.perf_counter()
    tensors = load_file(str(file))
    assert all(CHECKS[check](t) for t in tensors.values())
    model.load_state_dict(tensors, strict=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="baby-218m")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Transformer(preset(args.preset))
    tensors = model_tensors(model)
    params = sum(t.numel() for t in tensors.values())
    file = Path(args.dir) / f"finite_check_{args.preset}.safetensors"
    save_file(tensors, str(file))
    del tensors
    times: dict[str, list[float]] = {check: [] for check in CHECKS}
    try:
        for _ in range(args.rounds):
            for check in CHECKS:
                times[check].append(load(model, file, check))
    finally:
        file.unlink()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.preset}: {params / 1e6:.1f}M "
          f"parameters, {params * 4 / 1e6:.0f} MB fp32; median of {args.rounds} rounds")
    plain = statistics.median(times["none"])
    for check, seconds in times.items():
        s = statistics.median(seconds)
        print(f"{check:18} load {s * 1000:6.0f} ms  +{(s - plain) * 1000:5.0f} ms ({s / plain - 1:+.1%})")


if __name__ == "__main__":
    main()
