"""The whole pipeline on the built-in Chinese corpus, on a CPU, in minutes: `make demo`.

    babyllama demo --out_dir runs/demo            # about 15 minutes on 2 CPU cores
    babyllama demo --out_dir runs/demo --smoke    # every stage on a sliver of the data, about half a minute
    babyllama demo --out_dir runs/demo --force    # redo every stage
    babyllama demo --out_dir runs/demo --dpo      # then DPO on preference pairs, about 7 minutes more

Stages, each skipped when its outputs are whole and no stage whose outputs it reads ran (a rerun resumes where the
last one stopped; a damaged output, or one made from a redone stage's, is redone: Demo.stage):
data (prepare --demo) -> tokenizer (8k byte-level BPE) -> tokens (pretokenize) -> pretrain
(configs/demo.toml) -> sft (configs/sft-demo.toml) -> eval (loss and bits per byte of the
pretrained model; held-out sentiment and entity extraction of the fine-tuned one) -> chat
(a few answers) -> report (runs/demo/report.md). With --dpo: dpo data (pairs of the entity items
of data/dpo_items.jsonl: the reference answer chosen; the SFT model's own wrong answer, else a wrong
label, rejected; and of 4,000 SFT reviews: the model's own label chosen, the other rejected) -> dpo
(configs/dpo-demo.toml) -> dpo eval (the held-out eval items as QA and as pairs, before and after:
dpo/eval/preferences.json), and the report again.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from babyllama.errors import UserError, agree, discard, write_whole
from babyllama.lock import LOCK

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
        if force and self.out.is_dir():  # everything but the lock that the CLI holds on it
            for old in self.out.iterdir():
                if old.is_dir() and not old.is_symlink():
                    shutil.rmtree(old)
                elif old.name != LOCK:
                    old.unlink()
        self.out.mkdir(parents=True, exist_ok=True)
        check_demo_kind(self.out, smoke)
        self.fresh = not (self.out / "demo.json").exists()  # no stage has run here: none is "made" again
        write_whole(self.out / "demo.json", json.dumps({"smoke": smoke}) + "\n")
        self.timings_file = self.out / "timings.json"
        why = whole(self.timings_file)
        self.timings = json.loads(self.timings_file.read_text()) if why is None else {}
        if not isinstance(self.timings, dict):  # [] or 1: a TypeError at the first stage
            why, self.timings = "not a JSON object", {}
        if why not in (None, MISSING):
            print(f"note: {self.timings_file} is damaged ({why}); the stages' times start afresh", flush=True)
        self.ran: set[str] = set()  # the stages that ran in this run: those that read their outputs run again

    def stage(self, i: int, n: int, s: Stage) -> None:
        """Run a stage unless its outputs are whole and none of the stages it reads (s.needs) ran in this run. A stage
        whose outputs are missing (a stopped run) runs where it stopped: a training run resumes, an eval picks up its
        answers so far; one whose outputs are damaged, or whose input was redone, starts afresh: what it owns is
        removed."""
        why = next((f"its input {name} was redone" for name in s.needs if name in self.ran), None)
        if why is None:
            needs = {path: NEEDS.get(path.relative_to(self.out).as_posix(), ()) for path in s.outputs}
            why = next((f"{path} is damaged ({bad})" for path in s.outputs
                        if (bad := whole(path, needs[path])) not in (None, MISSING)), None)
        missing = [path for path in s.outputs if not path.exists()]
        if why is None and not missing:
            print(f"[{i}/{n}] {s.name}: done before ({', '.join(map(str, s.outputs))}), skipped", flush=True)
            return
        if why is not None and any(path.exists() for path in s.owned):  # a fresh out_dir's stages are not redone
            print(f"[{i}/{n}] {s.name}: redone from the start, as {why}", flush=True)
            for path in s.owned:
                discard(path)
        elif not self.fresh:
            print(f"[{i}/{n}] {s.name}: made, as {missing[0]} was missing", flush=True)
        self.ran.add(s.name)
        print(f"[{i}/{n}] {s.name} ...", flush=True)
        start = time.time()
        s.run()
        self.timings[s.name] = round(time.time() - start, 1)
        write_whole(self.timings_file, json.dumps(self.timings, indent=2) + "\n")
        print(f"[{i}/{n}] {s.name}: {self.timings[s.name]:.1f} s", flush=True)

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
        self.report()

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
        stages = [  # each with the stages whose outputs it reads: when one of them runs, it is redone
            Stage("data", [o / "data" / "stats.json"], [o / "data"], self.data, ()),
            Stage("tokenizer", [o / "tokenizer" / "tokenizer.json"], [o / "tokenizer"], self.tokenizer, ("data",)),
            Stage("tokens", [o / "tokens" / "manifest.json"], [o / "tokens"], self.tokens, ("data", "tokenizer")),
            Stage("pretrain", [o / "pretrain" / "final"], [o / "pretrain"], lambda: self.train("pretrain"),
                  ("tokens",)),
            Stage("sft", [o / "sft" / "final"], [o / "sft"], lambda: self.train("sft"), ("data", "pretrain")),
            Stage("eval", [o / "pretrain" / "eval" / "eval.json", o / "sft" / "eval" / "eval.json"],
                  [o / "pretrain" / "eval", o / "sft" / "eval"], self.evaluate, ("data", "tokens", "pretrain", "sft")),
            Stage("chat", [o / "chat_answers.md"], [o / "chat_answers.md"], self.chat, ("sft",)),
            Stage("report", [o / "report.md"], [o / "report.md"], self.report, ("eval", "chat")),
        ]
        if self.dpo:  # dpo eval remakes the report
            stages += [Stage("dpo data", [o / "data" / "dpo_eval.jsonl"],
                             [o / "data" / "dpo.jsonl", o / "data" / "dpo_eval.jsonl"], self.dpo_data, ("data", "sft")),
                       Stage("dpo", [o / "dpo" / "final"], [o / "dpo"], lambda: self.train("dpo"), ("dpo data", "sft")),
                       Stage("dpo eval", [o / "dpo" / "eval" / "preferences.json", o / "dpo" / "eval" / "eval.json"],
                             [o / "dpo" / "eval"], self.dpo_eval, ("dpo data", "dpo", "eval"))]
        for i, s in enumerate(stages, 1):
            self.stage(i, len(stages), s)
        return o / "report.md"


class Stage(NamedTuple):
    """A stage of the demo: done when each of outputs is whole (whole); owned: what it writes, removed before it is
    redone from the start; needs: the names of the stages whose outputs it reads."""
    name: str
    outputs: list[Path]
    owned: list[Path]
    run: Callable[[], None]
    needs: tuple[str, ...]


MISSING = "missing"
NEEDS = {"pretrain/eval/eval.json": ("lm",), "sft/eval/eval.json": ("qa",), "dpo/eval/eval.json": ("qa",),
         "dpo/eval/preferences.json": ("sft", "dpo", "qa_changes")}  # the objects that run_demo reads in a stage's
# JSON output (below out): one without them is redone, not a KeyError after the stages


def whole(path: Path, needs: tuple[str, ...] = ()) -> str | None:
    """Why a stage's output at path is not whole, or None when it is: MISSING where there is nothing; a checkpoint
    (a run's final/) by check_whole, a .json file by parsing it (and, with needs, by holding an object under each of
    those keys), another file by being one. NewerFormat (a UserError) for a checkpoint that a newer babyllama wrote:
    no damage to redo."""
    from babyllama.checkpoint import NewerFormat, check_whole

    if not path.exists():
        return MISSING
    if path.name == "final":
        try:
            check_whole(path)
        except NewerFormat:
            raise
        except UserError as e:
            return str(e).rstrip(".")
        return None
    if not path.is_file():
        return "not a file"
    if path.suffix == ".json":
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:  # UnicodeDecodeError is a ValueError
            return f"not valid JSON: {e}"
        if needs and not isinstance(value, dict):
            return "not a JSON object"
        if missing := [k for k in needs if not isinstance(value.get(k), dict)]:
            return f"no {' or '.join(map(repr, missing))} object in it"
    return None


def check_demo_kind(out: Path, smoke: bool) -> None:
    """UserError unless out holds the outputs of a demo of this kind (its demo.json says --smoke or not: a smoke
    run's outputs are never reused by a full one, nor the reverse) or nothing yet (but the CLI's lock): a folder of
    other outputs (the README's commands one by one, say) would be taken for the demo's stages done."""
    kind = out / "demo.json"
    if not kind.exists():
        if any(not f.name.startswith(".") for f in out.iterdir()):  # hidden: the lock, demo.json's temporary file
            raise UserError(f"{out} holds files but no demo.json, so they are no demo's outputs; pass --force to "
                            "delete them and run the demo there, or choose another --out_dir.")
        return
    try:
        made = json.loads(kind.read_text(encoding="utf-8"))["smoke"]
    except (ValueError, OSError, TypeError, KeyError):
        made = None
    if type(made) is not bool:
        raise UserError(f"{kind} is damaged (not {{\"smoke\": true}} or {{\"smoke\": false}}), so whose outputs "
                        f"{out} holds is unknown; pass --force to redo them or choose another --out_dir.")
    if made != smoke:
        raise UserError(f"{out} holds a {'--smoke' if made else 'full'} demo's outputs; pass --force to redo them "
                        "or choose another --out_dir.")


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
