"""The whole pipeline on the built-in Chinese corpus, on a CPU, in minutes: `make demo`.

    babyllama demo --out_dir runs/demo            # about 15 minutes on 2 CPU cores
    babyllama demo --out_dir runs/demo --smoke    # every stage on a sliver of the data, about half a minute
    babyllama demo --out_dir runs/demo --force    # redo every stage
    babyllama demo --out_dir runs/demo --dpo      # then DPO on preference pairs, about 7 minutes more

Stages, each done once: when a stage ends, demo.json records a stamp of its outputs (each file's path, size and
mtime) and of the stages whose outputs it read; a rerun skips a stage whose outputs and inputs are as recorded,
goes on with one that was stopped (a training resumes), and redoes, from the start and saying why, one whose
outputs were changed or damaged since, or whose input changed (Demo.status):
data (prepare --demo) -> tokenizer (8k byte-level BPE) -> tokens (pretokenize) -> pretrain
(configs/demo.toml) -> sft (configs/sft-demo.toml) -> eval (loss and bits per byte of the
pretrained model; held-out sentiment and entity extraction of the fine-tuned one) -> chat
(a few answers) -> report (runs/demo/report.md). With --dpo, before the report: dpo data (pairs of the entity items
of data/dpo_items.jsonl: the reference answer chosen; the SFT model's own wrong answer, else a wrong
label, rejected; and of 4,000 SFT reviews: the model's own label chosen, the other rejected) -> dpo
(configs/dpo-demo.toml) -> dpo eval (the held-out eval items as QA and as pairs, before and after:
dpo/eval/preferences.json), then the report. Without --dpo, DPO outputs that a redone stage made stale are removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from babyllama.errors import UserError, agree, write_whole

CHAT_QUESTIONS = [
    ("判断这条评论的情感是正面还是负面：\n", "这本书内容很精彩，印刷质量也很好，值得购买。"),
    ("判断这条评论的情感是正面还是负面：\n", "物流太慢了，书还有破损，非常失望。"),
    ("找出这句话中的人名：\n", "江泽民主席和李鹏总理在北京会见了外国客人。"),
    ("找出这句话中的地名：\n", "今年春节，上海和广州的游客人数都创了新高。"),
]
EVAL_NEW_TOKENS = 32  # the answers are a label or a few names
SELF_LABELLED = 4000  # sentiment items of sft.jsonl whose own label DPO keeps (dpo_data)
SMOKE = {  # a sliver of everything
    "limit": 1500, "vocab": 1024,
    "pretrain": ["--max_steps", "20", "--batch_size", "8", "--eval_every", "10", "--save_every", "10",
                 "--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads", "2",
                 "--model.max_seq_len", "128", "--warmup_steps", "5", "--compile", "false"],
    "sft": ["--max_steps", "20", "--batch_size", "8", "--eval_every", "10", "--save_every", "10",
            "--warmup_steps", "5"],
    "dpo": ["--max_steps", "10", "--batch_size", "8", "--eval_every", "5", "--save_every", "5", "--warmup_steps", "2"],
    "eval_items": 60,
    "preference_items": 200,  # prompts the SFT model answers for dpo.jsonl: DPO's 10 steps of 8 take 80 of them
}


def config_path(name: str) -> Path:
    """configs/NAME from the current directory, else from the source checkout this package runs from."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / "configs" / name).is_file():
            return root / "configs" / name
    raise UserError(f"configs/{name} not found; run the demo from the babyllama checkout.")


class Demo:
    def __init__(self, out: str | Path, smoke: bool, force: bool, dpo: bool = False):
        self.out, self.smoke, self.dpo = Path(out), smoke, dpo
        if force and self.out.is_dir():
            removed = remove_demo_outputs(self.out)
            print(f"--force: removed {', '.join(removed)} from {self.out}" if removed else
                  f"--force: {self.out} held none of the demo's outputs, nothing removed", flush=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.record = check_demo_kind(self.out, smoke, force)  # {stage: what it made and read}, kept in demo.json
        self.save()
        self.timings_file = self.out / "timings.json"
        try:
            self.timings = json.loads(self.timings_file.read_text(encoding="utf-8"))
            why = None if isinstance(self.timings, dict) else "not a JSON object"  # [] or 1: a TypeError later
        except FileNotFoundError:
            self.timings, why = {}, None
        except (ValueError, OSError) as e:  # UnicodeDecodeError is a ValueError
            self.timings, why = {}, f"not valid JSON: {e}"
        if why is not None:
            self.timings = {}
            print(f"note: {self.timings_file} is damaged ({why}); the stages' times start afresh", flush=True)

    def save(self) -> None:
        """demo.json: the kind of demo and, per stage, the stamp of what it made and those of the stages it read."""
        write_whole(self.out / "demo.json", json.dumps({"smoke": self.smoke, "stages": self.record}) + "\n")

    def stamp(self, s: Stage) -> dict[str, list[int]]:
        """{path below out: [size in bytes, mtime_ns]} of every file under s.paths, less those under another stage's
        paths inside them (data/dpo.jsonl, pretrain/eval/) and their temporaries: stat only, no reading."""
        inner = [q for t in self.all if t.name != s.name for q in t.paths if any(p in q.parents for p in s.paths)]
        files = {}
        for path in s.paths:
            for f in files_under(path):
                if not any(f == q or q in f.parents or f == q.with_name(f".{q.name}.tmp") for q in inner):
                    st = f.stat() if f.exists() else f.lstat()  # a link to nothing: the link itself
                    files[f.relative_to(self.out).as_posix()] = [st.st_size, st.st_mtime_ns]
        return dict(sorted(files.items()))

    def inputs(self, s: Stage) -> dict[str, str | None]:
        """{stage s reads: the digest of its recorded outputs' stamp, None where it has none}."""
        return {name: made(self.record, name) for name in s.needs}

    def status(self, s: Stage) -> tuple[str, str]:
        """("done", "made" or "redone", why): done when s's outputs are as it recorded them and the stages it reads
        as they were when it ran; made when it never ran here, or its last run stopped with its inputs as they are
        and it resumes (a training from its newest checkpoint, an eval from its answers so far); else redone from the
        start."""
        rec, now = self.record.get(s.name, {}), self.inputs(s)
        if "outputs" in rec:
            if changed := next((name for name in s.needs if rec["inputs"].get(name) != now[name]), None):
                return "redone", f"its input {changed} changed since it ran"
            if why := changes(rec["outputs"], self.stamp(s)):
                return "redone", f"its outputs changed since it ran: {why}"
            return "done", "its outputs and inputs are as they were when it ran"
        if "started" in rec:
            if changed := next((name for name in s.needs if rec["started"].get(name) != now[name]), None):
                return "redone", f"its input {changed} changed since its last run started"
            if s.resumes:
                return "made", "its last run stopped before the end; it goes on from there"
            return "redone", "its last run stopped before the end"
        if self.stamp(s):
            return "redone", "demo.json has no record of its outputs (made outside the demo or by an older babyllama)"
        return "made", "it has not run here yet"

    def stage(self, i: int, n: int, s: Stage) -> None:
        """Run s unless it is done (status), saying which of done, made or redone and why. Redone: its paths are
        removed first, whatever they are; made: only a file where its folder should be. Its stamp goes into
        demo.json when it starts (what it read) and when it ends (what it made, and what it read)."""
        verdict, why = self.status(s)
        print(f"[{i}/{n}] {s.name}: {verdict}, as {why}{'; skipped' if verdict == 'done' else ''}", flush=True)
        if verdict == "done":
            return
        for path in s.paths:
            if verdict == "redone" or (path.suffix == "" and (path.is_symlink() or path.is_file())):
                remove(path)
        self.record[s.name] = {"started": self.inputs(s)}
        self.save()
        print(f"[{i}/{n}] {s.name} ...", flush=True)
        start = time.time()
        s.run()
        self.record[s.name] = {"outputs": self.stamp(s), "inputs": self.inputs(s)}
        self.save()
        self.timings[s.name] = round(time.time() - start, 1)
        write_whole(self.timings_file, json.dumps(self.timings, indent=2) + "\n")
        print(f"[{i}/{n}] {s.name}: {self.timings[s.name]:.1f} s", flush=True)

    def drop_stale(self, stages: list[Stage]) -> None:
        """Remove the outputs of stages this run leaves out (DPO's, without --dpo) that a redone stage made stale,
        so that the report does not show them."""
        for s in stages:
            if s.name in self.record and (why := self.status(s))[0] == "redone":
                for path in s.paths:
                    remove(path)
                del self.record[s.name]
                self.save()
                print(f"{s.name}: removed, as {why[1]} (demo --dpo makes it again)", flush=True)

    # --- the stages ---

    def data(self) -> None:
        from babyllama.data.clean import prepare
        from babyllama.data.demo_corpus import build_demo_corpus

        d = self.out / "data"
        limits = {"limit": SMOKE["limit"], "eval_limit": SMOKE["eval_items"],
                  "preference_items": SMOKE["preference_items"]} if self.smoke else {}
        build_demo_corpus(d, **limits)
        prepare([str(d / "raw" / "pretrain.jsonl")], d, min_chars=10, dedup="minhash")

    def parts(self) -> list[Path]:
        """prepare's cleaned shards: the pretraining text (data/ also holds the raw copy and the SFT,
        eval and DPO items, which the tokenizer and pretraining must not read)."""
        return sorted((self.out / "data").glob("part_*.jsonl"))

    def tokenizer(self) -> None:
        from babyllama.data.sources import CorpusReader
        from babyllama.tokenizer import train_bpe, training_sample

        reader = CorpusReader(self.parts())
        texts = training_sample(reader.documents(), read=reader.read)  # the whole corpus: under the default budget
        train_bpe(texts, SMOKE["vocab"] if self.smoke else 8192).save(self.out / "tokenizer")

    def tokens(self) -> None:
        from babyllama.data.pretokenize import pretokenize

        pretokenize(list(map(str, self.parts())), str(self.out / "tokenizer"), self.out / "tokens", workers=2,
                    val_fraction=0.02 if self.smoke else 0.005)

    def train(self, stage: str) -> None:
        from babyllama.checkpoint import latest_checkpoint
        from babyllama.config import load_config
        from babyllama.train.dpo import dpo
        from babyllama.train.stages import pretrain, sft

        run = self.out / stage
        args = ["--out_dir", str(run)]
        if stage == "dpo":
            cfg = load_config(config_path("dpo-demo.toml"), [*args, "--init", str(self.out / "sft" / "final"),
                                                             "--data", str(self.out / "data" / "dpo.jsonl"),
                                                             *(SMOKE["dpo"] if self.smoke else [])])
            dpo(cfg, resume=latest_checkpoint(run) is not None)
        elif stage == "pretrain":
            smoke = [*SMOKE["pretrain"], "--model.vocab_size", str(SMOKE["vocab"])]  # no embedding row unused
            cfg = load_config(config_path("demo.toml"), [*args, "--data", str(self.out / "tokens"),
                                                         *(smoke if self.smoke else [])])
            pretrain(cfg, resume=latest_checkpoint(run) is not None)
        else:
            cfg = load_config(config_path("sft-demo.toml"), [*args, "--init", str(self.out / "pretrain" / "final"),
                                                             "--data", str(self.out / "data" / "sft.jsonl"),
                                                             *(SMOKE["sft"] if self.smoke else [])])
            sft(cfg, resume=latest_checkpoint(run) is not None)

    def evaluate(self) -> None:
        from babyllama.evaluate import evaluate
        from babyllama.sampling import Sampling

        d = self.out / "data"
        evaluate(self.out / "pretrain" / "final", self.out / "pretrain" / "eval", data=str(self.out / "tokens"))
        train_files = [str(d / "sft.jsonl"), *map(str, self.parts())]
        evaluate(self.out / "sft" / "final", self.out / "sft" / "eval", qa=str(d / "eval.jsonl"),
                 train_data=train_files, sampling=Sampling(EVAL_NEW_TOKENS))

    def dpo_data(self) -> None:
        """Pairs for DPO (dpo.jsonl): the entity items of dpo_items.jsonl, sentences that SFT never asked
        about, with the SFT model's own answer rejected where it is wrong, else a wrong label; and
        SELF_LABELLED sentiment items of sft.jsonl with the model's own label chosen (self_labelled_pairs):
        without them DPO on entity pairs shifts the sentiment prior, and with the reference label chosen
        they cost held-out sentiment accuracy (bench/RESULTS.md). Held out (dpo_eval.jsonl): the eval
        items, made as the entity pairs are; on sentiment the model's wrong answer is the other label
        (1,376 of its 1,377 wrong answers on the SFT items), so those items are not asked. The model
        answers greedily, as the eval asks."""
        from babyllama.checkpoint import load_checkpoint
        from babyllama.data.demo_corpus import SENTIMENT_PROMPT, preference_pairs, self_labelled_pairs, spread
        from babyllama.evaluate import answer
        from babyllama.progress import progress
        from babyllama.sampling import Sampling

        d = self.out / "data"
        if not (d / "dpo_items.jsonl").is_file():
            raise UserError(f"{d} has no dpo_items.jsonl (it was made by an older babyllama); "
                            "rerun with --force to remake the demo's data.")
        model, tokenizer, _ = load_checkpoint(self.out / "sft" / "final")

        def answers(records: list[dict], source: str) -> dict[str, str]:
            asked = [r["instruction"] + r["input"] for r in records]
            return {q: answer(model, tokenizer, q, Sampling(EVAL_NEW_TOKENS))
                    for q in progress(asked, desc=f"the SFT model's answers ({source})", unit=" item")}

        def read(name: str) -> list[dict]:
            return [json.loads(line) for line in (d / name).read_text(encoding="utf-8").splitlines()]

        items, evals = read("dpo_items.jsonl"), read("eval.jsonl")  # dpo_items.jsonl: entity items only
        reviews = spread([r for r in read("sft.jsonl") if r["instruction"] == SENTIMENT_PROMPT],
                         SMOKE["preference_items"] if self.smoke else SELF_LABELLED)
        train = (preference_pairs(items, answers(items, "dpo_items.jsonl"))
                 + self_labelled_pairs(reviews, answers(reviews, "sft.jsonl's reviews")))
        held = preference_pairs(evals, answers([r for r in evals if r["instruction"] != SENTIMENT_PROMPT],
                                               "eval.jsonl"))
        for name, pairs in (("dpo.jsonl", train), ("dpo_eval.jsonl", held)):
            write_whole(d / name, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))

    def dpo_eval(self) -> None:
        """The DPO model on the held-out QA items (and which items it answers differently from the SFT model:
        fixed, broken), and the SFT and DPO models on the held-out pairs, per task and pooled."""
        from babyllama.checkpoint import load_model
        from babyllama.evaluate import evaluate
        from babyllama.sampling import Sampling
        from babyllama.train.dpo import preference_metrics

        d, run = self.out / "data", self.out / "dpo"
        evaluate(run / "final", run / "eval", qa=str(d / "eval.jsonl"), sampling=Sampling(EVAL_NEW_TOKENS))
        sft_model, dpo_model = load_model(self.out / "sft" / "final"), load_model(run / "final")
        beta = json.loads((run / "config.json").read_text())["train"]["beta"]
        models = {"sft": sft_model, "dpo": dpo_model}  # each scored against the SFT model
        tasks = {task: {"pairs": len(data), **{name: preference_metrics(m, sft_model, data, beta)
                                               for name, m in models.items()}}
                 for task, data in held_out_pairs(d / "dpo_eval.jsonl", run / "eval" / "pairs", run / "final",
                                                  sft_model.cfg.max_seq_len).items()}
        result = {"pairs": sum(t["pairs"] for t in tasks.values()), "beta": beta, **pooled(tasks, list(models)),
                  "tasks": tasks,
                  "qa_changes": qa_changes(self.out / "sft" / "eval" / "items.jsonl", run / "eval" / "items.jsonl")}
        write_whole(run / "eval" / "preferences.json", json.dumps(result, indent=2) + "\n")

    def chat(self) -> None:
        from babyllama.chat import reply
        from babyllama.chat_format import Conversation
        from babyllama.checkpoint import load_checkpoint
        from babyllama.sampling import Sampling

        model, tokenizer, _ = load_checkpoint(self.out / "sft" / "final")
        lines = ["## Chat answers", "", "| question | answer |", "|---|---|"]
        for prompt, text in CHAT_QUESTIONS:
            answer = "".join(reply(model, tokenizer, Conversation([(prompt + text, "")]), Sampling(EVAL_NEW_TOKENS)))
            lines.append(f"| {(prompt + text).replace(chr(10), ' ')} | {answer.strip()} |")
        write_whole(self.out / "chat_answers.md", "\n".join(lines) + "\n")

    def report(self) -> None:
        from babyllama.report import make_report

        rows = "\n".join(f"| {k} | {v} |" for k, v in self.timings.items())
        total = sum(self.timings.values())
        extra = [f"## Wall time per stage (s)\n\n| stage | seconds |\n|---|---|\n{rows}\n| total | {total:.1f} |\n"]
        extra.append((self.out / "chat_answers.md").read_text(encoding="utf-8"))
        write_whole(self.out / "report_extra.md", "\n".join(extra))
        make_report(self.out)

    def run(self) -> Path:
        o = self.out
        stages = [  # each with the stages whose outputs it reads: when one of them changes, it is redone
            Stage("data", [o / "data"], self.data, ()),
            Stage("tokenizer", [o / "tokenizer"], self.tokenizer, ("data",)),
            Stage("tokens", [o / "tokens"], self.tokens, ("data", "tokenizer")),
            Stage("pretrain", [o / "pretrain"], lambda: self.train("pretrain"), ("tokens",), True),
            Stage("sft", [o / "sft"], lambda: self.train("sft"), ("data", "pretrain"), True),
            Stage("eval", [o / "pretrain" / "eval", o / "sft" / "eval"], self.evaluate,
                  ("data", "tokens", "pretrain", "sft"), True),
            Stage("chat", [o / "chat_answers.md"], self.chat, ("sft",)),
        ]
        dpo = [Stage("dpo data", [o / "data" / "dpo.jsonl", o / "data" / "dpo_eval.jsonl"], self.dpo_data,
                     ("data", "sft")),
               Stage("dpo", [o / "dpo"], lambda: self.train("dpo"), ("dpo data", "sft"), True),
               Stage("dpo eval", [o / "dpo" / "eval"], self.dpo_eval, ("dpo data", "dpo", "eval"), True)]
        report = Stage("report", [o / "report.md", o / "report_extra.md", o / "plots"], self.report,
                       ("eval", "chat", *(["dpo eval"] if self.dpo else [])))
        self.all = [*stages, *dpo, report]
        if self.dpo:
            stages += dpo
        stages.append(report)
        for i, s in enumerate(stages, 1):
            if s is report and not self.dpo:
                self.drop_stale(dpo)
            self.stage(i, len(stages), s)
        return o / "report.md"


class Stage(NamedTuple):
    """A stage of the demo: paths, what it writes and owns (folders, less the paths of other stages inside them, and
    files): removed before it is redone; needs: the names of the stages whose outputs it reads; resumes: whether a
    run of it that was stopped goes on where it stopped (a training, an eval) rather than from the start."""
    name: str
    paths: list[Path]
    run: Callable[[], None]
    needs: tuple[str, ...]
    resumes: bool = False


DEMO_NAMES = ("data", "tokenizer", "tokens", "pretrain", "sft", "dpo", "plots", "chat_answers.md", "report_extra.md",
              "report.md", "timings.json", "demo.json")  # what the demo writes in its out_dir (and temporaries)


def remove(path: Path) -> None:
    """Remove path, whatever it is: a folder with what it holds, a file, a link (not what it points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.is_symlink() or path.exists():
        path.unlink()


def remove_demo_outputs(out: Path) -> list[str]:
    """--force: remove the demo's own names in out (DEMO_NAMES and their temporaries), never other files, nor the
    lock the CLI holds on out; returns the names removed."""
    removed = []
    for name in (*DEMO_NAMES, *(f".{n}.tmp" for n in DEMO_NAMES)):
        if (out / name).exists() or (out / name).is_symlink():
            remove(out / name)
            removed.append(name)
    return removed


def files_under(path: Path) -> list[Path]:
    """The files under a folder (links not followed into), or [path] for a file or link, [] for nothing."""
    if path.is_dir() and not path.is_symlink():
        return [Path(root) / f for root, dirs, files in os.walk(path) for f in (*files, *(
            d for d in dirs if (Path(root) / d).is_symlink()))]
    return [path] if path.exists() or path.is_symlink() else []


def made(record: dict, name: str) -> str | None:
    """A digest of the stamp of what stage name made as recorded, None where it has not finished."""
    outputs = record.get(name, {}).get("outputs")
    return None if outputs is None else hashlib.sha256(json.dumps(outputs, sort_keys=True).encode()).hexdigest()[:16]


def changes(old: dict[str, list[int]], new: dict[str, list[int]]) -> str | None:
    """The first difference between two stamps in words, a file gone before one cut or rewritten before one new (a
    file where a folder was: the folder's files are gone), None when equal."""
    def said(rel: str) -> tuple[int, str]:
        a, b = old.get(rel), new.get(rel)
        if b is None:
            return 0, f"{rel} is gone"
        if a is None:
            return 2, f"{rel} is new"
        return 1, f"{rel} size {a[0]} -> {b[0]} bytes" if a[0] != b[0] else f"{rel} was rewritten (its mtime changed)"

    return min((said(rel) for rel in old.keys() | new.keys() if old.get(rel) != new.get(rel)), default=(0, None))[1]


def valid(record: object) -> dict:
    """demo.json's stages, less any record that is not as save wrote it (those stages are redone)."""
    def stamp(x: object) -> bool:
        return isinstance(x, dict) and all(isinstance(v, list) and len(v) == 2 and all(type(n) is int for n in v)
                                           for v in x.values())

    def digests(x: object) -> bool:
        return isinstance(x, dict) and all(v is None or isinstance(v, str) for v in x.values())

    return {name: r for name, r in (record.items() if isinstance(record, dict) else ()) if isinstance(r, dict) and (
        (set(r) == {"started"} and digests(r["started"]))
        or (set(r) == {"outputs", "inputs"} and stamp(r["outputs"]) and digests(r["inputs"])))}


def check_demo_kind(out: Path, smoke: bool, force: bool = False) -> dict:
    """demo.json's record of the stages (valid) when out holds the outputs of a demo of this kind (its demo.json
    says --smoke or not: a smoke run's outputs are never reused by a full one, nor the reverse), {} when it holds
    nothing yet (but hidden files: the CLI's lock, a temporary) or force (its foreign files stay). UserError
    otherwise: a folder of other outputs (the README's commands one by one, say) would be taken for the demo's."""
    kind = out / "demo.json"
    if not kind.exists():
        if not force and any(not f.name.startswith(".") for f in out.iterdir()):
            raise UserError(f"{out} holds files but no demo.json, so they are no demo's outputs; pass --force to "
                            "run the demo beside them (it replaces only its own names there: "
                            f"{', '.join(DEMO_NAMES)}), or choose another --out_dir.")
        return {}
    try:
        read = json.loads(kind.read_text(encoding="utf-8"))
        made = read["smoke"]
    except (ValueError, OSError, TypeError, KeyError):
        made = None
    if type(made) is not bool:
        raise UserError(f"{kind} is damaged (not {{\"smoke\": true}} or {{\"smoke\": false}}), so whose outputs "
                        f"{out} holds is unknown; pass --force to redo them or choose another --out_dir.")
    if made != smoke:
        raise UserError(f"{out} holds a {'--smoke' if made else 'full'} demo's outputs; pass --force to redo them "
                        "or choose another --out_dir.")
    return valid(read.get("stages"))


def qa_changes(before: Path, after: Path) -> dict[str, dict[str, int]]:
    """Per task, the QA items of two evals' items.jsonl that the second answers right and the first wrong
    (fixed), and the reverse (broken): the changes behind a change of accuracy. Items are matched by task
    and question; those only one eval asked are left out."""
    def right(path: Path) -> dict[tuple[str, str], bool]:
        items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        return {(x["task"], x["question"]): x["prediction"] == x["reference"] for x in items if x["kind"] == "qa"}

    first, changes = right(before), {}
    for (task, question), now in right(after).items():
        counts = changes.setdefault(task, {"fixed": 0, "broken": 0})
        if first.get((task, question), now) != now:
            counts["fixed" if now else "broken"] += 1
    return changes


def task_of(prompt: str) -> str:
    """The demo's task of a prompt, known by its instruction: sentiment, person or place."""
    from babyllama.data.demo_corpus import PERSON_PROMPT, PLACE_PROMPT, SENTIMENT_PROMPT

    return next(t for p, t in ((SENTIMENT_PROMPT, "sentiment"), (PERSON_PROMPT, "person"), (PLACE_PROMPT, "place"))
                if prompt.startswith(p))


def held_out_pairs(path: Path, work: Path, checkpoint: Path, max_seq_len: int) -> dict:
    """{task: PreferenceData} of the demo's held-out pairs (path: dpo_eval.jsonl), in the order the tasks first come:
    each task's lines go to work/TASK.jsonl and its own DPO token cache, work/TASK_tokens (checkpoint's tokenizer,
    rows of max_seq_len), so that a pair the cache leaves out (equal answers, too long) leaves its own task alone.
    work is made afresh. Raises UserError when every pair of a task is left out."""
    from babyllama.data.sft_tokens import SFTSettings
    from babyllama.train.distributed import Dist
    from babyllama.train.dpo import PreferenceData
    from babyllama.train.sft_data import load_sft_data

    lines: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        lines.setdefault(task_of(json.loads(line)["prompt"]), []).append(line)
    shutil.rmtree(work, ignore_errors=True)  # caches of other pairs or another model would be refused
    work.mkdir(parents=True)
    settings, data = SFTSettings(max_seq_len + 1, val_fraction=0.0), {}
    for task, task_lines in lines.items():
        write_whole(work / f"{task}.jsonl", "".join(task_lines))
        pairs, _, _ = load_sft_data([work / f"{task}.jsonl"], checkpoint, work / f"{task}_tokens", settings, False,
                                    Dist(), kind="dpo")
        data[task] = PreferenceData(pairs)
    return data


def pooled(tasks: dict[str, dict], models: list[str]) -> dict[str, dict[str, float]]:
    """{model: its metrics over the pairs of every task}: each a mean over pairs (preference_metrics), so the tasks'
    means weighted by their pairs."""
    n = sum(t["pairs"] for t in tasks.values())
    return {m: {k: sum(t["pairs"] * t[m][k] for t in tasks.values()) / n for k in next(iter(tasks.values()))[m]}
            for m in models}


def dpo_line(prefs: dict) -> str:
    """The line run_demo prints of preferences.json: the held-out pairs before and after DPO, and per task where it
    has them (one written before they were scored per task has none)."""
    line = (f"dpo, {prefs['pairs']} held-out pairs: chosen likelier {prefs['sft']['logps/accuracies']:.1%} -> "
            f"{prefs['dpo']['logps/accuracies']:.1%}, rewards/accuracies {prefs['dpo']['rewards/accuracies']:.1%}")
    tasks = ", ".join(f"{task} {p['dpo']['rewards/accuracies']:.1%}" for task, p in prefs.get("tasks", {}).items())
    return line + (f" ({tasks})" if tasks else "")


def run_demo(out: str | Path = "runs/demo", smoke: bool = False, force: bool = False, dpo: bool = False) -> Path:
    report = Demo(out, smoke, force, dpo).run()
    final = Path(out) / "sft" / "final"
    results = json.loads((Path(out) / "sft" / "eval" / "eval.json").read_text())
    lm = json.loads((Path(out) / "pretrain" / "eval" / "eval.json").read_text())["lm"]
    print("\n=== babyllama demo finished ===")
    print(f"report:            {report}")
    print(f"val bits per byte: {lm['bits_per_byte']:.3f} (pretrained model)")
    for task, s in results["qa"].items():
        score = (f"accuracy {s['accuracy']:.1%} (majority {s['majority_baseline']:.1%})" if "accuracy" in s
                 else f"exact match {s['exact_match']:.1%} (majority {s['majority_baseline']:.1%}), "
                      f"char F1 {s['char_f1']:.3f}")
        print(f"{task + ':':18s} {score}")
    if dpo:
        prefs = json.loads((Path(out) / "dpo" / "eval" / "preferences.json").read_text())
        qa = json.loads((Path(out) / "dpo" / "eval" / "eval.json").read_text())["qa"]
        print(dpo_line(prefs))
        for task, s in qa.items():
            if task not in results["qa"]:  # an SFT eval of other items (eval --limit)
                continue
            name, change = "accuracy" if "accuracy" in s else "exact match", prefs["qa_changes"][task]
            print(f"{'dpo ' + task + ':':18s} {name} {results['qa'][task]['exact_match']:.1%} -> "  # = accuracy
                  f"{s['exact_match']:.1%} ({change['fixed']} {agree(change['fixed'], 'item', 'items')} fixed, "
                  f"{change['broken']} broken)")
    print(f"chat with it:      babyllama chat {final}")
    print(f"serve it:          babyllama serve {final}   (then open http://127.0.0.1:8000/)")
    return report
