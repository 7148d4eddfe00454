"""Every command of the README runs as written, in order, as on a fresh clone after `make demo`.

The README's bash blocks are cut into commands (a `\\` continues a line, `#` starts a comment), and
each python block is one snippet. Each either runs here, in order, in this process and in a fresh
directory that holds configs/ as a clone does, or is listed in NOT_RUN with its reason (a download,
a GPU, a cluster, an install). A README command in neither fails the test, as does a NOT_RUN entry
that matches no command, or a command that does not exit 0. The first block builds runs/demo stage
by stage, as `make demo` does. To take well under a minute or two:
  * `prepare --demo` builds the smoke demo's sliver of the corpus (demo.SMOKE's sizes);
  * pretrain, sft and dpo get the smoke demo's settings appended, as `--key value` (the README allows it),
    and 4 steps; `demo` gets --smoke;
  * eval gets `--limit 8 --max_new_tokens 8`, chat `--max_new_tokens 8`;
  * serve runs in a thread on a free port, which the python example then asks.
"""

from __future__ import annotations

import functools
import glob
import io
import logging
import re
import shlex
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("snownlp")
pytest.importorskip("fastapi")
pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]
NOT_RUN = {  # a command's beginning, as written: why it does not run here
    "python3 -m venv": "sets up a virtual environment",
    "pip install": "installs packages",
    "make demo": "the full demo: its stages run one by one below, on the smoke data",
    "make test": "the test suite itself",
    "babyllama prepare --input wikipedia-cn": "needs downloaded corpora",
    "babyllama prepare --input data/raw/": "needs downloaded corpora",
    "babyllama pretokenize --input data/clean --tokenizer runs/tok --out_dir data/tokens --engine datatrove":
        "reads data/clean, the downloaded WuDao corpus the line above cleans",
    "babyllama prepare --input /shared/wudao": "needs a Slurm cluster and downloaded corpora",
    "babyllama pretokenize --input /shared/clean": "needs a Ray cluster",
    "torchrun": "GPU recipes (the torchrun tests run DDP and FSDP on CPUs)",
    "babyllama sft --init runs/baby-92m/final": "needs a baby-92m model and downloaded SFT data",
    "babyllama pretokenize --sft --input alpaca_gpt4_data_zh.json": "needs downloaded SFT data",
    "babyllama eval runs/baby-92m-sft/final": "needs a baby-92m model and C-Eval",
    "babyllama export runs/baby-92m-sft/final": "needs a baby-92m model",
    "babyllama serve runs/baby-92m-sft/final": "needs a baby-92m model",
    "lm_eval": "needs C-Eval and CMMLU from the Hugging Face Hub",
    "python3 -c 'import csv, json, sys;": "reads C-Eval, a download (tests/test_lm_eval.py runs it on a sample)",
    "babyllama tokenizer info ../shared/chatglm2_tokenizer": "needs ChatGLM2's tokenizer.model",
    "babyllama pretokenize --input data/clean --tokenizer path/to/chatglm2": "needs downloaded corpora",
    "babyllama pretrain --config configs/baby-92m.toml": "a GPU recipe: 10 B tokens",
    "from babyllama.model import Transformer": "an API sketch: idx, targets, prompt_ids are the reader's",
}
SERVE = "http://127.0.0.1:8000"


def readme_commands() -> list[str]:
    """The README's commands in order: bash lines as written (comments dropped), python blocks whole."""
    commands = []
    for lang, body in re.findall(r"```(bash|python)\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        if lang == "python":
            commands.append(body)
            continue
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Runner:
    """Runs README commands in this process: `babyllama ...` through cli.main, python blocks by exec."""

    def __init__(self, monkeypatch):
        from babyllama.demo import SMOKE

        self.monkeypatch, self.port, self.servers, self.threads = monkeypatch, None, [], []
        short = ["--max_steps", "4", "--warmup_steps", "1"]  # after the smoke settings: these win
        self.extra = {"pretrain": [*SMOKE["pretrain"], *short], "sft": [*SMOKE["sft"], *short, "--data_workers", "1"],
                      "dpo": [*SMOKE["dpo"], *short, "--data_workers", "1"], "demo": ["--smoke"],
                      "eval": ["--limit", "8", "--max_new_tokens", "8"], "chat": ["--max_new_tokens", "8"]}
        import uvicorn

        run = uvicorn.Server.run  # serve's server runs in a thread, and the commands after it ask it
        monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets=None: self.serve_in_thread(server, run))

    def serve_in_thread(self, server, run) -> None:
        for name in ("uvicorn.error", "uvicorn.access"):  # its info lines would outlive the test's captured stdout
            logging.getLogger(name).setLevel(logging.WARNING)
        thread = threading.Thread(target=run, args=(server,), daemon=True)
        thread.start()
        self.threads.append(thread)
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        assert server.started
        self.servers.append(server)

    def run(self, command: str) -> None:
        if "\n" in command:  # a python block; the server it asks is the one started last
            exec(compile(command.replace(SERVE, f"http://127.0.0.1:{self.port}"), "README.md", "exec"), {})
            return
        words, stdin = shlex.split(command), "质量很好，物流也快，非常满意！\n"
        if "|" in words:
            pipe = words.index("|")
            assert words[0] == "echo" and pipe == 2, command
            stdin, words = words[1] + "\n", words[pipe + 1 :]
        assert words[0] == "babyllama", f"not run and not in NOT_RUN: {command}"
        argv = [match for w in words[1:] for match in (sorted(glob.glob(w)) if "*" in w else [w])]
        argv += self.extra.get(argv[0], [])
        if argv[0] == "serve":
            self.port = free_port()
            argv = [a for i, a in enumerate(argv) if "--port" not in argv[i - 1 : i + 1]] + ["--port", str(self.port)]
        from babyllama.cli import main

        self.monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
        assert main(argv) == 0, command

    def close(self) -> None:
        for server in self.servers:
            server.should_exit = True
        for thread in self.threads:
            thread.join(timeout=30)


def test_every_readme_command_runs_as_written(tmp_path, monkeypatch, capsys):
    from babyllama.data import demo_corpus
    from babyllama.demo import SMOKE

    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo_corpus, "build_demo_corpus", functools.partial(
        demo_corpus.build_demo_corpus, limit=SMOKE["limit"], eval_limit=SMOKE["eval_items"],
        preference_items=SMOKE["preference_items"]))
    commands, used, took = readme_commands(), set(), {}
    Path("runs/demo").mkdir(parents=True)  # what `make demo` (not run) leaves: its stages' folder, a smoke's here
    Path("runs/demo/demo.json").write_text('{"smoke": true}\n')
    runner = Runner(monkeypatch)
    start = time.time()
    try:
        for command in commands:
            skipped = [key for key in NOT_RUN if command.startswith(key)]
            used.update(skipped)
            if not skipped:
                began = time.time()
                runner.run(command)
                took[command[:60]] = time.time() - began
    finally:
        runner.close()
    assert set(NOT_RUN) == used, f"NOT_RUN entries that match no README command: {set(NOT_RUN) - used}"
    ran = len(commands) - sum(any(c.startswith(k) for k in NOT_RUN) for c in commands)
    assert ran >= 25, ran
    for made in ("runs/demo/report.md", "runs/demo/sft/eval/eval.json", "runs/pretrain/final", "runs/tok",
                 "runs/demo/pretrain-sft/final", "data/tokens/manifest.json", "runs/demo/demo.gguf"):
        assert Path(made).exists(), made
    print(f"{ran} README commands in {time.time() - start:.0f} s; the slowest:",
          sorted(took.items(), key=lambda kv: -kv[1])[:5])


def test_readme_training_commands_on_the_demo_data_warm_up_as_the_demo():
    """The LoRA examples had no --config, so they took the default 1,000 warmup steps for a run of a few hundred
    ("warmup covers the whole run"): every sft / dpo command on the demo's data warms up as its demo config."""
    from babyllama.cli import build_parser
    from babyllama.config import load_config

    demo = [shlex.split(c) for c in readme_commands() if c.startswith(("babyllama sft", "babyllama dpo"))
            and "runs/demo/data/" in c]
    assert len(demo) >= 3, demo
    for words in demo:
        args, overrides = build_parser().parse_known_args(words[1:])
        ours = load_config(args.config and ROOT / args.config, overrides).train.warmup_steps
        assert ours == load_config(ROOT / "configs" / f"{words[1]}-demo.toml").train.warmup_steps, shlex.join(words)


def test_readme_quotes_the_stop_message_as_printed(monkeypatch, capsys):
    """The README quoted SIGTERM's message without its start: it is the one main prints, word for word."""
    from babyllama import cli
    from babyllama.errors import Stopped

    def stopped(args):
        raise Stopped("stopped by SIGTERM at step N of M, checkpoint PATH", 15)

    monkeypatch.setattr(cli, "cmd_pretrain", stopped)
    assert cli.main(["pretrain"]) == 143
    printed = capsys.readouterr().err.strip()
    readme = " ".join((ROOT / "README.md").read_text().split())  # a quote may wrap
    assert f"`{printed}`" in readme, printed


def test_the_code_maps_order_holds_for_every_import():
    """The code map said a module imports only those above it, but clean.py imported shards.py, below it, at its
    top, and four modules import one below them inside a function. Each module's top-level imports are of modules
    above it in the map; those below it are inside a function (or for type hints), exactly the ones it names."""
    import ast

    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Code map"):]
    block = block[block.index("```\nsrc/babyllama/") + 4:]
    order = re.findall(r"^  (\S+\.py)", block[:block.index("```")], re.M)
    src = ROOT / "src" / "babyllama"
    assert sorted(order) == sorted(str(f.relative_to(src)) for f in src.rglob("*.py") if f.stem[0] != "_")
    place = {"babyllama." + p[:-3].replace("/", "."): i for i, p in enumerate(order)}
    below = set()
    for i, p in enumerate(order):
        tree = ast.parse((src / p).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("babyllama"):
                names = [node.module] if node.module in place else [f"{node.module}.{a.name}" for a in node.names]
            else:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in (n for n in names if place.get(n, -1) >= i):
                at_top = node in tree.body or any(node in ast.walk(s) for s in tree.body if isinstance(s, ast.Try))
                assert not at_top, f"{p} imports {name}, below it in the code map, at its top"
                below.add((p, name.removeprefix("babyllama.").replace(".", "/") + ".py"))
    assert below == {("tokenizer.py", "data/sources.py"), ("checkpoint.py", "data/sources.py"),
                     ("chat_format.py", "data/preferences.py"), ("data/sources.py", "data/preferences.py"),
                     ("data/sft_tokens.py", "data/preferences.py")}


def test_readme_multi_node_commands_number_processes_as_torchrun_does():
    """The README's 2-node commands passed --node_rank with --rdzv_backend c10d, which torchrun ignores ("node_rank is
    only used for static rdzv_backend"), as if node 0 ran rank 0; and kept --data and --out_dir on each node's own
    disk. A command of several nodes gives --node_rank only with the static rendezvous, and shared folders."""
    multi = [shlex.split(c) for c in readme_commands() if c.startswith("torchrun --nnodes")]
    assert multi
    for words in multi:
        static = words[words.index("--rdzv_backend") + 1] == "static" if "--rdzv_backend" in words else True
        assert ("--node_rank" in words) == static, words
        assert all(words[words.index(flag) + 1].startswith("/shared/") for flag in ("--data", "--out_dir")), words
