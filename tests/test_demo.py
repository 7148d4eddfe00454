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
    assert "chosen likelier" in dpo.stdout
    report_text = (out / "report.md").read_text(encoding="utf-8")  # the held-out pairs' table, overall and per task
    assert "| dpo | " in report_text and f"| dpo, person ({tasks['person']['pairs']}) | " in report_text
