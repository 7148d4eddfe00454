"""Shared fixtures: tiny models and a tiny tokenizer trained on generated text."""

from __future__ import annotations

import io
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

import pytest
import torch

from babyllama.model import ModelConfig, Transformer

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # a suite started in the background (`make test &`,
    # nohup) ignores Ctrl-C, and so would every process it starts: the tests of Ctrl-C need it delivered
    signal.signal(signal.SIGINT, signal.default_int_handler)

CHATGLM2 = Path(__file__).resolve().parents[2] / "shared" / "chatglm2_tokenizer" / "tokenizer.model"
ROUNDTRIP_TEXTS = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "The quick brown fox jumps over the lazy dog.",
    "电话 13800138000, 价格 3.14159 元, 2024年",
    "emoji 😀🚀👨‍👩‍👧 and ✓",
    "rare CJK Ext-B: 𠀀𠀁𪚥𡃁",
    "  odd\twhitespace\n\n  \u3000全角空格\r\n trailing  ",
    "</s> and <s> spelled in text",
]


def tiny_config(**overrides) -> ModelConfig:
    base = dict(dim=64, n_layers=2, n_heads=4, vocab_size=300, max_seq_len=64, multiple_of=16)
    return ModelConfig(**{**base, **overrides})


def sharp_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A random model with large weights, so greedy decoding does not repeat one token."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(std=0.3)
    return model.eval()


def poison(file: Path, value: float = float("nan"), part: str = "") -> str:
    """Put value (NaN, Inf) into one element of the first tensor of the safetensors file whose name holds part, as
    a hand edit or a flipped bit would; returns the tensor's name."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(file))
    name = sorted(k for k in tensors if part in k)[0]
    tensors[name].view(-1)[0] = value
    save_file(tensors, str(file), metadata={"format": "pt"})
    return name


def not_finite(file: Path, name: str) -> str:
    """What the CLI says of a weights file whose tensor name holds NaN or Inf (weights_file.read_safetensors)."""
    return (f"babyllama: error: {file} is damaged: its tensor {name} holds NaN or Inf, which training never saves; "
            "restore the checkpoint from a copy or use another one.\n")


def generated_corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    zh = (
        "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种"
        "面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本"
        "去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比"
        "或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总"
        "次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做"
        "必战先回则任取据处队南给色光门即保治北造百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权"
        "收证改清己美再采转更单风切打白教速花带安场身车例真务具万每目至达走积示议声报斗完类八离华名确才科张信"
        "马节话米整空元况今集温传土许步群广石记需段研界拉林律叫且究观越织装影算低持音众书布复容儿须际商非验连"
        "断深难近矿千周委素技备半办青省列习响约支般史感劳便团往酸历市克何除消构府称太准精值号率族维划选标写存"
        "候毛亲快效斯院查江型眼王按格养易置派层片始却专状育厂京识适属圆包火住调满县局照参红细引听该铁价严"
    )
    en = "the of and to in is was for on are with as by at from that this have which one all were".split()
    docs = []
    for _ in range(n):
        words = [rng.choice(zh) + rng.choice(zh) if rng.random() < 0.7 else rng.choice(en) for _ in range(30)]
        docs.append("".join(w if w.isascii() is False else f" {w} " for w in words).strip() + "。")
    return docs


@pytest.fixture(scope="session")
def bpe_tokenizer():
    from babyllama.tokenizer import train_bpe

    return train_bpe(generated_corpus(), vocab_size=600)


def simulate_death(straight: Path, died: Path, step: int) -> None:
    """Make `died` look like `straight` killed right after step: its checkpoint and metrics up to it."""
    import json
    import shutil

    name = f"step_{step:06d}"
    shutil.copytree(straight / "checkpoints" / name, died / "checkpoints" / name)
    lines = [x for x in (straight / "metrics.jsonl").read_text().splitlines() if json.loads(x)["step"] <= step]
    (died / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def logged_losses(out: Path) -> dict[int, float]:
    import json

    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").open()) if "loss" in r}


def favours_control_ids(model, favoured: dict[int, float]):
    """The model with its logits raised by `favoured` ({id: amount}), as an SFT model that ranks <s> first."""
    bias = torch.zeros(model.cfg.vocab_size)
    for i, amount in favoured.items():
        bias[i] = amount
    model.output.register_forward_hook(lambda module, inputs, logits: logits + bias.to(logits.device))
    return model


def run_cli(*args: str | Path, stdin: str | bytes = "") -> subprocess.CompletedProcess:
    """`babyllama ARGS` run in this process through cli.main, as a pipe runs it: stdin given, stdout and stderr
    (with the log lines that main's logging.basicConfig sends there) captured as text, and argparse's exit code.
    A `python -m babyllama` process imports torch again, seconds a call; the tests about the process itself
    (exit status, signals, torchrun, a pipe into chat, the demo end to end) start one."""
    from babyllama.cli import main

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root, level = logging.getLogger(), logging.getLogger().level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    raw = stdin.encode() if isinstance(stdin, str) else stdin
    pipe = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8")  # as from a UTF-8 locale's pipe
    try:
        with mock.patch.object(sys, "stdin", pipe), redirect_stdout(out), \
                redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse's usage errors
                code = e.code
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return subprocess.CompletedProcess([str(a) for a in args], code, out.getvalue(), err.getvalue())


def refuse_writes(monkeypatch, name: str, code: int, text: bool = False) -> None:
    """Path.open of a file called name opens it for writing, but every write raises OSError(code) (ENOSPC: a full
    disk, EACCES: a folder not writable); text: a text file, as prepare's parts are."""
    real_open = Path.open

    class Refused(io.FileIO):
        def write(self, data) -> int:
            raise OSError(code, os.strerror(code))

    def open_(self, mode="r", *args, **kwargs):
        if self.name != name:
            return real_open(self, mode, *args, **kwargs)
        return io.TextIOWrapper(Refused(self, "w")) if text else Refused(self, "w")

    monkeypatch.setattr(Path, "open", open_)


def running(model, tokenizer, name: str = "tiny"):
    """A live uvicorn serving build_app(model, tokenizer, name) on a free port, as serve does: yields its URL."""
    import uvicorn

    from babyllama.serve import build_app, uvicorn_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn_config(build_app(model, tokenizer, name), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)
