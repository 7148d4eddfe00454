"""The SFT token cache: built once in parallel, equal to the chat format's own rendering, reused, refused."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
import time

import numpy as np
import pytest
import torch

from babyllama.chat_format import (
    CUT_MARGIN,
    Conversation,
    conversation_from_record,
    longest_piece,
    render_conversation,
    truncate_conversation,
)
from babyllama.checkpoint import save_checkpoint
from babyllama.data.sft_tokens import SFTSettings, SFTStats, build_sft_cache, open_split, read_sft_cache
from babyllama.data.shards import is_val
from babyllama.data.sources import iter_records
from babyllama.errors import UserError
from babyllama.tokenizer import HFTokenizer
from babyllama.train.distributed import Dist
from babyllama.train.sft_data import load_sft_data
from tests.conftest import logged_losses, run_cli, sharp_model, tiny_config
from tests.test_chat_format import whole_texts
from tests.test_pretrain import torchrun
from tests.test_sft import samples

MULTI_TURN = [{"conversations": [{"role": "system", "content": "你是一个医生。"}]
               + [{"role": r, "content": f"第{i}轮{'问题' if r == 'user' else '回答'}：" + "症状" * (i * 7 % 40)}
                  for i in range(n) for r in ("user", "assistant")]} for n in range(1, 12)]


def direct(path, tok, settings):
    """(train, val) samples rendered straight by the chat format, without the cache, and how many were cut."""
    out, cut = {False: [], True: []}, 0
    for _, record, _ in iter_records(path):
        conv = conversation_from_record(record)
        ids, mask = render_conversation(tok, conv)
        if len(ids) > settings.max_len:
            ids, mask = truncate_conversation(tok, conv, settings.max_len)
            cut += 1
        out[is_val("\x00".join(u for u, _ in conv.turns), settings.val_fraction)].append((ids, mask))
    return out[False], out[True], cut


def read_back(data):
    return [] if data is None else [tuple(x.tolist() for x in data.sample(i)) for i in range(len(data.offsets) - 1)]


@pytest.fixture(scope="module")
def demo_sft(tmp_path_factory, bpe_tokenizer):
    from babyllama.data.demo_corpus import build_demo_corpus

    d = tmp_path_factory.mktemp("sft_tokens")
    build_demo_corpus(d / "demo", limit=1500, eval_limit=60)
    (d / "multi.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in MULTI_TURN))
    bpe_tokenizer.save(d / "tok")
    return d


def sft_on(records: list[dict], tmp_path, tokenizer, capsys):
    """(what it printed, the train samples) of `babyllama sft` for one step of a tiny model on records,
    written as one JSONL file."""
    from babyllama.cli import main

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "init", sharp_model(tiny_config(vocab_size=600, max_seq_len=64)), tokenizer)
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records))
    assert main(["sft", "--init", str(tmp_path / "init"), "--data", str(tmp_path / "data.jsonl"), "--out_dir",
                 str(tmp_path / "run"), "--max_steps", "1", "--val_fraction", "0"]) == 0
    train, _, _ = load_sft_data([tmp_path / "data.jsonl"], tmp_path / "init", tmp_path / "run" / "sft_tokens",
                                SFTSettings(65, 0.0), False, Dist())
    return capsys.readouterr().out, train


def test_sft_trains_on_an_openai_messages_file_with_no_bad_record(tmp_path, bpe_tokenizer, capsys):
    """`babyllama sft` on OpenAI's fine-tuning format counted every record bad ("not an instruction, prompt/answer or
    conversations record") and stopped: each is a sample, the conversation its messages make."""
    records = [{"messages": [{"role": "developer", "content": "简洁"}, {"role": "user", "content": f"问题{i}"},
                             {"role": "assistant", "content": [{"type": "text", "text": f"回答{i}"}]}]}
               for i in range(20)]
    out, train = sft_on(records, tmp_path, bpe_tokenizer, capsys)
    assert ("sft data: 20 records, 0 bad, 0 with an empty answer, 0 filtered by length, 0 truncated; 20 train / 0 val "
            "samples") in out
    assert sorted(samples(train)) == sorted(
        render_conversation(bpe_tokenizer, Conversation([(f"问题{i}", f"回答{i}")], "简洁")) for i in range(20))


def test_sft_trains_on_prompt_completion_records_and_not_on_messages_of_weight_0(tmp_path, bpe_tokenizer, capsys):
    """`babyllama sft` counted {"prompt": ..., "completion": ...} records bad ("not an instruction, prompt/answer,
    conversations or messages record") and trained on an assistant message of "weight": 0: the first is a pair, or
    with lists a conversation whose completion alone has loss, and the second carries no loss."""
    user, answer = {"role": "user", "content": "问一"}, {"role": "assistant", "content": "答一"}
    records = [{"prompt": "问题", "completion": "回答"},
               {"prompt": [user, answer, {"role": "user", "content": "问二"}],
                "completion": [{"role": "assistant", "content": "答二"}]},
               {"messages": [user, {**answer, "weight": 0}, {"role": "user", "content": "问三"},
                             {"role": "assistant", "content": "答三", "weight": 1}]}]
    out, train = sft_on(records, tmp_path, bpe_tokenizer, capsys)
    assert ("sft data: 3 records, 0 bad, 0 with an empty answer, 0 filtered by length, 0 truncated; 3 train / 0 val "
            "samples") in out
    tok = bpe_tokenizer
    q1, a1 = tok.encode("问一") + [1], tok.encode("答一") + [2]
    want = [([*tok.encode("问题"), 1, *tok.encode("回答"), 2], [0] * (len(tok.encode("问题")) + 1) + [1] * (
                len(tok.encode("回答")) + 1))]
    for q, a in (("问二", "答二"), ("问三", "答三")):  # 答一 is the prompt's, then of weight 0: no loss on it
        ids = [*q1, *a1, *tok.encode(q), 1, *tok.encode(a), 2]
        want.append((ids, [0] * (len(ids) - len(tok.encode(a)) - 1) + [1] * (len(tok.encode(a)) + 1)))
    assert sorted(samples(train)) == sorted(want)


@pytest.mark.parametrize("name, workers", [("demo/sft.jsonl", 2), ("multi.jsonl", 1)])
def test_cached_samples_equal_the_chat_format_token_for_token(demo_sft, bpe_tokenizer, tmp_path, name, workers):
    settings = SFTSettings(max_len=97, val_fraction=0.1)
    build_sft_cache([demo_sft / name], demo_sft / "tok", tmp_path / "c", settings, workers=workers)
    train, val, stats = load_sft_data([demo_sft / name], demo_sft / "tok", tmp_path / "c", settings, False, Dist())
    want_train, want_val, cut = direct(demo_sft / name, bpe_tokenizer, settings)
    assert read_back(train) == want_train and read_back(val) == want_val
    assert stats.truncated == cut > 0
    assert (stats.samples, stats.val_samples) == (len(want_train), len(want_val))


def test_cache_is_reused_and_refused_when_it_belongs_to_other_inputs_or_settings(demo_sft, tmp_path, capsys):
    import shutil

    f, settings = tmp_path / "multi.jsonl", SFTSettings(max_len=65)
    shutil.copy2(demo_sft / "multi.jsonl", f)
    load_sft_data([f], demo_sft / "tok", tmp_path / "c", settings, True, Dist())
    built = read_sft_cache(tmp_path / "c")
    load_sft_data([f], demo_sft / "tok", tmp_path / "c", settings, True, Dist())
    assert read_sft_cache(tmp_path / "c") == built and capsys.readouterr().out.count("building") == 1
    with pytest.raises(UserError) as e:
        load_sft_data([f], demo_sft / "tok", tmp_path / "c", SFTSettings(max_len=129), True, Dist())
    assert str(e.value) == (f"the SFT token cache {tmp_path / 'c'} was built with the model's max_seq_len 64 (now "
                            "128); delete it to rebuild, or choose another --sft_cache.")
    assert "using" not in capsys.readouterr().out  # said only of a cache accepted, not before its refusal
    f.write_bytes(f.read_bytes()[:-1] + b" ")  # the file changed, its size did not
    with pytest.raises(UserError, match="built with other inputs .*multi.jsonl differs"):
        load_sft_data([f], demo_sft / "tok", tmp_path / "c", settings, True, Dist())
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot write the SFT token cache"):
        build_sft_cache([f], demo_sft / "tok", tmp_path / "file" / "c", settings)


def load_while_held(cache, inputs, tok, settings, kind, capsys, meanwhile) -> tuple[str, dict, int]:
    """load_sft_data of inputs into cache while another process holds cache, as a pretokenize --sft or another run
    that builds it does: (what it printed, {"data": what it returned} or {"error": its UserError}, the pid of that
    process). Once it waits on
    the lock (it has printed a line of its cache), meanwhile() writes into cache what that process left, then the
    process lets go."""
    import threading

    from tests.test_lock import hold_in_child

    child = hold_in_child(cache, "pretokenize")
    result: dict = {}

    def load() -> None:
        try:
            result["data"] = load_sft_data(inputs, tok, cache, settings, False, Dist(), kind=kind)
        except UserError as e:
            result["error"] = e

    thread, said = threading.Thread(target=load), ""
    try:
        thread.start()
        deadline = time.time() + 30
        while f"{kind} cache: " not in said and thread.is_alive() and time.time() < deadline:
            time.sleep(0.05)
            said += capsys.readouterr().out
        meanwhile()
    finally:
        child.communicate("")
        thread.join(60)
    return said + capsys.readouterr().out, result, child.pid


def files_of(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("left", ["other inputs", "an SFT cache for DPO", "token shards", "the same inputs"])
def test_a_run_that_waited_for_a_cache_checks_what_it_finds_as_it_would_have_at_its_start(demo_sft, tmp_path, capsys,
                                                                                        left):
    """sft (dpo) waited for the lock of its --sft_cache while pretokenize --sft built it from other inputs, then
    built its own cache over it (`sft cache: building`, said before it waited; dpo put a DPO cache in place of the
    SFT one): what it finds once it holds the folder is checked as at its start, refused in the same sentence or
    used, and said while it waits."""
    import shutil

    from babyllama.data.pretokenize import pretokenize

    settings, cache = SFTSettings(max_len=65), tmp_path / "cache"
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": f"问题{i}", "chosen": f"好的回答{i}", "rejected": f"坏{i}"},
                                          ensure_ascii=False) for i in range(20)))
    other = tmp_path / "other"  # what the process that held the folder left in it
    if left == "token shards":
        pretokenize([demo_sft / "demo" / "sft.jsonl"], demo_sft / "tok", other, workers=1)
    else:
        source = demo_sft / ("demo/sft.jsonl" if left == "other inputs" else "multi.jsonl")
        build_sft_cache([source], demo_sft / "tok", other, settings)
    kind, data = ("dpo", pairs) if left == "an SFT cache for DPO" else ("sft", demo_sft / "multi.jsonl")
    capsys.readouterr()
    said, result, pid = load_while_held(cache, [data], demo_sft / "tok", settings, kind, capsys,
                                   lambda: shutil.copytree(other, cache, dirs_exist_ok=True))
    assert files_of(cache) == files_of(other)  # as that process left it: nothing built over it
    waiting = f"{kind} cache: waiting for another run building {cache} (pid {pid}, babyllama pretokenize)"
    if left == "the same inputs":
        assert "error" not in result and said.splitlines() == [waiting, f"sft cache: using {cache}"]
        assert read_back(result["data"][0]) == read_back(load_sft_data([data], demo_sft / "tok", other, settings,
                                                                       False, Dist())[0])
        return
    assert said.splitlines() == [waiting] and str(result.get("error")) == {
        "other inputs": f"the SFT token cache {cache} was built with other inputs ({data} is new); delete it to "
                        "rebuild, or choose another --sft_cache.",
        "an SFT cache for DPO": f"--sft_cache {cache} is an SFT token cache, which DPO samples must not be written "
                                "into; pass another --sft_cache.",
        "token shards": f"--sft_cache {cache} is a folder of token shards, which SFT samples must not be written "
                        "into; pass another --sft_cache.",
    }[left]


def test_sft_and_dpo_of_a_folder_do_not_train_on_its_held_out_splits(demo_sft, tmp_path):
    import shutil

    d = tmp_path / "data"  # sft.jsonl beside the demo's held-out eval.jsonl (the same shape) and a dev/ folder
    (d / "dev").mkdir(parents=True)
    shutil.copy(demo_sft / "multi.jsonl", d / "sft.jsonl")
    shutil.copy(demo_sft / "demo" / "eval.jsonl", d / "eval.jsonl")
    shutil.copy(demo_sft / "demo" / "sft.jsonl", d / "dev" / "sft.jsonl")
    manifest = build_sft_cache([d], demo_sft / "tok", tmp_path / "c", SFTSettings(max_len=65))
    assert [i["path"] for i in manifest["inputs"]] == [str(d / "sft.jsonl")]
    assert manifest["stats"]["records"] == len(MULTI_TURN)
    pairs = [{"prompt": f"第{i}题", "chosen": "好", "rejected": "坏"} for i in range(3)]
    (tmp_path / "pairs").mkdir()
    for name, records in (("dpo.jsonl", pairs), ("dpo_test.jsonl", pairs * 5)):
        (tmp_path / "pairs" / name).write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records))
    settings = SFTSettings(max_len=65)
    manifest = build_sft_cache([tmp_path / "pairs"], demo_sft / "tok", tmp_path / "p", settings, kind="dpo")
    assert manifest["stats"]["records"] == 3
    named = [tmp_path / "pairs" / "dpo.jsonl", tmp_path / "pairs" / "dpo_test.jsonl"]
    assert build_sft_cache(named, demo_sft / "tok", tmp_path / "q", settings, kind="dpo")["stats"]["records"] == 18


def test_cache_copied_with_its_inputs_is_used_elsewhere_and_rebuilt_when_one_changed(demo_sft, tmp_path, capsys):
    """A folder copied with `cp -a` (mtimes kept) elsewhere: its cache matches the inputs beside it (their absolute
    paths differ, their paths relative to the cache do not); an input changed since is rebuilt, as before."""
    import shutil

    here, settings = tmp_path / "a", SFTSettings(max_len=65)
    (here / "data").mkdir(parents=True)
    shutil.copy2(demo_sft / "multi.jsonl", here / "data" / "multi.jsonl")
    build_sft_cache([here / "data"], demo_sft / "tok", here / "cache", settings)
    built = read_sft_cache(here / "cache")
    there = tmp_path / "b" / "a"
    shutil.copytree(here, there)  # copy2: as cp -a
    assert build_sft_cache([there / "data"], demo_sft / "tok", there / "cache", settings) == built  # not rebuilt
    capsys.readouterr()
    train, _, _ = load_sft_data([there / "data"], demo_sft / "tok", there / "cache", settings, False, Dist())
    assert "sft cache: using" in capsys.readouterr().out
    assert read_back(train) == read_back(load_sft_data([here / "data"], demo_sft / "tok", here / "cache", settings,
                                                       False, Dist())[0])
    f = there / "data" / "multi.jsonl"
    f.write_bytes(f.read_bytes().replace("症状".encode(), "病症".encode(), 1))  # one character, the same size
    with pytest.raises(UserError) as e:
        load_sft_data([there / "data"], demo_sft / "tok", there / "cache", settings, False, Dist())
    assert str(e.value) == (f"the SFT token cache {there / 'cache'} was built with other inputs ({f} differs); "
                            "delete it to rebuild, or choose another --sft_cache.")
    rebuilt = build_sft_cache([there / "data"], demo_sft / "tok", there / "cache", settings)
    assert rebuilt["inputs"][0]["mtime_ns"] == f.stat().st_mtime_ns != built["inputs"][0]["mtime_ns"]


def test_a_cache_of_an_older_version_copied_with_its_inputs_says_so(demo_sft, tmp_path):
    """A version 2 manifest (its inputs without relative path and SHA-256), copied with `cp -a` and its
    byte-identical inputs: it said 'built with other inputs (…/multi.jsonl is new)'."""
    import shutil

    here, settings = tmp_path / "a", SFTSettings(max_len=65)
    (here / "data").mkdir(parents=True)
    shutil.copy2(demo_sft / "multi.jsonl", here / "data" / "multi.jsonl")
    built = build_sft_cache([here / "data"], demo_sft / "tok", here / "cache", settings)
    old = {**built, "version": 2, "inputs": [{k: i[k] for k in ("path", "bytes", "mtime_ns")} for i in built["inputs"]]}
    (here / "cache" / "manifest.json").write_text(json.dumps(old))
    there = tmp_path / "b" / "a"
    shutil.copytree(here, there)  # copy2: as cp -a
    for cache in (here / "cache", there / "cache"):  # in its place too
        with pytest.raises(UserError) as e:
            load_sft_data([cache.parent / "data"], demo_sft / "tok", cache, settings, False, Dist())
        assert str(e.value) == (f"the SFT token cache {cache} was built with an older version of babyllama; delete it "
                                "to rebuild, or choose another --sft_cache.")


def test_the_data_tools_and_their_workers_run_without_torch():
    """pretokenize's and the SFT cache's worker processes import these modules; torch costs each ~170 MB. The
    cache hashes its inputs with weights_file.file_sha256, which must not bring it in."""
    import subprocess
    import sys

    code = "import sys, babyllama.data.pretokenize, babyllama.data.sft_tokens; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout == "False\n", r.stderr


def test_an_input_with_a_new_mtime_and_the_same_bytes_uses_the_cache(demo_sft, tmp_path, capsys):
    """cp without -p, or the same file downloaded again: a new mtime, the same bytes, which the manifest's SHA-256
    bears out, so the cache is used as it is; the same size with one character changed is refused, and so is a
    new mtime alone under a manifest from before the digests."""
    import hashlib
    import shutil

    f, settings, cache = tmp_path / "multi.jsonl", SFTSettings(max_len=65), tmp_path / "cache"
    shutil.copy2(demo_sft / "multi.jsonl", f)
    built = build_sft_cache([f], demo_sft / "tok", cache, settings)
    assert built["inputs"][0]["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    files = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.iterdir()}
    f.unlink()
    shutil.copyfile(demo_sft / "multi.jsonl", f)  # a new file with the same bytes
    os.utime(f, ns=(1, 1))
    train, _, _ = load_sft_data([f], demo_sft / "tok", cache, settings, False, Dist())
    stamped = {**built, "inputs": [{**built["inputs"][0], "mtime_ns": 1}]}  # the new mtime, recorded
    assert build_sft_cache([f], demo_sft / "tok", cache, settings) == stamped  # pretokenize --sft: the same
    out = capsys.readouterr().out
    assert out.startswith(f"note: {f} has a new mtime but the same bytes; using it\nsft cache: using")
    assert len(train) == built["stats"]["samples"]
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.iterdir()
            if p.name != "manifest.json"} == {k: v for k, v in files.items() if k != "manifest.json"}  # not rebuilt
    refused = (f"the SFT token cache {cache} was built with other inputs ({f} differs); delete it to rebuild, or "
               "choose another --sft_cache.")
    f.write_bytes(f.read_bytes().replace("症状".encode(), "病症".encode(), 1))  # one character, the same size
    os.utime(f, ns=(2, 2))
    with pytest.raises(UserError) as e:
        load_sft_data([f], demo_sft / "tok", cache, settings, False, Dist())
    assert str(e.value) == refused
    shutil.copyfile(demo_sft / "multi.jsonl", f)
    manifest = json.loads((cache / "manifest.json").read_text())
    del manifest["inputs"][0]["sha256"]  # as written before the digests
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError) as e:
        load_sft_data([f], demo_sft / "tok", cache, settings, False, Dist())
    assert str(e.value) == refused


@pytest.mark.parametrize("open_with", ["sft", "pretokenize"])
def test_a_new_mtime_with_the_same_bytes_is_recorded_so_the_next_run_does_not_hash(demo_sft, tmp_path, capsys,
                                                                                   monkeypatch, open_with):
    """`touch data.jsonl`, then sft twice: both runs hashed the whole input again (minutes for a GB) and both printed
    the note, with a logger's prefix ("INFO babyllama.data.sft_tokens: note: ..."). The first run records the new
    mtime in the manifest, under the cache's lock; the second trusts it: it hashes nothing and says nothing."""
    import shutil

    from babyllama.data import sft_tokens

    f, settings, cache = tmp_path / "multi.jsonl", SFTSettings(max_len=65), tmp_path / "cache"
    shutil.copy2(demo_sft / "multi.jsonl", f)
    build_sft_cache([f], demo_sft / "tok", cache, settings)
    os.utime(f, ns=(10**18, 10**18))  # touch
    hashed, sha256 = [], sft_tokens.file_sha256
    monkeypatch.setattr(sft_tokens, "file_sha256", lambda p: hashed.append(p) or sha256(p))

    def run() -> str:
        monkeypatch.setattr(sft_tokens, "_SAME_BYTES", {})  # a new process
        capsys.readouterr()
        if open_with == "sft":
            load_sft_data([f], demo_sft / "tok", cache, settings, False, Dist())
        else:
            build_sft_cache([f], demo_sft / "tok", cache, settings)
        return capsys.readouterr().out

    assert run().startswith(f"note: {f} has a new mtime but the same bytes; using it\n") and hashed == [str(f)]
    assert read_sft_cache(cache)["inputs"][0]["mtime_ns"] == 10**18
    assert "new mtime" not in run() and hashed == [str(f)]  # not hashed again
    assert not list(cache.glob(".*.tmp"))


def test_a_resumed_run_after_touch_hashes_the_input_once_not_on_every_resume(demo_sft, tmp_path, monkeypatch):
    """The checkpoint records the cache's manifest as the run started, with the input's old mtime, so after `touch`
    every resume hashed the input again (minutes for a GB) to compare it with that record, though the cache had
    recorded the new mtime: the record is compared through the cache's manifest where that is the same cache but for
    the mtimes it has confirmed since."""
    import shutil

    from babyllama.data import sft_tokens

    f, settings, cache = tmp_path / "multi.jsonl", SFTSettings(max_len=65), tmp_path / "cache"
    shutil.copy2(demo_sft / "multi.jsonl", f)
    started_with = {k: v for k, v in build_sft_cache([f], demo_sft / "tok", cache, settings).items() if k != "stats"}
    os.utime(f, ns=(10**18, 10**18))  # touch
    hashed, sha256 = [], sft_tokens.file_sha256
    monkeypatch.setattr(sft_tokens, "file_sha256", lambda p: hashed.append(p) or sha256(p))
    for _ in range(2):  # two resumes, each a new process
        monkeypatch.setattr(sft_tokens, "_SAME_BYTES", {})
        load_sft_data([f], demo_sft / "tok", cache, settings, False, Dist(), started_with=started_with)
    assert hashed == [str(f)]
    f.write_bytes(f.read_bytes().replace(b"\n", b"\r\n", 1)[:-1])  # other bytes, the same size: refused
    os.utime(f, ns=(2 * 10**18, 2 * 10**18))
    with pytest.raises(UserError, match=r"^the run started with other inputs \("):
        load_sft_data([f], demo_sft / "tok", cache, settings, False, Dist(), started_with=started_with)


def test_a_file_added_to_or_removed_from_a_data_folder_is_named_new_or_gone(demo_sft, tmp_path):
    import shutil

    settings, data = SFTSettings(max_len=65), tmp_path / "data"
    data.mkdir()
    shutil.copy2(demo_sft / "multi.jsonl", data / "a.jsonl")
    build_sft_cache([data], demo_sft / "tok", tmp_path / "cache", settings)
    shutil.copy2(demo_sft / "multi.jsonl", data / "b.jsonl")
    with pytest.raises(UserError) as e:
        load_sft_data([data], demo_sft / "tok", tmp_path / "cache", settings, False, Dist())
    assert str(e.value) == (f"the SFT token cache {tmp_path / 'cache'} was built with other inputs "
                            f"({data / 'b.jsonl'} is new); delete it to rebuild, or choose another --sft_cache.")
    (data / "a.jsonl").unlink()
    with pytest.raises(UserError, match=re.escape(f"other inputs ({data / 'b.jsonl'} is new)")):
        load_sft_data([data], demo_sft / "tok", tmp_path / "cache", settings, False, Dist())
    (data / "b.jsonl").rename(data / "a.jsonl")  # the same size and mtime under the old name
    shutil.copy2(demo_sft / "multi.jsonl", data / "c.jsonl")
    build_sft_cache([data], demo_sft / "tok", tmp_path / "cache2", settings)
    (data / "c.jsonl").unlink()
    with pytest.raises(UserError, match=re.escape(f"other inputs ({data / 'c.jsonl'} is gone)")):
        load_sft_data([data], demo_sft / "tok", tmp_path / "cache2", settings, False, Dist())

def test_every_difference_of_a_cache_is_said_in_the_words_of_its_flags(demo_sft, tmp_path, bpe_tokenizer):
    from babyllama.data.sft_tokens import cache_differences, cache_key

    f = tmp_path / "pairs.jsonl"  # it said "max_len 65 (now 129)", an internal name off by one
    f.write_text(json.dumps({"prompt": "问题", "chosen": "好", "rejected": "坏"}, ensure_ascii=False))
    built = build_sft_cache([f], demo_sft / "tok", tmp_path / "c", SFTSettings(max_len=65), kind="dpo")
    other = SFTSettings(129, 0.1, 1, 2, 3, 4)
    another = {**bpe_tokenizer.record(), "fingerprint": "other"}
    assert cache_differences(built, cache_key([f], another, other, "dpo", tmp_path / "c")) == [
        "another tokenizer", "the model's max_seq_len 64 (now 128)", "val_fraction 0.02 (now 0.1)",
        "min_prompt_chars 0 (now 1)", "max_prompt_chars 0 (now 2)", "min_answer_chars 0 (now 3)",
        "max_answer_chars 0 (now 4)"]
    same = cache_key([f], bpe_tokenizer.record(), SFTSettings(max_len=65), "dpo", tmp_path / "c")
    assert cache_differences(built, {**same, "kind": "sft"}) == ["DPO samples, not SFT"]
    assert cache_differences(built, {**same, "version": 99}) == ["an older version of babyllama"]
    assert cache_differences({**built, "version": 99}, same) == ["a newer version of babyllama"]
    with pytest.raises(UserError) as e:  # a DPO cache says so
        load_sft_data([f], demo_sft / "tok", tmp_path / "c", other, True, Dist(), kind="dpo")
    assert str(e.value) == (f"the DPO token cache {tmp_path / 'c'} was built with the model's max_seq_len 64 (now "
                            "128); val_fraction 0.02 (now 0.1); min_prompt_chars 0 (now 1); max_prompt_chars 0 (now "
                            "2); min_answer_chars 0 (now 3); max_answer_chars 0 (now 4); delete it to rebuild, or "
                            "choose another --sft_cache.")
    with pytest.raises(UserError) as e:  # a resume whose settings changed: not "the inputs changed"
        load_sft_data([f], demo_sft / "tok", tmp_path / "c", other, True, Dist(), kind="dpo", started_with=built)
    assert str(e.value).startswith("the run started with the model's max_seq_len 64 (now 128), val_fraction 0.02 "
                                   "(now 0.1), ")


def test_a_cache_is_rebuilt_when_the_special_ids_or_the_chat_format_change(demo_sft, tmp_path, monkeypatch):
    """The key held the tokenizer's fingerprint, which a tokenizer.json's special ids are not part of: a tokenizer
    whose <eos> became another id reused samples that end in the old one. Every setting that changes the tokens is
    a key: the special ids, the chat format, max_seq_len (and the filters, val_fraction: the test above)."""
    import shutil

    from babyllama import chat_format
    from babyllama.tokenizer import META_FILE

    f, cache, settings = demo_sft / "multi.jsonl", tmp_path / "c", SFTSettings(max_len=65)

    def built(tok, settings) -> tuple[dict, bool]:  # the manifest, and whether the cache was built anew: its
        if (cache / "manifest.json").exists():  # manifest then lacks the mark put in the one before
            marked = {**json.loads((cache / "manifest.json").read_text()), "mark": True}
            (cache / "manifest.json").write_text(json.dumps(marked))
        manifest = build_sft_cache([f], tok, cache, settings)
        return manifest, "mark" not in manifest

    first, new = built(demo_sft / "tok", settings)
    assert new and built(demo_sft / "tok", settings)[1] is False  # reused: the same settings
    shutil.copytree(demo_sft / "tok", tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / META_FILE).read_text())
    (tmp_path / "tok" / META_FILE).write_text(json.dumps({**meta, "eos_id": meta["bos_id"], "bos_id": meta["eos_id"]}))
    swapped, new = built(tmp_path / "tok", settings)
    ids, _, lengths = open_split(cache, swapped, "train")
    assert new and swapped["tokenizer"]["eos_id"] == meta["bos_id"]
    assert ids[int(lengths[0]) - 1] == meta["bos_id"]  # the first sample ends in the new <eos>
    with pytest.raises(UserError) as e:
        load_sft_data([f], demo_sft / "tok", cache, settings, False, Dist())
    assert str(e.value) == (f"the SFT token cache {cache} was built with the tokenizer's bos_id {meta['eos_id']} (now "
                            f"{meta['bos_id']}), the tokenizer's eos_id {meta['bos_id']} (now {meta['eos_id']}); "
                            "delete it to rebuild, or choose another --sft_cache.")
    monkeypatch.setattr(chat_format, "CHAT_TEMPLATE", chat_format.CHAT_TEMPLATE + "{{- '' -}}")
    rendered, new = built(tmp_path / "tok", settings)
    assert new and rendered["chat_format"] != swapped["chat_format"]
    longer, new = built(tmp_path / "tok", SFTSettings(max_len=129))
    assert new and open_split(cache, longer, "train")[2].max() == 129 > 65


def test_pretokenize_sft_builds_what_sft_uses(demo_sft, tmp_path):
    """...and its summary line counts what SFT records have: it listed the DPO pairs' "equal_pairs": 0 and
    "equal_after_truncation": 0 too."""
    r = run_cli("pretokenize", "--sft", "--input", str(demo_sft / "multi.jsonl"), "--tokenizer", str(demo_sft / "tok"),
                "--out_dir", str(tmp_path / "c"), "--max_seq_len", "64", "--workers", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)
    assert summary["samples"] + summary["val_samples"] == len(MULTI_TURN)
    assert list(summary) == ["out_dir", "dtype", "records", "bad", "filtered", "filtered_by_chars", "empty_answers",
                             "truncated", "samples", "val_samples", "bad_examples", "max_id"]
    r = run_cli("pretokenize", "--sft", "--input", str(demo_sft / "multi.jsonl"), "--out_dir", str(tmp_path / "d"))
    assert r.returncode == 2 and "--max_seq_len" in r.stderr


def test_the_cache_bar_says_one_record_in_the_singular(tmp_path, bpe_tokenizer):
    """The bar ended with `1 records`."""
    bpe_tokenizer.save(tmp_path / "tok")
    (tmp_path / "one.jsonl").write_text(json.dumps(MULTI_TURN[0], ensure_ascii=False) + "\n", encoding="utf-8")
    r = run_cli("pretokenize", "--sft", "--input", tmp_path / "one.jsonl", "--tokenizer", tmp_path / "tok",
                "--out_dir", tmp_path / "c", "--max_seq_len", "256", "--val_fraction", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    bar = [line for line in r.stderr.splitlines() if line.startswith("sft tokens: ")]
    assert re.fullmatch(r"sft tokens: 100%\|#+\| (\S+)/\1 \[[^\]]*, 1 record, [\d,]+ samples/s\]", bar[-1]), bar


def test_the_cache_bar_counts_the_input_bytes_of_their_total(demo_sft, tmp_path):
    """The SFT/DPO cache's bar counted records with no total: no percentage, no ETA. It counts the inputs' bytes read
    of their size, as prepare's and pretokenize's bars do, moving as each batch is written, with the records so far."""
    data = demo_sft / "demo" / "sft.jsonl"
    records = len(data.read_text(encoding="utf-8").splitlines())
    assert records > 1000  # more than one batch (RECORDS_PER_BATCH)
    r = run_cli("pretokenize", "--sft", "--input", data, "--tokenizer", demo_sft / "tok", "--out_dir", tmp_path / "c",
                "--max_seq_len", "64", "--workers", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    bar = [line for line in r.stderr.splitlines() if line.startswith("sft tokens: ")]
    assert re.fullmatch(r"sft tokens:   0%\|\s+\| 0\.00/(\S+) \[.*\]", bar[0]), bar
    size = re.fullmatch(r"sft tokens:   0%\|\s+\| 0\.00/(\S+) \[.*\]", bar[0])[1]
    assert re.fullmatch(rf"sft tokens: 100%\|#+\| {size}/{size} \[[^\]]*, {records:,} records, [\d,]+ samples/s\]",
                        bar[-1]), bar


def sft_val(run, data):
    """The packed validation rows of an SFT run (its own token cache)."""
    return load_sft_data([data], run / "final", run / "sft_tokens", SFTSettings(max_len=65), True, Dist())[1]


def one_process_val_loss(run, data, batch_size, eval_batches) -> float:
    """The validation loss of run/final over the trainer's validation rows, computed in this one process."""
    from babyllama.checkpoint import load_model
    from babyllama.evaluate import loss_sums

    model = load_model(run / "final")
    val = sft_val(run, data)
    n = min(len(val), batch_size * eval_batches)
    forward = lambda batch: model(batch["idx"], batch["targets"], segments=batch.get("segments"))[1]
    nats, tokens, _ = loss_sums(forward, val, range(n), batch_size, model.rope_cos.device)
    return nats / tokens


def final_val_loss(run) -> float:
    return [json.loads(x) for x in (run / "metrics.jsonl").open()][-1]["val_loss"]


@pytest.fixture(scope="module")
def sft_init(demo_sft, bpe_tokenizer, tmp_path_factory):
    init = tmp_path_factory.mktemp("sft_init") / "init"
    save_checkpoint(init, sharp_model(tiny_config(vocab_size=600, max_seq_len=64)), bpe_tokenizer)
    return init


SFT_COMMON = ["--max_steps", "4", "--pack", "true", "--lr", "1e-3", "--warmup_steps", "2", "--log_every", "1",
              "--eval_every", "2", "--save_every", "0", "--data_workers", "1", "--ddp_timeout", "60"]


def test_torchrun_two_processes_build_once_and_train_like_one(demo_sft, sft_init, tmp_path):
    common = ["sft", "--init", str(sft_init), "--data", str(demo_sft / "demo" / "sft.jsonl"), *SFT_COMMON,
              "--eval_batches", "3"]
    two = torchrun([*common, "--out_dir", str(tmp_path / "two"), "--batch_size", "2"], nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("sft cache: building") == 1  # rank 0 built it; rank 1 waited and mapped it
    one = run_cli(*common, "--out_dir", str(tmp_path / "one"), "--batch_size", "4")
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = logged_losses(tmp_path / "two"), logged_losses(tmp_path / "one")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(math.isclose(a[s], b[s], rel_tol=1e-4) for s in a), (a, b)
    # 3 validation batches of the global batch (4 packed rows), dealt to the ranks: one process's loss, the same
    # rows whichever way the global batch is split
    data = demo_sft / "demo" / "sft.jsonl"
    assert len(sft_val(tmp_path / "two", data)) >= 5
    expected = one_process_val_loss(tmp_path / "two", data, 4, 3)
    assert final_val_loss(tmp_path / "two") == pytest.approx(expected, rel=1e-5)
    assert final_val_loss(tmp_path / "one") == pytest.approx(final_val_loss(tmp_path / "two"), rel=1e-4)


def test_torchrun_three_processes_fsdp_validate_uneven_batches(demo_sft, sft_init, tmp_path):
    start = time.time()
    r = torchrun(["sft", "--init", str(sft_init), "--data", str(demo_sft / "demo" / "sft.jsonl"), *SFT_COMMON,
                  "--out_dir", str(tmp_path), "--batch_size", "1", "--eval_batches", "4", "--fsdp", "true"],
                 nproc=3, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert time.time() - start < 240
    data = demo_sft / "demo" / "sft.jsonl"
    assert len(sft_val(tmp_path, data)) >= 4  # 4 batches of the global batch (3 rows), dealt over 3 ranks
    assert final_val_loss(tmp_path) == pytest.approx(one_process_val_loss(tmp_path, data, 3, 4), rel=1e-5)


@pytest.mark.parametrize("damage", ["delete", "cut", "manifest"])
def test_a_damaged_cache_stops_with_one_sentence(demo_sft, tmp_path, damage):
    f, settings = demo_sft / "multi.jsonl", SFTSettings(max_len=65)
    build_sft_cache([f], demo_sft / "tok", tmp_path / "c", settings)
    ids = tmp_path / "c" / "train.ids.bin"
    if damage == "delete":
        ids.unlink()
    elif damage == "manifest":
        (tmp_path / "c" / "manifest.json").write_text("[1]")
    else:
        ids.write_bytes(ids.read_bytes()[:-2])
    with pytest.raises(UserError, match="damaged"):
        load_sft_data([f], demo_sft / "tok", tmp_path / "c", settings, True, Dist())


def test_records_with_an_empty_answer_are_skipped_and_counted(demo_sft, tmp_path):
    records = [{"instruction": "问一", "output": "答一"}, {"instruction": "问二", "output": ""},
               {"instruction": "问三", "input": "补充", "output": " \u200b\ufeff\u3000"},  # nothing visible
               {"prompt": "问四", "answer": "答四"},
               {"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": ""},
                                  {"role": "user", "content": "在吗"}, {"role": "assistant", "content": "在"}]}]
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records))
    settings = SFTSettings(max_len=64, val_fraction=0.0)
    manifest = build_sft_cache([tmp_path / "sft.jsonl"], demo_sft / "tok", tmp_path / "c", settings)
    s = manifest["stats"]
    assert (s["records"], s["bad"], s["empty_answers"], s["samples"]) == (5, 0, 3, 2)


def test_records_with_an_empty_question_are_bad(demo_sft, tmp_path):
    records = [{"instruction": "", "output": "答一"}, {"instruction": " ", "input": "\u200b", "output": "答二"},
               {"prompt": "", "answer": "答三"}, {"instruction": "", "input": "问四", "output": "答四"},
               {"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                                  {"role": "user", "content": "  "}, {"role": "assistant", "content": "在"}]}]
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records))
    manifest = build_sft_cache([tmp_path / "sft.jsonl"], demo_sft / "tok", tmp_path / "c", SFTSettings(64, 0.0))
    assert (manifest["stats"]["bad"], manifest["stats"]["samples"]) == (4, 1)  # 问四 is the question of the 4th
    why = "a question (instruction, prompt or user message) is empty, so there is nothing to answer"
    assert (tmp_path / "c" / "bad_records.txt").read_text().splitlines() == [
        f"{tmp_path / 'sft.jsonl'}:{n}: {why}" for n in (1, 2, 3, 5)]


def test_the_bad_records_past_the_five_shown_are_counted_in_words_that_agree(demo_sft, tmp_path, caplog):
    (tmp_path / "sft.jsonl").write_text("\n".join(["{", "{", "{", "{", "{", "{",
                                                   json.dumps({"instruction": "问", "output": "答"})]))
    build_sft_cache([tmp_path / "sft.jsonl"], demo_sft / "tok", tmp_path / "c", SFTSettings(64, 0.0))
    assert caplog.records[-1].getMessage() == (f"... and 1 more bad SFT record (6 in all), each listed in "
                                               f"{tmp_path / 'c' / 'bad_records.txt'}")


def test_bad_records_txt_lists_the_first_max_listed_then_counts_the_rest(demo_sft, tmp_path, caplog, monkeypatch):
    """The cache's bad_records.txt held a line per bad record without bound, as prepare's did; as prepare's, it lists
    the first MAX_LISTED (here 3), then a line that counts the rest, and the console says the first ones are there."""
    from babyllama.data import sft_tokens

    monkeypatch.setattr(sft_tokens, "MAX_LISTED", 3)
    (tmp_path / "sft.jsonl").write_text("\n".join(["{"] * 7 + [json.dumps({"instruction": "问", "output": "答"})]))
    build_sft_cache([tmp_path / "sft.jsonl"], demo_sft / "tok", tmp_path / "c", SFTSettings(64, 0.0))
    assert (tmp_path / "c" / "bad_records.txt").read_text().splitlines() == [
        f"{tmp_path / 'sft.jsonl'}:{n}: not valid JSON (Expecting property name enclosed in double quotes)"
        for n in (1, 2, 3)] + ["... and 4 more bad records (7 in all)"]
    assert caplog.records[-1].getMessage() == (f"... and 2 more bad SFT records (7 in all), the first 3 listed in "
                                               f"{tmp_path / 'c' / 'bad_records.txt'}")


def test_system_and_history_fields_are_rendered_as_the_conversation_with_them(demo_sft, bpe_tokenizer, tmp_path):
    """A top-level `system` (LLaMA-Factory's alpaca and sharegpt) and alpaca `history` were dropped: '问二<s>答二</s>'.
    The sample is now the conversation's with them, token for token, the history's answers in the loss as every
    answer of a multi-turn conversation; a field of another type makes a bad record, its reason naming it."""
    tok, turns = bpe_tokenizer, [{"role": "user", "content": "问二"}, {"role": "assistant", "content": "答二"}]
    good = [({"system": "你是助手", "conversations": turns}, Conversation([("问二", "答二")], "你是助手")),
            ({"system": "你是助手", "instruction": "问四", "input": "", "output": "答四",
              "history": [["早先的问", "早先的答"], ["再问", "再答"]]},
             Conversation([("早先的问", "早先的答"), ("再问", "再答"), ("问四", "答四")], "你是助手")),
            ({"instruction": "问五", "output": "答五", "history": [["早先的问", "早先的答"]]},
             Conversation([("早先的问", "早先的答"), ("问五", "答五")]))]
    bad = [{"instruction": "问", "output": "答", "system": 5}, {"conversations": turns, "system": ["你是助手"]},
           {"instruction": "问", "output": "答", "history": "早先的问"},
           {"instruction": "问", "output": "答", "history": [["只有问"]]}]
    f = tmp_path / "sft.jsonl"
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [r for r, _ in good] + bad))
    manifest = build_sft_cache([f], demo_sft / "tok", tmp_path / "c", SFTSettings(max_len=200, val_fraction=0.0))
    ids, mask, lengths = open_split(tmp_path / "c", manifest, "train")
    ends = np.cumsum(lengths).tolist()
    got = [(ids[e - n : e].tolist(), mask[e - n : e].tolist()) for e, n in zip(ends, lengths.tolist(), strict=True)]
    assert got == [render_conversation(tok, conv) for _, conv in good]
    assert tok.decode(got[0][0]).startswith("你是助手\n问二")
    alpaca_ids, alpaca_mask = got[1]
    assert [i for i, m in zip(alpaca_ids, alpaca_mask, strict=True) if m] == [
        *tok.encode("早先的答"), tok.eos_id, *tok.encode("再答"), tok.eos_id, *tok.encode("答四"), tok.eos_id]
    assert (manifest["stats"]["records"], manifest["stats"]["bad"]) == (7, 4)
    history = "its 'history' is not a list of [question, answer] pairs of strings"
    assert (tmp_path / "c" / "bad_records.txt").read_text().splitlines() == [
        f"{f}:4: its 'system' is a number, not a string", f"{f}:5: its 'system' is a list, not a string",
        f"{f}:6: {history}",
        f"{f}:7: {history}"]
    (tmp_path / "c" / "manifest.json").write_text(json.dumps({**manifest, "version": 4}))  # before these fields
    settings = SFTSettings(max_len=200, val_fraction=0.0)
    assert build_sft_cache([f], demo_sft / "tok", tmp_path / "c", settings)["version"] > 4  # rebuilt, not reused


def shown(tok, ids, mask) -> str:
    """A sample as text, <s> and </s> for <bos> and <eos>, each run of ids with loss in [[ ]] (as the tester's
    show.py prints a cache)."""
    special = {tok.bos_id: "<s>", tok.eos_id: "</s>"}
    out = ""
    for m, run in itertools.groupby(zip(ids, mask, strict=True), key=lambda x: x[1]):
        pieces = itertools.groupby((i for i, _ in run), key=lambda i: i in special)
        text = "".join("".join(special[i] for i in part) if is_special else tok.decode(list(part))
                       for is_special, part in pieces)
        out += f"[[{text}]]" if m else text
    return out


def test_the_system_and_history_of_every_shape_come_once(demo_sft, bpe_tokenizer, tmp_path):
    """TRL's conversational prompt / completion with a top-level `system` and `history` read both twice:
    'TOP\nTOP\nh<s>a</s>h<s>[[a</s>]]P<s>[[C</s>]]'. Every shape now gets them once, in one place; the prompt's
    and the history's answers carry no loss there, as TRL trains on the completion alone."""
    context = {"system": "TOP", "history": [["h", "a"]]}
    records = [{"prompt": [{"role": "user", "content": "P"}], "completion": [{"role": "assistant", "content": "C"}]},
               {"messages": [{"role": "user", "content": "P"}, {"role": "assistant", "content": "C"}]},
               {"prompt": "P", "completion": "C"}, {"instruction": "P", "output": "C"}]
    f = tmp_path / "sft.jsonl"
    f.write_text("\n".join(json.dumps({**r, **context}) for r in records))
    manifest = build_sft_cache([f], demo_sft / "tok", tmp_path / "c", SFTSettings(max_len=64, val_fraction=0.0))
    ids, mask, lengths = open_split(tmp_path / "c", manifest, "train")
    ends = np.cumsum(lengths).tolist()
    assert [shown(bpe_tokenizer, ids[e - n : e].tolist(), mask[e - n : e].tolist())
            for e, n in zip(ends, lengths.tolist(), strict=True)] == [
        "TOP\nh<s>a</s>P<s>[[C</s>]]"] + ["TOP\nh<s>[[a</s>]]P<s>[[C</s>]]"] * 3


def test_a_record_of_two_shapes_is_read_in_the_first_and_the_fields_left_out_named_once_a_file(
        demo_sft, bpe_tokenizer, tmp_path, caplog):
    """A record with the fields of two shapes (prompt / completion and instruction / output, or and messages; messages
    and an answer) dropped those of one without a word: they are named, once a file, as prepare names those of a
    record of two schemas."""
    says = [{"role": "user", "content": "U"}, {"role": "assistant", "content": "M"}]
    two = tmp_path / "two.jsonl"
    two.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "P", "completion": "C", "instruction": "I", "output": "O"},
        {"prompt": "P", "completion": "C", "messages": says}, {"messages": says, "answer": "A"},
        {"instruction": "I", "input": "", "output": "O"}, {"prompt": "P", "completion": "C", "instruction": "I2",
                                                           "output": "O2"}]))
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"instruction": "I", "output": "O", "input": "X", "history": [["h", "a"]]}))
    manifest = build_sft_cache([two, one], demo_sft / "tok", tmp_path / "c", SFTSettings(max_len=64, val_fraction=0))
    ids, mask, lengths = open_split(tmp_path / "c", manifest, "train")
    ends = np.cumsum(lengths).tolist()
    assert [shown(bpe_tokenizer, ids[e - n : e].tolist(), mask[e - n : e].tolist())
            for e, n in zip(ends, lengths.tolist(), strict=True)] == [
        "P<s>[[C</s>]]", "U<s>[[M</s>]]", "U<s>[[M</s>]]", "I<s>[[O</s>]]", "P<s>[[C</s>]]",
        "h<s>[[a</s>]]IX<s>[[O</s>]]"]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{two}: records with the fields of more than one shape are read in the first of conversations, messages, "
        f"prompt with answer (else completion), instruction with output, leaving out the 'instruction' of 2 records "
        f"(the first at {two}:1), the 'output' of 2 records (the first at {two}:1), the 'prompt' of 1 record (the "
        f"first at {two}:2), the 'completion' of 1 record (the first at {two}:2), the 'answer' of 1 record (the first "
        f"at {two}:3)"]


def test_a_preference_record_is_bad_for_sft_and_no_field_of_it_is_said_left_out(demo_sft, tmp_path, caplog):
    """`sft --data dpo.jsonl` warned "... leaving out the 'prompt' of 2 records", as if it read them as messages,
    and then skipped the same records as preference records: a preference record is bad for SFT, and nothing of it is
    read or left out; the fields of a good record of two shapes beside it still are."""
    says = [{"role": "user", "content": "U"}, {"role": "assistant", "content": "M"}]
    f = tmp_path / "dpo.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "P", "chosen": "C", "rejected": "R", "messages": says[:1]},  # pairs that dpo reads
        {"messages": says[:1], "chosen": {"role": "assistant", "content": "C"}, "rejected": "R", "question": "Q"},
        {"messages": says, "prompt": "P"}]))
    manifest = build_sft_cache([f], demo_sft / "tok", tmp_path / "c", SFTSettings(max_len=64, val_fraction=0))
    assert (manifest["stats"]["records"], manifest["stats"]["bad"], manifest["stats"]["samples"]) == (3, 2, 1)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{f}:1: it is a preference record ('chosen' and 'rejected'), which `babyllama dpo` reads: skipped an SFT "
        "record",
        f"{f}:2: it is a preference record ('chosen' and 'rejected'), which `babyllama dpo` reads: skipped an SFT "
        "record",
        f"{f}: records with the fields of more than one shape are read in the first of conversations, messages, "
        f"prompt with answer (else completion), instruction with output, leaving out the 'prompt' of 1 record (the "
        f"first at {f}:3)"]


def test_a_file_of_the_other_stages_records_is_named_as_such_and_stops_the_build_at_once(demo_sft, tmp_path, caplog):
    """`dpo --data sft.jsonl` read every record (a million: 25 s), warned "not a preference record (...every shape of
    a pair...)" and ended "no usable preference records ... 1000000 bad"; sft on a preference file named its records
    for `babyllama dpo` one by one alike. When the first batch of records (or all, where fewer) are the other stage's,
    the build stops there, naming their kind and the stage that reads them; a file with one good record is read."""
    from babyllama.data import sft_tokens

    sft_file, pairs = tmp_path / "sft.jsonl", tmp_path / "pairs.jsonl"
    sft_file.write_text("".join(json.dumps({"instruction": f"问{i}", "input": "", "output": "答"}) + "\n"
                                for i in range(sft_tokens.RECORDS_PER_BATCH + 500)))
    pairs.write_text(json.dumps({"prompt": "问", "chosen": "好", "rejected": "坏"}) + "\n" +
                     json.dumps({"conversations": [{"from": "human", "value": "问"}], "chosen": {"from": "gpt",
                                 "value": "好"}, "rejected": {"from": "gpt", "value": "坏"}}) + "\n")
    settings = SFTSettings(max_len=64, val_fraction=0)
    with pytest.raises(UserError) as e:
        build_sft_cache([sft_file], demo_sft / "tok", tmp_path / "d", settings, kind="dpo")
    assert str(e.value) == (f"the first 1,000 records of {sft_file} are instruction records ('instruction', 'input' "
                            "and 'output'), which `babyllama sft` reads, not preference records; nothing was written.")
    with pytest.raises(UserError) as e:
        build_sft_cache([pairs], demo_sft / "tok", tmp_path / "s", settings)
    assert str(e.value) == (f"all 2 records of {pairs} are preference records ('chosen' and 'rejected'), which "
                            "`babyllama dpo` reads, not SFT records; nothing was written.")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # no bad record's warning, one sentence
    assert not (tmp_path / "s" / "manifest.json").exists() and not list((tmp_path / "s").glob(".*.tmp"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "问", "completion": "答"}) + "\n")
    with pytest.raises(UserError, match=r"^the only record of .* is a prompt/completion record \('prompt' and "
                                        r"'completion'\), which `babyllama sft` reads, not a preference record; "):
        build_sft_cache([prompts], demo_sft / "tok", tmp_path / "p", settings, kind="dpo")
    manifest = build_sft_cache([pairs, sft_file], demo_sft / "tok", tmp_path / "m", settings)  # one batch, both kinds
    assert (manifest["stats"]["bad"], manifest["stats"]["samples"]) == (2, sft_tokens.RECORDS_PER_BATCH + 500)


def test_the_filters_of_characters_are_counted_apart_from_max_seq_len_and_measure_every_turn(demo_sft, tmp_path):
    """The --min/max_prompt/answer_chars filters shared the `filtered` count with max_seq_len's, which the README
    called "by length": each is counted (filtered_by_chars of filtered) and said apart. They measure every question
    and answer, of the history and of weight 0 too, and not the system text."""
    from babyllama.train.stages import data_line

    limits = {"min_prompt_chars": 5, "max_prompt_chars": 20, "min_answer_chars": 3, "max_answer_chars": 10}
    records = [{"instruction": "aaaaa", "output": "bbbbb"},
               {"instruction": "aaaa", "output": "bbbbb"},  # a question of 4 characters
               {"instruction": "aaaaa", "output": "b" * 11},  # an answer of 11
               {"system": "s" * 50, "instruction": "aaa", "input": "aa", "output": "bbbbb"},  # the system: not measured
               {"instruction": "aaaaa", "output": "bbbbb", "history": [["hhhhh", "x"]]},  # the history's answer: 1
               {"messages": [{"role": "user", "content": "uuuuu"}, {"role": "assistant", "content": "x", "weight": 0},
                             {"role": "user", "content": "vvvvv"}, {"role": "assistant", "content": "yyyyy"}]}]
    f = tmp_path / "filt.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    manifest = build_sft_cache([f], demo_sft / "tok", tmp_path / "c", SFTSettings(64, 0.0, **limits))
    stats = manifest["stats"]
    assert (stats["records"], stats["filtered"], stats["filtered_by_chars"], stats["samples"]) == (6, 4, 4, 2)
    assert data_line("sft", SFTStats(**stats)) == (
        "sft data: 6 records, 0 bad, 0 with an empty answer, 4 filtered by length (4 by characters, 0 by max_seq_len), "
        "0 truncated; 2 train / 0 val samples")
    f.write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    with pytest.raises(UserError) as e:  # max_seq_len 2: the first has nothing of its question left
        build_sft_cache([f], demo_sft / "tok", tmp_path / "d", SFTSettings(3, 0.0, **limits))
    assert str(e.value) == (f"no usable SFT records in {f} (2 read, 0 bad, 0 with an empty answer, 2 filtered by "
                            "length (1 by characters, 1 by max_seq_len)); nothing was written.")


def test_sft_and_dpo_folders_skip_their_text_files_as_eval_does(demo_sft, tmp_path, caplog):
    """A readme.txt in an `sft --data` folder made a bad SFT record of each of its lines, where eval --qa skips it
    with a note: the readers of records read a folder's .jsonl, .json, .csv and .parquet files and say the text files
    skipped; a .txt named itself is read (a line a bad record), and a folder of text alone is refused."""
    import logging

    d = tmp_path / "sft"
    d.mkdir()
    (d / "a.jsonl").write_text(json.dumps({"instruction": "问", "output": "答"}, ensure_ascii=False) + "\n")
    (d / "readme.txt").write_text("这些是训练数据\n第二行\n")
    with caplog.at_level(logging.WARNING):
        manifest = build_sft_cache([d], demo_sft / "tok", tmp_path / "c", SFTSettings(64, 0.0))
        (d / "pairs.jsonl").write_text(json.dumps({"prompt": "问", "chosen": "好", "rejected": "坏"},
                                                  ensure_ascii=False) + "\n")
        (d / "a.jsonl").unlink()
        pairs = build_sft_cache([d], demo_sft / "tok", tmp_path / "p", SFTSettings(64, 0.0), kind="dpo")
    assert ([i["path"] for i in manifest["inputs"]], manifest["stats"]["records"], manifest["stats"]["bad"]) == (
        [str(d / "a.jsonl")], 1, 0)
    assert ([i["path"] for i in pairs["inputs"]], pairs["stats"]["records"], pairs["stats"]["bad"]) == (
        [str(d / "pairs.jsonl")], 1, 0)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{kind} reads records from .jsonl, .json, .csv, .parquet files; {d / 'readme.txt'} is skipped (name a file "
        "itself to read it)" for kind in ("SFT", "DPO")]
    named = build_sft_cache([d, d / "readme.txt"], demo_sft / "tok", tmp_path / "n", SFTSettings(64, 0.0), kind="dpo")
    assert (named["stats"]["records"], named["stats"]["bad"]) == (3, 2)
    (d / "pairs.jsonl").unlink()
    with pytest.raises(UserError) as e:
        build_sft_cache([d], demo_sft / "tok", tmp_path / "t", SFTSettings(64, 0.0))
    assert str(e.value) == (f"{d} holds no .jsonl/.json/.csv/.parquet files of SFT records, only text: "
                            f"{d / 'readme.txt'}.")


def test_a_context_that_leaves_nothing_of_the_question_filters_the_sample(demo_sft, tmp_path):
    """pretokenize --sft --max_seq_len 2 trained on <bos> and an answer, no question: such a sample is filtered and
    counted; with none left, nothing is written."""
    f = tmp_path / "sft.jsonl"
    f.write_text(json.dumps({"instruction": "很长的问题" * 4, "output": "很长的回答" * 4}, ensure_ascii=False))
    with pytest.raises(UserError) as e:
        build_sft_cache([f], demo_sft / "tok", tmp_path / "c", SFTSettings(max_len=3, val_fraction=0.0))
    assert str(e.value) == (f"no usable SFT records in {f} (1 read, 0 bad, 0 with an empty answer, 1 filtered by "
                            "length (0 by characters, 1 by max_seq_len)); nothing was written.")


def test_a_stop_while_the_cache_is_put_in_place_waits_for_it(demo_sft, tmp_path, monkeypatch):
    """Ctrl-C after the earlier cache's manifest was removed and before the new one was written lost the earlier
    cache and left a half-renamed one: now the stop waits until the new cache is complete, then comes."""
    import signal

    import babyllama.data.sft_tokens as sft_tokens

    settings, real = SFTSettings(max_len=65), sft_tokens.write_json

    def stopped_first(path, data):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the files are renamed in
        real(path, data)

    monkeypatch.setattr(sft_tokens, "write_json", stopped_first)
    with pytest.raises(KeyboardInterrupt) as stop:
        build_sft_cache([demo_sft / "multi.jsonl"], demo_sft / "tok", tmp_path / "c", settings)
    assert type(stop.value) is KeyboardInterrupt  # not Completed: the cache of an sft run is not its whole output
    manifest = read_sft_cache(tmp_path / "c")
    assert manifest is not None and manifest["stats"]["samples"] > 0
    assert not [p.name for p in (tmp_path / "c").iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(sft_tokens, "write_json", real)
    assert build_sft_cache([demo_sft / "multi.jsonl"], demo_sft / "tok", tmp_path / "c", settings) == manifest


def test_bad_bytes_a_lone_surrogate_and_an_empty_conversations_list_each_say_what_they_are(demo_sft, tmp_path):
    """Bytes that are not UTF-8 were reported as a lone surrogate (\\ud800-\\udfff), which the file does not hold;
    an empty conversations list as an item that lacks a role, though it has no item."""
    lines = [b'{"instruction": "\xe9\x97\xae\xff\xfe", "output": "a"}', b'{"instruction": "q\\ud800", "output": "a"}',
             b'{"conversations": []}', b'{"conversations": {"role": "user"}}',
             b'{"conversations": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}',
             *(json.dumps({"instruction": "问", "output": "答"}, ensure_ascii=False).encode(),) * 2]  # mostly UTF-8
    f = tmp_path / "sft.jsonl"
    f.write_bytes(b"\n".join(lines))
    manifest = build_sft_cache([f], demo_sft / "tok", tmp_path / "c", SFTSettings(64, 0.0))
    assert (manifest["stats"]["bad"], manifest["stats"]["samples"]) == (5, 2)
    assert (tmp_path / "c" / "bad_records.txt").read_text().splitlines() == [
        f"{f}:1: its text holds bytes that are not text in the file's encoding (\\xff\\xfe)",
        f"{f}:2: its text holds a lone surrogate (\\ud800-\\udfff), which no tokenizer can encode",
        f"{f}:3: its 'conversations' list is empty: there is no message",
        f"{f}:4: its 'conversations' is an object, not a list of messages",
        f"{f}:5: conversations item 2: unknown role 'robot' (known: system, developer, user, human, assistant, gpt, "
        "chatgpt, bing, bard)"]


def test_a_huge_text_is_cut_as_whole_without_being_tokenized_whole(demo_sft, bpe_tokenizer, tmp_path, monkeypatch):
    """pretokenize --sft of one 2,000,000-character answer took 1 GB and 21 s to keep 129 ids: each record was
    rendered whole before it was cut. No text is now tokenized from more characters than the cut can keep
    (chat_format.bounded_ids): the samples are those of the whole texts, each counted truncated, and the length
    filters still see the whole texts."""
    huge = "".join(random.Random(0).choices("天地玄黄宇宙洪荒日月", k=50_000))
    f = tmp_path / "huge.jsonl"
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"instruction": "问", "output": huge}, {"instruction": huge, "output": "答"},
        {"conversations": [{"role": "system", "content": huge}, {"role": "user", "content": "问一"},
                           {"role": "assistant", "content": huge}, {"role": "user", "content": "问二"},
                           {"role": "assistant", "content": "答二"}]}]))
    settings = SFTSettings(max_len=65, val_fraction=0.0)
    lengths: list[int] = []
    encode = HFTokenizer._encode_many  # the worker's tokenizer is its own
    monkeypatch.setattr(HFTokenizer, "_encode_many", lambda tok, texts: lengths.extend(map(len, texts)) or
                        encode(tok, texts))
    build_sft_cache([f], demo_sft / "tok", tmp_path / "c", settings, workers=1)
    assert max(lengths) == (65 + CUT_MARGIN) * longest_piece(bpe_tokenizer)
    train, _, stats = load_sft_data([f], demo_sft / "tok", tmp_path / "c", settings, False, Dist())
    whole_texts(monkeypatch)
    want, _, cut = direct(f, bpe_tokenizer, settings)
    assert read_back(train) == want and stats.truncated == cut == 3 and max(lengths) >= len(huge)
    filtered = SFTSettings(max_len=65, val_fraction=0.0, max_answer_chars=len(huge) - 1)
    build_sft_cache([f], demo_sft / "tok", tmp_path / "c2", filtered, workers=1)
    _, _, stats = load_sft_data([f], demo_sft / "tok", tmp_path / "c2", filtered, False, Dist())
    assert (stats.filtered, stats.samples, stats.truncated) == (2, 1, 1)


REPLACE = ("import sys\n"
           "from babyllama.data.sft_tokens import SFTSettings, build_sft_cache\n"
           "build_sft_cache([sys.argv[1]], sys.argv[2], sys.argv[3], SFTSettings(max_len=65))\n")


def test_a_cache_replaced_while_a_run_reads_it_is_read_whole(demo_sft, tmp_path, monkeypatch):
    """A run that found a complete cache read its manifest, then its files, without holding the folder: another run
    that replaced the cache in between (an sft of other inputs, or pretokenize --sft) left it the files of another
    cache than its manifest, refused as damaged. It reads both while it holds the folder now: the other run waits
    (saying so), and replaces the cache once this one has mapped its files, which it keeps."""
    import subprocess
    import sys

    import babyllama.train.sft_data as sft_data

    settings, cache, multi = SFTSettings(max_len=65), tmp_path / "cache", demo_sft / "multi.jsonl"
    expected = read_back(load_sft_data([multi], demo_sft / "tok", cache, settings, False, Dist())[0])
    real, others = sft_data.read_sft_cache, []

    def read_then_replaced(out):
        manifest = real(out)
        if not others:  # the other run starts: it replaces the cache at once, or waits for this one
            other = subprocess.Popen([sys.executable, "-c", REPLACE, str(demo_sft / "demo" / "sft.jsonl"),
                                      str(demo_sft / "tok"), str(cache)], stdout=subprocess.PIPE, text=True)
            others.append(other)
            next((line for line in other.stdout if "waiting for another run building" in line), None)
        return manifest

    monkeypatch.setattr(sft_data, "read_sft_cache", read_then_replaced)
    try:
        train = load_sft_data([multi], demo_sft / "tok", cache, settings, False, Dist())[0]
    finally:
        others[0].communicate(timeout=60)
    assert read_back(train) == expected and others[0].returncode == 0
    assert real(cache)["stats"]["samples"] != len(expected)  # replaced by the other run, once this one had read it


def test_a_command_started_ignoring_ctrl_c_stops_on_it(demo_sft, sft_init, tmp_path):
    """A background job of a shell script (`babyllama sft ... &`) starts with SIGINT ignored (POSIX): eval, prepare,
    pretokenize and a cache build ran on through `kill -INT` (only training and DPO's precompute heard it). The CLI
    hears it for every command now: here an sft waiting for its token cache, which another process holds."""
    import signal
    import subprocess
    import sys

    from tests.test_lock import hold_in_child

    cache = tmp_path / "cache"
    holder = hold_in_child(cache, "pretokenize")
    proc = subprocess.Popen([sys.executable, "-m", "babyllama", "sft", "--init", sft_init, "--data",
                             demo_sft / "multi.jsonl", "--out_dir", tmp_path / "run", "--sft_cache", cache],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert next((line for line in proc.stdout if "waiting for another run building" in line), None)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        holder.communicate("")
    assert (proc.returncode, err.splitlines()[-1]) == (130, "babyllama: interrupted; run the same command to start "
                                                        "again (no checkpoint was saved yet).")


PAIR_OF_RANKS = ("import sys\n"
                 "from babyllama.data.sft_tokens import SFTSettings\n"
                 "from babyllama.errors import UserError\n"
                 "from babyllama.train.distributed import process_group\n"
                 "from babyllama.train.sft_data import load_sft_data\n"
                 "data, tok, cache = sys.argv[1:]\n"
                 "with process_group('cpu', timeout_s=20) as d:\n"
                 "    try:\n"
                 "        load_sft_data([data], tok, cache, SFTSettings(max_len=65), False, d)\n"
                 "    except UserError as e:\n"
                 "        print(type(e).__name__, e)\n")


def test_under_torchrun_a_cache_that_rank_0_refuses_ends_every_rank(demo_sft, tmp_path):
    """Rank 0 builds the token cache while the others wait for it in a collective; when it refused (here: no usable
    record), they waited on until torchrun stopped them, or ddp_timeout (another node's ranks, NCCL). Its refusal
    reaches them now: rank 0 says it once, and every rank raises AlreadySaid (exit code 2). Two gloo processes."""
    import socket
    import subprocess
    import sys

    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "no conversation"}\n' * 3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [subprocess.Popen([sys.executable, "-c", PAIR_OF_RANKS, data, demo_sft / "tok", tmp_path / "cache"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for rank in (0, 1)]
    try:
        said = [rank.communicate(timeout=120) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    refusal = (f"no usable SFT records in {data} (3 read, 3 bad, 0 with an empty answer, 0 filtered by length); "
               "nothing was written.")
    assert [out.splitlines()[-1] for out, _ in said] == [f"AlreadySaid {refusal}"] * 2, said
    assert [err.count("babyllama: error:") for _, err in said] == [1, 0]
    assert f"babyllama: error: {refusal}" in said[0][1]


def test_a_complete_cache_in_a_read_only_folder_is_read_without_its_lock(demo_sft, tmp_path, monkeypatch):
    """A cache built once and shared read-only (a cluster's mount) was read before reads took the folder's lock;
    no lock file can be made there, so it is read without one (no run can replace it); a writable one is locked."""
    import babyllama.train.sft_data as sft_data
    from babyllama.errors import UserError

    settings, cache, multi = SFTSettings(max_len=65), tmp_path / "cache", demo_sft / "multi.jsonl"
    expected = read_back(load_sft_data([multi], demo_sft / "tok", cache, settings, False, Dist())[0])

    def cannot_lock(out, *a):
        raise UserError(f"cannot write to {out}; choose another --sft_cache.")

    monkeypatch.setattr(sft_data, "locked", cannot_lock)  # root may write anywhere: the mount's refusal, as said
    with pytest.raises(UserError, match="cannot write"):  # a writable folder is read under its lock
        load_sft_data([multi], demo_sft / "tok", cache, settings, False, Dist())
    monkeypatch.setattr(sft_data.os, "access", lambda path, mode: mode != os.W_OK)
    assert read_back(load_sft_data([multi], demo_sft / "tok", cache, settings, False, Dist())[0]) == expected


def test_the_other_stages_records_first_stop_the_build_only_where_no_input_follows(demo_sft, tmp_path):
    """sft on a folder whose first file held 1,000 preference records and a later one SFT records stopped at the first
    batch ("the first 1,000 records of a_prefs.jsonl are preference records ..."), where before it skipped them as bad
    and trained on the rest: the first batch stops the build only where it is every record, or comes from the last
    input; else they are counted bad, and "no usable SFT records" names their kind."""
    from babyllama.data import sft_tokens

    n = sft_tokens.RECORDS_PER_BATCH
    data = tmp_path / "data"
    data.mkdir()
    pairs = "".join(json.dumps({"prompt": f"问{i}", "chosen": "好", "rejected": "坏"}) + "\n" for i in range(n))
    (data / "a_prefs.jsonl").write_text(pairs)
    (data / "b_sft.jsonl").write_text("".join(json.dumps({"instruction": f"问{i}", "output": "答"}) + "\n"
                                              for i in range(30)))
    settings = SFTSettings(max_len=64, val_fraction=0)
    manifest = build_sft_cache([data], demo_sft / "tok", tmp_path / "c", settings)
    assert (manifest["stats"]["records"], manifest["stats"]["bad"], manifest["stats"]["samples"]) == (n + 30, n, 30)
    (data / "b_sft.jsonl").write_text(json.dumps({"prompt": "问", "chosen": "好", "rejected": "坏"}) + "\n")
    with pytest.raises(UserError) as e:
        build_sft_cache([data], demo_sft / "tok", tmp_path / "d", settings)
    assert str(e.value) == (
        f"no usable SFT records in {data / 'a_prefs.jsonl'}, {data / 'b_sft.jsonl'} ({n + 1} read, {n + 1} bad, 0 with "
        f"an empty answer, 0 filtered by length); the first 1,000 records of {data / 'a_prefs.jsonl'} are preference "
        "records ('chosen' and 'rejected'), which `babyllama dpo` reads, not SFT records; nothing was written.")
    (data / "b_sft.jsonl").unlink()
    (data / "c_empty.jsonl").write_text("")
    (data / "a_prefs.jsonl").rename(data / "d_prefs.jsonl")  # the last input: nothing follows it
    with pytest.raises(UserError, match=r"^the first 1,000 records of .*d_prefs.jsonl are preference records "):
        build_sft_cache([data], demo_sft / "tok", tmp_path / "e", settings)
