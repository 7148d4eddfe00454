"""lm-evaluation-harness on one model two ways: `local-completions` against `babyllama serve` (HTTP,
the server's /tokenize, batches of token-id prompts with echo and logprobs) and `hf` on the export.
Prints each way's wall time, items/s and the ratio, and checks that both pick the same letters.

    python bench/lm_eval_serve.py runs/demo/sft/final [--items 200] [--batch_size 8]

The task is C-Eval-shaped (question, A-D, answer) over random words, as tests/test_lm_eval.py makes
it: the scores mean nothing, the cost of a loglikelihood request is what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import running  # noqa: E402
from tests.test_lm_eval import TASK  # noqa: E402

from babyllama.checkpoint import load_checkpoint  # noqa: E402
from babyllama.export import export  # noqa: E402


def timed_letters(task_dir: Path, **kwargs) -> tuple[list[str], float]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(task_dir), include_defaults=False)
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(tasks=["babyllama_mc"], task_manager=tasks, log_samples=True, **kwargs)
    seconds = time.perf_counter() - start
    samples = sorted(out["samples"]["babyllama_mc"], key=lambda s: s["doc_id"])
    letters = [s["doc"]["choices"][max(range(len(s["filtered_resps"])), key=lambda i: s["filtered_resps"][i][0])]
               for s in samples]
    return letters, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--batch_size", type=int, default=8)
    args = ap.parse_args()
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    tmp = Path(tempfile.mkdtemp(prefix="lm_eval_serve."))
    rng = random.Random(0)
    words = ["长城", "北京", "黄河", "网络", "协议", "月份", "首都", "科学", "历史", "文化", "质量", "物流"]
    items = [{"question": "".join(rng.sample(words, 3)) + "是什么", **{c: rng.choice(words) for c in "ABCD"},
              "answer": rng.choice("ABCD"), "choices": list("ABCD")} for _ in range(args.items)]  # the README's JSON
    (tmp / "ceval_val.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in items))
    (tmp / "tasks").mkdir()
    (tmp / "tasks" / "babyllama_mc.yaml").write_text(TASK)  # the README's task, over ceval_val.jsonl here
    os.chdir(tmp)
    model, tokenizer, _ = load_checkpoint(args.checkpoint, "cpu")
    export(args.checkpoint, tmp / "hf")
    hf, hf_s = timed_letters(tmp / "tasks", model="hf", device="cpu", batch_size=args.batch_size,
                             model_args=f"pretrained={tmp / 'hf'},dtype=float32")
    for url in running(model, tokenizer):
        served_args = (f"base_url={url}/v1/completions,model=bench,max_length={model.cfg.max_seq_len - 1},"
                       "num_concurrent=1")
        served, served_s = timed_letters(tmp / "tasks", model="local-completions", batch_size=args.batch_size,
                                         model_args=served_args)
    n = 4 * args.items  # loglikelihood requests: one per option
    print(f"hf (export):               {hf_s:6.1f} s  {n / hf_s:6.1f} requests/s")
    print(f"local-completions (serve): {served_s:6.1f} s  {n / served_s:6.1f} requests/s  "
          f"{served_s / hf_s:.2f}x hf's time")
    print(f"same letters: {sum(a == b for a, b in zip(hf, served, strict=True))} of {len(hf)}")


if __name__ == "__main__":
    main()
