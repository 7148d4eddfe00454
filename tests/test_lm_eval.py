"""lm-evaluation-harness on an exported model: its multiple-choice accuracy equals `babyllama eval --mc`."""

from __future__ import annotations

import json
import random

import pytest

from babyllama.checkpoint import save_checkpoint
from babyllama.evaluate import ModelScorer, read_mc, score_mc
from babyllama.export import export
from tests.conftest import sharp_model, tiny_config

lm_eval = pytest.importorskip("lm_eval")

# a local task in C-Eval's shape, scored as `babyllama eval --mc` scores letters
TASK = """task: local_ceval
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nA. {{{{A}}}}\\nB. {{{{B}}}}\\nC. {{{{C}}}}\\nD. {{{{D}}}}\\n答案："
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(answer)}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""


def test_lm_eval_on_the_export_agrees_with_babyllama_eval_mc(bpe_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = sharp_model(tiny_config(vocab_size=600, max_seq_len=128))
    save_checkpoint(tmp_path / "ck", model, bpe_tokenizer)
    export(tmp_path / "ck", tmp_path / "hf")
    rng, words = random.Random(0), ["长城", "北京", "黄河", "网络", "协议", "月份", "首都", "科学", "历史", "文化"]
    items = [{"question": "".join(rng.sample(words, 3)) + "是什么", **{c: rng.choice(words) for c in "ABCD"},
              "answer": rng.choice("ABCD")} for _ in range(24)]
    (tmp_path / "net_val.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in items))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local_ceval.yaml").write_text(TASK.format(path=tmp_path / "net_val.jsonl"))

    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)  # not its 14,000 task files
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'hf'},dtype=float32",
                                  tasks=["local_ceval"], task_manager=tasks,
                                  device="cpu", batch_size=1, log_samples=True)
    theirs = ["ABCD"[max(range(4), key=lambda i: s["filtered_resps"][i][0])] for s in
              sorted(out["samples"]["local_ceval"], key=lambda s: s["doc_id"])]
    summary, ours = score_mc(read_mc([tmp_path / "net_val.jsonl"])[0], ModelScorer(model), bpe_tokenizer)
    assert theirs == [r["letter_choice"] for r in ours]  # item by item
    assert out["results"]["local_ceval"]["acc,none"] == pytest.approx(summary["overall"]["letter_accuracy"])
