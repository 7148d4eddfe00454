"""Preference pairs for DPO: the shapes users have, in SFT's chat format, into the DPO token cache.

    conv, chosen, rejected = preference_from_record({"prompt": "1+1=?", "chosen": "2", "rejected": "3"})
    (c_ids, c_mask), (r_ids, r_mask), cut = render_pair(tokenizer, conv, chosen, rejected, max_len=513)

Accepted records (the fields of one JSON object):
  {prompt, chosen, rejected}, strings (TRL's standard shape);
  {prompt: [messages], chosen: [assistant message], rejected: [...]} (TRL's conversational shape);
  {chosen: [messages], rejected: [messages]}, two whole conversations (TRL's implicit prompt): the messages they
    share from the start are the prompt, and each then has one assistant message, its answer; a `prompt` string
    beside them (HuggingFaceH4/ultrafeedback_binarized's, with a `messages` list, a copy of `chosen`, that is not
    read) must be the last user message they share;
  {conversations: [...], chosen: {from|role, value|content}, rejected: {...}}: LLaMA-Factory's DPO
    files; the conversation (ShareGPT or OpenAI items) ends with the user;
  {conversations: [...], chosen: "...", rejected: "..."}: MedicalGPT's;
  {question, chosen, rejected}: Intel/orca_dpo_pairs (with a `system`), the question a `prompt` string;
  {instruction, input, chosen, rejected}: LLaMA-Factory's alpaca preference files, the instruction followed by its
    input (none: "") the prompt, as SFT joins them (chat_format.instruction_prompt);
  {input: {messages: [...], tools, parallel_tool_calls}, preferred_output: [assistant message], non_preferred_output:
    [...]}: OpenAI's preference fine-tuning (DPO) format; its input's messages end with the user's, each output is a
    list of one assistant message, and tools (a non-empty `tools`, a tool call, a tool message) are not read;
  {question, response_chosen, response_rejected}: MedicalGPT's reward data.
A `messages` list may stand for `conversations` (chat_format.conversation_key), and messages are read as SFT reads
them (chat_format.message_of_item: OpenAI's text parts, the developer role). A record with the fields of several
shapes is read in the first it has (PREFERENCE_ORDER: preference_fields), the fields of the others left out, which
the DPO token cache names once a file as SFT's names those of its shapes.
Each may have a `system` text and a `history` ([[question, answer], ...], earlier turns), read as SFT
reads them (chat_format.context_messages).
Both answers of a pair follow the same conversation. The mask marks only the last answer and its
<eos>, the one the pair is about: earlier answers are context. A long pair is cut as SFT cuts a
sample, answer by answer (chat_format.truncate_conversation). Bad records are counted as for SFT
(an empty prompt is one, as an empty instruction is for SFT). A pair with a blank answer, chosen or
rejected, is skipped and counted (empty_answers); so is one whose two samples are the same ids and
mask, which teaches nothing: answers of the same text or tokens (equal_pairs), or answers that differ
only in what truncation cut off (equal_after_truncation).
"""

from __future__ import annotations

from collections import Counter

from babyllama.chat_format import (
    PREFERENCE_ANSWERS,
    Conversation,
    checked_for_training,
    context_messages,
    conversation_from_messages,
    cut_conversation,
    field_text,
    instruction_prompt,
    is_blank,
    kind_of,
    line_ends,
    message_of_item,
    messages_key,
    messages_of_record,
    preference_answers,
    whole_conversations,
)
from babyllama.data.sft_tokens import SFTSettings
from babyllama.data.shards import is_val
from babyllama.errors import agree
from babyllama.tokenizer import Tokenizer

# The fields of the preference shapes. The answers' fields (chat_format.PREFERENCE_ANSWERS) decide the shape, as they
# decide that a record is a preference pair for prepare and SFT; a record with those of several is read in the first
# shape it has, in this order, and the fields of the others are left out (preference_fields), as SFT reads a record of
# several shapes (chat_format.SHAPE_ORDER): {question, messages, chosen, rejected} is read from its messages, its
# question left out. The prompt beside chosen and rejected answers is the first of PROMPT_KEYS, an instruction with its
# input (LLaMA-Factory's alpaca preference files).
PROMPT_KEYS = ("conversations", "messages", "prompt", "question", "instruction")
PREFERENCE_FIELDS = (*PROMPT_KEYS, "input", *(key for pair in PREFERENCE_ANSWERS for key in pair))
# The shapes in words, in the order they are tried (preference_fields): PREFERENCE_ORDER says it, and NOT_A_PAIR names
# them all for a record of none.
PREFERENCE_SHAPES = ("chosen and rejected conversations (with a prompt string)",
                     f"{', '.join(PROMPT_KEYS)} (each with chosen and rejected, an instruction with its input)",
                     "input with preferred_output and non_preferred_output",
                     "question with response_chosen and response_rejected")
PREFERENCE_ORDER = ", ".join(PREFERENCE_SHAPES)
NOT_A_PAIR = f"not a preference record ({', '.join(PREFERENCE_SHAPES[:-1])}, or {PREFERENCE_SHAPES[-1]})"


# What each field of a pair is, in the reason of a record where it is null or of another type (_absent).
KINDS = {"prompt": "a string or a list of messages", "question": "a string", "instruction": "a string",
         "conversations": "a list of messages", "messages": "a list of messages", "input": "an object with 'messages'",
         "chosen": "a string or an assistant message", "rejected": "a string or an assistant message",
         "preferred_output": "a list of one assistant message",
         "non_preferred_output": "a list of one assistant message", "response_chosen": "a string",
         "response_rejected": "a string"}
NO_PROMPT = (f"its prompt is missing (one of {', '.join(PROMPT_KEYS)} beside its 'chosen' and 'rejected', or 'chosen' "
             "and 'rejected' conversations that share it)")


def _absent(record: dict, key: str) -> ValueError:
    """The bad record of a field that a pair needs and record lacks: "its 'rejected' is missing", or where it is there
    but null (a parquet file gives null to the fields of its other rows), named as SFT names a null answer: "its
    'chosen' is null, not a string or an assistant message"."""
    return ValueError(f"its {key!r} is null, not {KINDS[key]}" if key in record else f"its {key!r} is missing")


def _text(record: dict, key: str) -> str:
    """record[key], a string. Raises ValueError naming the field: missing, null (_absent), or of another type (its type
    named)."""
    value = field_text(record, key)
    if value is None:
        raise _absent(record, key)
    return value


def _answer(record: dict, key: str) -> str:
    """The answer record[key]: a string (MedicalGPT), one assistant message (LLaMA-Factory) or a list holding one
    (TRL). Raises ValueError naming the field and what it is instead (missing or null too: _absent), or an answer of
    "weight": 0 (_trained)."""
    value = record.get(key)
    if value is None:
        raise _absent(record, key)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        messages = messages_of_record(record, key)
        if len(messages) != 1:
            raise ValueError(f"its {key!r} holds {len(messages)} messages, not the one assistant answer")
        role, content = messages[0]
        _trained(value[0], key)
    elif isinstance(value, dict):
        role, content = message_of_item(value, f"its {key!r}")
        _trained(value, key)
    else:
        raise ValueError(f"its {key!r} is {kind_of(value)}, not a string or an assistant message")
    if role != "assistant":
        raise ValueError(f"its {key!r} is a {role} message, not the assistant's answer")
    return content


def _output(record: dict, key: str) -> str:
    """The answer record[key] of OpenAI's DPO format (`preferred_output`, `non_preferred_output`): a list of one
    assistant message, read as _answer reads it. Raises ValueError naming the field: missing, of another type (a
    string, one message not in a list), or a list of another length or role (_answer)."""
    value = record.get(key)
    if value is not None and not isinstance(value, list):
        raise ValueError(f"its {key!r} is {kind_of(value)}, not a list of one assistant message")
    return _answer(record, key)


def _input_messages(record: dict) -> list[tuple[str, str]]:
    """(role, content) of the messages of the `input` of OpenAI's DPO format, an object of `messages` (read as SFT reads
    OpenAI's messages), `tools` and `parallel_tool_calls`. Raises ValueError naming the fault: an input missing or not
    an object, `tools` (a list that is not empty: the answers may call them, and no chat format here shows them), or
    messages that are malformed (messages_of_record: a tool call or a tool message among them too)."""
    value = record.get("input")
    if value is None:
        raise _absent(record, "input")
    if not isinstance(value, dict):
        raise ValueError(f"its 'input' is {kind_of(value)}, not an object with 'messages'")
    if value.get("tools"):
        raise ValueError("its 'input' has 'tools'; tools and tool calls are not read")
    return messages_of_record(value, "messages", name="input.messages")


def _trained(item: dict, key: str) -> None:
    """Raises ValueError for the answer item of record[key] (a message read by message_of_item) with OpenAI's
    "weight": 0, which SFT reads as no loss: the loss of a DPO pair is on its answers."""
    if item.get("weight") == 0:
        raise ValueError(f"its {key!r} answer has a 'weight' of 0, but a DPO answer always carries the loss")


def prompt_messages(record: dict, key: str) -> list[tuple[str, str]]:
    """(role, content) of the prompt record[key] (preference_fields' first): a conversation (`conversations`,
    `messages`), a list of messages (TRL's conversational `prompt`), OpenAI's `input` (_input_messages) or a string
    (`prompt`, `question`; an `instruction` followed by its `input` string, as SFT joins them: instruction_prompt).
    Raises ValueError naming the field: missing, of another type, or a malformed list (messages_of_record). prepare's
    text of a pair is made of these messages (data/sources.text_of_preference)."""
    if key == "input":
        return _input_messages(record)
    if key == messages_key(record):
        return messages_of_record(record, key)
    if key == "instruction":
        _text(record, key)  # either of another type is raised, naming it
        field_text(record, "input")
        return [("user", instruction_prompt(record))]
    return [("user", _text(record, key))]


def _implicit_prompt(record: dict) -> tuple[list[tuple[str, str]], str, str]:
    """(prompt messages, chosen, rejected) of TRL's implicit-prompt shape: `chosen` and `rejected` are each a whole
    conversation ending with the assistant's answer, and the messages before it that both share from the start are
    the prompt (of two equal conversations, all but the last message). Raises ValueError when one ends otherwise,
    they share no first message, or more than the answer follows the shared messages."""
    chosen, rejected = messages_of_record(record, "chosen"), messages_of_record(record, "rejected")
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1][0] != "assistant":
            raise ValueError(f"its {key!r} conversation ends with a {messages[-1][0]} message, not the assistant's "
                             "answer")
        _trained(record[key][-1], key)
    shared = min(len(chosen), len(rejected)) - 1
    n = next((i for i, (c, r) in enumerate(zip(chosen[:shared], rejected[:shared], strict=True)) if c != r), shared)
    if n == 0:
        raise ValueError("its 'chosen' and 'rejected' conversations differ in their first message: they share no "
                         "prompt")
    if len(chosen) > n + 1 or len(rejected) > n + 1:
        raise ValueError(f"its 'chosen' and 'rejected' conversations share {n} {agree(n, 'message', 'messages')} "
                         f"from their start, then go on with {len(chosen) - n} and "
                         f"{len(rejected) - n}: only the answer may follow the prompt they share")
    return chosen[:n], chosen[n][1], rejected[n][1]


def _check_prompt(record: dict, prompt: list[tuple[str, str]]) -> None:
    """Raises ValueError where a record's `prompt` string, beside whole conversations, is not the last user message of
    the prompt they share: the record says two things of its question."""
    text = field_text(record, "prompt")
    if text is not None and text != next((c for role, c in reversed(prompt) if role == "user"), None):
        raise ValueError("its 'prompt' is not the last user message that its 'chosen' and 'rejected' conversations "
                         "share")


def preference_fields(record: dict) -> tuple[str, ...]:
    """The fields of PREFERENCE_FIELDS that preference_from_record reads of record, those of the first shape it has
    (PREFERENCE_ORDER), the prompt first and the answers next; the others it has are left out (chat_format.
    unread_fields). ("messages", "chosen", "rejected"), ("instruction", "chosen", "rejected", "input"), ("input",
    "preferred_output", "non_preferred_output"). The answers' fields decide the shape (chat_format.preference_answers),
    either of a pair enough (the other is then said to be missing, as is an `input` or a `question`); () when it has
    none of them, or `chosen` and `rejected` without a prompt (a bad record). Beside whole
    conversations, a `prompt` string is read (it must be their last shared user message) and a `messages` list that
    equals the chosen conversation (HuggingFaceH4/ultrafeedback_binarized's copy of it) is as good as read; one that
    differs is left out. A null field is an absent one."""
    there = {k for k in PREFERENCE_FIELDS if record.get(k) is not None}
    if whole_conversations(record):
        copy = ("messages",) if record.get("messages") == record["chosen"] else ()
        return (*(("prompt",) if "prompt" in there else ()), "chosen", "rejected", *copy)
    answers = set(preference_answers(record))
    if answers & {"chosen", "rejected"}:
        prompt = next((k for k in PROMPT_KEYS if k in there), None)
        return (prompt, "chosen", "rejected", *(("input",) if prompt == "instruction" else ())) if prompt else ()
    if answers & {"preferred_output", "non_preferred_output"}:
        return "input", "preferred_output", "non_preferred_output"
    if answers & {"response_chosen", "response_rejected"}:
        return "question", "response_chosen", "response_rejected"
    return ()


def _not_a_pair(record: dict) -> str:
    """Why record, of which preference_fields reads nothing, is no pair: a field of a pair's answers that is null
    (_absent: {prompt, chosen: null, rejected: null}), answers without a prompt (NO_PROMPT; a null prompt named as
    null), else NOT_A_PAIR: it has no field of a pair's answers."""
    answers = [key for pair in PREFERENCE_ANSWERS for key in pair]
    if null := next((key for key in answers if key in record and record[key] is None), None):
        return str(_absent(record, null))
    if not preference_answers(record):
        return NOT_A_PAIR
    null = next((key for key in PROMPT_KEYS if key in record and record[key] is None), None)
    return str(_absent(record, null)) if null else NO_PROMPT


def preference_from_record(record: dict) -> tuple[Conversation, str, str]:
    """(conversation whose last answer is "", chosen, rejected) of a record of one of the shapes above, read in the
    first it has (preference_fields), after its `system` and `history` (chat_format.context_messages). prepare's
    preference schema reads a record by it too (data/sources.text_of_preference), so both find the same records bad.

    Raises ValueError, saying why, for a record of none of them (_not_a_pair), a field missing (`rejected` beside a
    `chosen`), null or of another type, or one that cannot train (chat_format.checked_for_training: an empty prompt,
    text no tokenizer can encode).
    """
    fields = preference_fields(record)
    if not fields:
        raise ValueError(_not_a_pair(record))
    if whole_conversations(record):
        prompt, chosen, rejected = _implicit_prompt(record)
        _check_prompt(record, prompt)
    else:  # MedicalGPT's reward data has strings, OpenAI's format lists of one message, the others either
        answer = {"response_chosen": _text, "preferred_output": _output}.get(fields[1], _answer)
        prompt, chosen, rejected = (prompt_messages(record, fields[0]), answer(record, fields[1]),
                                    answer(record, fields[2]))
    conv = conversation_from_messages(context_messages(record) + prompt, add_generation_prompt=True)
    chosen, rejected = line_ends(chosen), line_ends(rejected)  # as the conversation's texts
    return checked_for_training(conv, chosen, rejected), chosen, rejected


def with_answer(conv: Conversation, answer: str) -> Conversation:
    return Conversation([*conv.turns[:-1], (conv.turns[-1][0], answer)], conv.system)


def render_answer(tokenizer: Tokenizer, conv: Conversation, max_len: int) -> tuple[list[int], list[int], bool]:
    """(ids, mask, truncated) of a conversation as SFT renders and cuts it, the mask on its last answer only; ids and
    mask [] where the cut leaves nothing of its last question or answer (chat_format.cut_conversation)."""
    ids, mask, cut = cut_conversation(tokenizer, conv, max_len)  # a huge answer: from what a cut keeps
    if not ids:
        return [], [], cut
    start = len(mask) - mask[::-1].index(0)  # the last answer: after the last prompt's <bos>
    return ids, [0] * start + mask[start:], cut


def render_pair(tokenizer: Tokenizer, conv: Conversation, chosen: str, rejected: str, max_len: int
                ) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]], bool]:
    """(chosen ids, mask), (rejected ids, mask) and whether either was cut to max_len ids."""
    c_ids, c_mask, c_cut = render_answer(tokenizer, with_answer(conv, chosen), max_len)
    r_ids, r_mask, r_cut = render_answer(tokenizer, with_answer(conv, rejected), max_len)
    return (c_ids, c_mask), (r_ids, r_mask), c_cut or r_cut


def pair_samples(tok: Tokenizer, parsed: tuple[Conversation, str, str], settings: SFTSettings,
                 counts: Counter) -> tuple[list, bool]:
    """The token cache's samples of a pair (data/sft_tokens.render_batch): its chosen then its rejected
    answer; none, counted, for a blank answer (chosen, rejected or both: empty_answers), equal answers, a
    filter of characters that fails (filtered, filtered_by_chars: a question of the history, the prompt, or either
    answer out of its limits), or samples that are the same ids and mask, which carry no preference: the
    answers tokenize alike (equal_pairs) or differ only beyond max_len (equal_after_truncation); none, counted
    filtered, where max_len leaves nothing of the question or of an answer."""
    conv, chosen, rejected = parsed
    if is_blank(chosen) or is_blank(rejected):
        counts["empty_answers"] += 1
        return [], False
    if chosen == rejected:
        counts["equal_pairs"] += 1
        return [], False
    prompt = conv.turns[-1][0]
    if not all(settings.fits(u, a) for u, a in conv.turns[:-1]) or not (
            settings.fits(prompt, chosen) and settings.fits(prompt, rejected)):
        counts.update(("filtered", "filtered_by_chars"))
        return [], False
    *samples, cut = render_pair(tok, conv, chosen, rejected, settings.max_len)
    if not samples[0][0] or not samples[1][0]:
        counts["filtered"] += 1
        return [], False
    if samples[0] == samples[1]:
        counts["equal_after_truncation" if cut else "equal_pairs"] += 1
        return [], False
    counts["truncated"] += cut
    return samples, is_val("\x00".join(u for u, _ in conv.turns), settings.val_fraction)
