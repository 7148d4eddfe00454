"""`babyllama demo --smoke`: every stage runs, writes what it should, and a rerun skips them all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.test_cli import run_process

pytest.importorskip("snownlp")


def test_demo_smoke_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = run_process("demo", "--smoke", "--out_dir", str(out))  # the one run as a user's own process
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (out / ".lock").exists()  # the demo held its out_dir while its stages ran inside it, then let go
    for path in ("data/stats.json", "data/sft.jsonl", "data/eval.jsonl", "tokenizer/tokenizer.json",
                 "tokens/manifest.json", "pretrain/final/model.safetensors", "pretrain/metrics.jsonl",
                 "sft/final/model.safetensors", "pretrain/eval/eval.json", "sft/eval/eval.json",
                 "chat_answers.md", "timings.json", "report.md"):
        assert (out / path).is_file(), path
    results = json.loads((out / "sft" / "eval" / "eval.json").read_text())
    assert set(results["qa"]) == {"sentiment", "person", "place"}
    assert 0 < results["qa"]["sentiment"]["majority_baseline"] < 1
    assert results["leakage"]["leaked"] == 0 and results["leakage"]["checked"] > 50
    sources = json.loads((out / "tokens" / "manifest.json").read_text())["sources"]
    assert [Path(s).name for s in sources] == ["part_00000.jsonl"]  # not the raw copy, SFT or eval items
    lm = json.loads((out / "pretrain" / "eval" / "eval.json").read_text())["lm"]
    assert 0 < lm["bits_per_byte"] < 8
    assert set(json.loads((out / "timings.json").read_text())) == {
        "data", "tokenizer", "tokens", "pretrain", "sft", "eval", "chat", "report"}
    report = (out / "report.md").read_text()
    for section in ("## Data", "### Corpus", "Tokenizer:", "### Run `pretrain`", "### Run `sft`", "bits_per_byte",
                    "Question answering", "Leakage: 0 of", "## Wall time per stage", "## Chat answers"):
        assert section in report, section
    for png in (out / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "plots").glob("*.png"))) >= 4
    assert "babyllama chat" in r.stdout and "report:" in r.stdout
    assert "embedding rows unused" not in r.stdout  # the smoke model's vocab_size is its tokenizer's

    full = run_cli("demo", "--out_dir", str(out))  # a full demo never reuses a smoke run's outputs
    assert full.returncode == 2 and "holds a --smoke demo's outputs" in full.stderr
    again = run_cli("demo", "--smoke", "--out_dir", str(out))
    assert again.returncode == 0 and again.stdout.count("skipped") == 8

    dpo = run_cli("demo", "--smoke", "--dpo", "--out_dir", str(out))  # DPO after the stages done above
    assert dpo.returncode == 0 and dpo.stdout.count("skipped") == 8, dpo.stderr[-3000:]
    assert (out / "data" / "dpo.jsonl").is_file() and (out / "dpo" / "final" / "model.safetensors").is_file()
    prefs = json.loads((out / "dpo" / "eval" / "preferences.json").read_text())
    assert prefs["pairs"] > 50 and prefs["sft"]["rewards/margins"] == 0  # the SFT model is its own reference
    tasks = prefs["tasks"]  # the held-out pairs per task: they add up to all of them
    assert set(tasks) == {"sentiment", "person", "place"} and sum(t["pairs"] for t in tasks.values()) == prefs["pairs"]
    mean = sum(t["pairs"] * t["dpo"]["rewards/accuracies"] for t in tasks.values()) / prefs["pairs"]
    assert mean == pytest.approx(prefs["dpo"]["rewards/accuracies"], abs=1e-9)
    after = json.loads((out / "dpo" / "eval" / "eval.json").read_text())["qa"]
    before = json.loads((out / "sft" / "eval" / "eval.json").read_text())["qa"]
    assert set(after) == set(prefs["qa_changes"]) == {"sentiment", "person", "place"}
    for task, change in prefs["qa_changes"].items():  # the changes add up to the change of exact match
        moved = round((after[task]["exact_match"] - before[task]["exact_match"]) * after[task]["items"])
        assert change["fixed"] - change["broken"] == moved, task
        fixed = f"{change['fixed']} {'item' if change['fixed'] == 1 else 'items'} fixed"  # "1 items fixed" before
        assert f"{after[task]['exact_match']:.1%} ({fixed}, {change['broken']} broken)\n" in dpo.stdout, task
    assert "chosen likelier" in dpo.stdout
    report_text = (out / "report.md").read_text(encoding="utf-8")  # the held-out pairs' table, overall and per task
    assert "| dpo | " in report_text and f"| dpo, person ({tasks['person']['pairs']}) | " in report_text


def test_held_out_pairs_are_scored_per_task_whatever_the_cache_leaves_out(tmp_path, bpe_tokenizer):
    """demo --dpo ended with an AssertionError where the DPO token cache left out a held-out pair (equal answers, or
    too long): the pairs were matched to their tasks by their line of dpo_eval.jsonl, which a pair left out shifts.
    Each task's pairs are a token cache of their own: one left out leaves its own task, the others keep theirs."""
    from babyllama.checkpoint import save_checkpoint
    from babyllama.data.demo_corpus import PERSON_PROMPT, PLACE_PROMPT, SENTIMENT_PROMPT
    from babyllama.demo import held_out_pairs
    from tests.conftest import sharp_model, tiny_config

    save_checkpoint(tmp_path / "sft", sharp_model(tiny_config(vocab_size=600)), bpe_tokenizer)
    pairs = [(SENTIMENT_PROMPT + "这本书很好", "正面", "负面"), (PERSON_PROMPT + "王明来了", "王明", "王明"),  # equal
             (PERSON_PROMPT + "李鹏在北京", "李鹏", "无"), (PLACE_PROMPT + "上海很大", "上海", "无"),
             (SENTIMENT_PROMPT + "物流太慢", "负面", "正面")]
    path = tmp_path / "dpo_eval.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}, ensure_ascii=False) + "\n"
                            for p, c, r in pairs), encoding="utf-8")
    data = held_out_pairs(path, tmp_path / "pairs", tmp_path / "sft", 64)
    assert {task: len(d) for task, d in data.items()} == {"sentiment": 2, "person": 1, "place": 1}
    chosen = {task: [bpe_tokenizer.decode(d.sequences.sample(2 * i)[0].tolist()) for i in range(len(d))]
              for task, d in data.items()}
    assert [[c.endswith(answer) for c in chosen[task]] for task, answer in
            [("sentiment", "好正面"), ("person", "北京李鹏"), ("place", "很大上海")]] == [[True, False], [True], [True]]
    assert chosen["sentiment"][1].endswith("物流太慢负面")


def test_pooled_metrics_weigh_each_task_by_its_pairs():
    from babyllama.demo import pooled

    tasks = {"a": {"pairs": 1, "dpo": {"x": 1.0, "y": 2.0}}, "b": {"pairs": 3, "dpo": {"x": 0.0, "y": 6.0}}}
    assert pooled(tasks, ["dpo"]) == {"dpo": {"x": 0.25, "y": 5.0}}


def test_the_dpo_line_names_tasks_only_where_preferences_json_has_them():
    """A preferences.json from before the pairs were scored per task printed "(; DPO's pairs are of ...)"."""
    from babyllama.demo import dpo_line

    prefs = {"pairs": 4, "sft": {"logps/accuracies": 0.5}, "dpo": {"logps/accuracies": 0.75, "rewards/accuracies": 1}}
    assert dpo_line(prefs) == "dpo, 4 held-out pairs: chosen likelier 50.0% -> 75.0%, rewards/accuracies 100.0%"
    prefs["tasks"] = {"person": {"dpo": {"rewards/accuracies": 0.5}}}
    assert dpo_line(prefs).endswith("100.0% (person 50.0%)")
