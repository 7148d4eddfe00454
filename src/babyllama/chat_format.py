"""The chat format: one module for SFT, chat, serve and eval, so that they cannot drift apart.

    [system "\\n"] user₁ <bos> answer₁ <eos> user₂ <bos> answer₂ <eos> ...

    conv = conversation_from_record({"instruction": "翻译：", "input": "你好", "output": "Hello"})
    ids, mask = render_conversation(tokenizer, conv)          # training: mask 1 on answers and their <eos>
    prompt = render_prompt(tokenizer, conv, max_len=192)     # inference: ends with <bos>, the answer follows

Loss falls on the answer tokens and their <eos> (of the answers that carry loss: below), nothing else; the
inference prompt of a conversation is, token for token, its training ids up to the last answer.

Records (a `conversations` or OpenAI `messages` list, an instruction, a prompt / answer or prompt / completion row,
TRL's conversational prompt / completion lists) and the server's OpenAI `messages` become a conversation by one set of
rules:
  * a record's top-level `system` text and alpaca `history` ([[question, answer], ...], oldest first:
    LLaMA-Factory's alpaca and sharegpt formats) come first, as a system message and earlier turns
    (context_messages); their answers carry loss as every answer of a conversation does (but below);
  * line ends are "\\n": a Windows file's "\\r\\n" and a lone "\\r" become one (line_ends), as prepare's cleaning
    makes them and as chat and the chat page send text; every other character stays as written;
  * system messages, wherever they are, are joined with "\\n" into the system text, which goes
    before the first user message;
  * consecutive messages of one role (two user messages in a row) are joined with "\\n" into one;
  * the first message after the system text must be the user's: a conversation that starts with
    the assistant is refused;
  * for training it must end with an answer, for generation with the user's message;
  * a conversation keeps an empty answer; SFT skips such a record (data/sft_tokens.py counts it),
    since it would teach the model to answer with <eos> alone;
  * for training, a question with nothing visible (an empty instruction, prompt or user message)
    makes the record bad: there is nothing the answer answers (checked_for_training);
  * an answer carries no loss (Conversation.untrained) where it is an assistant message with OpenAI's "weight": 0,
    or in the `prompt` of a conversational prompt / completion record (TRL trains on the completion alone); answers
    joined from messages of both kinds make the record bad, and for training the turns after the last answer with
    loss go (nothing later reads them), before the checks for training, so a record without one is bad.

Truncation, when a conversation is longer than max_len tokens, cuts in this order:
  1. whole turns, oldest first (the system text and the last turn always stay);
  2. the beginning of the remaining prompt (the text nearest the answer stays), from its first whole character: ids
     that hold the tail of a character the cut split (a byte piece, a byte-level BPE token) go too;
  3. the end of the last answer, before its <eos>, where a character ends: the <eos> of a kept answer is never cut.
A conversation cut so that nothing of its last question or answer is left is no sample (SFT and DPO count it
filtered). A text far longer than max_len tokens is tokenized from about the characters that the cut keeps (an
answer's first, a question's last), from several cuts that must agree on them, so that its ids are those it has
whole, and memory and time are bounded by max_len: bounded_ids. Where they disagree (a run that pairs from its start
reaching the ids kept, as 哈哈哈...), the text is tokenized whole.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import unicodedata
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from babyllama.tokenizer import Tokenizer

# The roles of a `conversations` or `messages` item ({role, content} or ShareGPT's {from, value}) -> system / user /
# assistant. developer is OpenAI's newer name for system. ShareGPT names the assistant that answered: gpt, and in
# ShareGPT V3 (ShareGPT_V3_unfiltered_cleaned_split.json) a few items chatgpt and bing, in other exports bard; each is
# the assistant's answer, and read so. (LLaMA-Factory skips a record with such a role as broken; FastChat's training
# script knows human and gpt alone.) Tool roles (tool, function, ipython) are unknown: a record with one is bad.
ROLES = {"system": "system", "developer": "system", "user": "user", "human": "user", "assistant": "assistant",
         "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}

# The fields that hold a record's messages, the first one it has read: `conversations` (LLaMA-Factory's and
# ShareGPT's), else `messages` (OpenAI's fine-tuning format, TRL's conversational one). Both are the conversation
# schema, so a record with both is read from `conversations` (sources.py's rule between schemas does not choose).
CONVERSATION_KEYS = ("conversations", "messages")

# The fields that make an SFT record's shape. A record with those of several shapes is read in the first it has, the
# others' fields left out (unread_fields), as prepare reads a record of several schemas (data/sources.py):
SHAPE_ORDER = "conversations, messages, prompt with answer (else completion), instruction with output"
SHAPE_FIELDS = ("conversations", "messages", "prompt", "answer", "completion", "instruction", "input", "output")

# The fields of a preference pair's two answers, a pair per kind of shape (data/preferences.py: TRL's, LLaMA-Factory's
# and MedicalGPT's; OpenAI's DPO format; MedicalGPT's reward data). A record with any one of them is a preference
# record (preference_answers): `dpo` reads it, prepare detects its preference schema by them (data/sources.py), and SFT
# refuses it, all three by this one rule.
PREFERENCE_ANSWERS = (("chosen", "rejected"), ("preferred_output", "non_preferred_output"),
                      ("response_chosen", "response_rejected"))

# The same format as a Jinja chat template (Hugging Face's apply_chat_template, llama.cpp --jinja):
# line ends made "\n" (line_ends), system (and developer) messages joined first, consecutive messages of one role
# joined with "\n",
# each user text then bos_token, each answer then eos_token; the prompt for an answer ends with
# bos_token. Content may be a string or OpenAI's list of text parts; what serve refuses, it raises.
CHAT_TEMPLATE = (
    "{%- macro text(m) -%}"
    "{{- (m['content'] if m['content'] is string else m['content'] | map(attribute='text') | join(''))"
    " | replace('\\r\\n', '\\n') | replace('\\r', '\\n') -}}"  # escaped: Jinja reads a CR in its source as \n
    "{%- endmacro -%}"
    "{%- set ns = namespace(system='', role='', text='', out='', first=true) -%}"
    "{%- for m in messages if m['role'] in ['system', 'developer'] -%}"
    "{%- set ns.system = ns.system + ('\n' if ns.system else '') + text(m) -%}"
    "{%- endfor -%}"
    "{%- for m in messages if m['role'] not in ['system', 'developer'] -%}"
    "{%- if m['role'] not in ['user', 'assistant'] -%}"
    "{{- raise_exception('role ' + m['role'] + ' is not one of system, developer, user, assistant') -}}"
    "{%- elif not ns.role and m['role'] == 'assistant' -%}"
    "{{- raise_exception('the first message after the system text must be the user message') -}}"
    "{%- elif m['role'] == ns.role -%}{%- set ns.text = ns.text + '\n' + text(m) -%}"
    "{%- else -%}"
    "{%- if ns.role == 'user' -%}"
    "{%- set ns.out = ns.out + (ns.system + '\n' if ns.first and ns.system else '') + ns.text + bos_token -%}"
    "{%- set ns.first = false -%}"
    "{%- elif ns.role == 'assistant' -%}{%- set ns.out = ns.out + ns.text + eos_token -%}{%- endif -%}"
    "{%- set ns.role = m['role'] -%}{%- set ns.text = text(m) -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.role == 'user' -%}"
    "{%- set ns.out = ns.out + (ns.system + '\n' if ns.first and ns.system else '') + ns.text + bos_token -%}"
    "{%- elif ns.role == 'assistant' -%}{%- set ns.out = ns.out + ns.text + eos_token -%}{%- endif -%}"
    "{{- ns.out -}}"
)


@dataclass
class Conversation:
    turns: list[tuple[str, str]]  # (user, answer) pairs; at inference the last answer is ""
    system: str = ""
    untrained: frozenset[int] = frozenset()  # the turns (from 0) whose answer carries no loss


# --- records and messages -> a conversation ---


def kind_of(value: object) -> str:
    """A JSON value's type in words, for a message: "true or false", "a number", "a string", "a list", "an object"
    ("null" for None; NaN, Infinity or -Infinity for a float that is no number JSON has, as Python's json reads the
    words it writes for them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    return ("null" if value is None else "true or false" if isinstance(value, bool) else "a number"
            if isinstance(value, int | float) else "a string" if isinstance(value, str) else "a list"
            if isinstance(value, list) else "an object")


def field_text(record: dict, key: str, numbers: bool = False, lists: bool = False) -> str | None:
    """record[key] as text: a string; with numbers an int or float as its text (42, 0.5); with lists a list of
    strings (several references) joined with 、; None when it is not there or null. Raises ValueError naming the
    field and its type for any other value (a list, an object, true or false, a number where not allowed, and NaN or
    Infinity, which JSON does not have: Python's json writes them for a float NaN, and its 'nan' was scored as text):
    "its 'output' is a list, not a string" (a bad record, saying why: the readers of prepare, SFT, DPO and eval
    say it so)."""
    value = record.get(key)
    if value is None or isinstance(value, str):
        return value
    if numbers and isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    if lists and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "、".join(value)
    raise ValueError(f"its {key!r} is {kind_of(value)}, not a string{' or a number' if numbers else ''}")


def conversation_key(record: dict) -> str | None:
    """The field that holds record's messages (CONVERSATION_KEYS: `conversations`, else `messages`); None without. A
    null field is an absent one (a parquet or Hugging Face datasets file gives null to the fields of its other rows),
    as field_text reads it."""
    return next((key for key in CONVERSATION_KEYS if record.get(key) is not None), None)


def messages_key(record: dict) -> str | None:
    """The field that holds a message list of record: conversation_key's, else `prompt` where it is a list (TRL's
    conversational prompt); None without. The readers of SFT, DPO, prepare and eval --qa all decide by it."""
    return conversation_key(record) or ("prompt" if isinstance(record.get("prompt"), list) else None)


def messages_of_record(record: dict, key: str | None = None, name: str | None = None) -> list[tuple[str, str]]:
    """[(role, content)] of the message list record[key], by default its `conversations` or else its `messages`
    (conversation_key), of {role, content} or {from: human|gpt, value} items; roles become system / user /
    assistant (ROLES). name: the list's name in what is raised, key by default ("input.messages" for the `messages` of
    an object in the record's `input`). Raises ValueError saying what is malformed: the list is not there, is not one
    (naming its type), is empty, or an item is no object, lacks its role or content, has an unknown role, a tool call,
    or a content that is neither a string nor a list of text parts (message_of_item)."""
    key = key or conversation_key(record) or CONVERSATION_KEYS[0]
    name = name or key
    if key not in record:
        raise ValueError(f"it lacks {name!r}, a list of messages")
    items = record.get(key)
    if not isinstance(items, list):
        raise ValueError(f"its {name!r} is {kind_of(items)}, not a list of messages")
    if not items:
        raise ValueError(f"its {name!r} list is empty: there is no message")
    return [message_of_item(item, f"{name} item {i}") for i, item in enumerate(items, 1)]


def message_of_item(item: object, where: str) -> tuple[str, str]:
    """(role, content) of item, a message, where (as "messages item 2") naming it in what is raised. Raises
    ValueError naming the item and what is wrong: "conversations item 2: unknown role 'tool' (known: ...)",
    "messages item 2: a message of role 'assistant' with 'tool_calls'; tool calls are not read", and content_text's."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}: {kind_of(item)}, not an object with a role and a content")
    role_key, content_key = ("role" if "role" in item else "from"), ("content" if "content" in item else "value")
    if role_key not in item:
        raise ValueError(f"{where}: no 'role' (or 'from')")
    role = item[role_key]
    if not isinstance(role, str):
        raise ValueError(f"{where}: its {role_key!r} is {kind_of(role)}, not a string")
    if role not in ROLES:
        raise ValueError(f"{where}: unknown role {role!r} (known: {', '.join(ROLES)})")
    if call := next((key for key in ("tool_calls", "function_call") if item.get(key)), None):
        raise ValueError(f"{where}: a message of role {role!r} with {call!r}; tool calls are not read")
    if content_key not in item:
        raise ValueError(f"{where}: no 'content' (or 'value')")
    check_weight(item.get("weight"), where, role)
    return ROLES[role], content_text(item[content_key], where, content_key)


def check_weight(weight: object, where: str, role: str) -> None:
    """A message's OpenAI "weight": 0 (its answer carries no loss) or 1 on an assistant message, or none (null too:
    a parquet or Hugging Face datasets file gives the messages without one a null). Raises ValueError naming where and
    the fault: "messages item 2: its 'weight' is 0.5, not 0 or 1", "messages item 1: a 'weight' on a message of role
    'user'; only the assistant's messages have one"."""
    if weight is None:
        return
    if ROLES[role] != "assistant":
        raise ValueError(f"{where}: a 'weight' on a message of role {role!r}; only the assistant's messages have one")
    if isinstance(weight, bool) or weight not in (0, 1):
        shown = weight if isinstance(weight, int | float) and not isinstance(weight, bool) else kind_of(weight)
        raise ValueError(f"{where}: its 'weight' is {shown}, not 0 or 1")


def weight_zero(items: list) -> set[int]:
    """The indices (from 0) of the messages of a list that message_of_item has read with "weight": 0."""
    return {i for i, item in enumerate(items) if item.get("weight") == 0}


def content_text(content: object, where: str, key: str) -> str:
    """A message's content (its field key) as text: a string, or OpenAI's list of parts, whose texts ({"type":
    "text", "text": str}) are joined with "", as OpenAI joins them. Raises ValueError naming where and the fault: a
    part of another type ("messages item 2: a content part of type 'image_url'; only text parts are read"), a part
    that is no object, has no type or no text, or whose type or text is no string, a content of another type."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where}: its {key!r} is {kind_of(content)}, not a string or a list of text parts")
    for part in content:
        if not isinstance(part, dict):
            raise ValueError(f"{where}: a content part that is {kind_of(part)}, not an object with a type")
        kind, text = part.get("type"), part.get("text")
        if "type" not in part:
            raise ValueError(f"{where}: a content part has no 'type'")
        if not isinstance(kind, str):
            raise ValueError(f"{where}: a content part whose 'type' is {kind_of(kind)}, not a string")
        if kind != "text":
            raise ValueError(f"{where}: a content part of type {kind!r}; only text parts are read")
        if "text" not in part:
            raise ValueError(f"{where}: a text part has no 'text'")
        if not isinstance(text, str):
            raise ValueError(f"{where}: a text part whose 'text' is {kind_of(text)}, not a string")
    return "".join(part["text"] for part in content)


def instruction_pair(record: dict) -> tuple[str, str] | None:
    """(question, answer) of a `prompt` / `answer` row (the recipe's sft_data.csv) or, without an answer, a `prompt` /
    `completion` row (OpenAI's legacy fine-tuning format, TRL's prompt-completion type), or of an alpaca-zh / BELLE /
    shibing624/medical record (instruction + input, output); else None.
    Raises ValueError naming the field and its type when one of them that it reads is there but not a string
    (field_text): `"output": ["a"]` is a bad record for that reason, not for being no instruction record."""
    prompt, answer = field_text(record, "prompt"), field_text(record, "answer")
    if prompt is not None and answer is None:
        answer = field_text(record, "completion")
    if prompt is not None and answer is not None:
        return prompt, answer
    instruction, output = field_text(record, "instruction"), field_text(record, "output")
    field_text(record, "input")
    if instruction is None or output is None:
        return None
    return instruction_prompt(record), output


def null_answer(record: dict) -> str | None:
    """The answer field that is there but null beside a record's question (`answer`, else `completion`, beside a
    `prompt`; `output` beside an `instruction`), which instruction_pair reads as absent, else a null `conversations`
    or `messages` of a record without a question; None when there is none. Only for a record that instruction_pair
    refused: a parquet file gives null to the fields of its other rows, and says so of the one it then lacks."""
    keys = ("answer", "completion") if record.get("prompt") is not None else (
        ("output",) if record.get("instruction") is not None else CONVERSATION_KEYS)
    return next((key for key in keys if key in record and record[key] is None), None)


def no_pair_words(record: dict) -> str:
    """Why a record that instruction_pair refused (and that holds no conversation) is no SFT record, in words: a null
    field (null_answer), else the field of its shape that is missing, "its 'output' is missing" beside an instruction,
    "its 'answer' (or 'completion') is missing" beside a prompt, "its 'instruction' is missing" beside an output, "its
    'prompt' is missing" beside an answer or completion; else that it has no SFT shape's fields."""
    if null := null_answer(record):
        return f"its {null!r} is null, not {'a list of messages' if null in CONVERSATION_KEYS else 'a string'}"
    there = {k for k in SHAPE_FIELDS if record.get(k) is not None}
    missing = ("'answer' (or 'completion')" if "prompt" in there else "'output'" if "instruction" in there else
               "'instruction'" if "output" in there else "'prompt'" if there & {"answer", "completion"} else None)
    if missing:
        return f"its {missing} is missing"
    return "not an instruction, prompt/answer, prompt/completion, conversations or messages record"


def read_fields(record: dict) -> tuple[str, ...]:
    """The fields of SHAPE_FIELDS that record_conversation reads of record, those of the first shape it has (in
    SHAPE_ORDER): ("messages",), ("prompt", "completion"); () when it has none."""
    key = conversation_key(record)
    return (key,) if key else pair_fields(record)


def pair_fields(record: dict) -> tuple[str, ...]:
    """The fields that a record's question and answer are read from, where it is no conversation (instruction_pair,
    or TRL's conversational prompt / completion lists): ("prompt", "answer"), ("instruction", "input", "output");
    () when it has none of those shapes."""
    if isinstance(record.get("prompt"), list):
        return "prompt", "completion"
    there = {k for k in SHAPE_FIELDS if record.get(k) is not None}
    shape = next((pair for pair in (("prompt", "answer"), ("prompt", "completion"), ("instruction", "output"))
                  if there >= set(pair)), ())
    return ("instruction", "input", "output") if shape == ("instruction", "output") else shape


def unread_fields(record: dict, read: tuple[str, ...], fields: tuple[str, ...] = SHAPE_FIELDS) -> list[str]:
    """The fields of `fields` (of the shapes a reader knows) that record has, neither null nor "" (a CSV's empty
    cell), and that reading it by its `read` fields leaves out: ["instruction", "output"] for a prompt / completion
    record that has them too. [] when read is (): the record is bad, and says so."""
    return [f for f in fields if read and f not in read and record.get(f) not in (None, "")]


def instruction_prompt(record: dict) -> str | None:
    """The user's turn of an alpaca-zh / BELLE record: its instruction followed directly by its input (none:
    ""); None unless both are text. SFT trains on it and eval asks it, so both build it here."""
    instruction, extra = record.get("instruction"), record.get("input") or ""
    if not isinstance(instruction, str) or not isinstance(extra, str):
        return None
    return instruction + extra


def context_messages(record: dict) -> list[tuple[str, str]]:
    """(role, content) of what goes before a record's own messages: its `system` text, then each [question,
    answer] of its `history` as a user and an assistant message; [] when neither is there (absent, null, or
    empty: "", [], as an empty CSV cell reads ""). SFT, DPO and eval read them here, so that they agree.
    Raises ValueError naming the field when system is not a string (and its type: field_text) or history not a
    list of string pairs."""
    system, history = field_text(record, "system"), record.get("history")
    if history in (None, ""):
        history = []
    if not isinstance(history, list) or not all(
            isinstance(t, list | tuple) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in history):
        raise ValueError("its 'history' is not a list of [question, answer] pairs of strings")
    turns = [m for q, a in history for m in (("user", q), ("assistant", a))]
    return ([("system", system)] if system else []) + turns


def is_blank(text: str) -> bool:
    """Nothing visible: only whitespace, zero-width and other format or control characters."""
    return all(ch.isspace() or unicodedata.category(ch) in ("Cf", "Cc", "Zs", "Zl", "Zp") for ch in text)


SURROGATE = re.compile("[\ud800-\udfff]")  # in a str, always a lone one: a pair is one character


def is_unicode(text: str) -> bool:
    """False for text that no UTF-8 file or tokenizer can hold: a lone surrogate (the JSON escape
    \\ud800, or an undecodable byte read with errors="surrogateescape"). Searched for, not encoded: the UTF-8 of
    a document of 50 M Chinese characters was 150 MB more in pretokenize's main process."""
    return text.isascii() or SURROGATE.search(text) is None


def not_unicode(text: str) -> str | None:
    """What text holds that no tokenizer can encode, as words to follow "holds"; None when it is Unicode
    (is_unicode). Characters U+DC80-U+DCFF are bytes that the file's encoding does not decode, as the readers
    (errors="surrogateescape") and chat's stdin give them, named in the words: "bytes that are not text in the
    file's encoding (\\xff\\xfe)"; other lone surrogates came from a JSON escape such as \\ud800 (a JSON escape
    in U+DC80-U+DCFF reads as a byte: the decoded record no longer tells them apart)."""
    if is_unicode(text):
        return None
    escaped = [c for c in text if "\udc80" <= c <= "\udcff"]
    if escaped:
        shown = "".join(f"\\x{ord(c) - 0xDC00:02x}" for c in escaped[:8]) + ("..." if len(escaped) > 8 else "")
        return f"bytes that are not text in the file's encoding ({shown})"
    return "a lone surrogate (\\ud800-\\udfff), which no tokenizer can encode"


def conversation_from_messages(messages: Sequence[tuple[str, str]], add_generation_prompt: bool,
                               untrained: Collection[int] = ()) -> Conversation:
    """A conversation from (role, content) messages by the rules above.

    add_generation_prompt: the messages end with the user's, whose answer is to be generated.
    untrained: the indices (from 0) of the assistant messages whose answer carries no loss.
    Raises ValueError with the broken rule.
    """
    messages = [(role, line_ends(content)) for role, content in messages]
    system = "\n".join(content for role, content in messages if role == "system")
    merged: list[list] = []  # [role, content, trained] with consecutive same-role messages joined
    for role, content, trained in ((r, c, i not in untrained) for i, (r, c) in enumerate(messages) if r != "system"):
        if merged and merged[-1][0] == role:
            if merged[-1][2] != trained:
                raise ValueError("two assistant messages in a row, joined into one answer, differ in their "
                                 "'weight' (0 and 1)")
            merged[-1][1] += "\n" + content
        else:
            merged.append([role, content, trained])
    if not merged:
        raise ValueError("there are only system messages")
    if merged[0][0] != "user":  # before the last message's rule: [assistant] breaks this one, not that
        raise ValueError("the conversation starts with the assistant; its first message (after any system "
                         "messages) must come from the user")
    if add_generation_prompt != (merged[-1][0] == "user"):
        raise ValueError(f"the last message must come from the {'user' if add_generation_prompt else 'assistant'}")
    if add_generation_prompt:
        merged.append(["assistant", "", True])
    turns = [(u[1], a[1]) for u, a in zip(merged[::2], merged[1::2], strict=True)]
    return Conversation(turns, system, frozenset(i for i, a in enumerate(merged[1::2]) if not a[2]))


def line_ends(text: str) -> str:
    """text with its line ends made "\\n": "\\r\\n" (a Windows file's) and a lone "\\r" (an old Mac's)."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def conversation_from_record(record: dict) -> Conversation:
    """The conversation of an SFT record (record_conversation) that ends with its last answer with loss.
    Raises ValueError when it is no SFT record, when a field has the wrong type, when it cannot train
    (checked_for_training: the turns kept, not those cut), or when no answer carries loss (each has a 'weight' of
    0)."""
    conv = record_conversation(record)
    n = max((i + 1 for i in range(len(conv.turns)) if i not in conv.untrained), default=0)
    if n == 0:
        raise ValueError("no answer carries loss (each has a 'weight' of 0), so there is nothing to train on")
    kept = Conversation(conv.turns[:n], conv.system, frozenset(i for i in conv.untrained if i < n))
    return checked_for_training(kept)


def checked_for_training(conv: Conversation, *answers: str) -> Conversation:
    """conv, whose SFT or DPO record (with the DPO pair's answers) is good to train on. Raises ValueError,
    saying why, when its text is no valid Unicode (not_unicode: bytes its file's encoding does not decode, or a
    lone surrogate such as the JSON escape \\ud800) or a question is blank (is_blank): an empty instruction,
    prompt or user message asks nothing."""
    why = not_unicode("".join([conv.system, *answers, *(u + a for u, a in conv.turns)]))
    if why:
        raise ValueError(f"its text holds {why}")
    if any(is_blank(u) for u, _ in conv.turns):
        raise ValueError("a question (instruction, prompt or user message) is empty, so there is nothing to answer")
    return conv


def record_conversation(record: dict) -> Conversation:
    """The conversation of a record as SFT reads it, not yet checked for training (conversation_from_record): a
    `conversations` or `messages` list (conversation_key), TRL's conversational prompt / completion (a `prompt` list:
    prompt_completion_messages), a `prompt` / `answer` or `completion` row or an instruction record, after its
    `system` and `history` (context_messages), which every shape gets here and only here. Raises ValueError when it is
    none of them (a preference record, with a field of PREFERENCE_ANSWERS, is said to be one), a field has the wrong
    type or the messages break a rule above."""
    not_a_pair(record)
    context = context_messages(record)
    if key := conversation_key(record):
        messages, untrained = messages_of_record(record, key), weight_zero(record[key])
    elif isinstance(record.get("prompt"), list):  # TRL trains on the completion alone: the history's answers too go
        messages, untrained = prompt_completion_messages(record)
        untrained |= {i - len(context) for i, (role, _) in enumerate(context) if role == "assistant"}
    else:
        pair = instruction_pair(record)
        if pair is None:
            raise ValueError(no_pair_words(record))
        messages, untrained = [("user", pair[0]), ("assistant", pair[1])], set()
    return conversation_from_messages(context + messages, add_generation_prompt=False,
                                      untrained={len(context) + i for i in untrained})


def not_a_pair(record: dict) -> None:
    """Raises ValueError where record is a preference record (preference_answers), which SFT and eval --qa do not read:
    "it is a preference record ('chosen' and 'rejected'), which `babyllama dpo` reads", or where dpo's reader finds it
    bad, that reader's reason (data/preferences.preference_from_record), so that sft, dpo and prepare name one fault:
    "it is a preference record ('chosen' and 'rejected'), bad for `babyllama dpo` too: its prompt is missing (...)"."""
    if answers := preference_answers(record):
        # data/preferences.py builds on this module, so it is imported here, once a record is a pair
        from babyllama.data.preferences import preference_from_record

        what = f"it is a preference record ({' and '.join(map(repr, answers))})"
        try:
            preference_from_record(record)
        except ValueError as e:
            raise ValueError(f"{what}, bad for `babyllama dpo` too: {e}") from None
        raise ValueError(f"{what}, which `babyllama dpo` reads")


def preference_answers(record: dict) -> list[str]:
    """The fields of PREFERENCE_ANSWERS that record has, a null one being absent: ["chosen", "rejected"],
    ["preferred_output"]; [] for a record that is no preference pair. Empty ones ("", a CSV's empty cell) are absent
    too beside the fields of an SFT shape (read_fields), as in a CSV of prompt, answer, chosen and rejected columns:
    {prompt, answer, chosen: ""} is a prompt / answer row, but {prompt, chosen: "", rejected: ""} a pair with empty
    answers, which dpo skips and counts."""
    there = [key for pair in PREFERENCE_ANSWERS for key in pair if record.get(key) is not None]
    return [] if there and all(record[key] == "" for key in there) and read_fields(record) else there


def whole_conversations(record: dict) -> bool:
    """Whether a preference record's `chosen` and `rejected` are whole conversations (TRL's implicit prompt; beside a
    `prompt` string in HuggingFaceH4/ultrafeedback_binarized): lists, one of them of more than one message, beside no
    `prompt` list (TRL's conversational shape, whose lists are the answer alone). DPO and prepare read them so."""
    chosen, rejected = record.get("chosen"), record.get("rejected")
    return (isinstance(chosen, list) and isinstance(rejected, list) and max(len(chosen), len(rejected)) > 1
            and not isinstance(record.get("prompt"), list))


def prompt_completion_messages(record: dict) -> tuple[list[tuple[str, str]], set[int]]:
    """(the messages of `prompt` and `completion`, the indices of those without loss) of TRL's conversational
    prompt / completion record: the prompt ends with the user's message, the completion is the assistant's answer
    (one message or more), and it alone carries loss, as TRL trains on it alone (less any message with "weight": 0).
    Raises ValueError when either list is malformed (messages_of_record) or breaks those rules."""
    prompt, completion = messages_of_record(record, "prompt"), messages_of_record(record, "completion")
    if next((role for role, _ in reversed(prompt) if role != "system"), "user") != "user":
        raise ValueError("its 'prompt' ends with the assistant's message, not the user's that the completion answers")
    if role := next((role for role, _ in completion if role != "assistant"), None):
        raise ValueError(f"its 'completion' holds a {role} message; a completion is the assistant's answer alone")
    untrained = {i for i, (role, _) in enumerate(prompt) if role == "assistant"}
    return prompt + completion, untrained | {len(prompt) + i for i in weight_zero(record["completion"])}


# --- a conversation -> token ids ---


def render_conversation(
    tokenizer: Tokenizer, conv: Conversation, add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and, per id, 1 where it carries loss (answers and their <eos>).

    add_generation_prompt leaves the last answer out, so the ids end with <bos>: the prompt.
    """
    users = [f"{conv.system}\n{u}" if i == 0 and conv.system else u for i, (u, _) in enumerate(conv.turns)]
    return _joined(tokenizer, tokenizer.encode_batch(users), tokenizer.encode_batch([a for _, a in conv.turns]),
                   add_generation_prompt, conv.untrained)


def _joined(tokenizer: Tokenizer, users: list[list[int]], answers: list[list[int]],
            add_generation_prompt: bool, untrained: Collection[int]) -> tuple[list[int], list[int]]:
    """ids and loss mask of questions and answers already tokenized: user <bos> answer <eos> ..., the mask 0 on
    the answers whose index is in untrained."""
    ids, mask = [], []
    for i, (user, answer) in enumerate(zip(users, answers, strict=True)):
        ids += user + [tokenizer.bos_id]
        mask += [0] * (len(user) + 1)
        if add_generation_prompt and i == len(users) - 1:
            break
        ids += answer + [tokenizer.eos_id]
        mask += [int(i not in untrained)] * (len(answer) + 1)
    return ids, mask


def truncate_conversation(
    tokenizer: Tokenizer, conv: Conversation, max_len: int, add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """render_conversation cut to at most max_len ids, in the order of the module docstring; ([], []) when a cut
    would leave nothing of the last question (its <bos> alone) or nothing of its answer (whole_characters)."""
    return cut_conversation(tokenizer, conv, max_len, add_generation_prompt)[:2]


def cut_conversation(
    tokenizer: Tokenizer, conv: Conversation, max_len: int, add_generation_prompt: bool = False
) -> tuple[list[int], list[int], bool]:
    """(ids, mask, cut): truncate_conversation's ids and mask, and whether they are not the whole conversation
    (render_conversation's): turns dropped or a text cut (SFT and DPO count such samples truncated).

    Linear in the conversation, and bounded by max_len: every text is tokenized about once, a long one from about
    the characters a cut keeps (bounded_ids: whole where a run reaches them), and the first kept question, which
    follows the system text, once more per try of a bisection for the oldest turn that can stay (dropping a turn
    removes at least its <bos> and <eos>, so fewer turns never take more ids).
    """
    turns, n = conv.turns, len(conv.turns)
    users = bounded_ids(tokenizer, [u for u, _ in turns], max_len, keep_end=True)  # a prompt keeps its end
    answers = bounded_ids(tokenizer, [a for _, a in turns], max_len, keep_end=False)  # an answer its beginning
    cost = [len(u) + len(a) + 2 for u, a in zip(users, answers, strict=True)]  # user <bos> answer <eos>
    if add_generation_prompt:
        cost[-1] = len(users[-1]) + 1  # user <bos>: the answer is to come
    tail = list(itertools.accumulate(reversed(cost)))[::-1]  # tail[s]: ids of turns[s:]

    @functools.cache
    def first(s: int) -> list[int]:  # the first kept question, after the system text
        return bounded_ids(tokenizer, [f"{conv.system}\n{turns[s][0]}"], max_len, True)[0] if conv.system else users[s]

    def fits(s: int) -> bool:  # turns[s:] in max_len ids
        return tail[s] - len(users[s]) + len(first(s)) <= max_len

    # 1. drop the oldest turns: the first start that fits (n - 1 when none does); most often all fit: no bisection
    lo, hi = (0, 0) if fits(0) else (min(1, n - 1), n - 1)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    ids, mask = _joined(tokenizer, [first(lo), *users[lo + 1 :]], answers[lo:], add_generation_prompt,
                        {i - lo for i in conv.untrained if i >= lo})
    if len(ids) <= max_len:
        return ids, mask, lo > 0
    if add_generation_prompt:  # 2. the prompt's beginning goes
        ids = last_whole_characters(tokenizer, ids, max_len)
        return ids, mask[len(mask) - len(ids) :], True
    prompt_len = len(first(lo)) + 1  # the last turn alone: prompt ids (ending in <bos>), answer ids, <eos>
    prompt, answer = ids[:prompt_len], ids[prompt_len:-1]
    keep_prompt = max(max_len - len(answer) - 1, min(prompt_len, max_len // 2))
    prompt = last_whole_characters(tokenizer, prompt, keep_prompt)  # 2. the prompt's beginning goes
    answer = whole_characters(tokenizer, answer[: max_len - len(prompt) - 1])  # 3. the answer's end goes
    if len(prompt) < 2 or not answer:  # its <bos> alone: nothing of the question is left, or nothing of the answer
        return [], [], True
    answer.append(tokenizer.eos_id)  # a kept answer's <eos> stays
    return prompt + answer, [0] * len(prompt) + mask[-1:] * len(answer), True  # mask[-1]: the answer's loss, 0 or 1


# The ids beyond max_len that bounded_ids tokenizes a long text's kept end from: its cuts begin about max_len +
# CUT_MARGIN ids from that end, so that each has more than max_len ids (and fits nowhere, as the whole text) whatever
# its start changes of the ids next to it (at most 4 on random CJK, emoji, ASCII and digit texts with the test BPE,
# the demo's and ChatGLM2's tokenizers; 32 leaves 8 times that).
CUT_MARGIN = 32

# What bounded_ids puts before a question's end that it tokenizes alone, so that the end is tokenized as inside a
# text: a dummy prefix `▁` (SentencePiece's, Llama's) goes before ANCHOR, not before the end. A private-use character,
# in no piece of babyllama's BPE, ChatGLM2's or Llama's tokenizers, so it joins nothing after it (bounded_ids checks).
ANCHOR = "\ue000"


def bounded_ids(tokenizer: Tokenizer, texts: Sequence[str], max_len: int, keep_end: bool) -> list[list[int]]:
    """The ids of texts (encode_batch) as a cut to max_len ids needs them. A text of at most C = (max_len +
    CUT_MARGIN) * L characters (L = longest_piece) is tokenized whole; of a longer one, more than max_len ids whose
    last max_len (keep_end: a question's, whose end a cut keeps) or first max_len (an answer's) are the whole text's,
    tokenized from about the characters they hold, so that memory and time are bounded by max_len, not by the text (a
    2,000,000-character answer took 1 GB to keep 128 of its ids):

    its last (first) C characters have more than max_len + CUT_MARGIN ids, since no id holds more than L characters;
    the last (first) max_len + CUT_MARGIN of these hold about n characters, and the text is tokenized from L cuts, its
    last (first) n, n + 1, ..., n + L - 1 characters. Why the ids the cuts agree on are the whole text's: the whole
    text's ids have a boundary at one of these L places, since no id holds more than L characters. BPE (babyllama's,
    SentencePiece's, Hugging Face's) merges the best-ranked pair of neighbouring pieces, the leftmost of equals, until
    none is left; no merge joins the two sides of a boundary, so each side had the merges it has alone: the ids after
    a boundary are those of the text after it alone, tokenized as inside a text (ANCHOR before it takes the dummy
    prefix; its ids are checked and dropped), the ids before one those of the text before it. So the whole text's
    kept ids are those of one of the L cuts, and of every cut where all L agree. (So too for Unigram where the best
    segmentation is unique, and with a pre-token split that starts over at a boundary, as GPT-2's and Metaspace's.)

    The text is tokenized whole where the L cuts disagree: where a run that pairs from its start reaches the kept ids
    (ChatGLM2's BPE pairs a run of 'a' or 哈 so: "xat" + "a" * 8703 keeps other ids than "at" + "a" * 8703), where
    ANCHOR joined what follows it, or where a cut has max_len ids or fewer (a normalizer that joins characters)."""
    cap = max_len + CUT_MARGIN  # characters: C when a text is longer (no id holds less than one character)
    if any(len(t) > cap for t in texts):
        cap *= longest_piece(tokenizer)
    ids = tokenizer.encode_batch([(t[-cap:] if keep_end else t[:cap]) if len(t) > cap else t for t in texts])
    long = [i for i, t in enumerate(texts) if len(t) > cap]
    if not long:
        return ids
    agreed = agreed_cuts(tokenizer, [texts[i] for i in long], [ids[i] for i in long], cap, max_len, keep_end)
    whole = [i for i, cut in zip(long, agreed, strict=True) if cut is None]
    for i, cut in zip(long, agreed, strict=True):
        ids[i] = cut
    for i, all_ids in zip(whole, tokenizer.encode_batch([texts[i] for i in whole]), strict=True):
        ids[i] = all_ids
    return ids


def agreed_cuts(tokenizer: Tokenizer, texts: list[str], shortened: list[list[int]], cap: int, max_len: int,
                keep_end: bool) -> list[list[int] | None]:
    """Per text, the ids of the shortest of bounded_ids' L cuts of it where all L agree on their kept max_len ids and
    have more, else None (to be tokenized whole). shortened: the ids of each text's last (keep_end) or first cap = C
    characters. One encode_batch of L cuts per text, of at most C + L characters each (most often far fewer)."""
    n_cuts = longest_piece(tokenizer)
    margin = slice(-max_len - CUT_MARGIN, None) if keep_end else slice(max_len + CUT_MARGIN)
    spans = [min(len(tokenizer.decode(ids[margin])), cap) if len(ids) > max_len else len(text)
             for text, ids in zip(texts, shortened, strict=True)]
    swept = [n + n_cuts < len(text) for text, n in zip(texts, spans, strict=True)]  # else the cuts reach its start
    parts = [ANCHOR + text[len(text) - n - k :] if keep_end else text[: n + k]
             for text, n, sweep in zip(texts, spans, swept, strict=True) if sweep for k in range(n_cuts)]
    *encoded, anchor = tokenizer.encode_batch([*parts, ANCHOR])
    anchor = anchor if keep_end else []  # an answer's cuts begin where it does
    groups = (encoded[j : j + n_cuts] for j in range(0, len(encoded), n_cuts))
    kept = slice(-max_len, None) if keep_end else slice(max_len)
    out: list[list[int] | None] = []
    for sweep in swept:
        cuts = [g[len(anchor) :] for g in next(groups) if g[: len(anchor)] == anchor] if sweep else []  # ANCHOR alone
        agree = len(cuts) == n_cuts and all(len(c) > max_len and c[kept] == cuts[0][kept] for c in cuts)
        out.append(cuts[0] if agree else None)
    return out


@functools.cache
def longest_piece(tokenizer: Tokenizer) -> int:
    """The most characters of a text that one id holds, at least 1: a piece's characters (ChatGLM2's longest is 16,
    '▁' one of them), a byte-level piece's bytes counted as the characters they begin or end (b"\\xae\\xe4" of two).
    Once per tokenizer, as character_tails."""
    return max((sum(not 0x80 <= b <= 0xBF for b in raw) + (0x80 <= raw[0] <= 0xBF)
                for raw in tokenizer.id_bytes() if raw), default=1)


def whole_characters(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
    """ids less the last ones where they end inside a UTF-8 character, which a byte-level BPE token or a byte
    fallback piece can hold a part of (Tokenizer.decode_complete): a cut answer then ends with its last whole
    character, not with bytes that decode to U+FFFD. An incomplete character is at most 3 bytes, so its ids are among
    the last 4, and those alone are decoded."""
    while ids and tokenizer.decode(ids[-4:]) != tokenizer.decode_complete(ids[-4:]):
        ids = ids[:-1]
    return ids


def last_whole_characters(tokenizer: Tokenizer, ids: list[int], n: int) -> list[int]:
    """The last n ids of ids at most (all of them when they are no more), less the first ones where the cut begins
    inside a UTF-8 character (character_tails): a prompt cut on the left then begins with its first whole character,
    not with bytes that decode to U+FFFD. whole_characters ends a cut on the right so. Nothing is decoded or encoded
    per cut. With a tokenizer whose ids never join one character's tail to the next character's start (SentencePiece's
    byte fallback, whose <0x80>-<0xBF> pieces are a byte each; babyllama's BPE, which had no such id at vocabularies of
    600 and 4,000), a cut leaves at most 3 continuation bytes before the first whole character, so at most 3 more ids
    go; with one that has such ids, an id that holds a tail and more goes whole, with the characters it begins."""
    if len(ids) <= n:
        return ids
    tails, start = character_tails(tokenizer), len(ids) - max(n, 0)
    while start < len(ids) and ids[start] in tails:
        start += 1
    return ids[start:]


@functools.cache
def character_tails(tokenizer: Tokenizer) -> frozenset[int]:
    """The ids whose bytes (Tokenizer.id_bytes) begin with a UTF-8 continuation byte, 0x80-0xBF: a byte fallback
    piece <0x80>-<0xBF> (SentencePiece, Llama's tokenizer.json), or a byte-level BPE token that holds the end of a
    character and maybe more (`®`, b"\\xae" of 问). Such an id never begins a whole character. Once per tokenizer:
    id_bytes decodes the vocabulary once (0.15 s for ChatGLM2's 64,793 ids)."""
    return frozenset(i for i, raw in enumerate(tokenizer.id_bytes()) if raw and 0x80 <= raw[0] <= 0xBF)


def render_prompt(tokenizer: Tokenizer, conv: Conversation, max_len: int | None = None) -> list[int]:
    """The ids that ask for the answer to the last turn (ending with <bos>), at most max_len of them."""
    if max_len is None:
        return render_conversation(tokenizer, conv, add_generation_prompt=True)[0]
    return truncate_conversation(tokenizer, conv, max_len, add_generation_prompt=True)[0]


def prompt_budget(max_seq_len: int, max_new_tokens: int) -> int:
    """The ids a prompt may take so that max_new_tokens of answer fit after it in a context of max_seq_len, the answer
    given at most half the context: the prompt keeps at least the other half, as SFT's truncation keeps it. Chat and
    eval cut their prompts to it (render_prompt's max_len)."""
    return max_seq_len - min(max_new_tokens, max_seq_len // 2)


def text_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """Plain text to continue, outside the chat format: <eos> first, as every document in the shards
    follows the previous one's <eos>."""
    return [tokenizer.eos_id, *tokenizer.encode(text)]
