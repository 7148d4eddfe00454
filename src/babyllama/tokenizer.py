"""Tokenizers behind one interface: a byte-level BPE trained here, any SentencePiece .model
(ChatGLM2's included), or a Hugging Face tokenizer.json / tokenizer directory.

    babyllama tokenizer train --input corpus.jsonl --vocab_size 8192 --out_dir runs/tok
    babyllama tokenizer info runs/tok            # or ../shared/chatglm2_tokenizer/tokenizer.model

    tok = load_tokenizer("runs/tok"); ids = tok.encode("你好", eos=True); tok.decode(ids)
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import json
import logging
import os
import random
import re
import shutil
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from babyllama.errors import UserError, agree, not_a_file, write_whole, writing

if TYPE_CHECKING:
    from babyllama.data.sources import BytesRead

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2: the same layout as ChatGLM2 (pad/unk=0, bos=1, eos=2)
META_FILE = "babyllama_tokenizer.json"
RECORDED = ("fingerprint", "vocab_size", "bos_id", "eos_id", "pad_id")  # what checkpoints and token directories keep
log = logging.getLogger(__name__)
LFS_POINTER = b"version https://git-lfs.github.com/spec/"  # what a clone without git-lfs leaves
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a byte-fallback token (SentencePiece, Llama's tokenizer.json)
SAMPLE_TEXT = (
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。\n"
    "中华人民共和国成立于1949年10月1日，首都是北京。\n"
    "人工智能是计算机科学的一个分支，它企图了解智能的实质。\n"
    "Large language models are trained on trillions of tokens.\n"
)
BUILT_IN_SAMPLE = "SAMPLE_TEXT, 4 built-in lines, not the training data (measure yours: tokenizer info --sample)"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32 (twice the disk)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class Tokenizer:
    """What every tokenizer offers; ids are plain Python ints."""

    kind: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    fingerprint: str  # changes with the vocabulary and merges (record() adds the special ids, kept apart for HF)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self.encode_batch([text], bos, eos)[0]

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        out = self._encode_many(list(texts))  # in parallel threads, inside the library
        return [[self.bos_id] * bos + ids + [self.eos_id] * eos for ids in out]

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def decode_complete(self, ids: Sequence[int]) -> str:
        """decode(ids) less an incomplete UTF-8 sequence at its end: the text of a generation that
        max_new_tokens cut inside a character, which decode shows as U+FFFD (one per byte for
        SentencePiece). The bytes are completed with continuation bytes, and the character they
        complete is dropped; a U+FFFD that no continuation completes (bytes that are not UTF-8, or
        the character U+FFFD itself) stays."""
        text = self.decode(ids)
        cont = self._byte_id(0x80)
        if not text.endswith("\ufffd") or cont is None:  # pieces that are all text never cut a character
            return text
        for second in (cont, self._byte_id(0xA0)):  # after E0 and F0 at least A0 / 90; after ED and F4 below A0
            for more in range(3):
                done = self.decode([*ids, second, *[cont] * more])
                if not done.endswith("\ufffd"):
                    return done[:-1]
        return text

    def _byte_id(self, value: int) -> int | None:
        """The id that stands for the single byte `value`, or None when the vocabulary has none."""
        raise NotImplementedError

    def save(self, out_dir: str | Path) -> None:
        raise NotImplementedError

    @functools.cache  # noqa: B019 - a handful of tokenizers live for the whole process
    def token_bytes(self) -> np.ndarray:
        """(2, vocab_size) int64: the UTF-8 bytes each id adds to the text of its document, for bits per byte.

        Row 0 is an id inside a document, row 1 an id that starts one (it follows <eos>, <s> or
        another control id): SentencePiece and Llama-style tokenizers add a dummy prefix `▁` that
        decoding drops there, and keep as a space elsewhere. Each entry is the growth of the decoded
        text: row 1 is len(decode([id])), row 0 len(decode([a, id])) - len(decode([a])) after a plain
        letter a. A byte token (`<0xE4>`, a byte-level BPE's piece) counts its bytes, control and
        unknown ids 0, so a document's counts add up to the UTF-8 length of its decoded text.
        """
        ids = [[i] for i in range(self.vocab_size)]
        anchor = self.anchor_id()
        first = [len(s.encode()) for s in self._decode_each(ids)]
        base = len(self._decode_each([[anchor]])[0].encode())
        inside = [len(s.encode()) - base for s in self._decode_each([[anchor, i] for i in range(self.vocab_size)])]
        out = np.array([inside, first], dtype=np.int64)
        for i, raw in self._byte_tokens().items():
            out[:, i] = len(raw)
        out[:, self.control_ids() + self._unknown_ids()] = 0
        return out

    def text_bytes(self, before: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """The UTF-8 bytes each of `ids` adds to the text, given the id before each (same shape).

        A document starts after <eos> or a control id (<s>); summed over whole documents this is
        the UTF-8 length of their decoded text, the denominator of bits per byte.
        """
        starts = np.isin(before, sorted({self.eos_id, *self.control_ids()}))
        return self.token_bytes()[starts.astype(np.int64), ids]

    @functools.cache  # noqa: B019 - a handful of tokenizers live for the whole process
    def id_bytes(self) -> tuple[bytes | None, ...]:
        """Per id, the bytes it adds to a text inside it (UTF-8: `▁的` is b" \\xe7\\x9a\\x84", the space kept), as
        token_bytes measures them; a byte piece (`<0xE4>`, a byte-level BPE's `æĬ`) gives its raw bytes, which may
        be only part of a character. None for an id that adds no text: <eos>, control and unknown ids. All ids
        are decoded once, in one batch (a fraction of a second for ChatGLM2's 64,793)."""
        anchor = self.anchor_id()
        base = len(self._decode_each([[anchor]])[0])
        inside = self._decode_each([[anchor, i] for i in range(self.vocab_size)])
        raw, textless = self._byte_tokens(), {self.eos_id, *self.control_ids(), *self._unknown_ids()}
        return tuple(None if i in textless else raw.get(i, text[base:].encode()) or None
                     for i, text in enumerate(inside))

    def _decode_each(self, batch: list[list[int]]) -> list[str]:
        raise NotImplementedError

    def anchor_id(self) -> int:
        """A token that decodes to one plain character whatever follows it: put before ids, it makes them
        decode as inside a document (row 0 of token_bytes, chat.decode_stream's window)."""
        for text in ("a", "e", "0", "的", "."):
            i = self._piece_id(text)
            if i is not None and self._decode_each([[i]])[0] == text:
                return i
        raise UserError("the tokenizer has no single-character token for a, e, 0, 的 or '.'; "
                        "bits per byte cannot be measured with it.")

    def _piece_id(self, piece: str) -> int | None:
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str:
        """The vocabulary's string for id i (`<s>`, `▁的`, `<0xE4>`), as HF's convert_ids_to_tokens."""
        raise NotImplementedError

    def special_tokens(self) -> dict[str, str]:
        """{"bos_token": "<s>", "eos_token": "</s>", "pad_token": ...}: Hugging Face's names and strings."""
        return {f"{k}_token": self.id_to_piece(getattr(self, f"{k}_id")) for k in ("bos", "eos", "pad")}

    def _byte_tokens(self) -> dict[int, bytes]:
        """{id: its bytes} of the ids that stand for raw bytes rather than text."""
        raise NotImplementedError

    def _unknown_ids(self) -> list[int]:
        return []

    def grouped_byte_ids(self) -> frozenset[int]:
        """Byte pieces that decode as one run, and the special ids that decoding skips inside a run: Hugging
        Face's ByteFallback decoder (Llama 2's) turns a whole run of byte pieces into one U+FFFD per byte
        when any byte of the run is not UTF-8, so text decoded from a cut inside a run can differ
        (chat.decode_stream never cuts before one). Empty for the other tokenizers, whose bytes decode alike
        from any character boundary."""
        return frozenset()

    def control_ids(self) -> list[int]:
        """The special ids other than eos (bos, pad, unk, ...): never training targets."""
        raise NotImplementedError

    @functools.cache  # noqa: B019 - a handful of tokenizers live for the whole process
    def suppress_tokens(self, model_vocab_size: int) -> tuple[int, ...]:
        """Ids that generation must never produce (HF generate's `suppress_tokens`): the control ids
        and the model's ids beyond the tokenizer's vocabulary (ChatGLM2's 64789 pieces in 64793 rows)."""
        return tuple(sorted({*self.control_ids(), *range(self.vocab_size, model_vocab_size)} - {self.eos_id}))

    def generation_kwargs(self, model_vocab_size: int) -> dict:
        """What model.stream needs from the tokenizer: where to stop, and what never to produce."""
        return {"eos_id": self.eos_id, "suppress_tokens": self.suppress_tokens(model_vocab_size)}

    def record(self) -> dict:
        """What a checkpoint or token directory records of its tokenizer, to be compared (differences) when read:
        the fingerprint, and the special ids, which a tokenizer.json's fingerprint leaves out (they live in
        babyllama_tokenizer.json or tokenizer_config.json)."""
        return {k: getattr(self, k) for k in RECORDED}

    def differences(self, recorded: dict | None) -> tuple[str, str] | None:
        """None when this tokenizer is the one `recorded` (a record()) describes, else the values that differ,
        this tokenizer's and the recorded ones, in words: ("eos_id 1", "eos_id 2"). Values a record lacks (one
        written by an older babyllama: only fingerprint and vocab_size) are not compared."""
        mine = self.record()
        differ = [k for k in RECORDED if k in (recorded or {}) and recorded[k] != mine[k]]
        if not differ:
            return None
        return ", ".join(f"{k} {mine[k]}" for k in differ), ", ".join(f"{k} {recorded[k]}" for k in differ)

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)

    def info(self, sample: Iterable[str] = (SAMPLE_TEXT,), sample_name: str = BUILT_IN_SAMPLE) -> dict:
        """What `tokenizer info` and `tokenizer train` print: the ids, the token dtype, the fingerprint, characters
        per token on the lines of sample's documents (measure), and sample_name, what the sample is (by default 4
        built-in lines, which a user took for the training data when it was not said)."""
        chars, n_tokens = self.measure(sample)
        return {
            "kind": self.kind, "vocab_size": self.vocab_size, "bos_id": self.bos_id,
            "eos_id": self.eos_id, "pad_id": self.pad_id, "token_dtype": self.dtype.name,
            "fingerprint": self.fingerprint,
            "chars_per_token": round(chars / max(n_tokens, 1), 3),
            "chars_per_token_of": sample_name,
        }

    def measure(self, documents: Iterable[str]) -> tuple[int, int]:
        """(characters, tokens) of documents: their characters less newlines, and the tokens of their lines
        (str.splitlines), each encoded alone, without bos or eos. The documents are read one at a time, a line over
        PIECE_CHARS is cut as pretokenize cuts a long document (text_pieces: our byte-level BPE gives the whole line's
        ids), and the pieces are encoded a batch of about MEASURE_BATCH characters at a time: memory stays flat
        whatever the sample's size (holding a 20 MB sample took 1.1 GB) or its lines' (a line of 12 MB took 1.5 GB,
        now 0.3 GB as 50 k lines of the same bytes), beside the text of the document read."""
        chars = n_tokens = held = 0
        batch: list[str] = []
        for text in documents:
            chars += len(text) - text.count("\n")
            for line in text.splitlines():
                for piece in text_pieces(line, PIECE_CHARS, self):
                    batch.append(piece)
                    held += len(piece)
                    if held >= MEASURE_BATCH:
                        n_tokens += sum(map(len, self.encode_batch(batch)))
                        batch, held = [], 0
        return chars, n_tokens + sum(map(len, self.encode_batch(batch)))


MEASURE_BATCH = 1 << 20  # characters of lines that Tokenizer.measure encodes at once, in the library's threads


PIECE_CHARS = 1 << 16  # a longer document is encoded in pieces of at most this many characters (text_pieces)
# Where a piece may end: between a character of punctuation or a symbol and a letter or digit, or the other way round
# (not after an apostrophe: 's), or before a space between two other characters. Byte-level BPE (babyllama's own,
# GPT-2's pre-tokens) makes no token across such a cut, so the pieces' ids joined are the whole's.
PIECE_CUT = re.compile(r"(?<=[^\s\w'])(?=[^\W_])|(?<=[^\W_])(?=[^\s\w])|(?<=\S)(?= \S)")
SYNC_CHARS = 256  # the context each side of a cut without PIECE_CUT that sync_cut tokenizes (doubled until 16x)
SYNC_IDS = 16  # the ids after a cut that both of sync_cut's tokenizations must have alike


def text_pieces(text: str, size: int, tok: Tokenizer) -> Iterator[str]:
    """text cut into pieces of at most size characters, each ending at the last cut (PIECE_CUT) in its second half,
    else where tokenizations agree there is a token boundary (sync_cut), else at size characters; text itself when it
    is no longer (a text of one piece is encoded as before). The ids of the pieces joined are those of the whole for
    our byte-level BPE (train_bpe's, GPT-2's pre-tokens); a hard cut at size characters (no PIECE_CUT in size / 2
    characters and no agreement within 16 * SYNC_CHARS of it, or ids whose bytes do not add up: sync_cut) may change a
    token there; a SentencePiece model, or an HF tokenizer that puts "▁" before a text, may differ at each cut by a
    token or two (its "▁" before each piece's start)."""
    start = 0
    while len(text) - start > size:
        cuts = [m.start() for m in PIECE_CUT.finditer(text, start + size // 2, start + size)]
        end = cuts[-1] if cuts else sync_cut(tok, text, start + size - size // 4, start + size)
        yield text[start:end]
        start = end
    yield text[start:]


def sync_cut(tok: Tokenizer, text: str, at: int, limit: int) -> int:
    """A place in text[at:limit] where a token boundary of the whole text's ids is, as two tokenizations tell it:
    of the text around `at` (context characters each side) and of the text from `at` on (to 2 * context), which have
    other context on each side. The first place from `at` on where both have a boundary and their next SYNC_IDS ids
    are alike: BPE merges depend on the text near them only, so that ids synchronized there after other beginnings
    are those of any longer context. With context SYNC_CHARS, doubled while they do not synchronize, up to 16 times;
    then limit (a hard cut). Also limit at once where the ids' bytes do not add up to their text's (token_ends: an
    unknown id, a normalizer), so that no end is known: a larger context holds the same text."""
    context = SYNC_CHARS
    while context <= 16 * SYNC_CHARS:
        lo = max(at - context, 0)
        around, after = tok.encode_batch([text[lo: at + context], text[at: at + 2 * context]])
        ends_around = token_ends(tok, around, text[lo: at + context])
        ends_after = token_ends(tok, after, text[at: at + 2 * context])
        if ends_around is None or ends_after is None:
            return limit
        ends_around = ends_around - (at - lo)
        for end in np.intersect1d(ends_around[(ends_around > 0) & (ends_around < min(context, limit - at))],
                                  ends_after):
            i, j = np.flatnonzero(ends_around == end)[0] + 1, np.flatnonzero(ends_after == end)[0] + 1
            if around[i: i + SYNC_IDS] == after[j: j + SYNC_IDS] and len(around) - i > SYNC_IDS:
                return at + int(end)
        context *= 2
    return limit


def token_ends(tok: Tokenizer, ids: list[int], text: str) -> np.ndarray | None:
    """(len(ids),) int64: the character of text each id ends at (exclusive), -1 where an id ends inside a character
    (a byte-level piece), by the bytes each id adds (Tokenizer.token_bytes; the first id's as a document's first, so
    SentencePiece's "▁" before it counts nothing). None where they do not add up to text's UTF-8 length: an unknown
    id counts 0 bytes, a normalizer changes the text, a prefix that decoding keeps adds one; then an end may be
    anywhere, and none is trusted."""
    if not ids:
        return np.zeros(0, dtype=np.int64)
    sizes = tok.token_bytes()[0, ids]
    sizes[0] = tok.token_bytes()[1, ids[0]]
    ends, char_ends = np.cumsum(sizes), np.cumsum([len(c.encode()) for c in text])
    if not len(char_ends) or ends[-1] != char_ends[-1]:
        return None
    at = np.searchsorted(char_ends, ends)
    whole = (at < len(char_ends)) & (char_ends[np.minimum(at, len(char_ends) - 1)] == ends)
    return np.where(whole, at + 1, -1)



class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer: our own BPE, or any tokenizer.json."""

    kind = "hf"

    def __init__(self, tok, bos_id: int, eos_id: int, pad_id: int):
        self.tok = tok
        self.tok.encode_special_tokens = True  # text that spells "</s>" stays text, never a control id
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.fingerprint = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def _decode_each(self, batch: list[list[int]]) -> list[str]:
        return self.tok.decode_batch(batch, skip_special_tokens=True)

    def _piece_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

    def id_to_piece(self, i: int) -> str:
        return self.tok.id_to_token(i)

    def _byte_id(self, value: int) -> int | None:
        from tokenizers import decoders

        if isinstance(self.tok.decoder, decoders.ByteLevel):
            return self.tok.token_to_id(byte_level_char(value))
        piece = f"<0x{value:02X}>"
        i = self.tok.token_to_id(piece)
        return i if i is not None and self.decode([i]) != piece else None  # a decoder that makes it a byte

    def _byte_tokens(self) -> dict[int, bytes]:
        """A byte-level BPE's pieces (a character per byte), or a byte-fallback vocabulary's <0xE4>."""
        from tokenizers import decoders

        pieces = {i: self.tok.id_to_token(i) for i in range(self.vocab_size)}
        if isinstance(self.tok.decoder, decoders.ByteLevel):
            byte = {byte_level_char(b): b for b in range(256)}
            return {i: bytes(byte[c] for c in p) for i, p in pieces.items() if p is not None and set(p) <= byte.keys()}
        fallback = [i for i, p in pieces.items() if p is not None and BYTE_PIECE.fullmatch(p)]
        return {i: bytes([int(pieces[i][3:5], 16)]) for i, text in
                zip(fallback, self._decode_each([[i] for i in fallback]), strict=True)
                if text != pieces[i]}  # a decoder that turns <0xE4> into a byte, not into its spelling

    @functools.cache  # noqa: B019 - a handful of tokenizers live for the whole process
    def grouped_byte_ids(self) -> frozenset[int]:
        from tokenizers import decoders

        if isinstance(self.tok.decoder, decoders.ByteLevel) or not self._byte_tokens():
            return frozenset()
        skipped = (i for i, t in self.tok.get_added_tokens_decoder().items() if t.special)  # decode drops them first
        return frozenset([*self._byte_tokens(), *skipped])

    def control_ids(self) -> list[int]:
        added = self.tok.get_added_tokens_decoder()
        return sorted({i for i, t in added.items() if t.special} | {self.bos_id, self.pad_id} - {self.eos_id})

    def save(self, out_dir: str | Path) -> None:
        """tokenizer.json (as tokenizers' save writes it) and META_FILE in out_dir, each whole or not at all;
        CannotWrite where the disk refuses them."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_whole(out / "tokenizer.json", self.tok.to_str(pretty=True))
        specials = {"bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}
        write_whole(out / META_FILE, json.dumps(specials, indent=2) + "\n")


class SPTokenizer(Tokenizer):
    """A SentencePiece model, such as ChatGLM2's tokenizer.model (pad = unk = 0 when it has no pad)."""

    kind = "sentencepiece"

    def __init__(self, path: Path):
        import sentencepiece as spm

        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise not_loadable(path, "SentencePiece model", e) from None
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else max(self.sp.unk_id(), 0)
        if self.bos_id < 0 or self.eos_id < 0:
            raise UserError(f"SentencePiece model {path} has no bos or eos piece; train it with them.")
        self.fingerprint = hashlib.sha256(self.sp.serialized_model_proto()).hexdigest()[:16]

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        single = os.environ.get("TOKENIZERS_PARALLELISM", "").lower() == "false"  # as HF tokenizers
        return self.sp.encode(texts, num_threads=1 if single else os.cpu_count() or 1)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([i for i in ids if i < self.vocab_size])

    def _decode_each(self, batch: list[list[int]]) -> list[str]:
        return self.sp.decode(batch)

    def _piece_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return None if self.sp.is_unknown(i) else i

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def _byte_id(self, value: int) -> int | None:
        i = self.sp.piece_to_id(f"<0x{value:02X}>")
        return i if self.sp.is_byte(i) else None

    def _byte_tokens(self) -> dict[int, bytes]:
        return {i: bytes([int(self.sp.id_to_piece(i)[3:5], 16)]) for i in range(self.vocab_size) if self.sp.is_byte(i)}

    def _unknown_ids(self) -> list[int]:
        return [i for i in range(self.vocab_size) if self.sp.is_unknown(i)]

    def control_ids(self) -> list[int]:
        specials = (i for i in range(self.vocab_size) if self.sp.is_control(i) or self.sp.is_unknown(i))
        return sorted({*specials, self.bos_id, self.pad_id} - {self.eos_id})

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if Path(self.path).resolve() != (out / "tokenizer.model").resolve():
            tmp = out / ".tokenizer.model.tmp"
            with writing(out / "tokenizer.model", tmp):  # CannotWrite where the disk refuses it
                shutil.copyfile(self.path, tmp)
                tmp.replace(out / "tokenizer.model")


@functools.cache
def byte_level_char(value: int) -> str:
    """The character that spells byte `value` in a byte-level BPE's pieces (GPT-2's bytes_to_unicode); cached: a cut
    answer asks it per byte id (decode_complete), and building the table took a fifth of an SFT cache's build."""
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return chr(value) if value in shown else chr(256 + [b for b in range(256) if b not in shown].index(value))


def load_tokenizer(path: str | Path, remedy: str = "") -> Tokenizer:
    """A tokenizer from a directory (ours, a checkpoint, or HF), a tokenizer.json or a .model file.

    Raises UserError when there is none at path, ending with `remedy`: what to do, in the terms of the
    caller's options (default: pass another path, as a command whose argument is the tokenizer says)."""
    p = Path(path)
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return _load_hf(p / "tokenizer.json")
        if (p / "tokenizer.model").is_file():
            return SPTokenizer(p / "tokenizer.model")
        raise UserError(f"{p} has neither tokenizer.json nor tokenizer.model; "
                        f"{remedy or 'pass a tokenizer directory or file'}.")
    if not p.is_file():
        raise UserError(f"tokenizer {p} {not_a_file(p)}; "
                        f"{remedy or 'train one with `babyllama tokenizer train` or pass a path'}.")
    if p.suffix == ".json":
        return _load_hf(p)
    if p.suffix == ".model":
        return SPTokenizer(p)
    raise UserError(f"{p} is not a tokenizer: expected tokenizer.json or a SentencePiece .model file.")


def _load_hf(path: Path) -> HFTokenizer:
    from tokenizers import Tokenizer as RustTokenizer

    try:
        tok = RustTokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises a bare Exception on bad files
        raise not_loadable(path, "tokenizer.json", e) from None
    meta = path.parent / META_FILE
    if meta.is_file():
        return HFTokenizer(tok, *_special_ids(meta, tok.get_vocab_size(with_added_tokens=True)))
    return HFTokenizer(tok, *_guess_special_ids(tok, path))


def _special_ids(meta: Path, vocab_size: int) -> tuple[int, int, int]:
    """bos, eos and pad of babyllama_tokenizer.json, each checked to be an id of the vocabulary."""
    ids = read_json(meta)
    names = ("bos_id", "eos_id", "pad_id")
    values = [ids.get(k) if isinstance(ids, dict) else None for k in names]
    for name, v in zip(names, values, strict=True):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < vocab_size:
            raise UserError(f"{meta} must hold bos_id, eos_id and pad_id as ids in [0, {vocab_size}); {name} is {v!r}.")
    return values[0], values[1], values[2]


def not_loadable(path: Path, kind: str, error: Exception) -> UserError:
    """One sentence for a tokenizer file that does not load; a git-lfs pointer (a clone without LFS) is named."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(LFS_POINTER))
    except OSError:
        head = b""
    if head == LFS_POINTER:
        return UserError(f"{path} is a git-lfs pointer, not the {kind} itself: run `git lfs pull` in its "
                         "repository or download the file.")
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UserError(f"{path} is not a valid {kind} ({reason}).")


def read_json(path: Path):
    """A tokenizer's JSON side file, or one sentence naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:  # UnicodeDecodeError is a ValueError
        raise not_loadable(path, "JSON file", e) from None


def _guess_special_ids(tok, path: Path) -> tuple[int, int, int]:
    """bos/eos/pad of a foreign tokenizer.json, from tokenizer_config.json or common names."""
    names: dict[str, str | None] = {}
    cfg_file = path.parent / "tokenizer_config.json"
    if cfg_file.is_file():
        cfg = read_json(cfg_file)
        if not isinstance(cfg, dict):
            raise UserError(f"{cfg_file} must hold a JSON object.")
        for key in ("bos_token", "eos_token", "pad_token"):
            value = cfg.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            names[key] = value if isinstance(value, str) else None
    candidates = {
        "bos_token": ["<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>", "[CLS]"],
        "eos_token": ["</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>", "[SEP]"],
        "pad_token": ["<pad>", "<unk>", "[PAD]", "<|endoftext|>"],
    }
    ids = []
    for key, options in candidates.items():
        found = [tok.token_to_id(n) for n in [names.get(key), *options] if n]
        found = [i for i in found if i is not None]
        if not found and key != "pad_token":
            raise UserError(f"{path} has no {key.split('_')[0]} token; name it in tokenizer_config.json.")
        ids.append(found[0] if found else ids[-1])  # no pad: pad with eos
    return ids[0], ids[1], ids[2]


MAX_RUN = 16  # characters: the longest run in a pre-token while training
# GPT-2's split (what ByteLevel's use_regex applies), with every run bounded: one 200,000-character run
# of Chinese without punctuation made BPE training quadratic in its length (74 s against 0.8 s)
PRE_TOKEN = (rf"'s|'t|'re|'ve|'m|'ll|'d| ?\p{{L}}{{1,{MAX_RUN}}}| ?\p{{N}}{{1,{MAX_RUN}}}"
             rf"| ?[^\s\p{{L}}\p{{N}}]{{1,{MAX_RUN}}}|\s{{1,{MAX_RUN}}}(?!\S)|\s{{1,{MAX_RUN}}}")


def training_pre_tokenizer():
    """GPT-2's pre-tokens with runs of at most MAX_RUN characters, as bytes (lossless)."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRE_TOKEN), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


MAX_TRAIN_BYTES = 32 << 20  # of text (UTF-8) that training sees by default: about 3 GB of memory (bench/RESULTS.md)
MiB = 1 << 20


def training_sample(documents: Iterable[str], max_bytes: int = MAX_TRAIN_BYTES, seed: int = 0,
                    read: BytesRead | None = None) -> list[str]:
    """A uniform random sample of documents holding at most max_bytes of UTF-8 text (0: no bound), in their order:
    every document when they hold no more. Read once, with a progress bar of bytes and the documents so far, and
    logged (documents and MiB sampled, of how many). read: the BytesRead of the files the documents come from (a
    CorpusReader's), whose count and total the bar shows, so that it has a percentage and an ETA; without it the bar
    counts the bytes of text, of no total.

    BPE training holds every distinct pre-token, and Chinese ones are mostly distinct: about 90 bytes of memory per
    byte of real text, 125 of random characters (bench/RESULTS.md); the sample bounds it, as SentencePiece's
    input_sentence_size bounds its trainer's (Kudo and Richardson 2018: there a count of sentences, reservoir-sampled
    in one pass). Each document draws a key from Random(seed) in turn; the sample is the documents of the smallest
    keys, in key order up to the first whose bytes do not fit: a simple random sample, the same on every run over the
    same documents, of at least max_bytes less the largest document. A document over max_bytes alone is no candidate;
    the one of them with the smallest key fills what the sample leaves with its beginning, cut at a character, so a
    corpus of one long line, or of one beside a few short ones, is not trained on next to nothing. Memory: the sample
    and that beginning; the corpus is never held. UserError when max_bytes holds no character of any document."""
    from babyllama.progress import bytes_bar, counted

    rng = random.Random(seed)
    kept: list[tuple[float, int, str, int]] = []  # (-key, place, text, bytes): a heap, the largest key on top
    held = seen = n = over = 0
    cut = 1.0  # keys at or above it are out of the sample: the smallest key that did not fit
    big: tuple[float, int, bytes] = (1.0, 0, b"")  # (key, place, beginning) of the smallest key over max_bytes
    position = read or (lambda: seen)  # the bar's: the bytes of the files read, else of the text so far
    with bytes_bar("tokenizer train: reading", read.total if read else 0) as bar:
        for n, text in enumerate(counted(documents, bar, position), 1):
            data, key = text.encode(), rng.random()  # a key for every document: each depends on its place alone
            seen += len(data)
            if max_bytes and len(data) > max_bytes:
                over += 1
                if key < big[0]:
                    big = (key, n, data[:max_bytes + 1])  # + 1: where a cut falls
                continue
            if max_bytes and key >= cut:
                continue
            heapq.heappush(kept, (-key, n, text, len(data)))
            held += len(data)
            while max_bytes and held > max_bytes:  # the largest keys leave until the rest fits
                neg_key, _, _, dropped = heapq.heappop(kept)
                held, cut = held - dropped, -neg_key
    piece = beginning(big[2], max_bytes - held)
    if piece:
        kept.append((-big[0], big[1], piece, len(piece.encode())))
        held += kept[-1][3]
    if n and not kept:  # a sample of nothing trains the 259 byte ids: said as a corpus too small
        read = "the one document read is" if n == 1 else f"{n:,} documents read, each"
        raise UserError(f"--max_train_bytes {max_bytes:,} holds no whole character of the text ({read} larger than "
                        "it), so none was sampled; raise it, or pass 0 to train on every document.")
    budget = f"{max_bytes:,} bytes ({max_bytes / MiB:.1f} MiB)" if max_bytes else "0: every document"
    log.info("training on %d of %d %s: %.1f of %.1f MiB (--max_train_bytes %s)%s", len(kept), n,
             agree(n, "document", "documents"), held / MiB, seen / MiB, budget, over_budget(over, piece))
    return [text for _, _, text, _ in sorted(kept, key=lambda k: k[1])]


def beginning(data: bytes, size: int) -> str:
    """The text of data's first size bytes (UTF-8), less a character that they cut (data[size] says: a continuation
    byte); "" when size holds none."""
    size = max(size, 0)
    while 0 < size < len(data) and data[size] & 0xC0 == 0x80:  # a continuation byte: size is inside a character
        size -= 1
    return data[:size].decode()


def over_budget(over: int, piece: str) -> str:
    """What training_sample's line adds for the over documents larger than its budget, piece the beginning of one
    that the sample holds: "" when there are none."""
    if not over:
        return ""
    which = "its" if over == 1 else "one's"
    took = f"{which} first {len(piece.encode()):,} bytes are in the sample" if piece else "the sample has no room left"
    return f"; {over:,} {agree(over, 'document is', 'documents are')} larger than that: {took}"


def train_bpe(texts: Iterable[str], vocab_size: int, length: int | None = None) -> HFTokenizer:
    """Train a byte-level BPE (lossless on any text) with <pad>, <s>, </s> as ids 0, 1, 2.

    Training sees GPT-2's pre-tokens (Radford et al. 2019) with runs cut every MAX_RUN characters, so
    it takes time linear in the text whatever its punctuation; the trained tokenizer encodes with
    GPT-2's own split (linear too), the one that exported tokenizers name ("gpt-2" in GGUF). A corpus with
    fewer distinct pieces than vocab_size asks for gives a smaller vocabulary, with a warning. Its memory is
    about 90 bytes per byte of Chinese text: pass training_sample(...) for a large corpus. Ctrl-C or SIGTERM stops it at
    once (the Rust trainer runs in a thread, see in_thread). The trainer draws its own bars when stdout is a terminal;
    elsewhere (`> log 2>&1`) a line on stderr says every 30 s that it is still merging."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise UserError(f"vocab size {vocab_size} is too small: a byte-level BPE needs more than 259 ids.")
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = training_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    bars = sys.stdout.isatty()  # the trainer's bars end with newlines on stdout, before the JSON of `tokenizer train`
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=bars,
    )
    in_thread(lambda: tok.train_from_iterator(texts, trainer=trainer, length=length),
              None if bars else "tokenizer train: merging")
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trained = HFTokenizer(tok, bos_id=1, eos_id=2, pad_id=0)
    if trained.vocab_size < vocab_size:  # BPE stops when no pair of pieces is left to merge
        log.warning(f"the corpus has too few distinct pieces for a vocabulary of {vocab_size}: the trained one "
                    f"has {trained.vocab_size}.")
    return trained


def in_thread(work: Callable[[], None], status: str | None = None) -> None:
    """work() in a daemon thread while this one waits: a signal's handler (Ctrl-C's KeyboardInterrupt, the CLI's
    Terminated) runs in the main thread only when it runs Python, which it did not for the minutes of the Rust
    trainer's merges; now it raises at once and the process exits without waiting for the thread. The thread
    still runs to its end in a process that catches the exception and goes on. work's exception is raised here.
    status: while work runs, every progress.LINE_EVERY_S seconds a line "STATUS, N s" on stderr (N: seconds since
    it began, progress.status_lines); a log showed nothing for the minutes of merges."""
    from babyllama.progress import status_lines

    failed: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as e:  # raised again in the waiting thread
            failed.append(e)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    thread = threading.Thread(target=run, name="babyllama-bpe-training", daemon=True)
    with status_lines(lambda seconds: f"{status}, {seconds:.0f} s", say) if status else nullcontext():
        thread.start()
        thread.join()  # a signal's handler runs while it waits, and its exception ends the wait
    if failed:
        raise failed[0]
