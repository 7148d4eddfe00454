"""lm-evaluation-harness on an exported model: its multiple-choice accuracy equals `babyllama eval --mc`."""

from __future__ import annotations

import csv
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from babyllama.checkpoint import save_checkpoint
from babyllama.evaluate import ModelScorer, mc_choices, mc_summary, read_mc
from babyllama.export import export
from tests.conftest import running, sharp_model, tiny_config

lm_eval = pytest.importorskip("lm_eval")

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
TASK = re.search(r"```yaml\n(task: babyllama_mc\n.*?)```", README, re.S)[1]  # the README's task, as written
TO_JSON_LINES = re.search(r"^python3 -c .*? ceval-exam/val/\*\.csv > ceval_val\.jsonl$", README, re.M)[0]


@pytest.fixture(scope="module")
def ceval(bpe_tokenizer, tmp_path_factory):
    """A sharp tiny model, its HF export, 24 C-Eval-shaped items in a CSV file made JSON lines by the README's
    command, the README's task over them, and `babyllama eval --mc`'s letters for the CSV file."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    model = sharp_model(tiny_config(vocab_size=600, max_seq_len=128))
    save_checkpoint(tmp / "ck", model, bpe_tokenizer)
    export(tmp / "ck", tmp / "hf")
    rng, words = random.Random(0), ["长城", "北京", "黄河", "网络", "协议", "月份", "首都", "科学", "历史", "文化"]
    items = [{"id": str(i), "question": "".join(rng.sample(words, 3)) + "是什么",
              **{c: rng.choice(words) for c in "ABCD"}, "answer": rng.choice("ABCD")} for i in range(24)]
    for i, it in enumerate(items[:16]):  # an empty option, which eval --mc does not offer: lm-eval must not either
        it["ABCD"[i % 4] if it["answer"] != "ABCD"[i % 4] else "ABCD"[(i + 1) % 4]] = " " if i % 2 else ""
    items.append({**items[-1], "id": "24", "A": "", "answer": "A"})  # its answer an empty option: bad, left out
    (tmp / "ceval-exam" / "val").mkdir(parents=True)
    with (tmp / "ceval-exam" / "val" / "net_val.csv").open("w", encoding="utf-8", newline="") as f:
        csv.DictWriter(f, list(items[0])).writeheader()
        csv.DictWriter(f, list(items[0])).writerows(items)
    subprocess.run(["bash", "-c", TO_JSON_LINES.replace("python3", sys.executable, 1)], cwd=tmp, check=True)
    (tmp / "tasks").mkdir()
    (tmp / "tasks" / "babyllama_mc.yaml").write_text(TASK)
    scorer = ModelScorer(model, bpe_tokenizer)
    good, bad = read_mc([tmp / "ceval-exam" / "val"])[:2]
    assert len(good) == 24 and len(bad) == 1
    assert len((tmp / "ceval_val.jsonl").read_text().splitlines()) == 24  # the command leaves the bad row out too
    ours = [mc_choices(it, scorer, bpe_tokenizer) for it in good]
    return {"dir": tmp, "model": model, "letters": [r["letter_choice"] for r in ours],
            "accuracy": mc_summary(ours)["overall"]["letter_accuracy"]}


def lm_eval_letters(ceval, monkeypatch, **kwargs) -> tuple[list[str], float]:
    """lm-eval's answers on the local task (its likeliest letter per item) and its accuracy."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ceval["dir"])  # the task's data_files, ceval_val.jsonl, is where the README's command runs
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path="tasks", include_defaults=False)  # not its 14,000 files
    out = lm_eval.simple_evaluate(tasks=["babyllama_mc"], task_manager=tasks, log_samples=True, **kwargs)
    samples = sorted(out["samples"]["babyllama_mc"], key=lambda s: s["doc_id"])
    letters = [s["doc"]["choices"][max(range(len(s["filtered_resps"])), key=lambda i: s["filtered_resps"][i][0])]
               for s in samples]
    return letters, out["results"]["babyllama_mc"]["acc,none"]


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


def test_the_stock_ceval_and_cmmlu_tasks_score_another_prompt_as_the_readme_says():
    """README: the stock tasks score ` A` (no target_delimiter in their YAML: lm-eval's default, a space) after a
    subject's description and the stripped question, so their acc is not eval --mc's letter_accuracy. A tester
    read the README's old words as the opposite; an lm-eval that changes this must change them."""
    from lm_eval.config.task import TaskConfig

    tasks = Path(lm_eval.__file__).parent / "tasks"
    assert TaskConfig(task="t").target_delimiter == " "
    for default, question in (("ceval/_default_ceval_yaml", "question"), ("cmmlu/_default_template_yaml", "Question")):
        text = (tasks / default).read_text(encoding="utf-8")
        assert "target_delimiter" not in text and f'doc_to_text: "{{{{{question}.strip()}}}}\\nA. {{{{A}}}}' in text
    assert '"description": "以下是中国关于注册会计师的单项选择题，请选出其中的正确答案。\\n\\n"' in (
        tasks / "ceval" / "ceval-valid_accountant.yaml").read_text(encoding="utf-8")
    assert "`以下是中国关于注册会计师的单项选择题，请选出其中的正确答案。` and a blank line" in README
