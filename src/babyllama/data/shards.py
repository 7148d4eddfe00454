"""The token shard format, writer and reader in one place: flat uint16/uint32 files + manifest.json.

    data/tokens/
      shard_00000.bin ...   training documents, each its ids then <eos>, back to back
      val_00000.bin ...     validation documents (a document's split: is_val, a hash of its text)
      manifest.json         tokenizer fingerprint, dtype, every shard's token and document counts
      tokenizer/            the tokenizer that made them

    windows = TokenWindows("data/tokens", seq_len=512, split="train")
    batch = windows.collate([0, 17, 42])     # {"idx": (3, 512), "targets": (3, 512)} int64

The manifest is written last, so a directory with one is complete. A window never crosses a
shard; the few tokens left at a shard's end are not used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from babyllama.data.sources import BAD_RECORDS, TOKEN_SHARDS, output_kind, own_output
from babyllama.errors import (
    CannotWrite,
    UserError,
    agree,
    check_apart,
    check_folder,
    discard,
    signals_held,
    write_whole,
    writing,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "babyllama-tokens"  # the manifest's "format"; an SFT/DPO token cache's is another


HASH_CHARS = 1 << 20  # characters of a document encoded to UTF-8 at a time for its hash (is_val)


def is_val(text: str, val_fraction: float) -> bool:
    """A stable coin flip per document: blake2b of its UTF-8 text, as a number in [0, 1); the text encoded HASH_CHARS
    characters at a time (the same digest), so that a long document is not copied whole."""
    h = hashlib.blake2b(digest_size=8)
    for start in range(0, len(text), HASH_CHARS):
        h.update(text[start : start + HASH_CHARS].encode())
    return int.from_bytes(h.digest(), "little") / 2**64 < val_fraction



COPY_BYTES = 1 << 24  # a block of a file copied (BinShardWriter.move_open)


class BinShardWriter:
    """Appends documents to <prefix>_00000.bin ...; a shard closes once it holds shard_tokens."""

    def __init__(self, out: Path, prefix: str, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.prefix, self.split, self.dtype, self.shard_tokens = out, prefix, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.f = None
        self.open_at: int | None = None  # where the open document (write's open_end) begins in the open shard, tokens

    def write(self, tokens: np.ndarray, lengths: np.ndarray, open_end: bool = False) -> None:
        """Append documents (their tokens back to back, and each one's length), rolling shards between them: a
        document that does not fit the room left begins the next shard, one over shard_tokens fills a shard alone.
        A long document may come in parts, a write each: open_end says that the last document goes on in the next
        write, whose first is its next part; its parts land where the whole document would have (go_on). CannotWrite,
        the shard's temporary removed, where the disk is full or the folder not writable."""
        if self.open_at is not None and len(lengths):  # the first of lengths is the open document's next part
            self.go_on(tokens[: lengths[0]])
            if open_end and len(lengths) == 1:
                return
            tokens, lengths, self.open_at = tokens[lengths[0] :], lengths[1:], None
            if self.shards[-1]["tokens"] >= self.shard_tokens:
                self.close()
        ends = np.cumsum(lengths)  # (D,) where each document ends in tokens
        done_docs, done_tokens = 0, 0
        while done_docs < len(lengths):
            if self.f is None:
                self.open_shard()
            shard = self.shards[-1]
            room = self.shard_tokens - shard["tokens"]
            take = int(np.searchsorted(ends, done_tokens + room, side="right")) - done_docs
            take = max(take, 1 if shard["tokens"] == 0 else 0)  # a huge document fills a shard alone
            end_tokens = int(ends[done_docs + take - 1]) if take else done_tokens
            with self.writing():
                self.f.write(tokens[done_tokens:end_tokens].astype(self.dtype, copy=False).tobytes())
            shard["tokens"] += end_tokens - done_tokens
            shard["documents"] += take
            done_docs, done_tokens = done_docs + take, end_tokens
            if open_end and done_docs == len(lengths):
                self.open_at = shard["tokens"] - int(lengths[-1])
            elif shard["tokens"] >= self.shard_tokens or done_docs < len(lengths):
                self.close()

    def go_on(self, part: np.ndarray) -> None:
        """Append the open document's next part. Where it takes the shard past shard_tokens and the document began
        after others, the document so far moves to a shard of its own first (move_open), where the whole document
        would have gone: a shard of several documents holds at most shard_tokens (a long document in pieces went on
        in the shard it began in: 6,129 tokens in 5 documents at shard_tokens 1,000)."""
        if self.open_at and self.shards[-1]["tokens"] + len(part) > self.shard_tokens:
            self.move_open()
        with self.writing():
            self.f.write(part.astype(self.dtype, copy=False).tobytes())
        self.shards[-1]["tokens"] += len(part)

    def move_open(self) -> None:
        """Move the open document's tokens so far from the end of the open shard into the next shard, copied a
        block of COPY_BYTES at a time (fewer than shard_tokens: they fitted), and close the shard without them."""
        old, start = self.shards[-1], self.open_at * self.dtype.itemsize
        name = self.shard_name(len(self.shards))
        moved = self.out / f".{name}.tmp"
        with self.writing():  # on a failure both temporaries go; the CannotWrite names the file that was refused
            self.f.flush()
            with (writing(self.out / name, moved), (self.out / f".{old['file']}.tmp").open("rb") as src,
                  moved.open("wb") as dst):
                src.seek(start)
                shutil.copyfileobj(src, dst, COPY_BYTES)
            self.f.truncate(start)
        self.close()
        self.open_shard("ab")
        self.shards[-1].update(tokens=old["tokens"] - self.open_at, documents=1)
        old["tokens"], old["documents"], self.open_at = self.open_at, old["documents"] - 1, 0

    def shard_name(self, i: int) -> str:
        return f"{self.prefix}_{i:05d}.bin"

    def open_shard(self, mode: str = "wb") -> None:
        """Begin the next shard, in its temporary (mode "ab": that move_open copied a document into)."""
        name = self.shard_name(len(self.shards))
        self.shards.append({"file": name, "split": self.split, "tokens": 0, "documents": 0})
        with self.writing():
            self.f = (self.out / f".{name}.tmp").open(mode)  # self.f is None in writing: nothing to close

    def close(self) -> None:
        if self.f is not None:
            name = self.shards[-1]["file"]
            with self.writing():
                self.f.close()
                (self.out / f".{name}.tmp").rename(self.out / name)
            self.f = None

    def writing(self):
        """errors.writing for the open shard: on failure its file is closed and its temporary removed."""
        name = self.shards[-1]["file"]
        return writing(self.out / name, self.out / f".{name}.tmp", self.f)

    def discard(self) -> None:
        """Close the open shard and remove its temporary: the run failed or was interrupted between writes."""
        if self.f is not None:
            discard(self.out / f".{self.shards[-1]['file']}.tmp", self.f)
            self.f = None


def fresh_output_dir(out: Path, outputs: Callable[[Path], list[Path]]) -> Path:
    """Create out/, removing what an earlier run of either engine left there: outputs(out), token_outputs (the
    shards, manifest and work files) or clean.prepare_outputs."""
    out.mkdir(parents=True, exist_ok=True)
    for f in outputs(out):
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    return out


def token_outputs(out: Path) -> list[Path]:
    """The files and folders of the token shards in out, of either engine: shards, manifest, tokenizer, the
    temporaries and work files of a run that stopped."""
    return [f for f in [*out.glob("shard_*.bin"), *out.glob("val_*.bin"), *out.glob(".*.bin.tmp"), out / MANIFEST,
                        out / BAD_RECORDS, out / "tokenizer", out / "datatrove"] if f.exists()]


STAGE = ".incomplete"  # the hidden folder inside an output folder where a new output is written (staged)


@contextmanager
def staged(out: Path, outputs: Callable[[Path], list[Path]], last: str) -> Iterator[Path]:
    """out/STAGE, made empty, for the body to write a new output into while the earlier one in out stays as it was;
    removed when the body fails (a UserError for inputs with nothing usable, CannotWrite, Ctrl-C). The body ends
    with swap_in(stage, out, outputs, last). A stage that a kill -9 left is removed, or, cut in its swap, its swap
    is finished first (finish_swap)."""
    stage = out / STAGE
    finish_swap(out, outputs, last)
    shutil.rmtree(stage, ignore_errors=True)
    with writing(stage):
        stage.mkdir(parents=True)
    try:
        yield stage
    except CannotWrite as e:  # said of the file the user knows, in out
        shutil.rmtree(stage, ignore_errors=True)
        if stage not in Path(e.path).parents:
            raise
        raise CannotWrite(e.code, str(out / Path(e.path).relative_to(stage)), e.note) from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


SWAPPING = ".swapping"  # in the stage while swap_in runs: the names of the new output's files, to finish a cut swap


def swap_in(stage: Path, out: Path, outputs: Callable[[Path], list[Path]], last: str) -> None:
    """Replace the earlier output in out (outputs(out): its files and folders) by the complete new one in stage.
    out/last, the file that marks an output complete (manifest.json, stats.json), goes first and comes back last,
    so that a swap cut short leaves an output that reads as incomplete; SIGINT and SIGTERM wait until the swap is
    done, then raise Completed (the output is); renames only, so a full disk cannot stop it. A kill -9 cannot be
    held off: the names of the new files, written into the stage first, let the next run finish the swap
    (finish_swap) instead of losing both outputs."""
    with signals_held(complete=out):
        write_whole(stage / SWAPPING, json.dumps(sorted(f.name for f in stage.iterdir())))
        _swap(stage, out, outputs, last)


def finish_swap(out: Path, outputs: Callable[[Path], list[Path]], last: str) -> None:
    """Finish the swap_in into out that a kill -9 cut short, if one did (its stage holds SWAPPING)."""
    if (out / STAGE / SWAPPING).is_file():
        with signals_held():
            _swap(out / STAGE, out, outputs, last)


def _swap(stage: Path, out: Path, outputs: Callable[[Path], list[Path]], last: str) -> None:
    """swap_in's renames, which a second call after a cut one finishes: a file of the new output that is in out
    already (its name in SWAPPING, gone from the stage) stays; every other earlier file goes."""
    new = set(json.loads((stage / SWAPPING).read_text()))
    if (stage / last).exists():
        (out / last).unlink(missing_ok=True)
    for f in outputs(out):
        if f.name not in new or (stage / f.name).exists():
            shutil.rmtree(f) if f.is_dir() else f.unlink(missing_ok=True)
    for f in sorted(stage.iterdir(), key=lambda f: f.name == last):
        if f.name != SWAPPING:
            f.replace(out / f.name)
    (stage / SWAPPING).unlink()
    stage.rmdir()


def write_manifest(out: Path, manifest: dict) -> dict:
    splits = ("train", "val")
    manifest["totals"] = {
        s: {k: sum(x[k] for x in split_shards(manifest, s)) for k in ("tokens", "documents")}
        for s in splits
    }
    write_json(out / MANIFEST, manifest)  # written last: a manifest means every shard it lists is complete
    return manifest


def write_json(path: Path, value) -> None:
    """path as indented JSON, written whole or not at all (write_whole). CannotWrite where the disk is full or the
    folder not writable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


RECORDED = ("format", "version", "tokenizer", "dtype", "bos", "val_fraction", "shards")  # what a run records


def token_record(manifest: dict) -> dict:
    """What a pretraining run's checkpoints record of its token shards: their manifest less its bookkeeping
    (sources, totals, partition, timing), so every shard's file, split and size in tokens and documents, and
    the tokenizer record, dtype, bos and val_fraction they were made with."""
    return {k: manifest.get(k) for k in RECORDED}


def shards_difference(had: dict, now: dict, data_dir: str | Path) -> str | None:
    """The first way the shards `now` (token_record's) differ from those a run started with (`had`), in words:
    "another tokenizer", "bos False (now True)", or a shard of data_dir that is new, gone or differs (its size);
    None when they are the same."""
    if had.get("tokenizer") != now["tokenizer"]:
        return "another tokenizer"
    for k in ("format", "version", "dtype", "bos", "val_fraction"):
        if had.get(k) != now[k]:
            return f"{k} {had.get(k)} (now {now[k]})"
    old, new = ({s["file"]: s for s in record.get("shards") or []} for record in (had, now))
    d = Path(data_dir)
    return first_difference([str(d / f) for f in new if f in old and old[f] != new[f]],
                            [str(d / f) for f in new if f not in old], [str(d / f) for f in old if f not in new])


def first_difference(changed: list[str], new: list[str], gone: list[str]) -> str | None:
    """The first file that changed, else is new, else is gone, in words ("X differs", "X is new", "X is gone");
    None when there is none."""
    if changed or new or gone:
        return f"{changed[0]} differs" if changed else f"{new[0]} is new" if new else f"{gone[0]} is gone"
    return None


def read_manifest(path: str | Path, flag: str = "--data") -> dict:
    """The manifest of a folder of token shards (the one place pretrain, eval and merge open one). Raises
    UserError for a path that does not exist, a file (a corpus, or the manifest itself), a babyllama output of
    another kind (an SFT or DPO token cache, a checkpoint, a run: output_kind, own_output; flag names the setting
    that passed it), a folder without a manifest and a manifest that is not pretokenize's."""
    path = Path(path)
    check_folder(path, "", f"a folder of token shards, the --out_dir of babyllama pretokenize (with {MANIFEST})")
    found, manifest = (path / MANIFEST).is_file(), None
    if found:
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
    shards = isinstance(manifest, dict) and manifest.get("format") == FORMAT
    if shards and any(path.glob("*.bin")):  # what output_kind would call token shards, reading the manifest again
        return manifest
    kind = output_kind(path) or own_output(path)
    if kind not in (None, TOKEN_SHARDS, "the work folder of pretokenize --engine datatrove"):  # that: no manifest
        raise UserError(f"{flag} {path} is {kind}, not token shards; pass the --out_dir of babyllama pretokenize.")
    if not found:
        raise UserError(f"{path} has no {MANIFEST}; make one with `babyllama pretokenize`.")
    if not shards:
        raise UserError(f"{path / MANIFEST} is not a manifest of token shards (damaged?); run `babyllama "
                        "pretokenize` again.")
    return manifest


def merge(dirs: list[str], out: str | Path) -> dict:
    """Join the outputs of the `--num_shards N` runs of one corpus, one for each `--shard_index`, into one directory
    (hard links where possible), in the order of their --shard_index whatever the order given. Raises UserError,
    before out is touched, for a directory named twice, an out that is, holds or is inside a part, parts of other
    tokenizer settings, parts that are not each index of one N once (check_partitions), and a part missing a shard
    file or its tokenizer or with a shard of another size than its manifest says (check_shard_files)."""
    if len({Path(d).resolve() for d in dirs}) < len(dirs):
        raise UserError(f"--merge names a directory twice ({' '.join(map(str, dirs))}); each part once.")
    check_apart(out, dirs, "--merge")
    manifests = [read_manifest(d, "--merge") for d in dirs]
    first = manifests[0]
    for d, m in zip(dirs, manifests, strict=True):
        for key in ("tokenizer", "dtype", "bos", "val_fraction"):
            if m[key] != first[key]:
                raise UserError(f"cannot merge {d}: its {key} differs from {dirs[0]}'s.")
    partitions = [m.get("partition", WHOLE) for m in manifests]
    check_partitions(dirs, partitions)
    for d, m in zip(dirs, manifests, strict=True):  # all checked before out is touched
        check_shard_files(Path(d), m, m["shards"])
        if not (Path(d) / "tokenizer").is_dir():
            raise UserError(f"{Path(d) / 'tokenizer'} is missing; run `babyllama pretokenize` for that part again.")
    order = sorted(range(len(dirs)), key=lambda i: partitions[i]["shard_index"])  # any order given, one output
    dirs, manifests = [dirs[i] for i in order], [manifests[i] for i in order]
    first, out = manifests[0], Path(out)
    with staged(out, token_outputs, MANIFEST) as stage:  # the earlier output stays until the merge is complete
        shards, counters = [], {"train": 0, "val": 0}
        for d, m in zip(dirs, manifests, strict=True):
            for s in m["shards"]:
                prefix = "shard" if s["split"] == "train" else "val"
                name = f"{prefix}_{counters[s['split']]:05d}.bin"
                counters[s["split"]] += 1
                _link_or_copy(Path(d) / s["file"], stage / name)
                shards.append({**s, "file": name})
        shards.sort(key=lambda s: (s["split"] != "train", s["file"]))
        with writing(out / "tokenizer", stage / "tokenizer"):
            shutil.copytree(Path(dirs[0]) / "tokenizer", stage / "tokenizer")
        merged = {**first, "shards": shards, "sources": merged_sources(dirs, manifests),
                  "merged_from": [str(d) for d in dirs]}
        merged.pop("partition", None)
        write_manifest(stage, merged)
        swap_in(stage, out, token_outputs, MANIFEST)
    return merged


WHOLE = {"num_shards": 1, "shard_index": 0}  # the partition of a directory that records none: a whole corpus


def merged_sources(dirs: list[str], manifests: list[dict]) -> dict[str, dict]:
    """The sources of a merge: each input once, with its counts. Every part of a --num_shards split reads every
    input whole and keeps its share of the documents, so each part's counts of an input are the whole input's, the
    same in every part: they are taken once, not added up (a merge listed them once per part, `x.jsonl [p0]`,
    `x.jsonl [p1]`, and adding them up counted each record N times). A part whose counts of an input differ from
    the first part's (the file changed between the runs) is named in a warning; the first part's are kept."""
    sources: dict[str, dict] = {}
    for d, m in zip(dirs, manifests, strict=True):
        for src, st in m["sources"].items():
            first = sources.setdefault(src, st)
            if st != first:
                counts = [", ".join(f"{k} {x.get(k, 0)}" for k in ("records", "bad", "empty")) for x in (st, first)]
                log.warning("%s read %s with other counts than %s (%s against %s): did it change between the runs of "
                            "the parts? The merged manifest keeps the first's.", d, src, dirs[0], *counts)
    return sources


def check_partitions(dirs: list[str], partitions: list[dict]) -> None:
    """UserError unless the parts' manifests' partitions (pretokenize's --num_shards N --shard_index I) are of one N
    and hold each index from 0 to N - 1 once: else the merge would miss part of the corpus or hold some twice."""
    n, seen = partitions[0]["num_shards"], {}
    for d, p in zip(dirs, partitions, strict=True):
        if p["num_shards"] != n:
            raise UserError(f"cannot merge {d}: it is a part of --num_shards {p['num_shards']}, {dirs[0]} of "
                            f"--num_shards {n}; merge the parts of one split, each once.")
        if p["shard_index"] in seen:
            raise UserError(f"cannot merge {d}: it is --shard_index {p['shard_index']} of {n}, as is "
                            f"{seen[p['shard_index']]}; name each part once.")
        seen[p["shard_index"]] = d
    missing = [i for i in range(n) if i not in seen]
    if missing:
        raise UserError(f"cannot merge {len(seen)} of {n} parts, missing --shard_index {', '.join(map(str, missing))}: "
                        f"make each with pretokenize --num_shards {n} --shard_index I (the same --input and "
                        "--tokenizer) and merge all of them.")


def check_shard_files(data_dir: Path, manifest: dict, shards: list[dict]) -> None:
    """UserError naming the first of shards (manifest's records) that is missing from data_dir or whose size is not
    its recorded token count times the dtype's bytes (a truncated or overwritten file)."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for s in shards:
        f = data_dir / s["file"]
        if not f.is_file():
            raise UserError(f"{f} is missing, though {data_dir / MANIFEST} lists it ({s['tokens']} "
                            f"{agree(s['tokens'], 'token', 'tokens')}); restore it or run `babyllama pretokenize` "
                            "again.")
        size = f.stat().st_size
        if size != s["tokens"] * itemsize:
            n = size // itemsize if size % itemsize == 0 else size / itemsize  # a part token: a torn write
            raise UserError(f"{f} has {n} {agree(n, 'token', 'tokens')}, the manifest says {s['tokens']}.")


def _link_or_copy(src: Path, dst: Path) -> None:
    """dst as a hard link to src, or where that cannot be (another device) a copy, written whole or not at all."""
    try:
        os.link(src, dst)
    except OSError:
        tmp = dst.with_name(f".{dst.name}.tmp")
        with writing(dst, tmp):  # a full disk: one sentence, no half shard under the final name
            shutil.copyfile(src, tmp)
            tmp.replace(dst)


class TokenWindows:
    """Non-overlapping windows of seq_len + 1 tokens over the memory-mapped shards of one split."""

    lengths = None  # every window is as long as the next: nothing to group by length
    row_positions = None  # every window has seq_len positions, all of them ids
    doc_eos: int | None = None  # set to the <eos> id for document-masked attention (doc_mask)

    def __init__(self, data_dir: str | Path, seq_len: int, split: str = "train", manifest: dict | None = None):
        """manifest: data_dir's, read_manifest's, where the caller has it; else it is read here."""
        self.dir = Path(data_dir)
        self.manifest = manifest if manifest is not None else read_manifest(self.dir)
        self.seq_len = seq_len
        shards = split_shards(self.manifest, split)
        check_shard_files(self.dir, self.manifest, shards)  # so each file holds the tokens its record says
        self.arrays = [np.memmap(self.dir / s["file"], dtype=self.manifest["dtype"], mode="r") for s in shards]
        windows = np.cumsum(shard_windows(shards, seq_len), dtype=np.int64)
        self.starts = np.concatenate([[0], windows])  # the first window of each shard, then the count
        if self.starts[-1] == 0:
            total = sum(len(a) for a in self.arrays)
            raise UserError(
                f"the {split} split of {self.dir} has {total} {agree(total, 'token', 'tokens')}, fewer than one "
                f"window of {seq_len + 1}; use more data, a smaller max_seq_len"
                f"{f' or {larger}' if split == 'val' and (larger := larger_val_fraction(self.manifest)) else ''}."
            )

    def __len__(self) -> int:
        return int(self.starts[-1])

    def window(self, i: int) -> np.ndarray:
        """(seq_len + 1,) ids of window i."""
        shard = int(np.searchsorted(self.starts, i, side="right")) - 1
        start = (i - int(self.starts[shard])) * (self.seq_len + 1)
        return self.arrays[shard][start : start + self.seq_len + 1]

    def collate(self, indices: list[int]) -> dict:
        """{"idx", "targets"}, each a (B, seq_len) int64 tensor: a window and the same shifted by one;
        with doc_eos set, also "segments" (B, seq_len): document ids, each <eos> starting the next."""
        import torch  # here: the data tools (pretokenize and its workers) run without it

        rows = torch.from_numpy(np.stack([self.window(i).astype(np.int64) for i in indices]))  # (B, T+1)
        batch = {"idx": rows[:, :-1], "targets": rows[:, 1:]}
        if self.doc_eos is not None:
            batch["segments"] = torch.cumsum(batch["idx"] == self.doc_eos, dim=1)  # an <eos> acts as a <bos>
        return batch


def val_missed(record: dict) -> str | None:
    """Why shards of a val_fraction above 0 have no val split (record: their manifest or token_record), with the
    remedy: the hash (is_val) put none of their documents there; None for --val_fraction 0, which says it."""
    fraction = record.get("val_fraction") or 0
    if not fraction:
        return None
    n = split_documents(record, "train")
    return (f"pretokenize --val_fraction {fraction:g} put none of its {n:,} {agree(n, 'document', 'documents')} there "
            "(a hash of each one's text decides); pretokenize more documents, or with a larger --val_fraction")


def larger_val_fraction(manifest: dict) -> str | None:
    """The remedy of a val split too short for one window that takes documents from train: "a larger --val_fraction
    (it was 0.5)"; None where the train split holds no document, so that val holds the whole data already (shorter
    than one window: more data is the remedy). Of eval's --data check and of pretrain's TokenWindows alike."""
    if not split_documents(manifest, "train"):
        return None
    return f"a larger --val_fraction (it was {manifest.get('val_fraction') or 0:g})"


def split_shards(manifest: dict, split: str) -> list[dict]:
    """The records of a manifest's shards of split ("train", "val"), in its order."""
    return [s for s in manifest["shards"] if s["split"] == split]


def split_documents(manifest: dict, split: str) -> int:
    """How many documents a manifest's shards of split hold."""
    return sum(s["documents"] for s in split_shards(manifest, split))


def shard_windows(shards: list[dict], seq_len: int) -> list[int]:
    """How many windows of seq_len + 1 tokens each shard (a manifest's record) holds: a window never crosses one."""
    return [s["tokens"] // (seq_len + 1) for s in shards]
