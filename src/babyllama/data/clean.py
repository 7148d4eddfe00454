"""Cleaning: normalise text, drop short documents, remove exact and near duplicates (MinHash LSH).

    babyllama prepare --input wiki.json baike.jsonl --out_dir data/clean --dedup minhash --min_chars 50

Output: data/clean/part_00000.jsonl ... ({"text": ...} per line), stats.json (per source: records,
bad, too short, exact and near duplicates, kept, characters) and bad_records.txt (file:line of
every record that was skipped). Everything is deterministic: the first copy of a document wins.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from babyllama.data.shards import staged, swap_in, write_json
from babyllama.data.sources import BAD_RECORDS, CorpusReader
from babyllama.errors import UserError, agree, cannot_write, discard, require, writing
from babyllama.progress import bytes_bar, counted

_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f]+")  # not \u3000: it is Chinese layout
_BLANK_LINES = re.compile(r"\n{3,}")
# Format characters (category Cf) that change nothing a reader sees, only where a line may break: noise of web
# text. The zero-width space U+200B, the word joiner U+2060, U+FEFF (a byte-order mark inside the text) and the soft
# hyphen U+00AD. Every other one is text and stays: the zero-width joiner and non-joiner U+200D/U+200C join emoji
# into one (a family: man ZWJ woman ZWJ girl) and shape Persian and Indic words (mi ZWNJ khaham), variation
# selectors U+FE00-U+FE0F pick a glyph (text or emoji style), the bidirectional marks, embeddings, overrides and
# isolates (U+200E/F, U+202A-E, U+2066-9) decide the order right-to-left text is shown in, tag characters make flags.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u2060\ufeff\u00ad"))
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # category Cc, less \t and \n


def normalize(text: str) -> str:
    """Unify newlines (every line break of str.splitlines: \\r\\n, \\r, and the form feed of a PDF's page breaks, the
    vertical tab of Word's line breaks, U+0085, U+2028/9 and \\x1c-\\x1e become \\n; the control characters among
    them were dropped, gluing the words around them), drop the other control characters and the invisible format
    characters of _INVISIBLE (U+200B, U+2060, U+FEFF, U+00AD: not the zero-width joiners, variation selectors or
    bidirectional marks, which are part of the text), squeeze runs of spaces and blank lines.

    Full-width Chinese punctuation (，。！？：；“”) is left as it is: no NFKC. A text longer than CLEAN_PIECE_CHARS is
    normalised in pieces (normalized_pieces).
    """
    return "".join(normalized_pieces(text))


def _normalize(text: str) -> str:
    """normalize of text at once: each step makes a new string as long as text."""
    text = "\n".join(text.splitlines()).translate(_INVISIBLE)
    text = _CONTROL.sub("", text)
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


CLEAN_PIECE_CHARS = 1 << 20  # of a document, normalised, keyed and written at once: each step copies a piece


def normalized_pieces(text: str) -> list[str]:
    """normalize(text) in pieces of about CLEAN_PIECE_CHARS characters (one for a shorter text), each normalised
    alone, so that no step makes a copy of a long document. text is cut between two characters that no step changes
    or looks across (_cuttable: no line break, space, control or invisible character, so no \\r\\n, run of spaces
    or blank lines, stripped end of a line or of the text spans a cut) and that both stay in a dedup key: the
    pieces joined are normalize of the whole at once, and their dedup keys joined are its key."""
    return [_normalize(piece) for piece in _pieces(text, CLEAN_PIECE_CHARS, _cuttable)]


def _pieces(text: str, size: int, cuttable: Callable[[str], bool]) -> Iterator[str]:
    """text in pieces of at least size characters (the last may be shorter; text itself where it has no more), each
    cut at the first place from there between two characters that are cuttable; where there is none, the rest is
    one piece."""
    start = 0
    while len(text) - start > size:
        end = start + size
        while end < len(text) and not (cuttable(text[end - 1]) and cuttable(text[end])):
            end += 1
        yield text[start:end]
        start = end
    if start == 0:
        yield text
    elif start < len(text):
        yield text[start:]


SEPARATOR = 0x20  # what a run of whitespace and punctuation that keeps words apart becomes in a dedup key
MINUS = 0x2D  # "-", and what NFKC folds to it (－): before a digit, a sign
# Scripts written without spaces between words (Han, kana, Bopomofo; Thai, Lao, Myanmar, Khmer): a run of spaces
# or punctuation next to one of their characters keeps apart no words that would otherwise join.
UNSPACED = ((0x0E00, 0x0EFF), (0x1000, 0x109F), (0x1780, 0x17FF),  # Thai and Lao, Myanmar, Khmer
            (0x2E80, 0x2FDF), (0x3000, 0x312F), (0x31A0, 0x31FF),  # CJK radicals; 々 〇, kana, Bopomofo; strokes
            (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF),  # Han: extension A, unified, compatibility
            (0xFF66, 0xFF9F), (0x1B000, 0x1B16F), (0x20000, 0x3FFFF))  # half-width and old kana; Han extensions B on


def _separates(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "ZP" or ch.isspace()


def _joins_words(codes: np.ndarray) -> np.ndarray:
    """For code points (N,) uint32: (N,) bool, whether each is a letter, digit or mark of a script written with
    spaces between words (Latin, Cyrillic, Greek, Hangul, Arabic ...), two of which with nothing between are one
    word."""
    unspaced = np.zeros(len(codes), dtype=bool)
    for low, high in UNSPACED:
        unspaced |= (codes >= low) & (codes <= high)
    word = np.array([unicodedata.category(chr(c))[0] in "LNM" for c in codes.tolist()], dtype=bool)
    return word & ~unspaced


SEPARATES, JOINS = np.uint32(1 << 31), np.uint32(1 << 30)  # flags of a key table entry, above the code point


@functools.cache
def _key_table() -> np.ndarray:
    """(65536,) uint32: what each BMP character is in a dedup key: its NFKC, case-folded form where that is one
    character (full-width Ａ１ -> a1, － -> -), or'ed with SEPARATES where that form is whitespace or punctuation
    and with JOINS where it joins words (_joins_words)."""
    table = np.arange(1 << 16, dtype=np.uint32)
    for c in range(1 << 16):
        folded = unicodedata.normalize("NFKC", chr(c)).casefold()
        if len(folded) == 1:
            table[c] = ord(folded)
    separates = np.array([_separates(chr(c)) for c in table.tolist()], dtype=bool)
    return table | np.where(separates, SEPARATES, 0) | np.where(_joins_words(table), JOINS, 0)


KEY_PIECE_CHARS = 1 << 20  # of a document, keyed at once: ~30 MB of numpy arrays (a 20 M-character line took 500 MB)


def dedup_key(text: str) -> str:
    """What exact and near deduplication compare: the text with full-width letters, digits and punctuation folded
    to half-width (NFKC, per character), case-folded, and each run of whitespace and punctuation removed, so that
    copies that differ only in width, punctuation (，/,) or spacing (", " against ",") meet. A run stays, as one
    space, only where it keeps words apart: between two letters or digits of scripts written with spaces
    (_joins_words), so that 1.5 and 15, 10:30 and 1030, "the rapist" and "therapist" differ, and where it ends in
    a minus before a digit (-5 against 5); next to a Chinese or Japanese character it keeps nothing apart
    (今天，我们 = 今天我们 = 今天 我们). Text of punctuation alone is its own key. The kept text stays as written.
    Vectorised: ~20 us a document of 100 characters, ~8 ms one of a million; a longer one is keyed in pieces of
    about KEY_PIECE_CHARS, cut between two characters that stay (no run of separators spans a cut, so the pieces'
    keys joined are the whole's), in memory that does not grow with it."""
    return "".join(key_pieces(text))


def key_pieces(text: str) -> Iterator[str]:
    """dedup_key(text) in pieces, each made of about KEY_PIECE_CHARS characters of text: joined, they are the key."""
    return map(piece_key, _pieces(text, KEY_PIECE_CHARS, _stays))


def _stays(ch: str) -> bool:
    """Whether ch stays in a dedup key: it is no whitespace or punctuation (SEPARATES)."""
    return ord(ch) >= 1 << 16 or int(_key_table()[ord(ch)]) & SEPARATES == 0


def _cuttable(ch: str) -> bool:
    """Whether a piece of a document may end before or after ch (normalized_pieces): it stays in a dedup key, so it
    is no whitespace (a space or line break, which normalize squeezes, strips or joins with its neighbours), and it
    is no control or invisible character either, which normalize drops: it keeps ch as it is and looks across it
    in no step."""
    return not (ord(ch) in _INVISIBLE or _CONTROL.match(ch)) and _stays(ch)


def key_hash(keys: Iterable[str]) -> np.ndarray:
    """(1,) uint64, odd: 64 bits of blake2b of the UTF-8 of a dedup key given in pieces (those of normalized_pieces
    keyed one by one), as of the whole key at once, without it or its UTF-8 held."""
    h = hashlib.blake2b(digest_size=8)
    for key in keys:
        h.update(key.encode())
    return np.frombuffer(h.digest(), dtype=np.uint64) | 1


def piece_key(text: str) -> str:
    """dedup_key of text at once (numpy arrays of ~30 bytes a character)."""
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    entries = _key_table()[np.minimum(codes, (1 << 16) - 1)]
    if (beyond := codes >= 1 << 16).any():  # Han extensions, emoji: as written
        entries[beyond] = codes[beyond] | np.where(_joins_words(codes[beyond]), JOINS, 0)
    stays = (entries & SEPARATES) == 0
    words = np.flatnonzero(stays)
    if not len(words):
        return text  # punctuation or spaces only: compared as written
    chars = entries & np.uint32((1 << 30) - 1)  # the code points, without the flags
    runs = np.flatnonzero(np.diff(words) > 1)  # a run of separators lies after words[runs]
    left, right = words[runs], words[runs + 1]
    sign = (chars[right - 1] == MINUS) & (chars[right] >= ord("0")) & (chars[right] <= ord("9"))
    apart = left[((entries[left] & entries[right] & JOINS) != 0) | sign] + 1  # the first separator of each run
    stays[apart] = True  # that keeps words apart stays, as one space
    chars[apart] = SEPARATOR
    return chars[stays].tobytes().decode("utf-32-le", "surrogatepass")


class HashSets:
    """k sets of 64-bit keys in one (k, capacity) uint64 array: open addressing with linear probing.

    0 marks an empty slot (keys are made odd), and the array doubles when it is half full, so a
    key costs 16 to 32 bytes, against ~100 for a Python set of bytes.
    """

    def __init__(self, k: int, capacity: int = 1 << 12):
        self.table = np.zeros((k, capacity), dtype=np.uint64)
        self.count = 0  # keys per set

    @property
    def nbytes(self) -> int:
        return self.table.nbytes

    def _find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For keys (k,), one per set: the slot that holds each or where it would go, and whether it is there."""
        rows, mask = np.arange(len(keys)), self.table.shape[1] - 1  # the capacity is a power of two
        slots = (keys & np.uint64(mask)).astype(np.intp)
        while True:
            current = self.table[rows, slots]
            found, empty = current == keys, current == 0
            if (found | empty).all():
                return slots, found
            slots = np.where(found | empty, slots, (slots + 1) & mask)

    def contains_any(self, keys: np.ndarray) -> bool:
        return bool(self._find(keys)[1].any())

    def add_unless_any(self, keys: np.ndarray) -> bool:
        """Add keys (k,) uint64 odd, one to each set, unless a set holds its key already; returns whether one did."""
        slots, found = self._find(keys)
        if found.any():
            return True
        self.table[np.arange(len(keys)), slots] = keys
        self.count += 1
        if 2 * self.count > self.table.shape[1]:
            self._grow()
        return False

    def _grow(self) -> None:
        old = self.table
        self.table = np.zeros((old.shape[0], 2 * old.shape[1]), dtype=np.uint64)
        for i, row in enumerate(old):
            self._insert_many(i, row[row != 0])

    def _insert_many(self, i: int, keys: np.ndarray) -> None:
        """Distinct keys into set i, all at once: of the keys that want one free slot the first takes it,
        the others probe on."""
        cap = self.table.shape[1]
        slots = (keys & np.uint64(cap - 1)).astype(np.intp)
        while len(keys):
            free = np.flatnonzero(self.table[i, slots] == 0)
            _, first = np.unique(slots[free], return_index=True)
            won = free[first]
            self.table[i, slots[won]] = keys[won]
            rest = np.ones(len(keys), dtype=bool)
            rest[won] = False
            keys, slots = keys[rest], (slots[rest] + 1) & (cap - 1)


NUM_PERM, NGRAM = 128, 5  # MinHash permutations; shingles are character 5-grams


def lsh_bands(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands b, rows r) of an LSH index for a Jaccard threshold: datasketch's MinHashLSH choice, which
    minimises the area of false positives plus false negatives under the S-curve 1 - (1 - s^r)^b."""
    lsh = require("datasketch", "data").MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


MINHASH_THRESHOLD = 0.8  # --minhash_threshold by default


def check_dedup(dedup: str, threshold: float | None) -> float | None:
    """The MinHash threshold that --dedup and --minhash_threshold (None: not given) ask for: threshold, or
    MINHASH_THRESHOLD for --dedup minhash without one; None for the modes that use none. Raises UserError for an
    unknown --dedup, a threshold given with a --dedup that does not use it (`--dedup exact --minhash_threshold 1.5`
    was taken silently), and one where LSH has fewer than 2 bands or no use, whatever the mode."""
    if dedup not in ("none", "exact", "minhash"):
        raise UserError(f"unknown --dedup {dedup!r}; choose none, exact or minhash.")
    if threshold is None:
        return MINHASH_THRESHOLD if dedup == "minhash" else None
    if dedup != "minhash":
        raise UserError(f"--minhash_threshold is a setting of --dedup minhash, which --dedup {dedup} does not use; "
                        "leave it out or use --dedup minhash.")
    if not 0.2 <= threshold <= 0.98:  # also refuses nan
        raise UserError(f"--minhash_threshold is a Jaccard similarity in [0.2, 0.98], got {threshold}.")
    return threshold


def long_enough(chars: int, min_chars: int) -> bool:
    """The length filter on a document of chars characters: at least min_chars, and never empty."""
    return chars >= max(min_chars, 1)


MINHASH_PIECE_CHARS = 1 << 20  # of a document, shingled at once: ~50 MB of numpy arrays


class NearDuplicateIndex:
    """MinHash over character n-grams (Chinese has no spaces) with an LSH index in compact tables.

    The MinHash signatures are datasketch's; the index follows datasketch's MinHashLSH (its b bands
    of r rows for the threshold, Leskovec et al., Mining of Massive Datasets, ch. 3): a document is a
    near duplicate when all r values of some band equal those of a kept document. Each band's values
    are kept as one 64-bit hash in a HashSets row: 9 bands, 144 to 288 bytes a kept document, where
    MinHashLSH's Python dicts took ~4 KB.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = NUM_PERM, ngram: int = NGRAM, seed: int = 1):
        datasketch = require("datasketch", "data")
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        self.template = datasketch.MinHash(num_perm=num_perm, seed=seed, hashfunc=int)  # hashes come in as ints
        self.ngram = ngram
        self.tables = HashSets(self.bands)
        # odd 64-bit multipliers: band value j is weighted by MIX^j, so a band hashes to one number
        self.mix = np.array([pow(0x9E3779B97F4A7C15, j + 1, 1 << 64) for j in range(self.rows)], dtype=np.uint64)

    @property
    def count(self) -> int:
        return self.tables.count

    def shingle_hashes(self, text: str) -> np.ndarray:
        """Unique 32-bit hashes of the character n-grams of text, computed with numpy."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        n = max(1, min(self.ngram, len(codes)))
        h = np.full(max(len(codes) - n + 1, 1), 14695981039346656037, dtype=np.uint64)  # FNV-1a, 64 bit
        for i in range(min(n, len(codes))):
            h = (h ^ codes[i : len(codes) - n + 1 + i]) * np.uint64(1099511628211)
        return np.unique(h >> np.uint64(32))

    def minhash(self, pieces: Iterable[str]) -> np.ndarray:
        """(num_perm,) uint64: the MinHash signature of the text that pieces make joined ([text] for one; a long
        document's dedup key in pieces), as datasketch's MinHash computes it of the whole. A signature is a minimum
        over the shingles, so it is taken over each piece with the ngram - 1 characters before it (every n-gram is
        in one), in slices of MINHASH_PIECE_CHARS (_update): a 17 M-character document took 864 MB at once."""
        self.template.clear()
        held, shingled = "", False  # held: a piece with the ngram - 1 characters before it
        for piece in pieces:
            held += piece
            if len(held) >= self.ngram:
                self._update(held)
                held, shingled = held[len(held) - self.ngram + 1 :], True
        if not shingled:  # a text shorter than ngram is one shingle
            self._update(held)
        return self.template.hashvalues

    def _update(self, text: str) -> None:
        """Add the shingles of text to the signature being made, MINHASH_PIECE_CHARS at a time (each slice
        overlapping the next by ngram - 1)."""
        for start in range(0, max(len(text) - self.ngram + 1, 1), MINHASH_PIECE_CHARS):
            hashes = self.shingle_hashes(text[start : start + MINHASH_PIECE_CHARS + self.ngram - 1])
            for i in range(0, len(hashes), 4096):
                self.template.update_batch(hashes[i : i + 4096].tolist())

    def band_keys(self, signature: np.ndarray) -> np.ndarray:
        """(bands,) odd uint64: each band's r values hashed to one number."""
        bands = signature[: self.bands * self.rows].astype(np.uint64).reshape(self.bands, self.rows)
        with np.errstate(over="ignore"):  # arithmetic mod 2^64 on purpose
            return (bands * self.mix).sum(axis=1, dtype=np.uint64) | np.uint64(1)

    def seen_before(self, pieces: Iterable[str]) -> bool:
        """True when a document similar to the one pieces make joined was added before; else remember this one."""
        return self.tables.add_unless_any(self.band_keys(self.minhash(pieces)))


class SubstringIndex:
    """Finds whether a text contains any of a set of strings, each at least k characters long."""

    def __init__(self, items: set[str], k: int):
        self.k = k
        self.by_prefix: dict[str, list[str]] = {}
        for item in items:
            self.by_prefix.setdefault(item[:k], []).append(item)

    def matches(self, text: str) -> Iterator[str]:
        """The items that occur in text, in order of where they start."""
        for i in range(len(text) - self.k + 1):
            for item in self.by_prefix.get(text[i : i + self.k], ()):
                if text.startswith(item, i):
                    yield item

    def found_in(self, text: str) -> bool:
        return next(self.matches(text), None) is not None


@dataclass
class SourceStats:
    schema: str = ""
    records: int = 0
    bad: int = 0
    too_short: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    kept: int = 0
    characters: int = 0


WRITE_CHARS = 1 << 20  # of a document, escaped and encoded at once by ShardWriter.write


class ShardWriter:
    """JSON-lines shards part{tag}_00000.jsonl ... of at most `docs_per_shard` documents, each written to a
    temp name then renamed."""

    def __init__(self, out: Path, docs_per_shard: int, tag: str = ""):
        self.out, self.docs_per_shard, self.tag = out, docs_per_shard, tag
        self.index, self.in_shard, self.f = 0, 0, None
        self.files: list[str] = []

    @property
    def name(self) -> str:
        return f"part{self.tag}_{self.index:05d}.jsonl"

    def write(self, pieces: list[str]) -> None:
        """Append a document given as pieces of its text (normalized_pieces; [text] for one string); CannotWrite,
        the shard's temporary removed, where the disk refuses it. JSON escapes each character alone, so the line is
        written WRITE_CHARS characters at a time, the same bytes as json.dumps of the whole without its copies
        (escaped, with the line break added, encoded: 5 a character of a long document)."""
        try:  # not a `with writing(...)`: once per document, it tripled this method's time
            if self.f is None:
                self.f = (self.out / f".{self.name}.tmp").open("w", encoding="utf-8")
            if len(pieces) == 1 and len(pieces[0]) <= WRITE_CHARS:  # most documents: one write
                self.f.write(f'{{"text": {json.dumps(pieces[0], ensure_ascii=False)}}}\n')
            else:
                self.f.write('{"text": "')
                for piece in pieces:
                    for i in range(0, len(piece), WRITE_CHARS):
                        self.f.write(json.dumps(piece[i : i + WRITE_CHARS], ensure_ascii=False)[1:-1])
                self.f.write('"}\n')
        except OSError as e:
            cannot_write(e, self.out / self.name, self.out / f".{self.name}.tmp", self.f)
        self.in_shard += 1
        if self.in_shard >= self.docs_per_shard:
            self.close()

    def close(self) -> None:
        if self.f is None:
            return
        with writing(self.out / self.name, self.out / f".{self.name}.tmp", self.f):
            self.f.close()
            (self.out / f".{self.name}.tmp").rename(self.out / self.name)
        self.files.append(self.name)
        self.f, self.index, self.in_shard = None, self.index + 1, 0

    def discard(self) -> None:
        """Close the open part and remove its temporary: the run failed or was interrupted between writes."""
        if self.f is not None:
            discard(self.out / f".{self.name}.tmp", self.f)
            self.f = None


def clean_documents(
    documents: Iterable[tuple[str, str]],
    min_chars: int,
    dedup: str,
    threshold: float | None,
    stats: dict[str, SourceStats],
) -> Iterator[list[str]]:
    """The documents that survive normalisation, the length filter and deduplication, in order, each as the pieces
    that normalized_pieces makes of it (a long one is never copied whole: its pieces are).

    documents: (source, text) pairs; stats gets one SourceStats per source.
    """
    seen = HashSets(1)  # exact duplicates: 64 bits of blake2b of the dedup key
    near = NearDuplicateIndex(threshold) if dedup == "minhash" else None
    for source, raw in documents:
        s = stats.setdefault(source, SourceStats())
        pieces = normalized_pieces(raw)
        chars = sum(map(len, pieces))
        if not long_enough(chars, min_chars):
            s.too_short += 1
            continue
        if dedup != "none":
            # the key of a document in pieces is made again for each use rather than held: its length again
            keys = [dedup_key(pieces[0])] if len(pieces) == 1 else None
            if seen.add_unless_any(key_hash(keys or map(dedup_key, pieces))):
                s.exact_duplicates += 1
                continue
            if near is not None and near.seen_before(keys or map(dedup_key, pieces)):
                s.near_duplicates += 1
                continue
        s.kept += 1
        s.characters += chars
        yield pieces


def prepare(
    inputs: list[str],
    out: str | Path,
    *,
    format: str | None = None,
    min_chars: int = 10,
    dedup: str = "minhash",
    threshold: float | None = None,
    docs_per_shard: int = 100_000,
) -> dict:
    """Clean a corpus into JSON-lines shards; returns the statistics also written to stats.json. threshold: of
    --dedup minhash alone (None: MINHASH_THRESHOLD). Raises UserError (check_dedup, a missing input) before anything
    is written or shown."""
    threshold = check_dedup(dedup, threshold)
    reader, out = CorpusReader(inputs, format), Path(out)  # a missing input is said before anything is written
    with staged(out, prepare_outputs, "stats.json") as stage:  # the earlier output stays until the new one is whole
        result = _prepare(reader, stage, format, min_chars, dedup, threshold, docs_per_shard)
        swap_in(stage, out, prepare_outputs, "stats.json")
    reader.say_unshown(out / BAD_RECORDS)
    return result


def _prepare(reader: CorpusReader, out: Path, format: str | None, min_chars: int, dedup: str,
             threshold: float | None, docs_per_shard: int) -> dict:
    """prepare's work, into the folder out (its stage); returns the statistics written there last."""
    stats: dict[str, SourceStats] = {}
    writer = ShardWriter(out, docs_per_shard)
    start = time.time()
    try:
        # the bar is closed on an error too, so that its message starts a line
        with reader.bad_records_to(out), bytes_bar("prepare", reader.total_bytes) as bar:
            documents = counted(reader.documents_with_source(), bar, reader.bytes_read)
            for pieces in clean_documents(documents, min_chars, dedup, threshold, stats):
                writer.write(pieces)
        writer.close()
    except BaseException:  # a failure or Ctrl-C while reading or cleaning: the open part's temporary goes too
        writer.discard()
        raise
    for path, fs in reader.stats.items():
        s = stats.setdefault(path, SourceStats())
        s.schema, s.records, s.bad = fs.schema, fs.records, fs.bad
    reader.check_usable()
    if not writer.files:  # deduplication keeps a first copy: every good document was too short
        raise nothing_kept(totals(stats), min_chars)
    settings = {"format": format, "min_chars": min_chars, "dedup": dedup, "minhash_threshold": threshold}
    return write_stats(out, stats, writer.files, settings, time.time() - start)


def write_stats(out: Path, stats: dict[str, SourceStats], files: list[str], settings: dict, seconds: float) -> dict:
    """Write out/stats.json (per source, totals, the shard files, the settings) and return it."""
    result = {
        "sources": {k: asdict(v) for k, v in stats.items()},
        "total": totals(stats),
        "files": files,
        "settings": settings,
        "seconds": round(seconds, 2),
    }
    write_json(out / "stats.json", result)
    return result


def totals(stats: dict[str, SourceStats]) -> dict[str, int]:
    """The counts of every source added up."""
    return {k: sum(getattr(s, k) for s in stats.values()) for k in asdict(SourceStats()) if k != "schema"}


def nothing_kept(total: dict[str, int], min_chars: int | None) -> UserError:
    """The UserError of a prepare that kept no document, counting why (total: the counts of totals)."""
    why = [f"{n} {what}" for n, what in (
        (total["too_short"], f"shorter than --min_chars {min_chars}"), (total["bad"], "bad"),
        (total["exact_duplicates"], "exact duplicates"), (total["near_duplicates"], "near duplicates")) if n]
    n = total["records"]
    return UserError(f"{agree(n, 'the one record was not', f'none of the {n} records was')} kept: {', '.join(why)}; "
                     "lower --min_chars or check the inputs.")


def prepare_outputs(out: Path) -> list[Path]:
    """The files and folders of prepare's output in out, of either engine, with the temporaries and work files of
    a run that stopped."""
    return [f for f in [*out.glob("part_*.jsonl"), *out.glob(".part_*.tmp"), out / "stats.json",
                        out / BAD_RECORDS, out / "datatrove"] if f.exists()]
