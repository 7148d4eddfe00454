"""The report card: one Markdown page with plots for a run directory.

    babyllama report runs/demo          # writes runs/demo/report.md and runs/demo/plots/*.png

RUN_DIR is a training run (it has metrics.jsonl) or a directory holding several (pretrain/,
sft/ ...). The report gathers what it finds: corpus statistics (a `prepare` stats.json), token
shards (manifest.json) and the tokenizer, each run's settings and loss / learning-rate curves,
and every eval.json below RUN_DIR (loss and bits per byte, QA scores against the majority
baseline, multiple choice, held-out preference pairs, leakage, samples).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from babyllama.errors import UserError, agree, check_folder, first_few, require, write_whole, writing
from babyllama.progress import read_metrics


def pyplot():
    """matplotlib's pyplot, drawing to files only (no display needed)."""
    require("matplotlib", "report").use("Agg")
    import matplotlib.pyplot as plt

    return plt


NOT_SEARCHED = ("checkpoints", "plots")  # a run's checkpoints and a report's plots: nothing to find, many files
DATATROVE_WORK = "datatrove"  # prepare --engine datatrove's work folder in its output (with its settings.json), whose
# logs/<stage>/stats.json are datatrove's own


def find(root: Path, name: str) -> list[Path]:
    """Every file called name in root or any folder below it, in sorted order (the report's order). It does not go
    into checkpoints/, plots/, hidden folders, a datatrove prepare's work folder (datatrove/ with a settings.json) or
    the folders below a data folder (one that has a manifest.json: token shards or an SFT token cache, whose
    tokenizer/ data_section reads by path): nothing of the report's is there, and many files. root itself is searched
    whatever it holds: a manifest.json copied there hid every run below it."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [] if "manifest.json" in files and Path(folder) != root else [
            d for d in dirs if d not in NOT_SEARCHED and not d.startswith(".")
            and not (d == DATATROVE_WORK and (Path(folder) / d / "settings.json").is_file())]
        if name in files:
            found.append(Path(folder) / name)
    return sorted(found, key=lambda f: f.parent.parts)  # a folder's own file before those of the folders below it


def plot_tags(folders: list[Path], root: Path, at_root: str) -> dict[Path, str]:
    """The name that each folder's plot of one kind starts with: its path below root with "/" as "_" (at_root for
    root itself), so that two runs called sft in a/ and b/ draw two files; where two folders still get one name
    (a_b/sft and a/b_sft, or at_root's name below root), each gets a short hash of its path after it."""
    plain = {f: f.relative_to(root).as_posix().replace("/", "_") if f != root else at_root for f in folders}
    shared = Counter(plain.values())
    return {f: t if shared[t] == 1 else f"{t}_{hashlib.sha1(f.relative_to(root).as_posix().encode()).hexdigest()[:6]}"
            for f, t in plain.items()}


def read_json(path: Path, what: str, shape: Callable[[dict], bool]) -> dict | None:
    """The JSON object in path when shape(it) holds, else None after a note on stdout that it is left out (a file
    of another tool with the same name, or one cut short): a foreign file must not stop the report."""
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))  # a BOM that an editor wrote is no fault
        if isinstance(value, dict) and shape(value):
            return value
    except (ValueError, TypeError, KeyError):  # not JSON, not UTF-8, or another shape inside
        pass
    print(f"note: {path} is not {what}; the report leaves it out.")
    return None


CORPUS_COUNTS = ("bad", "too_short", "exact_duplicates", "near_duplicates", "kept")  # a prepare stats.json's total


FLAGS = ("final", "resumed")  # what the trainer marks a record with (true): its last, the first after a resume


def run_metrics(path: Path) -> list[dict]:
    """A training run's records (progress.read_metrics' of the metrics.jsonl at path), each with those of its values
    that are numbers (NaN and infinities as written by runs before they became null) or null (a non-finite number):
    the trainer's FLAGS (true) are left out, and so is any other value
    (a string, a list, an object), which a note on stdout names. Notes also say what else is left out: a last line
    cut off by a kill while it was written, other lines that are not records (a JSON object with an int step).
    ValueError (left_out says so) for a file that is not a run's: not UTF-8, or no record with a number to plot."""
    records, skipped = read_metrics(path, float)  # a bare NaN or Infinity kept: the summary says which
    metrics = [{k: v for k, v in r.items() if v is None or is_number(v)} for r in records]
    if not curves(metrics):  # another tool's records, or none
        raise ValueError(f"{path}: no step with a loss, val_loss, lr or rewards/accuracies")
    lines = path.read_text(encoding="utf-8").rstrip().splitlines()
    if skipped == [len(lines)] and not is_json(lines[-1]):  # the last line alone, and not whole
        print(f"note: the last line of {path} was cut off (a run killed while writing it?); the report shows the "
              "lines before it.")
    elif skipped:
        print(f"note: {agree(len(skipped), 'line', 'lines')} {first_few(skipped, 5)} of {path} "
              f"{agree(len(skipped), 'is', 'are')} not a run's record (a JSON object with an integer step); the "
              f"report leaves {agree(len(skipped), 'it', 'them')} out.")
    if dropped := sorted({k for r in records for k, v in r.items()
                          if not (v is None or is_number(v) or k in FLAGS and isinstance(v, bool))}):
        print(f"note: {path} holds values that are not numbers ({', '.join(dropped)}); the report leaves them out.")
    return metrics


def text(v) -> str:
    """v (a model's answer, a prompt, a value of a file) as Markdown text that shows it as it is: &, < and > as HTML
    entities (no tag of a model's passes raw into the page) and newlines as <br>."""
    return str(v).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\n", "<br>")


def code(name) -> str:
    """name (a folder's or a checkpoint's path) as a Markdown code span, shown as it is: its fence is longer than any
    run of backticks in it, and a newline is written \\n, so that neither ends the span or the heading."""
    name = str(name).replace("\r", "\\r").replace("\n", "\\n")
    longest = max((len(r) for r in "".join(c if c == "`" else " " for c in name).split()), default=0)
    fence = "`" * (longest + 1)
    pad = " " if "`" in name[:1] + name[-1:] else ""
    return f"{fence}{pad}{name}{pad}{fence}"


def is_json(line: str) -> bool:
    """Whether line is a whole JSON value (bare NaN and Infinity too), not one cut short."""
    try:
        json.loads(line, parse_constant=float)
    except ValueError:
        return False
    return True


def table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of rows (a row lacking a column: a blank cell); floats with 4 significant digits, other
    values as text() with | as \\| so that a cell holds any text."""
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else text(v).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


Series = dict[str, tuple[list, list]]  # a plot's lines: label -> (x values, y values)


def curves(metrics: list[dict]) -> dict[tuple[str, str], Series]:
    """The panels of a run's plot, (x name, y name) -> its lines, of run_metrics' records (each with a step; numbers
    or null) that hold the y number: loss (train and val) against tokens, the learning rate against step, and a DPO
    run's rewards/accuracies (train and val) against step; a panel none holds is left out, and a line x is tokens only
    where every point has them, else step. Empty for a metrics.jsonl of only other records."""
    def line(y: str) -> list[dict]:
        return [m for m in metrics if m.get(y) is not None and math.isfinite(m[y])]

    def against(x: str, lines: dict[str, str]) -> dict[tuple[str, str], Series]:
        points = {label: line(y) for label, y in lines.items()}
        x = x if all(m.get(x) is not None for ms in points.values() for m in ms) else "step"
        drawn = {label: ([m.get(x) for m in ms], [m[lines[label]] for m in ms]) for label, ms in points.items() if ms}
        return {(x, next(iter(lines.values()))): drawn} if drawn else {}

    return (against("tokens", {"train": "loss", "val": "val_loss"}) | against("step", {"lr": "lr"})
            | against("step", {"train": "rewards/accuracies", "val": "val_rewards/accuracies"}))


YLABELS = {"loss": "loss (nats / token)", "lr": "learning rate"}


def plot_run(name: str, panels: dict[tuple[str, str], Series], out: Path, tag: str) -> str:
    """curves' panels of the run called name side by side in one PNG named after tag (the run's path below the
    report's root, as an eval's plot: two runs called sft in a/ and b/ drew one file); returns its name."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, ((x, y), lines) in zip(axes[0], panels.items(), strict=True):
        for label, (xs, ys) in lines.items():
            ax.plot(xs, ys, "o-" if label == "val" else "-", label=label, lw=1)
        dpo = ("step", "rewards/accuracies") in panels  # its loss is of a pair, its val_loss of the held-out pairs
        ax.set(xlabel=x, ylabel="DPO loss (nats / pair)" if dpo and y == "loss" else YLABELS.get(y, y),
               title=f"{name}: {'schedule' if y == 'lr' else y}")
        if len(lines) > 1 or y != "lr":
            ax.legend()
    fig.tight_layout()
    file = f"{tag}_curves.png"
    with writing(out / file):  # CannotWrite where the disk refuses it
        fig.savefig(out / file, dpi=110)
    plt.close(fig)
    return file


def plot_bars(title: str, values: dict[str, float], out: Path, name: str, ylabel: str) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(values)), 3.4))
    ax.bar([k.replace(" ", "\n", 1).replace("_", "\n", 1) for k in values], list(values.values()), color="#4c72b0")
    for i, v in enumerate(values.values()):
        ax.text(i, v, f"{v:,.0f}" if v >= 100 else f"{v:.3g}", ha="center", va="bottom")
    ax.set(title=title, ylabel=ylabel)
    fig.tight_layout()
    with writing(out / name):  # CannotWrite where the disk refuses it
        fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


SFT_CACHE = "babyllama-sft-tokens"  # data.sft_tokens.FORMAT: an SFT token cache's manifest.json, which has no section


def token_manifest(v: dict) -> bool:
    """Whether manifest v is no token folder's (an SFT token cache's) or one that data_section can show: its dtype
    and its totals of each split (a dict of counts)."""
    totals = v.get("totals")
    return v.get("format") != "babyllama-tokens" or (
        isinstance(v.get("dtype"), str) and isinstance(totals, dict)
        and all(isinstance(t, dict) for t in totals.values()))


def data_section(root: Path, plots: Path) -> list[str]:
    """Each prepare stats.json's counts with a bar chart (its name: plot_tags of its folder, then _corpus.png), each
    token folder's totals and tokenizer; a stats.json or manifest.json of another shape is left out with a note."""
    lines = []
    stats_files = find(root, "stats.json")
    tags = plot_tags([f.parent for f in stats_files], root, "corpus")
    for stats_file in stats_files:
        stats = read_json(stats_file, "a prepare stats.json (a total with the counts of documents)",
                          lambda v: all(isinstance(v["total"][k], int) for k in CORPUS_COUNTS))
        if stats is None:
            continue
        total = stats["total"]
        lines += [f"### Corpus: {code(stats_file.parent.relative_to(root))}", "", table([total], list(total)), ""]
        name = plot_bars("documents", {k: total[k] for k in CORPUS_COUNTS}, plots, f"{tags[stats_file.parent]}"
                         "_corpus.png", "documents")
        lines += [f"![corpus]({plots.name}/{name})", ""]
    for manifest_file in find(root, "manifest.json"):
        m = read_json(manifest_file, "a token folder's or an SFT token cache's manifest.json", token_manifest)
        if m is not None and m.get("format") not in ("babyllama-tokens", SFT_CACHE):
            print(f"note: {manifest_file} is not a token folder's manifest.json (its format is not babyllama-tokens); "
                  "the report leaves it out.")
        if m is None or m.get("format") != "babyllama-tokens":  # an SFT token cache's has no section
            continue
        rows = [{"split": s, **v} for s, v in m["totals"].items()]
        lines += [f"### Token shards: {code(manifest_file.parent.relative_to(root))} ({text(m['dtype'])})", "",
                  table(rows, ["split", "tokens", "documents"]), ""]
        tok_dir = manifest_file.parent / "tokenizer"
        if tok_dir.is_dir():
            lines += [tokenizer_line(tok_dir), ""]
    return lines


def tokenizer_line(tok_dir: Path) -> str:
    """The data section's line on a token folder's tokenizer (in tok_dir): its info, or that it could not be read
    and why (a damaged tokenizer.json or tokenizer.model, also said in a note on stdout), so that the rest of the
    report is still written."""
    from babyllama.tokenizer import load_tokenizer

    try:
        info = load_tokenizer(tok_dir, remedy="put back the tokenizer that pretokenize saved there").info()
    except UserError as e:
        print(f"note: the tokenizer in {tok_dir} could not be read; the report leaves it out: {e}")
        return f"Tokenizer: could not be read: {text(e)}"
    return "Tokenizer: " + ", ".join(f"{k} {text(v)}" for k, v in info.items())


DPO_SUMMARY = ("rewards/accuracies", "rewards/margins", "val_rewards/accuracies", "val_rewards/margins")  # of the
# metrics DPO logs (train.dpo.METRICS, and val_ those of the held-out pairs): the last value of each


def run_section(run: Path, metrics: list[dict], root: Path, plots: Path, tag: str) -> list[str]:
    """The run in folder run, of its records (run_metrics'): its heading, which says a LoRA run's and a DPO run's
    kind (a DPO run: its metrics hold rewards), its settings (a LoRA run's adapter, a DPO run's beta and reference;
    "" where its config lacks one; a config.json of another shape is left out with a note), its final numbers (a DPO
    run's rewards too; "" where its records lack one) and its curves (tag: plot_tags' name for the run)."""
    panels = curves(metrics)
    config = (read_json(run / "config.json", "a training run's config.json", lambda v: all(
        isinstance(v.get(k, {}), dict) for k in ("model", "train"))) if (run / "config.json").is_file() else None) or {}
    model, train = config.get("model", {}), config.get("train", {})
    last = ([m for m in metrics if "loss" in m] or [m for m in metrics if "step" in m])[-1:] or [{}]  # val alone
    summary = {"steps": last[0].get("step"), "tokens": last[0].get("tokens"),
               "final train loss": final_loss([m["loss"] for m in metrics if "loss" in m]),
               "final val loss": final_loss([m["val_loss"] for m in metrics if "val_loss" in m]),
               "tokens/s": last[0].get("tokens_per_s")}
    summary = {k: "" if v is None else v for k, v in summary.items()}  # as a missing loss: no "None"
    keys = ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len"]
    settings = {k: model.get(k) for k in keys} | {k: train.get(k) for k in ("batch_size", "grad_accum", "lr")}
    settings["optimizer"] = train.get("optimizer", "adamw" if train else None)  # a run's from before Muon: adamw
    lora = bool(train.get("lora_rank"))
    if lora:
        settings |= {k: train.get(k) for k in ("lora_rank", "lora_alpha", "lora_targets")}
    dpo = any(k in m for m in metrics for k in DPO_SUMMARY)
    if dpo:
        reference = reference_shown(train, run, root)
        settings |= {"beta": train.get("beta"), "reference": f"{reference} (log-probs precomputed)"
                     if train.get("precompute_ref_log_probs") else reference}
        settings |= {k: train[k] for k in ("label_smoothing", "rpo_alpha") if train.get(k)}
        summary |= {k: next((m[k] for m in reversed(metrics) if m.get(k) is not None), "") for k in DPO_SUMMARY}
    settings = {k: "" if v is None else v for k, v in settings.items()}  # a key the config lacks: blank, not "None"
    kind = ", ".join(name for name, on in (("DPO", dpo), ("LoRA", lora)) if on)
    name = folder_name(run)
    return [f"### Run {code(run.relative_to(root) if run != root else name)}" + (f" ({kind})" if kind else ""), "",
            table([settings], list(settings)), "", table([summary], list(summary)), "",
            f"![curves]({plots.name}/{plot_run(name, panels, plots, tag)})", ""]


def final_loss(losses: list) -> float | str:
    """The last of a run's train (or val) losses (its records' in order), or "not finite" where it is not (null, as the
    trainer writes it, or "not finite (nan)" / "(inf)" of a NaN or Infinity that a run wrote before then): a diverged
    run must not show the last finite loss, from before it diverged. "" for none."""
    if not losses or losses[-1] is not None and math.isfinite(losses[-1]):
        return losses[-1] if losses else ""
    return "not finite" if losses[-1] is None else f"not finite ({losses[-1]})"


def reference_shown(train: dict, run: Path, root: Path) -> str:
    """How the report names a DPO run's reference model, its train.init in config.json (as given: relative to the
    folder it ran from): relative to the report's folder root (whole where it is outside) of the first that exists of
    init as seen from the run's folder now (out_dir -> init, which still names it after the runs were moved
    together) and init as written; else init as written and ", not found"."""
    init, out_dir = train.get("init"), train.get("out_dir")
    if not isinstance(init, str) or not init:
        return ""
    moved = [run / os.path.relpath(init, out_dir)] if isinstance(out_dir, str) and out_dir else []
    found = [Path(os.path.normpath(p.absolute())) for p in [*moved, Path(init)] if p.exists()]
    if not found:
        return f"{init}, not found"
    top = root.resolve()
    path = found[0].resolve()
    return path.relative_to(top).as_posix() if path.is_relative_to(top) else str(path)


def folder_name(folder: Path) -> str:
    """folder's own name, that of the folder it stands for where it is "." or ".." (Path(".").name is ""); "run" for
    the file system's root."""
    return Path(os.path.abspath(folder)).name or "run"


def left_out(path: Path, what: str, read: Callable[[Path], dict | list[dict]]) -> dict | list[dict] | None:
    """read(path), or None after a note on stdout that path is not what (a file of another tool with the same name,
    one cut short or damaged by hand, a null where a number was) and is left out: it must not stop the report. Only
    the reading is caught (the errors that reading a value of another shape raises), not the report's own code."""
    try:
        return read(path)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError):  # not JSON, or another shape inside
        print(f"note: {path} is not {what}; the report leaves it out.")
        return None


EVAL_JSON = "an eval.json of babyllama eval (a checkpoint and its scores)"


def is_number(v) -> bool:
    """v is an int or a float, not a bool (JSON's true); a null, a string or a list are not."""
    return isinstance(v, int | float) and not isinstance(v, bool)


SAMPLING_SAID = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty")  # the numbers decoding says


def read_eval(path: Path) -> dict:
    """The eval.json at path, with the shape eval_section reads. ValueError, TypeError, KeyError for a file that is
    not one (left_out says so): empty, cut, another tool's (a list, lm-evaluation-harness's {"results": ...}), nulls
    for the numbers the report draws or counts."""
    e = json.loads(path.read_text(encoding="utf-8-sig"))
    if not isinstance(e, dict) or not isinstance(e.get("checkpoint"), str):
        raise ValueError(f"{path}: no checkpoint")

    def qa_scores(s: dict) -> bool:  # the numbers a task's bars draw; majority_baseline is older than exact_match
        drawn = ("accuracy", "majority_baseline") if "accuracy" in s else ("exact_match", "char_f1")
        return isinstance(s["items"], int) and all(is_number(s[k]) for k in drawn) and is_number(
            s.get("majority_baseline", 0))

    qa, mc, lk, said = e.get("qa", {}), e.get("mc"), e.get("leakage"), e.get("continuations", [])
    sampling = e.get("sampling") or {}
    shaped = (isinstance(qa, dict) and all(isinstance(s, dict) and qa_scores(s) for s in qa.values())
              and (mc is None or isinstance(mc["overall"], dict) and isinstance(mc["overall"]["items"], int)
                   and isinstance(mc["subjects"], dict) and all(isinstance(v, dict) for v in mc["subjects"].values()))
              and isinstance(e.get("lm", {}), dict) and isinstance(e.get("mc_not_reached") or [], list)
              and isinstance(sampling, dict) and all(is_number(v) for k, v in sampling.items() if k in SAMPLING_SAID)
              and (lk is None or isinstance(lk, dict) and (lk.get("searched_documents") == 0 or all(
                  isinstance(lk[k], int) for k in ("leaked", "checked")) and isinstance(lk.get("too_short", 0), int)
                  and (not lk.get("too_short") or "min_chars" in lk)))
              and isinstance(said, list) and all(isinstance(c, dict) and {"prompt", "continuation"} <= set(c)
                                                 for c in said))
    if not shaped:
        raise ValueError(f"{path}: not the shape of an eval.json")
    return e


def limit_line(e: dict) -> list[str]:
    """What an eval.json's --limit scored, of the parts that ran (QA and multiple choice each take their own first N):
    none where no limit (an eval.json from before it was recorded scored every item) or neither part ran."""
    n = e.get("limit")
    parts = [f"the first {text(n)} {kind} items" for kind, key in (("QA", "qa"), ("multiple-choice", "mc")) if key in e]
    return [f"--limit {text(n)}: {' and '.join(parts)} are scored.", ""] if n and parts else []


def eval_section(path: Path, e: dict, root: Path, plots: Path, tag: str) -> list[str]:
    """The scores of eval.json e (read_eval's, at path), its bar chart (tag: plot_tags' name for its folder),
    leakage and samples; a preferences.json beside it of another shape is left out with a note."""
    checkpoint = checkpoint_shown(e, path.parent, root)
    lines = [f"### Evaluation: {code(path.parent.relative_to(root))} ({checkpoint})", "", *limit_line(e)]
    if "lm" in e:
        lm = numbers_only(e["lm"], path, "lm")
        lines += ["Language modelling on the validation split:", "", table([lm], list(lm)), ""]
    if "qa" in e:
        cols = ["task", "items", "accuracy", "majority_baseline", "exact_match", "char_f1", "rouge_l", "bleu",
                "word_bleu"]
        lines += [f"Question answering ({decoding(e.get('sampling') or {})}, chat format; bleu and word_bleu on "
                  "sacrebleu's 0-100 scale, the other scores fractions, 0-1):", "",
                  table([{"task": t, **numbers_only(s, path, f"qa.{t}")} for t, s in e["qa"].items()], cols), ""]
        bars = {}
        for t, s in e["qa"].items():
            if "accuracy" in s:
                bars |= {f"{t} accuracy": s["accuracy"], f"{t} majority": s["majority_baseline"]}
            else:
                bars[f"{t} exact"] = s["exact_match"]
                if "majority_baseline" in s:  # eval.json files written before it existed lack it
                    bars[f"{t} majority"] = s["majority_baseline"]
                bars[f"{t} char F1"] = s["char_f1"]
        lines += [f"![qa]({plots.name}/{plot_bars('held-out scores', bars, plots, f'{tag}_qa.png', 'score')})", ""]
    if "mc" in e:
        rows = [{"subject": "overall", **numbers_only(e["mc"]["overall"], path, "mc.overall")}]
        rows += [{"subject": s, **numbers_only(v, path, f"mc.subjects.{s}")} for s, v in e["mc"]["subjects"].items()]
        lines += ["Multiple choice:", "", table(rows, ["subject", "items", "letter_accuracy", "text_accuracy"]), ""]
        if missed := e.get("mc_not_reached"):
            lines += [f"Not reached under --limit {text(e.get('limit'))}: {text(', '.join(map(str, missed)))}.", ""]
    prefs = path.parent / "preferences.json"  # the demo's DPO eval: held-out pairs, before and after
    p = read_json(prefs, "the demo's preferences.json (held-out pairs, before and after DPO)", lambda v: (
        all(isinstance(v[m], dict) for m in ("sft", "dpo")) and "pairs" in v and "beta" in v
        and isinstance(v.get("tasks", {}), dict) and all(
            isinstance(t, dict) and "pairs" in t and all(isinstance(t[m], dict) for m in ("sft", "dpo"))
            for t in v.get("tasks", {}).values()))) if prefs.is_file() else None
    if p is not None:
        cols = ["model", "logps/accuracies", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"]
        lines += [f"Held-out preference pairs ({text(p['pairs'])}, beta {text(p['beta'])}; logps/accuracies: the "
                  "chosen answer is the likelier; rewards against the SFT model):", "",
                  table([{"model": m, **p[m]} for m in ("sft", "dpo")]
                        + [{"model": f"{m}, {task} ({t['pairs']})", **t[m]}  # per task, where the demo counts them
                           for task, t in p.get("tasks", {}).items() for m in ("sft", "dpo")], cols), ""]
    if "leakage" in e:
        lk = e["leakage"]
        if lk.get("searched_documents") == 0:
            lines += ["Leakage: not checked; the training data held no documents.", ""]
        else:
            in_eval = lk.get("leaked_in_eval_files", 0)
            occur = agree(lk["leaked"], "occurs", "occur")
            short = lk.get("too_short", 0)  # an eval.json from before it was counted has none
            lines += [f"Leakage: {lk['leaked']} of {lk['checked']} eval questions {occur} verbatim in the training data"
                      + (f" ({in_eval} only in the eval files, which were in the training data)." if in_eval
                         else ".")
                      + (f" {short} more, under {lk['min_chars']} characters, {agree(short, 'was', 'were')} not "
                         "checked." if short else ""), ""]
    lines += ["Continuations:", ""] + [f"- **{text(c['prompt'])}** {text(c['continuation'])}"
                                       for c in e.get("continuations", [])]
    samples, note = sample_answers(path.parent / "items.jsonl", e)
    if note:
        print(f"note: {note}")
        lines += ["", f"Sample answers: none; {text(note)}"]
    elif samples:
        lines += ["", "Sample answers:", "", table(
            [{k: str(x[k])[:80] for k in ("task", "question", "prediction", "reference")} for x in samples],
            ["task", "question", "prediction", "reference"])]
    return lines + [""]


def numbers_only(scores: dict, path: Path, part: str) -> dict:
    """scores (a part of the eval.json at path: "lm", "qa.sentiment") without its nulls (a score eval could not
    compute, as bits_per_byte without the bytes), which a note on stdout names: left out, not shown as "None"."""
    if nulls := [k for k, v in scores.items() if v is None]:
        print(f"note: {path} has null for {', '.join(f'{part}.{k}' for k in nulls)}; the report leaves "
              f"{agree(len(nulls), 'it', 'them')} out.")
    return {k: v for k, v in scores.items() if v is not None}


def decoding(sampling: dict) -> str:
    """How an eval's QA answers were generated, of its eval.json's sampling (sampling.Sampling's fields): "greedy"
    (temperature 0, and for an eval.json from before it was recorded), or "sampled: temperature 0.7, top_p 0.9", with
    top_k and repetition_penalty where set; then ", at most N new tokens" where recorded."""
    t = sampling.get("temperature") or 0
    set_ = [("temperature", t, 0), ("top_p", sampling.get("top_p", 1), 1), ("top_k", sampling.get("top_k", 0), 0)]
    set_ = [*(set_ if t else []), ("repetition_penalty", sampling.get("repetition_penalty", 1), 1)]  # greedy: top_p off
    parts = [f"{k} {v:g}" for k, v, off in set_ if v != off]
    parts = [f"sampled: {parts[0]}", *parts[1:]] if t else ["greedy", *parts]
    if "max_new_tokens" in sampling:
        parts.append(f"at most {sampling['max_new_tokens']} new tokens")
    return ", ".join(parts)


def checkpoint_shown(e: dict, folder: Path, root: Path) -> str:
    """How the report names the checkpoint that eval.json e in folder scored: "checkpoint `NAME`", NAME relative to the
    report's folder root where it is below it, else whole. Of its path relative to folder (checkpoint_relative), which
    still names it after the run folder and its eval were moved or copied together, and its real path when eval ran
    (checkpoint_path), the first that exists: an eval folder moved alone must not name a checkpoint beside its new
    place. Where neither exists, the real path and ", not found". The path as written (relative to the folder eval ran
    from: ../demo/sft/final read as from root) only for an eval.json from before checkpoint_path was recorded."""
    relative, real = e.get("checkpoint_relative"), e.get("checkpoint_path")
    if not isinstance(real, str):
        return f"checkpoint {code(e['checkpoint'])}"
    found = [path for path in ([Path(os.path.normpath(folder.resolve() / relative))] if isinstance(relative, str)
                               else []) + [Path(real)] if path.exists()]
    path = found[0] if found else Path(real)
    top = root.resolve()
    name = path.relative_to(top).as_posix() if path.is_relative_to(top) else str(path)
    return f"checkpoint {code(name)}" + ("" if found else ", not found")


def sample_answers(items: Path, e: dict) -> tuple[list[dict], str]:
    """Up to 3 QA items a task of the eval's items.jsonl, and "", or none and a note (a sentence) where items.jsonl
    is not the file that eval wrote together with eval.json e: missing, a line that is not an item (a cut one), or
    other numbers of items than e counts, QA per task and multiple choice (cut or replaced by hand)."""
    counts = Counter({f"QA ({t})": s["items"] for t, s in e.get("qa", {}).items()})
    counts["multiple-choice"] = e["mc"]["overall"]["items"] if "mc" in e else 0
    again = f"{items.parent / 'eval.json'} counts {number(counts)}; run the eval again."
    if not items.is_file():
        return [], f"{items} is missing but {again}" if counts.total() else ""
    held, by_task = Counter(), {}  # read a line at a time, keeping the items shown: an eval's file may be large
    try:
        with items.open(encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                x = json.loads(line)
                held[f"QA ({x['task']})" if x["kind"] == "qa" else "multiple-choice"] += 1
                if x["kind"] == "qa" and len(shown := by_task.setdefault(x["task"], [])) < 3:
                    shown.append(x)
    except (ValueError, TypeError, KeyError):  # a line cut short (or not UTF-8), or not an item
        return [], f"{items} holds a line that is not an item of eval (cut short?), and {again}"
    if held != counts:
        return [], f"{items} holds {number(held)} (cut or replaced since eval wrote it) but {again}"
    return [x for xs in by_task.values() for x in xs], ""


def number(counts: Counter) -> str:
    """"6 QA (sentiment), 2 multiple-choice items" of counts of items by kind; "1 QA (law) item", "no items"."""
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()) if n) or "no"
    return f"{kinds} {agree(counts.total(), 'item', 'items')}"


def make_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report.md and RUN_DIR/plots/; returns the report's path."""
    root = Path(run_dir)
    check_folder(root, "run directory", "a run's folder or a folder of runs (e.g. runs/demo)")
    runs = [root] if (root / "metrics.jsonl").is_file() else [p.parent for p in find(root, "metrics.jsonl")]
    evals = find(root, "eval.json")
    if not runs and not evals:
        raise UserError(f"{root} has no training run (metrics.jsonl) and no evaluation (eval.json) to report.")
    plots = root / "plots"
    for path, kind, other in ((plots, "a folder", "a file"), (root / "report.md", "a file", "a folder")):
        if path.exists() and path.is_dir() != (kind == "a folder"):
            raise UserError(f"{path} is {other}, but the report writes {kind} there; move it away or report another "
                            "folder.")
    with writing(plots):  # CannotWrite for a read-only run folder too
        plots.mkdir(exist_ok=True)
    lines = [f"# babyllama report: {code(root)}", "", "## Data", ""] + data_section(root, plots)
    run_tags, eval_tags = plot_tags(runs, root, folder_name(root)), plot_tags([e.parent for e in evals], root, "eval")
    lines += ["## Training", ""]
    for run in runs:
        if (metrics := left_out(run / "metrics.jsonl", "a training run's metrics.jsonl", run_metrics)) is not None:
            lines += run_section(run, metrics, root, plots, run_tags[run])
    lines += ["## Evaluation", ""]
    for path in evals:
        if (e := left_out(path, EVAL_JSON, read_eval)) is not None:
            lines += eval_section(path, e, root, plots, eval_tags[path.parent])
    extra = root / "report_extra.md"  # sections other tools add (the demo's timings and chat answers)
    if extra.is_file():
        lines += [extra.read_text(encoding="utf-8")]
    report = root / "report.md"
    write_whole(report, "\n".join(lines) + "\n")
    return report
