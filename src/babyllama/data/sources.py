"""Readers that turn corpus files into a stream of documents, never loading a file whole.

Two independent questions per file:
  * its shape: JSON lines, one JSON array or {"data": [...]} (streamed item by item), parquet, CSV or plain text,
    optionally compressed as .gz or .zst;
  * its schema: which fields make the text (wiki-cn, BaiduBaike, WuDao, alpaca/BELLE/medical
    instructions, multi-turn conversations or messages, preference pairs, or a plain `text` field), detected from
    each record's fields, so that one odd record decides nothing for the others, or forced with `format=`.

    reader = CorpusReader(["wiki.json", "baike.jsonl.zst"])
    for doc in reader.documents(): ...          # reader.stats: records, bad, per file

A file that cannot be read (not gzip, cut short, not parquet, not text) is never fatal: what came
before the damage is kept and the rest counts as one bad record, with its reason.
"""

from __future__ import annotations

import codecs
import csv
import functools
import gzip
import io
import json
import logging
import re
import shlex
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Collection, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from babyllama.chat_format import (
    PREFERENCE_ANSWERS,
    context_messages,
    conversation_key,
    field_text,
    instruction_pair,
    is_blank,
    kind_of,
    messages_of_record,
    not_unicode,
    pair_fields,
    preference_answers,
    prompt_completion_messages,
    read_fields,
    whole_conversations,
)
from babyllama.errors import (
    UserError,
    agree,
    cannot_write,
    check_out_dir,
    discard,
    first_few,
    not_a_file,
    require,
    writing,
)
from babyllama.progress import is_rank0

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".txt", ".parquet", ".csv")
BAD_RECORDS = "bad_records.txt"  # of prepare, pretokenize and the SFT/DPO token cache: `file:line: why` a line
MAX_LISTED = 100_000  # bad records a bad_records.txt lists (~10 MB), then a line that counts the rest (more_bad): a
# corpus of millions of bad lines wrote one line each, gigabytes
COMPRESSED = (".gz", ".zst")


# --- one small function per schema: record -> text, or None when the record lacks its fields; ValueError, naming
# the field and its type, for one of them that is there but of another type (chat_format.field_text) ---


def text_of_plain(r: dict) -> str | None:
    return field_text(r, "text")


def text_of_wiki(r: dict) -> str | None:
    return field_text(r, "completion")


def text_of_baike(r: dict) -> str | None:
    """The recipe's way: `title：summary` then `section title：content。` for every section."""
    title, summary, sections = field_text(r, "title"), field_text(r, "summary"), r.get("sections")
    if sections is not None and not isinstance(sections, list):
        raise ValueError(f"its 'sections' is {kind_of(sections)}, not a list of sections")
    if title is None or sections is None:
        return None
    text = f"{title}：{summary}" if summary else ""
    for s in sections:
        if not (isinstance(s, dict) and isinstance(s.get("title"), str) and isinstance(s.get("content"), str)):
            return None
        text += f"{s['title']}：{s['content']}。"
    return text


def text_of_wudao(r: dict) -> str | None:
    content = field_text(r, "content")
    if content is None:  # before the title: a record without content lacks it, whatever its title
        return None
    title = field_text(r, "title")
    return f"{title}\n{content}" if title else content


def text_of_instruction(r: dict) -> str | None:
    """As pretraining text, the recipe's way: the question followed directly by the answer (an
    instruction record, or a prompt/answer row of the recipe's sft_data.csv, or a prompt/completion row), after the
    record's `system` text and `history` turns, one line each (context_text). A `prompt` that is a list (TRL's
    conversational prompt-completion) is a conversation: its messages, then the completion's, a line each, read and
    checked as SFT reads them (chat_format.prompt_completion_messages), so that both find the same records bad."""
    if isinstance(r.get("prompt"), list):
        messages, _ = prompt_completion_messages(r)
        return context_text(r) + "\n".join(content for _, content in messages)
    pair = instruction_pair(r)
    return None if pair is None else context_text(r) + pair[0] + pair[1]


def text_of_conversation(r: dict) -> str | None:
    """Its messages a line each, after context_text; None without a `conversations` or `messages` field (of both, the
    `conversations` is read: chat_format.conversation_key). Raises ValueError, a bad record, for a malformed list
    (chat_format.messages_of_record names what)."""
    if not conversation_key(r):
        return None
    return context_text(r) + "\n".join(content for _, content in messages_of_record(r))


def text_of_preference(r: dict) -> str | None:
    """A preference pair as the text a model should learn: after context_text, its prompt (a conversation's, a
    `prompt` list's or OpenAI's `input` messages, a line each, or a `prompt` or `question` string) and then its chosen
    answer, as an instruction's answer follows its question (a chosen conversation holds its prompt: chat_format.
    whole_conversations); the rejected answer is not. None without any field of a preference shape. Raises
    ValueError, a bad record, for one that `babyllama dpo` finds bad, with its reason: each record is read by dpo's
    reader (data/preferences.preference_from_record), so that what prepare keeps, dpo reads."""
    # data/preferences.py builds on this module (through data/shards.py), so it is imported here, not above
    from babyllama.data.preferences import PREFERENCE_FIELDS, preference_fields, preference_from_record, prompt_messages

    if all(r.get(k) is None for k in PREFERENCE_FIELDS):
        return None
    _, chosen, _ = preference_from_record(r)
    key = preference_fields(r)[0]
    if whole_conversations(r):  # the prompt is in the chosen conversation
        prompt = "".join(content + "\n" for _, content in messages_of_record(r, "chosen")[:-1])
    elif isinstance(r[key], str):  # a prompt or question, or an instruction followed by its input
        prompt = prompt_messages(r, key)[0][1]
    else:
        prompt = "".join(content + "\n" for _, content in prompt_messages(r, key))
    return context_text(r) + prompt + chosen


def context_text(r: dict) -> str:
    """A record's `system` text and each [question, answer] of its `history` (chat_format.context_messages, as
    SFT reads them), a line each, question and answer joined as text_of_instruction joins them; "" when it has
    neither. Raises ValueError, a bad record, for a field of the wrong type."""
    messages = context_messages(r)
    lines = [c for role, c in messages if role == "system"]
    turns = [c for role, c in messages if role != "system"]
    lines += [q + a for q, a in zip(turns[::2], turns[1::2], strict=True)]
    return "".join(line + "\n" for line in lines)


SCHEMAS: dict[str, Callable[[dict], str | None]] = {
    "preference": text_of_preference,
    "text": text_of_plain,
    "wiki": text_of_wiki,
    "baike": text_of_baike,
    "wudao": text_of_wudao,
    "instruction": text_of_instruction,
    "conversation": text_of_conversation,
}


# schema -> the groups of fields any of which marks a record as one of it, in the order of detection: `text` before
# `content`, so that a record with both is the text it says (WuDao's records have no `text`), and `prompt` and
# `completion` before `completion` alone (a prompt-completion row, not a wiki article); a preference pair first, as
# it may hold a conversation (LLaMA-Factory's and MedicalGPT's DPO files), and by any one of its answers' fields, as
# `dpo` reads it (chat_format.PREFERENCE_ANSWERS): {prompt, chosen} is a pair without its rejected answer, bad for the
# reason `dpo` gives, not a record of no schema, and {prompt, chosen, completion} no prompt-completion row
SCHEMA_FIELDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "preference": tuple((key,) for pair in PREFERENCE_ANSWERS for key in pair),
    "conversation": (("conversations",), ("messages",)),
    "instruction": (("instruction", "output"), ("prompt", "answer"), ("prompt", "completion")),
    "wiki": (("completion",),),
    "baike": (("sections",),),
    "text": (("text",),),
    "wudao": (("content",),),
}


def schemas_of(record: dict, nulls: bool = False) -> dict[str, tuple[str, ...]]:
    """The schemas whose fields record has (SCHEMA_FIELDS), in the order of detection, each with those fields:
    {"text": ("text",), "wudao": ("content",)} for {"text": ..., "content": ...}. A null field is an absent one (a
    parquet or Hugging Face datasets file gives null to the fields of its other rows), as the schemas' readers read it:
    {"text": ..., "messages": null} is a text record; with nulls, null fields count too. Empty answers of a pair
    beside an SFT shape's fields are no pair, as SFT and dpo tell one (chat_format.preference_answers): {prompt,
    answer, chosen: ""} is an instruction."""
    keys = record.keys() if nulls else {k for k, v in record.items() if v is not None}
    found = {schema: tuple(f for group in groups if keys >= set(group) for f in group)
             for schema, groups in SCHEMA_FIELDS.items()}
    if not nulls and not preference_answers(record):
        found["preference"] = ()
    return {schema: fields for schema, fields in found.items() if fields}


def detect_schema(record: dict, usual: str = "") -> str | None:
    """The schema a record is read in: usual (its file's, of most of its records so far) when the record has its
    fields, else the first schema whose fields it has (SCHEMA_FIELDS), else the first whose fields it has null (a bad
    record, that lacks them: {"text": null}); None when it has those of none."""
    fits = schemas_of(record)
    return usual if usual in fits else next(iter(fits or schemas_of(record, nulls=True)), None)


def ignored_fields(record: dict, schema: str) -> list[str]:
    """The fields of schemas that record has, neither null nor "" (a parquet or CSV file's other rows' fields), but
    that reading it as schema leaves out: ["content"] for {"text": ..., "content": ...} read as text; of an instruction
    or conversation, those of the shapes that SFT reads in its place (chat_format.read_fields): ["instruction",
    "output"] beside a prompt and completion. [] where its schema's reader reads no field of it (a preference record
    without a prompt): the record is bad, and says so, as chat_format.unread_fields has it."""
    fits = schemas_of(record)
    if schema == "instruction":
        used = pair_fields(record)
    elif schema == "conversation":
        used = read_fields(record)
    elif schema == "preference":
        from babyllama.data.preferences import preference_fields  # it builds on this module: text_of_preference

        used = preference_fields(record)
    else:
        used = fits.get(schema, ())
    if not used:
        return []
    had = {f for fields in fits.values() for f in fields if record[f] not in (None, "")}
    return sorted(had - set(used))


@dataclass
class LeftOut:
    """The fields that records had and that the schema or shape they were read in left out: how many records had each,
    and where the first of them is. Its readers say it once a file (words)."""

    counts: Counter[str] = field(default_factory=Counter)
    first_at: dict[str, str] = field(default_factory=dict)  # field -> the location of the first of those records

    def note(self, fields: list[str], where: str) -> None:
        """Count a record at where whose fields are left out."""
        for f in fields:
            self.counts[f] += 1
            self.first_at.setdefault(f, where)

    def words(self) -> str:
        """"the 'content' of 2 records (the first at f.jsonl:2), the 'text' of 1 record (the first at f.jsonl:5)"."""
        return ", ".join(f"the {f!r} of {n:,} {agree(n, 'record', 'records')} (the first at {self.first_at[f]})"
                         for f, n in self.counts.most_common())


# --- file shapes: each yields (location, record, why): record a dict, or None when it is bad and why says so ---

Item = tuple[str, dict | None, str]


MAX_RECORD_CHARS = 1 << 26  # a line longer than 64 Mi characters is a bad record, skipped (_LineReader)
SNIFF_BYTES = 1 << 16  # the encoding is decided on the first 64 KiB


def open_binary(path: Path) -> io.BufferedIOBase:
    """A buffered binary stream of the file, decompressed, with a UTF-8 byte-order mark skipped."""
    if path.suffix == ".gz":  # buffered already; a second 1 MiB buffer would read into damage before it yields
        f = gzip.open(path, "rb")
    elif path.suffix == ".zst":
        f = io.BufferedReader(ZstdFrames(path), buffer_size=1 << 16)  # small reads: what precedes damage gets through
    else:
        f = io.BufferedReader(path.open("rb", buffering=0), buffer_size=1 << 20)
    if f.peek(3)[:3] == b"\xef\xbb\xbf":
        f.read(3)
    return f


class ZstdFrames(io.RawIOBase):
    """A .zst file decompressed, frame after frame. Raises EOFError when the file ends inside a frame
    (a cut download), which zstandard's stream_reader takes for the end of the data."""

    def __init__(self, path: Path):
        self.zstd = require("zstandard", "data")
        self.f = path.open("rb")
        self.frame = self.zstd.ZstdDecompressor().decompressobj()
        self.in_frame = False  # bytes of the current frame were read, its end was not
        self.out, self.pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self.pos == len(self.out):
            data = b""
            if self.frame.eof:  # a frame ended: what follows it begins the next one
                data = self.frame.unused_data
                self.frame, self.in_frame = self.zstd.ZstdDecompressor().decompressobj(), False
            data = data or self.f.read(1 << 12)  # small reads keep the output of each small, even of a zip bomb
            if not data:
                if self.in_frame:
                    raise EOFError("the file ends inside a zstd frame (cut short?)")
                return 0
            self.out, self.pos, self.in_frame = self.frame.decompress(data), 0, True
        n = min(len(b), len(self.out) - self.pos)
        b[:n] = self.out[self.pos : self.pos + n]
        self.pos += n
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


def _mostly_utf8(sample: bytes, lines: list[bytes]) -> bool:
    """UTF-8 with perhaps some damaged lines: of the lines that are not ASCII, most decode as UTF-8
    (in GBK text almost none do); not UTF-16 or UTF-32 without a byte-order mark (many NUL bytes)."""
    if sample.count(b"\x00") > len(sample) // 10:
        return False
    valid = sum(1 for line in lines if _decodes(line, "utf-8"))
    return valid * 2 >= len(lines)


def _decodes(data: bytes, encoding: str) -> bool:
    """Whether data is text in encoding, but perhaps for a character cut at its end: the sample's last
    line ends where its 64 KiB do when no newline came before (a one-line JSON array, a long first record)."""
    try:
        codecs.getincrementaldecoder(encoding)().decode(data, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _looks_gb(sample: bytes, lines: list[bytes]) -> bool:
    """GB2312 / GBK / GB18030 Chinese, what Excel and Chinese Windows write: nearly every line decodes,
    and most two-byte characters lie in the GB2312 block (both bytes 0xA1-0xFE), which Latin-1 or Big5
    text decoded as GB18030 would not."""
    if not lines or sum(1 for line in lines if _decodes(line, "gb18030")) < 0.9 * len(lines):
        return False
    pairs = [ch.encode("gb18030") for ch in sample.decode("gb18030", errors="ignore") if ord(ch) > 127]
    return sum(1 for b in pairs if len(b) == 2 and b[1] >= 0xA1) >= 0.8 * len(pairs)


def _sample(path: Path) -> bytes:
    """The first SNIFF_BYTES of the decompressed file, to its last whole line (a cut character would
    confuse detection); of a damaged file, what comes before the damage."""
    sample = bytearray()
    try:
        with open_binary(path) as f:
            while len(sample) < SNIFF_BYTES and (chunk := f.read(4096)):
                sample += chunk
    except _read_errors():
        pass
    if len(sample) >= SNIFF_BYTES and b"\n" in sample:
        del sample[_last_line_end(bytes(sample)) :]
    return bytes(sample)


def _last_line_end(sample: bytes) -> int:
    """Where the last whole line of sample ends: after its last newline byte; in text with NUL bytes, as UTF-16
    without a byte-order mark has, after the last two-byte newline (\\n\\0 or \\0\\n) at an even offset, so that
    no two-byte unit is cut (cut after the \\n of a UTF-16-LE newline, charset-normalizer found no encoding)."""
    ends = [i + 2 for pair in (b"\n\0", b"\0\n") if (i := _last_even(sample, pair)) >= 0] if b"\0" in sample else []
    return max(ends) if ends else sample.rindex(b"\n") + 1


def _last_even(data: bytes, pair: bytes) -> int:
    """The offset of the last occurrence of the two bytes pair in data at an even offset, else -1."""
    i = data.rfind(pair)
    while i > 0 and i % 2:
        i = data.rfind(pair, 0, i + 1)
    return i


def file_encoding(path: Path) -> str:
    """detect_encoding's answer; raises UserError when the bytes fit no encoding."""
    encoding = detect_encoding(path, _sample(path))
    if encoding is None:
        raise UserError(f"{path} is not text in any encoding charset-normalizer knows; convert it to UTF-8.")
    return encoding


def detect_encoding(path: Path, sample: bytes) -> str | None:
    """"utf-8"; else GB18030 when the text looks like GB2312/GBK Chinese; else what charset-normalizer
    finds in the file's first 64 KiB, sample (Big5, UTF-16, cp1252 ...: _best_code_page), each with a warning
    that names it; None when the bytes fit no encoding."""
    lines = [line for line in sample.split(b"\n") if not line.isascii()]
    if _mostly_utf8(sample, lines):
        return "utf-8"
    if sample.startswith((b"\xff\xfe", b"\xfe\xff")):  # a UTF-16 byte-order mark
        encoding = "utf-16"
    elif _looks_gb(sample, lines):
        encoding = "gb18030"
    else:
        encoding = _best_code_page(sample)
        if encoding is None:
            return None
    name = codecs.lookup(encoding).name.upper().replace("_", "-")
    if name != "UTF-8":
        log.warning("%s: not UTF-8; reading it as %s (detected). To convert it: %s", path, name,
                    iconv_command(path, name))
    return encoding


def iconv_command(path: Path, encoding: str) -> str:
    """The shell command that converts the file at path from encoding to UTF-8 in its place, through a temporary
    beside it (whose .utf8 suffix no reader takes for data), by its decompressor and back for a .gz or .zst:
    "iconv -f GB18030 -t UTF-8 d/qa.csv > d/qa.csv.utf8 && mv d/qa.csv.utf8 d/qa.csv"."""
    file, temporary = shlex.quote(str(path)), shlex.quote(f"{path}.utf8")
    iconv = f"iconv -f {encoding} -t UTF-8"
    tool = {".gz": "gzip", ".zst": "zstd"}.get(path.suffix)
    convert = f"{tool} -dc {file} | {iconv} | {tool} -c" if tool else f"{iconv} {file}"
    return f"{convert} > {temporary} && mv {temporary} {file}"


# The letters beyond ASCII of the languages written in the legacy Latin code pages (Windows cp1250-cp1258, ISO
# 8859): a text in one language uses one alphabet's; read in the wrong code page, it mixes several (French à è ê
# read as cp1250 come out ŕ č ę, Latvian and French at once).
ALPHABETS = {
    "ca": "àçèéíïòóúü", "cs": "áčďéěíňóřšťúůýž", "da, no": "åæéø", "de": "äöüß", "es": "áéíñóúü", "et": "äõöšüž",
    "fi": "äåöšž", "fr": "àâæçéèêëîïôœùûüÿ", "hr": "ćčđšž", "hu": "áéíóöőúüű", "is": "áæðéíóöúýþ",
    "it": "àèéìíîòóùú", "lt": "ąčėęįšūųž", "lv": "āčēģīķļņšūž", "nl": "áéèëïóöü", "pl": "ąćęłńóśźż",
    "pt": "àáâãçéêíóôõú", "ro": "ăâîşșţț", "sk": "áäčďéíĺľňóôŕšťúýž", "sl": "čšž", "sq": "çë", "sv": "åäéö",
    "tr": "âçğıîöşü",
}
CLOSE_CHAOS = 0.1  # charset-normalizer's chaos (share of odd characters) within which two readings are as good


def _best_code_page(sample: bytes) -> str | None:
    """The encoding of sample among charset-normalizer's readings whose chaos is within CLOSE_CHAOS of the best's:
    the one whose characters beyond ASCII fit one alphabet best (_alphabet_fit), then the one that more code pages
    decode to the same text, then charset-normalizer's order; of the code pages that decode sample to that text,
    cp1252 (the most used, and what an ISO-8859-1 label means to a browser). None when no encoding fits.

    charset-normalizer alone breaks ties by the order it tries code pages in (cp1250 before cp1252), and on a
    short text its chaos differs by an odd character or two, so Latin-1 French came out as cp1250 or cp1257."""
    matches = require("charset_normalizer", "data").from_bytes(sample)
    best = matches.best()
    if best is None:
        return None
    close = [m for m in matches if m.chaos <= best.chaos + CLOSE_CHAOS]
    pick = max(close, key=lambda m: (_alphabet_fit(str(m)), len(m.could_be_from_charset)))  # the first of equals
    return "cp1252" if "cp1252" in pick.could_be_from_charset else pick.encoding


def _alphabet_fit(text: str) -> float:
    """The share of text's characters beyond ASCII that are letters of the one alphabet (ALPHABETS) holding
    most of them; 0 for text without such characters or in another script."""
    chars = Counter(c for c in text.lower() if not c.isascii())
    fits = (sum(n for c, n in chars.items() if c in alphabet) for alphabet in ALPHABETS.values())
    return max(fits) / max(sum(chars.values()), 1)


def open_text(path: Path, encoding: str) -> io.TextIOWrapper:
    """The decoded file; bytes that do not decode become lone surrogates, which make their record bad."""
    return io.TextIOWrapper(open_binary(path), encoding=encoding, errors="surrogateescape", newline="")


Position = Callable[[], int]  # how many bytes of a file as stored (compressed) its reader has read so far


def _stored_position(f: io.TextIOWrapper) -> int:
    """How far open_text's stream f has read into its file as stored (compressed: the bytes decompressed so far
    came from there); what its buffers hold counts as read. Raises ValueError once f is closed."""
    stream = f.buffer
    raw = stream.fileobj if isinstance(stream, gzip.GzipFile) else stream.raw
    return (raw.f if isinstance(raw, ZstdFrames) else raw).tell()


def data_suffix(path: Path) -> str:
    """The suffix that says the shape: `.jsonl` for `x.jsonl.zst`."""
    suffixes = path.suffixes
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


LINE_CHUNK_CHARS = 1 << 20  # a line is read this many characters at a time (_LineReader)


class _LineReader:
    """The lines of a text stream, each with its line break, read LINE_CHUNK_CHARS characters at a time: one over
    MAX_RECORD_CHARS is read to its end holding at most MAX_RECORD_CHARS of it and a chunk (a readline of the limit
    made its copy and joined it, and the line's rest was read a limit at a time beside it: ~3 times the limit)."""

    def __init__(self, f: TextIO):
        self.f, self.after = f, ""  # after: a chunk read ahead, the start of the next line

    def line(self) -> str | None:
        """The next line with its break, "" at the end of the stream, None for one over MAX_RECORD_CHARS."""
        chunks, n = [], 0
        while chunk := self._chunk():
            n += len(chunk)
            if n <= MAX_RECORD_CHARS:
                chunks.append(chunk)
            elif chunks:  # over the limit: let go of what was held
                chunks = []
            if chunk.endswith(("\n", "\r")):
                break
        return "".join(chunks) if n <= MAX_RECORD_CHARS else None

    def _chunk(self) -> str:
        """Up to LINE_CHUNK_CHARS characters of a line, to its break; a \\r\\n that the size cut after its \\r is read
        whole (its \\n alone would count as a line more), the chunk read to see that kept for the next line."""
        chunk, self.after = self.after or self.f.readline(LINE_CHUNK_CHARS), ""
        if len(chunk) == LINE_CHUNK_CHARS and chunk.endswith("\r"):
            if (after := self.f.readline(LINE_CHUNK_CHARS)) == "\n":
                return chunk + after
            self.after = after
        return chunk


class _Lines:
    """(line number, text) of each non-blank line of f, its line break kept; text is None for a line over
    MAX_RECORD_CHARS, which is skipped without holding it (_LineReader). An iterator, not a generator: a generator's
    frame holds the line it gave while its reader works on it, and a JSON line of 50 M characters is 100-200 MB more
    beside its text (pretokenize's main process)."""

    def __init__(self, f: TextIO):
        self.lines, self.lineno = _LineReader(f), 0

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> tuple[int, str | None]:
        while (line := self.lines.line()) != "":
            self.lineno += 1
            if line is None or not line.isspace():  # not line.strip(): a copy of the line
                return self.lineno, line
        raise StopIteration


def records_jsonl(path: Path, f: TextIO) -> Iterator[Item]:
    """The records of a JSON Lines file; each line is let go once decoded (_Lines), only its record is held."""
    for lineno, line in _Lines(f):
        where = f"{path}:{lineno}"
        if line is None:
            yield where, None, f"a line over {MAX_RECORD_CHARS} characters"
            continue
        try:
            record = json.loads(line)  # the line break is JSON's whitespace
        except json.JSONDecodeError as e:
            yield where, None, f"not valid JSON ({json_fault(e, f'column {e.colno}', one_line=True)})"
            continue
        except RecursionError:
            yield where, None, "JSON nested too deep"
            continue
        del line  # not held while the record is read
        yield (where, record, "") if isinstance(record, dict) else (where, None, "not a JSON object")


def json_fault(e: json.JSONDecodeError, place: str, one_line: bool) -> str:
    """json's message of e, with place ("column 7", "line 3") where the message names one: its msg alone cut
    "Invalid control character at" and "Unterminated string starting at" before their position. A line break that
    json calls a control character is said as what it is: in a JSON line (one_line) it ends a string left open; in a
    value over lines (an array, objects over lines) it is a raw line break inside a string or a string left open."""
    if e.msg.startswith("Invalid control character") and e.doc[e.pos : e.pos + 1] in ("\n", "\r"):
        if one_line:
            return f"Unterminated string: the line ends inside it at {place}"
        return f"a line break inside a string at {place}, which JSON writes as \\n, or a string left open"
    return f"{e.msg} {place}" if e.msg.endswith(" at") else e.msg


_SPACE = re.compile(r"[ \t\r\n\ufeff]*")


class _JSONWindow:
    """The JSON values of a text stream, one at a time, decoded with json's raw_decode over a window that grows until
    the value fits: memory is the largest value, not the file. line: the line of the stream that the window is at."""

    def __init__(self, f: io.TextIOBase):
        self.f, self.buf, self.pos, self.line = f, "", 0, 1
        self.decoder = json.JSONDecoder()

    def _more(self, n: int) -> bool:
        chunk = self.f.read(n)
        self.buf, self.pos = self.buf[self.pos :] + chunk, 0
        return bool(chunk)

    def _to(self, end: int) -> None:
        self.line += self.buf.count("\n", self.pos, end)
        self.pos = end

    def peek(self) -> str:
        """The next character that is not space, moved to; "" at the end of the stream."""
        while True:
            self._to(_SPACE.match(self.buf, self.pos).end())
            if self.pos < len(self.buf) or not self._more(1 << 16):
                return self.buf[self.pos : self.pos + 1]

    def skip(self) -> None:
        """Move past the character that peek gave."""
        self._to(self.pos + 1)

    def value(self) -> object:
        """The JSON value that begins here, moved past. A syntax error, a value nested too deep or one over
        MAX_RECORD_CHARS raises ValueError."""
        size = 1 << 16
        while True:
            try:
                item, end = self.decoder.raw_decode(self.buf, self.pos)
                if end < len(self.buf) or not self._more(size):  # a number at the window's end may go on
                    break
            except json.JSONDecodeError as e:
                line = self.line + self.buf.count("\n", self.pos, e.pos)  # before _more moves the window
                if len(self.buf) - self.pos > MAX_RECORD_CHARS or not self._more(size):
                    raise ValueError(f"invalid JSON ({json_fault(e, f'line {line}', one_line=False)})") from None
            except RecursionError:
                raise ValueError("an item nested too deep") from None
            size *= 2
        self._to(end)
        return item


def _array_items(f: io.TextIOBase) -> Iterator[object]:
    """Each item of the JSON array that text stream f holds, one at a time (_JSONWindow). A syntax error, an item
    nested too deep or one over MAX_RECORD_CHARS ends it with ValueError."""
    window = _JSONWindow(f)
    if window.peek() != "[":
        raise ValueError("not a JSON array")
    yield from _items(window)
    if window.peek():  # a second top-level value: its records would vanish without a word
        raise ValueError("more data after the array's closing ]")


def _items(window: _JSONWindow) -> Iterator[object]:
    """Each item of the array whose "[" window is at, one at a time; window ends past its "]". ValueError as
    _array_items."""
    window.skip()
    if window.peek() == "]":
        window.skip()
        return
    while True:
        yield window.value()
        c = window.peek()
        if c == "]":
            window.skip()
            return
        if c != ",":
            raise ValueError(f"invalid JSON (expected , or ] but found {c or 'the end of the file'!r})")
        window.skip()
        window.peek()  # raw_decode takes no space before a value


def _keys(window: _JSONWindow) -> Iterator[str]:
    """Each key of the object whose "{" window is at, with window at the key's value, which the caller moves past
    (value, _items); window ends past its "}". A syntax error raises ValueError."""
    window.skip()
    if window.peek() == "}":
        window.skip()
        return
    while True:
        if window.peek() != '"':
            raise ValueError(f"invalid JSON (expected a key but found {window.peek() or 'the end of the file'!r})")
        key = window.value()
        if window.peek() != ":":
            raise ValueError(f"invalid JSON (expected : after the key {key!r})")
        window.skip()
        window.peek()
        yield str(key)
        c = window.peek()
        if c == "}":
            window.skip()
            return
        if c != ",":
            raise ValueError(f"invalid JSON (expected , or }} but found {c or 'the end of the file'!r})")
        window.skip()


def records_json_array(path: Path, f: TextIO) -> Iterator[Item]:
    """Items of one top-level JSON array, streamed; a syntax error ends the file (counted once)."""
    return _listed_records(path, _array_items(f))


def records_json_wrapped(path: Path, f: TextIO) -> Iterator[Item]:
    """The items of the one list of records that a top-level object holds under a key ({"data": [...]}, SQuAD's
    {"version": ..., "data": [...]}), streamed as an array's are; its other keys' values are read and let go. A
    syntax error, or a second list of objects, ends the file (counted once)."""
    return _listed_records(path, _wrapped_items(f))


def _listed_records(path: Path, items: Iterator[object]) -> Iterator[Item]:
    """An Item for each of items (a JSON list's, as they are parsed); the ValueError of a syntax error ends them,
    counted once as a bad record."""
    i = 0
    try:
        for i, item in enumerate(items, 1):
            ok = isinstance(item, dict)
            yield f"{path}:item {i}", item if ok else None, "" if ok else "not a JSON object"
    except ValueError as e:
        log.warning("%s: %s after item %d; the rest of the file is skipped", path, e, i)
        yield f"{path}:item {i + 1}", None, f"{e}; the rest of the file is skipped"


def _wrapped_items(f: io.TextIOBase) -> Iterator[object]:
    """Each item of the first list of objects in the top-level object of f (_JSONWindow: memory is the largest item
    or other value, not the file). ValueError where a second list of objects follows, as _array_items otherwise."""
    window, listed = _JSONWindow(f), ""
    window.peek()
    for key in _keys(window):
        if not _list_of_objects(window):
            window.value()
        elif listed:
            raise ValueError(f"a second list of records, under {key!r}, after the one under {listed!r}")
        else:
            listed = key
            yield from _items(window)
    if window.peek():
        raise ValueError("more data after the object's closing }")


def _list_of_objects(window: _JSONWindow) -> bool:
    """Whether the value window is at is a list whose first item is an object (as far as its window holds)."""
    return window.peek() == "[" and window.buf[_SPACE.match(window.buf, window.pos + 1).end() :][:1] == "{"


RECORD_FIELDS = frozenset(f for groups in SCHEMA_FIELDS.values() for group in groups for f in group)


def _record_lists(text: str) -> list[str]:
    """The keys under which the top-level object that text (a file's start) opens holds lists of objects, as far as
    text goes: ["data"] for {"version": "1.1", "data": [{...}, ...]}; [] where text opens no object or the object has
    a field of a record (SCHEMA_FIELDS: {"conversations": [...]} is one record, not a list of them)."""
    window, keys = _JSONWindow(io.StringIO(text)), []
    if window.peek() != "{":
        return []
    try:
        for key in _keys(window):
            if key in RECORD_FIELDS:
                return []
            if _list_of_objects(window):
                keys.append(key)
            window.value()
    except ValueError:  # text ends inside the object (a long list)
        pass
    return keys


def records_json_objects(path: Path, f: TextIO) -> Iterator[Item]:
    """The JSON values of a file of objects written over several lines, one after another, as `json.dump(record, f,
    indent=2)` writes one and `jq .` writes many: streamed as an array's items are (_JSONWindow), each located by the
    line where it begins; a syntax error ends the file (counted once), as in an array."""
    window, line = _JSONWindow(f), 1
    try:
        while window.peek():
            line = window.line
            record = window.value()
            ok = isinstance(record, dict)
            yield f"{path}:{line}", record if ok else None, "" if ok else "not a JSON object"
    except ValueError as e:
        log.warning("%s: %s at line %d; the rest of the file is skipped", path, e, line)
        yield f"{path}:{line}", None, f"{e}; the rest of the file is skipped"


def records_text(path: Path, f: TextIO) -> Iterator[Item]:
    for lineno, line in _Lines(f):
        if line is None:
            yield f"{path}:{lineno}", None, f"a line over {MAX_RECORD_CHARS} characters"
        else:
            line = line.rstrip("\r\n")  # the line as read goes: one copy held
            yield f"{path}:{lineno}", {"text": line}, ""


def records_parquet(path: Path, opened: Callable[[Position], None]) -> Iterator[Item]:
    """Rows as dicts; opened is given the file's Position: the share of its bytes that its rows read make."""
    pq = require("pyarrow.parquet", "data")
    file = pq.ParquetFile(path)
    size, rows, row = path.stat().st_size, max(file.metadata.num_rows, 1), 0
    opened(lambda: size * row // rows)
    for batch in file.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield f"{path}:row {row}", record, ""


class _LineTooLong(Exception):
    pass


class _RowLines:
    """The lines of a text stream for csv.reader, numbered; the lines of the row being parsed are
    kept, so that those after its first can be read again (put_back). A line over MAX_RECORD_CHARS
    is skipped without holding it (_LineReader) and raises _LineTooLong (read again, it is blank)."""

    def __init__(self, f: TextIO):
        self.lines = _LineReader(f)
        self.lineno = 0
        self.row: list[tuple[int, str]] = []  # (line number, line) of the row being parsed
        self.again: list[tuple[int, str]] = []  # lines to read again, the next one last

    def __iter__(self) -> _RowLines:
        return self

    def __next__(self) -> str:
        if self.again:
            self.lineno, line = self.again.pop()
        else:
            line = self.lines.line()
            if line == "":
                raise StopIteration
            self.lineno += 1
            if line is None:
                self.row.append((self.lineno, ""))
                raise _LineTooLong(f"a line over {MAX_RECORD_CHARS} characters")
        self.row.append((self.lineno, line))
        return line

    def put_back(self) -> None:
        """Read the lines of the last row after its first again, as rows of their own."""
        self.again += reversed(self.row[1:])


def records_csv(path: Path, f: TextIO) -> Iterator[Item]:
    """Rows as dicts by the header, located by the line where they start. A cell of up to
    MAX_RECORD_CHARS is read, with quoted commas, quotes and newlines. A row with more or fewer
    cells than the header is bad; so is one the csv module refuses (strict): a quote never closed,
    or closed inside a cell, makes its row bad, and the lines after that row's first are read
    again as rows of their own, so an unclosed quote cannot swallow the rows after it."""
    csv.field_size_limit(MAX_RECORD_CHARS)
    lines = _RowLines(f)
    rows = csv.reader(lines, strict=True)
    header = None
    while True:
        lines.row = []
        try:
            cells, why = next(rows), ""
        except StopIteration:
            return
        except (csv.Error, _LineTooLong) as e:
            cells, why = None, str(e)
            if len(lines.row) > 1:  # it ran over lines: an unclosed quote, most likely
                why = f"{why} in a cell that runs from line {lines.row[0][0]} to {lines.row[-1][0]} " \
                      "(an unclosed quote?); the lines after its first are read again"
                lines.put_back()
        where = f"{path}:{lines.row[0][0]}"
        if cells == []:  # a blank line
            continue
        if header is None and cells is not None:
            header = cells
        elif cells is None:
            yield where, None, why
        elif len(cells) != len(header):
            yield where, None, f"{len(cells)} cells where the header has {len(header)}"
        else:
            yield where, dict(zip(header, cells, strict=True)), ""


READERS = {".jsonl": records_jsonl, ".json": records_json_array, ".txt": records_text, ".csv": records_csv}


def _objects_over_lines(text: str) -> bool:
    """Whether text, the start of a .json or .jsonl file from its first character that is not space (_sample: whole
    lines), is a JSON object written over several lines (json.dump(indent=2), `jq .`), not JSON lines: it begins with
    "{", its first line is no whole JSON value, and the object that begins there ends on a later line, or, where its
    first line is "{" alone, as every pretty printer writes it, runs past text's end (an object longer than the
    sample). A syntax error inside text, or a cut record's first line, is a broken first record of JSON lines."""
    first = text.partition("\n")[0]
    if not text.startswith("{"):
        return False
    try:
        json.loads(first)
        return False  # a whole value: JSON lines
    except (ValueError, RecursionError):
        pass
    try:
        value, end = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError as e:
        return first.strip() == "{" and e.pos >= len(text.rstrip())
    except RecursionError:
        return False
    return isinstance(value, dict) and "\n" in text[:end]


def _whole_first_line(text: str) -> bool:
    """Whether text's first line is one whole JSON value with more lines after it, as in a JSON-lines
    file ("[1, 2]" then records), where a JSON array opens with "[" or "[{...}," or is the only line."""
    line, _, rest = text.partition("\n")
    try:
        json.loads(line)
    except ValueError:
        return False
    return bool(rest.strip())


def iter_records(path: Path, opened: Callable[[Position], None] | None = None) -> Iterator[Item]:
    """(location, record, why) of every record of a file: record None where it is bad, and why says
    why. A file that cannot be read to its end (not gzip, a cut or corrupted .gz or .zst, a damaged
    parquet, bytes of no text encoding) gives one bad record where the damage begins. opened, when given,
    is called with the file's Position once it is open (CorpusReader.bytes_read)."""
    suffix = data_suffix(path)
    if suffix not in (*READERS, ".parquet"):
        raise UserError(f"{path}: unknown file type {suffix or '(none)'}; use one of {', '.join(SUFFIXES)}.")
    return to_the_end(path, _records(path, suffix, opened or (lambda _: None)))


def _records(path: Path, suffix: str, opened: Callable[[Position], None]) -> Iterator[Item]:
    if suffix == ".parquet":
        yield from records_parquet(path, opened)
        return
    sample = _sample(path)
    encoding = detect_encoding(path, sample)
    if encoding is None:
        yield f"{path}:start", None, "not text in any encoding charset-normalizer knows (convert it to UTF-8)"
        return
    read = READERS[suffix]
    if suffix in (".jsonl", ".json"):  # a .json file that is no array is JSON lines, or objects over several lines
        text = sample.decode(encoding, errors="ignore").lstrip("\ufeff \t\r\n")
        lists = [] if _whole_first_line(text) else _record_lists(text)
        if len(lists) > 1:
            yield f"{path}:start", None, (f"one JSON object with lists of records under {len(lists)} keys "
                                          f"({', '.join(map(repr, lists))}); a file of records holds one list "
                                          "(an array, or an object with one list under a key such as 'data')")
            return
        read = (records_json_array if text[:1] == "[" and not _whole_first_line(text) else records_json_wrapped
                if lists else records_json_objects if _objects_over_lines(text) else records_jsonl)
    with open_text(path, encoding) as f:
        opened(functools.partial(_stored_position, f))
        yield from read(path, f)


def _read_errors() -> tuple[type[BaseException], ...]:
    """What a damaged file raises while it is read: gzip, zlib, zstandard, pyarrow (OSError, ValueError)."""
    zstd = sys.modules.get("zstandard")
    return (OSError, EOFError, ValueError, zlib.error, *((zstd.ZstdError,) if zstd else ()))


def to_the_end(path: Path, records: Iterator[Item]) -> Iterator[Item]:
    """records, then, where reading the file fails (a damaged archive, bytes its encoding cannot decode: a UTF-16
    byte-order mark before bytes that are not UTF-16), one bad item saying from where on it cannot be read, with a
    warning; the rest of the file is skipped."""
    where = f"{path}:start"
    try:
        for item in records:
            where = item[0]
            yield item
    except _read_errors() as e:
        log.warning("%s: cannot be read after %s (%s); the rest of the file is skipped", path, where, e)
        yield f"{path}:after {where.rsplit(':', 1)[-1]}", None, f"the file cannot be read from here on ({e})"


def expand_inputs(paths: list[str | Path], held_out: bool = False) -> list[Path]:
    """Files named directly, plus the data files below named directories (data_files), sorted; a file
    named twice (a folder and a file in it, ./x/../f.jsonl and f.jsonl) is kept once, at its first place
    (same real path), with a warning naming the repeats. Below a directory, files whose path names a
    held-out split (held_out_split: eval.jsonl, belle_test.json, dev/x.jsonl) are left out with a warning,
    unless held_out (the eval files of eval --qa/--mc); a file named directly, or read below a directory
    named directly (sf/test/a.jsonl of `sf sf/test`), is always kept (and is not in that warning).
    Each warning is given once a process (warn_once).

    Raises UserError for a path that does not exist or is not a regular file (/dev/null), a directory that is a
    checkpoint, tokenizer, token shards or another babyllama output without data files (a training run, an eval
    output; saying so), one without data files, or one whose data files are all held-out splits.
    """
    files: list[Path] = []
    below = {p: data_files(p) for p in map(Path, paths) if p.is_dir()}  # [] for a checkpoint, tokenizer, shards
    named = {p.resolve() for p in map(Path, paths) if p.is_file()} | \
        {f.resolve() for p, found in below.items() for f in found if not held_out_split(f.relative_to(p))}
    for p in map(Path, paths):
        if p.is_dir():
            found = below[p]
            if not found and (kind := output_kind(p) or own_output(p)):
                raise UserError(f"{p} is {kind}, not a folder of data files; name the data files or their folder.")
            if not found:
                raise UserError(f"directory {p} has no {'/'.join(SUFFIXES)} files (optionally .gz/.zst).")
            files += found if held_out else training_files(p, found, named)
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"input {p} {not_a_file(p)}.")
    first: dict[Path, Path] = {}
    for f in files:
        first.setdefault(f.resolve(), f)
    if repeats := sorted({str(f) for f in files if first[f.resolve()] is not f}):
        warn_once(f"inputs name these files more than once; each is read once: {', '.join(repeats)}")
    return list(first.values())


RECORD_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")  # of the records of SFT, DPO, eval --qa/--mc: no .txt


def files_of_records(paths: list[str | Path], held_out: bool = False) -> tuple[list[Path], list[Path]]:
    """(the files of paths that the readers of records read, the text files they skip): expand_inputs' files (held_out:
    its held-out splits too) less those found below a folder that hold lines of text, no records (a readme.txt beside
    SFT or QA files made a bad record of each of its lines); a file named itself is read whatever its suffix. SFT and
    DPO (data/sft_tokens.py) and eval --qa and --mc say the skipped in a note."""
    named = {Path(p).resolve() for p in paths}
    files = expand_inputs(paths, held_out=held_out)
    texts = [f for f in files if data_suffix(f) not in RECORD_SUFFIXES and f.resolve() not in named]
    return [f for f in files if f not in texts], texts


# The Hugging Face datasets convention for split names in paths (datasets.data_files: SPLIT_KEYWORDS of
# validation and test, NON_WORDS_CHARS): a keyword that a file or folder name holds between separators
# (- . _ space or a digit) or the name's ends; in any case, as files are named on Windows and macOS.
HELD_OUT_SPLITS = ("validation", "valid", "val", "dev", "test", "testing", "eval", "evaluation")
_HELD_OUT = re.compile(rf"(?<![^-._ 0-9])({'|'.join(HELD_OUT_SPLITS)})(?![^-._ 0-9])", re.IGNORECASE)
_WARNED: set[Hashable] = set()  # the warnings of expand_inputs given in this process (their keys)


def warn_once(message: str, key: Hashable = None) -> None:
    """log.warning(message) unless this process gave it, or one of the same key, already (a command may expand
    the same inputs more than once: eval reads --qa for its items and again for the leakage check; sft for its
    data and its cache) or is not the first of a torchrun job (RANK > 0), whose every process reads the same
    inputs. key: what the warning is about, when one thing can be spelled in several messages; else the message."""
    key = message if key is None else key
    if key not in _WARNED and is_rank0():
        _WARNED.add(key)
        log.warning("%s", message)


def held_out_split(path: Path) -> str | None:
    """The held-out split, in lower case, that a relative path names by the convention above, else None: "eval"
    for eval.jsonl or EVAL.json, "test" for belle_test.json or Test.jsonl, "dev" for dev-00001.jsonl or
    dev/x.jsonl, "validation" for validation.csv; None for contest.jsonl, device.json or train.jsonl."""
    return next((m.group(1).lower() for part in path.parts if (m := _HELD_OUT.search(part))), None)


def training_files(folder: Path, files: list[Path], named: Collection[Path] = ()) -> list[Path]:
    """files (data_files of folder) less those whose path below folder names a held-out split
    (held_out_split), with a warning (warn_once) naming them and how to train on them, less those also named
    directly or read below a directory named directly (named: real paths), which the caller reads. Raises
    UserError when every file is such a split and none is named."""
    held = [f for f in files if held_out_split(f.relative_to(folder))]
    unread = [f for f in held if f.resolve() not in named]
    names = ", ".join(str(f.relative_to(folder)) for f in unread)
    if held and len(unread) == len(files):
        raise UserError(f"every data file in {folder} is a held-out split by its name ({names}), which a folder "
                        f"does not give for training; name the files themselves to train on them.")
    if unread:
        splits = "/".join(sorted({held_out_split(f.relative_to(folder)) for f in unread}))
        why, one = ("its name marks a held-out split", "it") if len(unread) == 1 else \
            ("their names mark held-out splits", "one")
        warn_once(f"{folder}: not reading {names}: {why} ({splits}, as in Hugging Face datasets); to train on "
                  f"{one}, name the file itself, e.g. {unread[0]}",
                  key=(folder.resolve(), *(f.resolve() for f in unread)))  # once for a folder reached twice
    return [f for f in files if f not in held]


WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors")  # a checkpoint (or LoRA adapter)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
SNIFF_JSON_MAX_BYTES = 1 << 20  # a larger config.json or manifest.json is no run's or cache's: it is not read


def is_run_config(path: Path) -> bool:
    """Whether path is the config.json that a training run writes before anything else (RunConfig.to_dict:
    preset, model and a train table with out_dir; a run that stopped before its first log has no
    metrics.jsonl); False when it is not there or cannot be read."""
    return is_run_settings(_small_json_object(path))


def is_run_settings(config) -> bool:
    """Whether a parsed config.json is a training run's (is_run_config), not a checkpoint's."""
    return isinstance(config, dict) and {"preset", "model", "train"} <= config.keys() and \
        isinstance(config["train"], dict) and "out_dir" in config["train"]


def _small_json_object(path: Path) -> dict:
    """The JSON object in path; {} when it is not there, cannot be read, is not one, or is larger than
    SNIFF_JSON_MAX_BYTES (no file of ours is: it is not read to find out)."""
    try:
        if path.stat().st_size > SNIFF_JSON_MAX_BYTES:
            return {}
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _has(*marks: str) -> Callable[[Path], bool]:
    """Whether a folder holds a file matching each of the glob patterns marks."""
    return lambda folder: all(any(folder.glob(m)) for m in marks)


def _datatrove_work_of(command: str) -> Callable[[Path], bool]:
    """Whether a folder holds the datatrove work folder of command, in it (Slurm's) or in its stage (.incomplete:
    the local and Ray executors'); its settings.json says which command (prepare's when it does not say)."""
    def holds(folder: Path) -> bool:
        return any((f := folder / where / "datatrove" / "settings.json").is_file()
                   and _small_json_object(f).get("command", "prepare") == command for where in ("", ".incomplete"))

    return holds


# babyllama's outputs that share a folder with data: (what it is, whether a folder holds one, its non-data files)
OUTPUTS = (
    ("the output of babyllama prepare", _has("stats.json", "part_*.jsonl"), ("stats.json", BAD_RECORDS)),  # its
    # part_*.jsonl are data
    *[(f"the work folder of {command} --engine datatrove", _datatrove_work_of(command), ("datatrove",))
      for command in ("prepare", "pretokenize")],
    ("the output of babyllama eval", _has("eval.json", "items.jsonl"),
     ("eval.json", "items.jsonl", "preferences.json")),
    ("a training run", lambda folder: is_run_config(folder / "config.json"), ("config.json", "metrics.jsonl")),
    # checkpoints: output_kind
    ("the out_dir of babyllama demo", _has("demo.json", "timings.json"), ("demo.json", "timings.json")),
)


def _outputs_in(folder: Path) -> list[tuple[str, tuple[str, ...]]]:
    """(what it is, its non-data files) of each OUTPUTS that folder holds."""
    return [(what, files) for what, holds, files in OUTPUTS if holds(folder)]


def own_output(folder: Path) -> str | None:
    """What babyllama output (OUTPUTS) folder holds, the first found ("a training run"), else None."""
    return next((what for what, _ in _outputs_in(folder)), None)


def output_kind(folder: Path) -> str | None:
    """What babyllama output folder is when none of its files are data: "a checkpoint" (model.safetensors
    or a LoRA adapter; HF_MODEL when its config.json is transformers', as export --format hf's), "a tokenizer"
    (tokenizer.json, tokenizer.model), "an SFT token cache" or "a DPO token cache" (pretokenize --sft's or a
    run's: its manifest.json says kind sft or dpo), "a folder of token shards" (pretokenize's: another
    manifest.json beside .bin files); else None."""
    if (folder / "manifest.json").is_file() and any(folder.glob("*.bin")):
        kind = _manifest_kind(folder / "manifest.json")
        return token_cache_name(kind) if kind in ("sft", "dpo") else TOKEN_SHARDS
    if any((folder / f).is_file() for f in WEIGHT_FILES):
        return HF_MODEL if is_transformers_config(_small_json_object(folder / "config.json")) else "a checkpoint"
    if any((folder / f).is_file() for f in TOKENIZER_FILES):
        return "a tokenizer"
    return None


TOKEN_SHARDS = "a folder of token shards"  # output_kind of pretokenize's out_dir
HF_MODEL = "a Hugging Face model (its config.json is transformers')"  # output_kind of export --format hf's out


def is_transformers_config(config) -> bool:
    """Whether a parsed config.json is transformers' (model_type or architectures), not a babyllama checkpoint's
    (whose settings are under "model")."""
    return isinstance(config, dict) and "model" not in config and ("model_type" in config or "architectures" in config)


def token_cache_name(kind: str) -> str:
    """output_kind of an SFT/DPO token cache of kind "sft" or "dpo"."""
    return f"{'an SFT' if kind == 'sft' else 'a DPO'} token cache"


def check_output_folder(out: str | Path, writes: str, same: tuple[str, ...] = (), flag: str = "--out_dir",
                        example: Path | None = None, beside_data: bool = False) -> None:
    """Raise UserError when out, the folder a command writes `writes` into, is a file or below one
    (errors.check_out_dir), or is a babyllama output folder (output_kind, or, unless beside_data, an output
    that shares its folder with data: own_output, e.g. prepare's, whose bad_records.txt pretokenize would delete)
    other than those of `same`, the kinds that the command writes again in place: its files would join or replace
    another output's. flag names the setting in the message, and example a folder to suggest."""
    out = Path(out)
    check_out_dir(out, flag)
    if (kind := output_kind(out) or (None if beside_data else own_output(out))) and kind not in same:
        raise UserError(f"{flag} {out} is {kind}, which {writes} must not be written into; pass another {flag}"
                        f"{f', e.g. {example}' if example else ''}.")


def _manifest_kind(path: Path) -> str | None:
    """The "kind" of an SFT/DPO token cache's manifest.json (data/sft_tokens.py: sft or dpo); None for
    pretokenize's manifest, which has none, or a file that is not one (too large, not a JSON object)."""
    return _small_json_object(path).get("kind")


def data_files(folder: Path) -> list[Path]:
    """The files below folder that a reader reads (SUFFIXES, optionally .gz/.zst), sorted by path, less
    babyllama's own outputs, whose JSON and text files are not data: the non-data files of an output that
    shares its folder with data (OUTPUTS: prepare's stats.json and bad_records.txt beside the part_*.jsonl
    it wrote, eval's eval.json and items.jsonl, a run's config.json (is_run_config) and metrics.jsonl; an
    eval.json or stats.json alone is data) and whole folders of token shards and SFT/DPO token caches (a
    manifest.json beside .bin files), of checkpoints and tokenizers (output_kind) and hidden files and
    folders (temporaries, locks). So a data folder can hold prepare's output and the token cache built from it.

    Each real folder is walked once: a link to a folder walked already (to itself or a parent, a loop, or to a
    sibling) is not followed again. It, a broken link, and a FIFO, socket or device with a data file's name are
    skipped with one warning (warn_once) that names them; before, a link to its own folder was walked ~40 levels
    deep (12,000 paths in one warning) and a broken link or a FIFO went unsaid."""
    skipped: list[str] = []
    files = _data_files(folder, {folder.resolve()}, skipped)
    if skipped:
        warn_once(f"{folder}: skipped {len(skipped)} {agree(len(skipped), 'entry', 'entries')} without data to "
                  f"read: {first_few(skipped, 10)}", key=("skipped", folder.resolve()))
    return files


def _data_files(folder: Path, walked: set[Path], skipped: list[str]) -> list[Path]:
    """data_files of folder, walked (real paths) holding the folders walked so far, this one among them; each entry
    passed over that a user may have meant as data goes to skipped, as `path (why)`."""
    if output_kind(folder):
        return []
    own = {name for _, names in _outputs_in(folder) for name in names}
    files: list[Path] = []
    for f in sorted(folder.iterdir()):  # depth first in sorted order: the order of sorting all paths
        if f.name.startswith(".") or f.name in own:
            continue
        if f.is_dir():
            if (real := f.resolve()) in walked:
                skipped.append(f"{f} (a link to {real}, a folder read already)")
                continue
            walked.add(real)
            files += _data_files(f, walked, skipped)
        elif f.is_file():
            if data_suffix(f) in SUFFIXES:
                files.append(f)
        elif f.is_symlink() and not f.exists():
            skipped.append(f"{f} (a broken link)")
        elif data_suffix(f) in SUFFIXES:
            skipped.append(f"{f} ({_special_kind(f)}, not a regular file)")
    return files


def _special_kind(path: Path) -> str:
    """What an entry that is neither a file nor a folder is: "a FIFO", "a socket" or "a device"."""
    return "a FIFO" if path.is_fifo() else "a socket" if path.is_socket() else "a device"


@dataclass
class FileStats:
    records: int = 0
    bad: int = 0
    empty: int = 0  # good records whose text shows nothing (is_blank), skipped by a reader that skips them
    schema: str = ""  # the forced format, else the schema of most of its good records so far
    bad_examples: list[str] = field(default_factory=list)  # the first few locations
    read_as: Counter[str] = field(default_factory=Counter)  # good records by schema
    first_at: dict[str, str] = field(default_factory=dict)  # schema -> the location of its first good record
    ignored: LeftOut = field(default_factory=LeftOut)  # fields of another schema than the one read, unread

    def count(self, schema: str, where: str) -> None:
        """Count a good record at where, read as schema; the file's schema becomes the one of most records."""
        self.read_as[schema] += 1
        self.first_at.setdefault(schema, where)
        if self.read_as[schema] > self.read_as[self.schema]:  # "" counts 0
            self.schema = schema

    def to_dict(self) -> dict:
        return {"schema": self.schema, "records": self.records, "bad": self.bad, "empty": self.empty,
                "bad_examples": self.bad_examples}


def records_and_bad(sources: dict[str, dict]) -> dict[str, int]:
    """{"records": n, "bad": m, "empty": k}: the records read, the bad ones and the empty ones skipped, added up over
    sources ({file: its FileStats.to_dict()}, as a manifest's or a datatrove run's tasks hold them; "empty" counts 0
    in one written before it was counted)."""
    return {k: sum(s.get(k, 0) for s in sources.values()) for k in ("records", "bad", "empty")}


def check_counts(records: int, bad: int, empty: int, first_bad: str) -> None:
    """UserError when the inputs held no record, or only bad ones (the first named: first_bad) and empty ones
    (skipped by pretokenize), so that a command writes nothing in place of its earlier output."""
    if records == 0:
        raise UserError("the inputs hold no records; check the paths and --format.")
    if bad == records:
        which = agree(records, f"the one record was bad ({first_bad})",
                      f"every one of the {records} records was bad (the first: {first_bad})")
        raise UserError(f"{which}; nothing was written.")
    if bad + empty == records:
        raise UserError(f"{agree(records, 'the one record has no', f'none of the {records} records has')} text: "
                        f"{empty} empty{f', {bad} bad' if bad else ''}; nothing was written.")


class BytesRead:
    """Files read one after the other (in_turn), and how many of their bytes as stored (compressed) the records so
    far were read from: the files read to their end and what was read of the one being read (its reader's buffer
    ahead of the last record counts too; a parquet file: by its rows); total, their sizes, once every file has been
    read, and never more. Calling it gives that count, a progress bar's (bytes_bar), which has a total."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.sizes = [f.stat().st_size for f in files]
        self.total = sum(self.sizes)
        self._done, self._position = 0, lambda: 0  # bytes of the files read to their end; the Position in the next

    def in_turn(self) -> Iterator[Path]:
        """Each file, once the one before has been read: pass opened to iter_records of it."""
        for path, size in zip(self.files, self.sizes, strict=True):
            yield path
            self._done, self._position = self._done + size, lambda: 0

    def opened(self, position: Position) -> None:
        self._position = position

    def __call__(self) -> int:
        try:
            now = self._position()
        except ValueError:  # its stream was closed: damaged there, its next record is the next file's
            now = 0
        return min(self._done + now, self.total)


MAX_WARNINGS = 20  # bad records a CorpusReader shows on the console (bad_log MAX_LISTED, the counts all)


def more_bad(more: int, bad: int, what: str = "") -> str:
    """"... and 3 more bad records (23 in all)": what ends a list of bad records that stops short of the bad; what
    names their kind ("... and 3 more bad SFT records")."""
    return f"... and {more} more bad {what + ' ' if what else ''}{agree(more, 'record', 'records')} ({bad} in all)"


def say_unshown(bad: int, shown: int, listed: int, where: Path | None, what: str = "") -> None:
    """After reading: a warning that counts the bad records the console did not show (shown of bad), as `pretokenize
    --sft` ends its list: "... and 3 more bad records (23 in all), each listed in OUT/bad_records.txt" (where: the
    file that lists the first listed; None: nowhere; what: their kind, as more_bad). Nothing when every one was
    shown."""
    if bad > shown:
        listing = "" if where is None else f", {'each' if listed >= bad else f'the first {listed}'} listed in {where}"
        log.warning("%s%s", more_bad(bad - shown, bad, what), listing)


class CorpusReader:
    """Documents of many files; counts every record and every bad one, per file, and the bytes read of all
    (bytes_read: a progress bar's count, of total_bytes)."""

    def __init__(self, paths: list[str | Path], format: str | None = None, bad_log: TextIO | None = None,
                 skip_empty: bool = False):
        """bad_log, when given, receives the first MAX_LISTED bad records, one a line: `file:line: why` (its caller
        counts the rest: bad_records_to, the datatrove engine's finish). skip_empty: a good record
        whose text shows nothing (is_blank: "", whitespace, zero-width characters) is counted (FileStats.empty), not
        given, as pretokenize wants (prepare counts it too short)."""
        if format is not None and format not in SCHEMAS:
            raise UserError(f"unknown format {format!r}; choose one of {', '.join(SCHEMAS)}.")
        self.read = BytesRead(expand_inputs(paths))
        self.files, self.total_bytes = self.read.files, self.read.total
        self.format = format
        self.bad_log = bad_log
        self.skip_empty = skip_empty
        self.stats: dict[str, FileStats] = {}
        self.announced: set[str] = set()  # the schemas already logged: a folder of 1,000 files logs each once
        self.shown = 0  # bad records shown on the console, of all files
        self.listed = 0  # bad records written to bad_log
        self.first_bad = ""  # "file:line: why" of the first bad record

    def documents(self) -> Iterator[str]:
        for _, text in self.documents_with_source():
            yield text

    def documents_with_source(self) -> Iterator[tuple[str, str]]:
        """(file, text) of every document; at the end, when no bad_log lists the bad records, the warning that counts
        those the console did not show (say_unshown; a command that lists them says it once its output is in place)."""
        for path in self.read.in_turn():
            for text in self._file_documents(path):
                yield str(path), text
        if self.bad_log is None:
            self.say_unshown()

    def bytes_read(self) -> int:
        """How many bytes of the files as stored the documents so far were read from (BytesRead), of total_bytes."""
        return self.read()

    def _file_documents(self, path: Path) -> Iterator[str]:
        """The texts of a file's records, each read in the forced format or else in the schema that its own fields
        say (detect_schema), so that an odd record (a `content` among `text` ones) decides nothing for the others; a
        record with the fields of several schemas is read in the file's (of most of its records so far) when it fits,
        else in the first (`text` before `content`); a record with the fields of no schema is bad, as lacking those of
        the file's schema. The first good record of each schema is logged (once a reader), and at the end of a file a
        warning names the fields of other schemas that records had and were not read (once a file), and another
        counts each schema when its records are of several."""
        stats = self.stats.setdefault(str(path), FileStats(schema=self.format or ""))
        for where, record, why in iter_records(path, self.read.opened):
            stats.records += 1
            if record is None:
                self._bad(stats, where, why)
                continue
            schema = self.format or detect_schema(record, stats.schema) or stats.schema
            if not self.format and (ignored := ignored_fields(record, schema)):
                stats.ignored.note(ignored, where)
            try:
                text = SCHEMAS[schema](record) if schema else None
            except ValueError as e:  # a field of the wrong type (field_text, context_text, messages_of_record), named
                self._bad(stats, where, str(e))
                continue
            if text is None:
                self._bad(stats, where, f"lacks the fields of the {schema} schema" if schema else
                          f"has none of the fields of a known schema ({', '.join(sorted(map(str, record))[:5])})")
            elif why := not_unicode(text):
                self._bad(stats, where, f"holds {why}")
            else:
                if schema not in self.announced:
                    self.announced.add(schema)
                    log.info("%s: read as %s records (detected at %s)%s", path, schema, where,
                             "" if self.format else "; other files in this schema are not named")
                stats.count(schema, where)
                if self.skip_empty and is_blank(text):
                    stats.empty += 1
                    continue
                yield text
        if stats.ignored.counts:
            log.warning("%s: records with the fields of more than one schema are read in the file's schema (of most "
                        "of its records) where they fit it, else in the first of %s, leaving out %s; --format SCHEMA "
                        "reads every record in the schema you choose", path, ", ".join(SCHEMA_FIELDS),
                        stats.ignored.words())
        if len(stats.read_as) > 1:
            counts = ", ".join(f"{n:,} {schema} (the first at {stats.first_at[schema]})"
                               for schema, n in stats.read_as.most_common())
            log.warning("%s: its records are of %d schemas, each read as its fields say: %s; --format SCHEMA reads "
                        "every record as one schema and counts the others bad", path, len(stats.read_as), counts)

    @contextmanager
    def bad_records_to(self, out: Path) -> Iterator[None]:
        """While the body reads, the first MAX_LISTED bad records go to out/bad_records.txt too, a line each,
        `file:line: why` (why a short sentence, not the record), then a line that counts the rest (more_bad). Its last
        lines are written as the body ends (CannotWrite where the disk refuses them); on an error they are lost."""
        path = out / BAD_RECORDS
        with writing(path):
            self.bad_log = path.open("w", encoding="utf-8")
        try:
            yield
        except BaseException:
            discard(None, self.bad_log)
            raise
        finally:
            bad_log, self.bad_log = self.bad_log, None
        with writing(path, file=bad_log):
            if (bad := self.totals()[1]) > self.listed:
                bad_log.write(more_bad(bad - self.listed, bad) + "\n")
            bad_log.close()  # what it still buffers is written now

    def _bad(self, stats: FileStats, where: str, why: str) -> None:
        stats.bad += 1
        self.first_bad = self.first_bad or f"{where}: {why}"
        if self.bad_log is not None and self.listed < MAX_LISTED:
            self.listed += 1
            try:  # CannotWrite where the disk refuses it
                self.bad_log.write(f"{where}: {why}\n")
            except OSError as e:
                cannot_write(e, self.bad_log.name)
        if len(stats.bad_examples) < 5:  # the first few of each file, and of all files on the console
            stats.bad_examples.append(where)
            if self.shown < MAX_WARNINGS:
                self.shown += 1
                log.warning("%s: skipped a bad record: %s", where, why)

    def say_unshown(self, listed: Path | None = None) -> None:
        """After reading: the module's say_unshown of the bad records the console did not show (it shows MAX_WARNINGS,
        at most 5 of a file); listed: the bad_records.txt, once the output is in place (None: a reader that lists them
        nowhere). The list of prepare used to stop at 20 without a word."""
        say_unshown(self.totals()[1], self.shown, self.listed, listed)

    def totals(self) -> tuple[int, int]:
        return sum(s.records for s in self.stats.values()), sum(s.bad for s in self.stats.values())

    def check_usable(self) -> None:
        """After reading: UserError when the inputs held no record, or bad ones only (the first named) and empty ones
        (check_counts), so that a command writes nothing in place of its earlier output."""
        records, bad = self.totals()
        check_counts(records, bad, sum(s.empty for s in self.stats.values()), self.first_bad)


def iter_texts(paths: list[str | Path], format: str | None = None) -> Iterator[str]:
    """Documents of every file, for callers that do not need the counts."""
    return CorpusReader(paths, format).documents()
