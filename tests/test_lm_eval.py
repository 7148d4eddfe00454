"""lm-evaluation-harness on an exported model: its multiple-choice accuracy equals `babyllama eval --mc`."""

from __future__ import annotations

import json
import random

import pytest

from babyllama.checkpoint import save_checkpoint
from babyllama.evaluate import ModelScorer, mc_choices, mc_summary, read_mc
from babyllama.export import export
from tests.conftest import running, sharp_model, tiny_config

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


@pytest.fixture(scope="module")
def ceval(bpe_tokenizer, tmp_path_factory):
    """A sharp tiny model, its HF export, 24 C-Eval-shaped items and `babyllama eval --mc`'s letters for them."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    model = sharp_model(tiny_config(vocab_size=600, max_seq_len=128))
    save_checkpoint(tmp / "ck", model, bpe_tokenizer)
    export(tmp / "ck", tmp / "hf")
    rng, words = random.Random(0), ["长城", "北京", "黄河", "网络", "协议", "月份", "首都", "科学", "历史", "文化"]
    items = [{"question": "".join(rng.sample(words, 3)) + "是什么", **{c: rng.choice(words) for c in "ABCD"},
              "answer": rng.choice("ABCD")} for _ in range(24)]
    (tmp / "net_val.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in items))
    (tmp / "tasks").mkdir()
    (tmp / "tasks" / "local_ceval.yaml").write_text(TASK.format(path=tmp / "net_val.jsonl"))
    ours = [mc_choices(it, ModelScorer(model), bpe_tokenizer) for it in read_mc([tmp / "net_val.jsonl"])[0]]
    return {"dir": tmp, "model": model, "letters": [r["letter_choice"] for r in ours],
            "accuracy": mc_summary(ours)["overall"]["letter_accuracy"]}


def lm_eval_letters(ceval, monkeypatch, **kwargs) -> tuple[list[str], float]:
    """lm-eval's answers on the local task (its likeliest letter per item) and its accuracy."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(ceval["dir"] / "tasks"), include_defaults=False)  # not its 14,000 files
    out = lm_eval.simple_evaluate(tasks=["local_ceval"], task_manager=tasks, log_samples=True, **kwargs)
    letters = ["ABCD"[max(range(4), key=lambda i: s["filtered_resps"][i][0])] for s in
               sorted(out["samples"]["local_ceval"], key=lambda s: s["doc_id"])]
    return letters, out["results"]["local_ceval"]["acc,none"]


def test_lm_eval_on_the_export_agrees_with_babyllama_eval_mc(ceval, monkeypatch):
    letters, accuracy = lm_eval_letters(ceval, monkeypatch, model="hf", device="cpu", batch_size=1,
                                        model_args=f"pretrained={ceval['dir'] / 'hf'},dtype=float32")
    assert letters == ceval["letters"]  # item by item
    assert accuracy == pytest.approx(ceval["accuracy"])


def test_lm_eval_local_completions_on_babyllama_serve_agrees_too(ceval, bpe_tokenizer, monkeypatch):
    """lm-eval's client of OpenAI-style servers, with the server's own tokenizer (its /tokenize) and
    batches of prompts as token ids with echo and logprobs: no export needed."""
    pytest.importorskip("tenacity")  # lm-eval[api]
    for url in running(ceval["model"], bpe_tokenizer):
        args = f"base_url={url}/v1/completions,model=tiny,max_length=127,num_concurrent=1"
        letters, accuracy = lm_eval_letters(ceval, monkeypatch, model="local-completions", model_args=args,
                                            batch_size=8)
    assert letters == ceval["letters"]
    assert accuracy == pytest.approx(ceval["accuracy"])
