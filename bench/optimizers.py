"""AdamW against Muon: the demo model's validation loss after the same short pretraining run.

    make demo                                   # once, for runs/demo/tokens
    python bench/optimizers.py --data runs/demo/tokens --steps 150

Each run uses configs/demo.toml with its own full schedule (warmup, cosine decay over --steps)
and writes to a temporary directory; the table gives the final validation loss (nats per
token, 20 batches) and the wall time of each run, one after the other in this process.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from babyllama.config import load_config
from babyllama.train.stages import pretrain

RUNS = [("adamw", "2e-3"), ("adamw", "4e-3"), ("muon", "2e-3"), ("muon", "4e-3")]


def run(data: str, steps: int, optimizer: str, lr: str, out: Path) -> tuple[float, float]:
    args = ["--data", data, "--out_dir", str(out), "--max_steps", str(steps), "--warmup_steps", str(steps * 2 // 15),
            "--optimizer", optimizer, "--lr", lr, "--eval_every", str(steps), "--eval_batches", "20",
            "--save_every", str(10 * steps)]
    start = time.time()
    pretrain(load_config(Path(__file__).parents[1] / "configs" / "demo.toml", args))
    seconds = time.time() - start
    final = [json.loads(line) for line in (out / "metrics.jsonl").open()][-1]
    return final["val_loss"], seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="runs/demo/tokens")
    ap.add_argument("--steps", type=int, default=150)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for optimizer, lr in RUNS:
            loss, seconds = run(a.data, a.steps, optimizer, lr, Path(tmp) / f"{optimizer}-{lr}")
            rows.append((optimizer, lr, loss, seconds))
    reference = rows[0][2]
    print(f"\n| optimizer | lr | val loss after {a.steps} steps | vs adamw {RUNS[0][1]} | wall s |")
    print("|---|---|---|---|---|")
    for optimizer, lr, loss, seconds in rows:
        print(f"| {optimizer} | {lr} | {loss:.3f} | {loss - reference:+.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
