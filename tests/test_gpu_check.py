"""bench/gpu_check.py on a CPU: its sections that run there, so that the GPU check does not fail at once where the
code it drives has moved on (its stand-in for the token shards lacked what the Trainer reads now)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def test_the_gpu_check_runs_its_cpu_sections_and_the_trainer_takes_its_windows():
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--steps", "1", "--new-tokens", "4",
                        "--only", "sft", "decode", "syncs"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "FAILED" not in r.stdout, r.stdout
    assert "| host syncs in a training step | - | counted on a GPU only |" in r.stdout  # after a step of the Trainer
    for section in ("| packed SFT baby-92m dense mask (2x128) |", "| decode baby-92m KV cache, batch 16 |"):
        assert section in r.stdout
