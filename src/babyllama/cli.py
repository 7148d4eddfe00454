"""The `babyllama` command: argument parsing only; each command calls one function.

    babyllama tokenizer train --input corpus.txt --vocab-size 8192 --out runs/tok
    babyllama tokenizer info runs/tok
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from babyllama.errors import UserError


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from babyllama.data.sources import iter_texts
    from babyllama.tokenizer import train_bpe

    tok = train_bpe(iter_texts(args.input), args.vocab_size)
    tok.save(args.out)
    print(json.dumps({"saved": args.out, **tok.info()}, ensure_ascii=False, indent=2))


def cmd_tokenizer_info(args: argparse.Namespace) -> None:
    from pathlib import Path

    from babyllama.tokenizer import SAMPLE_TEXT, load_tokenizer

    tok = load_tokenizer(args.path)
    sample = SAMPLE_TEXT
    if args.sample:
        if not Path(args.sample).is_file():
            raise UserError(f"sample file {args.sample} does not exist.")
        sample = Path(args.sample).read_text(encoding="utf-8", errors="replace")
    info = tok.info(sample)
    print(json.dumps(info, ensure_ascii=False, indent=2))
    if info["token_dtype"] == "uint32":
        print(f"note: {tok.vocab_size} ids do not fit uint16, so token shards will be uint32 (twice the disk).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="babyllama", description="Pretrain and fine-tune a small Chinese LLaMA-2.")
    commands = parser.add_subparsers(dest="command", required=True)

    tok = commands.add_parser("tokenizer", help="train or inspect a tokenizer").add_subparsers(
        dest="action", required=True
    )
    p = tok.add_parser("train", help="train a byte-level BPE tokenizer")
    p.add_argument("--input", nargs="+", required=True, help=".txt (a document per line) or .jsonl (text field)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--out", required=True, help="directory for tokenizer.json")
    p.set_defaults(func=cmd_tokenizer_train)
    p = tok.add_parser("info", help="vocab size, special ids, token dtype, characters per token")
    p.add_argument("path", help="tokenizer directory, tokenizer.json or SentencePiece .model")
    p.add_argument("--sample", help="text file to measure characters per token on")
    p.set_defaults(func=cmd_tokenizer_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except UserError as e:
        print(f"babyllama: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("babyllama: interrupted", file=sys.stderr)
        return 130
    return 0
