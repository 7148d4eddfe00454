"""`babyllama demo --smoke`: every stage runs, writes what it should, and a rerun skips them all."""

from __future__ import annotations

import json
import shutil
import time
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
    assert dpo.returncode == 0 and dpo.stdout.count("skipped") == 7, dpo.stderr[-3000:]  # the report shows DPO's
    assert "[11/11] report: redone, as its input dpo eval changed since it ran\n" in dpo.stdout
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


STAGES = ["data", "tokenizer", "tokens", "pretrain", "sft", "eval", "chat", "report"]
DPO_STAGES = [*STAGES[:-1], "dpo data", "dpo", "dpo eval", "report"]


EVAL_JSONS = {"pretrain/eval/eval.json": '{"lm": {"bits_per_byte": 1.5}}\n',  # what run_demo reads of them
              "sft/eval/eval.json": '{"qa": {}}\n', "dpo/eval/eval.json": '{"qa": {}}\n',
              "dpo/eval/preferences.json": '{"sft": {}, "dpo": {}, "qa_changes": {}}\n'}


@pytest.fixture
def fake_demo(monkeypatch, tmp_path, capsys, bpe_tokenizer):
    """demo(*args) runs babyllama.demo.Demo on tmp_path/demo with each stage replaced by one that records its name in
    the list returned and writes files like the stage's (a real checkpoint for pretrain and sft), in milliseconds;
    returns (the stages that ran, what the run printed)."""
    from babyllama.checkpoint import save_checkpoint
    from babyllama.demo import Demo
    from tests.conftest import sharp_model, tiny_config

    model = sharp_model(tiny_config(vocab_size=600))

    def writer(name: str, *files: str):
        def write(self, *_):
            ran.append(name)
            for f in files:
                (self.out / f).parent.mkdir(parents=True, exist_ok=True)
                (self.out / f).write_text(EVAL_JSONS.get(f, "{}\n"))
        return write

    def train(self, stage: str) -> None:
        ran.append(stage)
        save_checkpoint(self.out / stage / "final", model, bpe_tokenizer)
        if stage != "pretrain":
            (self.out / stage / f"{stage}_tokens").mkdir()
            (self.out / stage / f"{stage}_tokens" / "manifest.json").write_text("{}\n")

    ran: list[str] = []
    for name, files in (("data", ["data/stats.json", "data/sft.jsonl", "data/eval.jsonl", "data/part_00000.jsonl"]),
                        ("tokenizer", ["tokenizer/tokenizer.json", "tokenizer/meta.json"]),
                        ("tokens", ["tokens/manifest.json", "tokens/train_00000.bin"]), ("chat", ["chat_answers.md"]),
                        ("report", ["report.md", "report_extra.md", "plots/a.png"]),
                        ("evaluate", ["pretrain/eval/eval.json", "sft/eval/eval.json", "sft/eval/items.jsonl"]),
                        ("dpo_data", ["data/dpo.jsonl", "data/dpo_eval.jsonl"]),
                        ("dpo_eval", ["dpo/eval/preferences.json", "dpo/eval/eval.json"])):
        shown = {"evaluate": "eval", "dpo_data": "dpo data", "dpo_eval": "dpo eval"}.get(name, name)
        monkeypatch.setattr(Demo, name, writer(shown, *files))
    monkeypatch.setattr(Demo, "train", train)

    def demo(dpo: bool = False, force: bool = False) -> tuple[list[str], str]:
        ran.clear()
        Demo(tmp_path / "demo", smoke=True, force=force, dpo=dpo).run()
        return list(ran), capsys.readouterr().out
    return demo


def test_a_stage_redone_redoes_every_stage_that_reads_its_outputs(fake_demo, tmp_path):
    """After `rm -rf OUT/pretrain` the demo redid pretrain and skipped sft as "done before" (an SFT of the old model),
    and report.md was never remade after eval or chat ran again: each stage was skipped on its own marker file."""
    out = tmp_path / "demo"
    ran, printed = fake_demo()
    assert ran == STAGES and "[1/8] data: made, as it has not run here yet\n" in printed
    ran, printed = fake_demo()
    assert ran == []  # all done: a rerun skips them all
    assert "[4/8] pretrain: done, as its outputs and inputs are as they were when it ran; skipped\n" in printed
    shutil.rmtree(out / "pretrain")
    ran, printed = fake_demo()
    assert ran == ["pretrain", "sft", "eval", "chat", "report"]
    assert "[4/8] pretrain: redone, as its outputs changed since it ran: pretrain/final/" in printed
    assert "[5/8] sft: redone, as its input pretrain changed since it ran\n" in printed
    (out / "chat_answers.md").unlink()
    ran, printed = fake_demo()
    assert ran == ["chat", "report"]
    assert "[7/8] chat: redone, as its outputs changed since it ran: chat_answers.md is gone\n" in printed
    assert "[8/8] report: redone, as its input chat changed since it ran\n" in printed


def test_a_stage_made_again_leaves_the_stages_that_do_not_read_it_alone(fake_demo, tmp_path):
    """`rm OUT/report.md` on a finished `demo --smoke --dpo` redid dpo data, dpo and dpo eval (about 7 minutes of a
    full demo), saying "a stage before it was redone": every stage after one that ran was redone."""
    out = tmp_path / "demo"
    assert fake_demo(dpo=True)[0] == DPO_STAGES
    (out / "report.md").unlink()
    ran, printed = fake_demo(dpo=True)
    assert ran == ["report"]
    assert "[11/11] report: redone, as its outputs changed since it ran: report.md is gone\n" in printed
    (out / "chat_answers.md").unlink()
    assert fake_demo(dpo=True)[0] == ["chat", "report"]
    shutil.rmtree(out / "sft" / "eval")
    assert fake_demo(dpo=True)[0] == ["eval", "dpo eval", "report"]
    shutil.rmtree(out / "sft" / "final")
    assert fake_demo(dpo=True)[0] == ["sft", "eval", "chat", "dpo data", "dpo", "dpo eval", "report"]


def test_a_stopped_stage_goes_on_where_it_stopped(fake_demo, tmp_path, monkeypatch):
    """A stage stopped (Ctrl-C) with its inputs as they were is made, not redone: its work so far is kept (a training
    resumes from its newest checkpoint, an eval picks up items.jsonl.partial)."""
    from babyllama.demo import Demo

    out = tmp_path / "demo"
    fake_demo()
    (out / "sft" / "eval" / "eval.json").unlink()
    evaluate = Demo.evaluate

    def stopped(self):
        (self.out / "sft" / "eval").mkdir(parents=True)
        (self.out / "sft" / "eval" / "items.jsonl.partial").write_text("{}\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(Demo, "evaluate", stopped)
    with pytest.raises(KeyboardInterrupt):
        fake_demo()
    monkeypatch.setattr(Demo, "evaluate", evaluate)
    ran, printed = fake_demo()
    assert ran == ["eval", "report"]
    assert "[6/8] eval: made, as its last run stopped before the end; it goes on from there\n" in printed
    assert (out / "sft" / "eval" / "items.jsonl.partial").exists()  # kept for the eval to pick up
    tokens = Demo.tokens

    def stopped_tokens(self):
        (self.out / "tokens").mkdir()
        (self.out / "tokens" / "x.bin").write_text("")
        raise KeyboardInterrupt

    monkeypatch.setattr(Demo, "tokens", stopped_tokens)
    (out / "tokenizer" / "meta.json").write_text('{"retrained": 1}\n')
    with pytest.raises(KeyboardInterrupt):
        fake_demo()
    monkeypatch.setattr(Demo, "tokens", tokens)
    ran, printed = fake_demo()  # no resume: pretokenize starts afresh, what it had written removed
    assert ran == STAGES[2:] and not (out / "tokens" / "x.bin").exists()
    assert "[3/8] tokens: redone, as its last run stopped before the end\n" in printed


@pytest.mark.parametrize("damaged, first", [
    ("sft/eval/eval.json", "eval"), ("sft/eval/items.jsonl", "eval"), ("pretrain/eval/eval.json", "eval"),
    ("tokens/manifest.json", "tokens"), ("tokens/train_00000.bin", "tokens"), ("tokenizer/meta.json", "tokenizer"),
    ("pretrain/final/model.safetensors", "pretrain"), ("sft/final/babyllama_tokenizer.json", "sft"),
    ("sft/sft_tokens/manifest.json", "sft"), ("data/sft.jsonl", "data"), ("data/part_00000.jsonl", "data"),
    ("report.md", "report"), ("report_extra.md", "report"), ("plots/a.png", "report"), ("chat_answers.md", "chat")])
def test_a_damaged_output_is_redone_saying_why(fake_demo, tmp_path, damaged, first):
    """An empty eval.json gave a JSONDecodeError traceback; an empty pretrain/final/model.safetensors "demo finished"
    (rc 0); a cut data/sft.jsonl, tokens shard, items.jsonl or an emptied report.md was reused: a stage was done when
    its marker file was there and parsed. Now any change to any file a stage made redoes it, and its readers."""
    out = tmp_path / "demo"
    fake_demo()
    size = (out / damaged).stat().st_size
    (out / damaged).write_text("")
    ran, printed = fake_demo()
    readers = {"eval": ["eval", "report"], "chat": ["chat", "report"], "report": ["report"]}
    assert ran == readers.get(first, STAGES[STAGES.index(first):])
    assert f"] {first}: redone, as its outputs changed since it ran: {damaged} size {size} -> 0 bytes\n" in printed
    assert fake_demo()[0] == []  # whole again


@pytest.mark.parametrize("damaged, text", [
    ("pretrain/eval/eval.json", '{"lm": {"bits_per_byte": null}}\n'),
    ("sft/eval/eval.json", '{"qa": {"sentiment": {"accuracy": "high"}}}\n'),
    ("sft/eval/eval.json", '{"qa": {}}\n')])  # the same bytes written again
def test_an_eval_json_rewritten_is_redone(fake_demo, tmp_path, damaged, text):
    """An eval.json with a wrong value (accuracy "high", bits_per_byte null) was taken for done, and run_demo's
    TypeError ended every rerun: any rewrite of it, of any size, redoes the eval stage."""
    out = tmp_path / "demo"
    fake_demo()
    time.sleep(0.01)  # a later mtime, whatever the file system's resolution
    (out / damaged).write_text(text)
    ran, printed = fake_demo()
    assert ran == ["eval", "report"]
    assert f"[6/8] eval: redone, as its outputs changed since it ran: {damaged} " in printed
    assert fake_demo()[0] == []


@pytest.mark.parametrize("name, first", [("tokenizer", "tokenizer"), ("data", "data"), ("plots", "report"),
                                         ("sft", "sft")])
def test_a_file_where_a_demo_folder_should_be_is_replaced(fake_demo, tmp_path, name, first):
    """`rm -rf OUT/tokenizer; touch OUT/tokenizer` gave a FileExistsError / NotADirectoryError traceback, or
    "choose another out_dir", which a demo user cannot do: the demo owns its names, and redoes the stage."""
    out = tmp_path / "demo"
    fake_demo()
    shutil.rmtree(out / name)
    (out / name).write_text("not a folder")
    ran, printed = fake_demo()
    assert ran == ({"report": ["report"], "sft": ["sft", "eval", "chat", "report"]}.get(first)
                   or STAGES[STAGES.index(first):])
    gone = {"tokenizer": "meta.json", "data": "eval.jsonl", "plots": "a.png",
            "sft": "final/babyllama_tokenizer.json"}  # the first of the folder's files, by name
    assert f"] {first}: redone, as its outputs changed since it ran: {name}/{gone[name]} is gone\n" in printed
    assert (out / name).is_dir()


def test_a_stage_changed_outside_the_demo_redoes_its_readers(fake_demo, tmp_path):
    """A tokenizer retrained into OUT/tokenizer skipped every stage (tokens of the old one), and a pretraining
    continued into OUT/pretrain skipped sft, eval and the report (old numbers printed)."""
    out = tmp_path / "demo"
    fake_demo()
    time.sleep(0.01)
    (out / "tokenizer" / "tokenizer.json").write_text('{"retrained": 1}\n')
    ran, printed = fake_demo()
    assert ran == STAGES[1:]
    assert "[3/8] tokens: redone, as its input tokenizer changed since it ran\n" in printed
    (out / "pretrain" / "checkpoints" / "step_000030").mkdir(parents=True)
    (out / "pretrain" / "checkpoints" / "step_000030" / "model.safetensors").write_text("")
    ran, printed = fake_demo()
    assert ran == ["pretrain", "sft", "eval", "chat", "report"]
    assert ("[4/8] pretrain: redone, as its outputs changed since it ran: "
            "pretrain/checkpoints/step_000030/model.safetensors is new\n") in printed
    assert not (out / "pretrain" / "checkpoints").exists()


def test_an_sft_redone_without_dpo_removes_the_stale_dpo_outputs(fake_demo, tmp_path):
    """`demo --dpo`, then an sft redone by a plain demo, then `demo --dpo` again reused the old dpo/ and its eval
    (made from the old SFT model), and the report showed them."""
    out = tmp_path / "demo"
    fake_demo(dpo=True)
    (out / "sft" / "final" / "model.safetensors").write_text("")
    ran, printed = fake_demo()
    assert ran == ["sft", "eval", "chat", "report"]
    assert "dpo data: removed, as its input sft changed since it ran (demo --dpo makes it again)\n" in printed
    assert not (out / "dpo").exists() and not (out / "data" / "dpo.jsonl").exists()
    ran, printed = fake_demo(dpo=True)
    assert ran == ["dpo data", "dpo", "dpo eval", "report"]
    assert "[8/11] dpo data: made, as it has not run here yet\n" in printed
    (out / "data" / "dpo_eval.jsonl").write_text('{"prompt": "cut')  # a held-out pair cut
    assert fake_demo(dpo=True)[0] == ["dpo data", "dpo", "dpo eval", "report"]
    assert fake_demo()[0] == []  # the report need not show DPO's again


def test_a_demo_json_without_stamps_redoes_every_stage(fake_demo, tmp_path):
    """A demo.json from before the stamps ({"smoke": true}) records no stage: each is redone, saying why."""
    out = tmp_path / "demo"
    fake_demo()
    (out / "demo.json").write_text('{"smoke": true}\n')
    ran, printed = fake_demo()
    assert ran == STAGES
    assert "[1/8] data: redone, as demo.json has no record of its outputs (made outside the demo or by an older " \
           "babyllama)\n" in printed


def test_force_removes_only_the_demos_own_names(fake_demo, tmp_path):
    """`demo --force --out_dir zz` deleted everything in zz (a .git, src/important.py) without a word."""
    out = tmp_path / "demo"
    fake_demo()
    (out / ".git").mkdir()
    (out / "src").mkdir()
    (out / "src" / "important.py").write_text("x = 1\n")
    ran, printed = fake_demo(force=True)
    assert ran == STAGES
    assert (f"--force: removed data, tokenizer, tokens, pretrain, sft, plots, chat_answers.md, report_extra.md, "
            f"report.md, timings.json, demo.json from {out}\n") in printed
    assert (out / ".git").is_dir() and (out / "src" / "important.py").read_text() == "x = 1\n"
    assert fake_demo(force=True)[0] == STAGES  # with foreign files and no demo.json: not refused


def test_a_damaged_demo_json_is_refused_in_a_sentence(tmp_path):
    """An empty demo.json raised a JSONDecodeError traceback."""
    from babyllama.demo import Demo
    from babyllama.errors import UserError

    out = tmp_path / "demo"
    out.mkdir()
    for text in ("", "[]", '{"smoke": 1}'):
        (out / "demo.json").write_text(text)
        with pytest.raises(UserError, match=r"demo.json is damaged .* pass --force to redo them or choose another"):
            Demo(out, smoke=True, force=False)


def test_a_folder_of_other_outputs_is_not_taken_for_a_demos(tmp_path):
    """`demo --smoke --out_dir X`, X a run of the README's commands (no demo.json), skipped every stage, wrote
    demo.json and reported that run's numbers as the demo's."""
    from babyllama.demo import Demo
    from babyllama.errors import UserError
    from babyllama.lock import LOCK

    out = tmp_path / "runs"
    (out / "data").mkdir(parents=True)
    (out / "data" / "stats.json").write_text("{}")
    with pytest.raises(UserError, match="holds files but no demo.json, so they are no demo's outputs; pass --force to "
                                        "run the demo beside them"):
        Demo(out, smoke=True, force=False)
    assert not (out / "demo.json").exists()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / LOCK).write_text("")  # the CLI's lock on it, taken before the demo starts
    Demo(tmp_path / "empty", smoke=True, force=False)
    Demo(out, smoke=True, force=True)  # --force: the demo's own names go (data/), the folder's other files stay
    assert json.loads((out / "demo.json").read_text()) == {"smoke": True, "stages": {}} and not (out / "data").exists()


@pytest.mark.parametrize("text", ["[]\n", "1\n", "{\n"])
def test_a_damaged_timings_json_starts_afresh_with_a_note(fake_demo, tmp_path, text):
    """A timings.json holding [] or 1 (valid JSON, no object) stopped the first stage that ran with a TypeError."""
    out = tmp_path / "demo"
    fake_demo()
    (out / "timings.json").write_text(text)
    (out / "report.md").unlink()
    ran, printed = fake_demo()
    assert ran == ["report"]
    assert f"note: {out / 'timings.json'} is damaged (" in printed
    assert list(json.loads((out / "timings.json").read_text())) == ["report"]


def test_hidden_files_are_no_other_outputs(tmp_path):
    """A kill during the first demo.json's write left .demo.json.tmp, and with it (or .DS_Store, .gitkeep) in the
    folder every rerun was refused: "holds files but no demo.json"."""
    from babyllama.demo import Demo

    out = tmp_path / "demo"
    out.mkdir()
    (out / ".demo.json.tmp").write_text('{"smoke": tr')
    (out / ".DS_Store").write_text("")
    Demo(out, smoke=True, force=False)
    assert json.loads((out / "demo.json").read_text()) == {"smoke": True, "stages": {}}
