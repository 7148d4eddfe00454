"""An OpenAI-compatible HTTP server with a web chat page, on FastAPI + uvicorn.

    babyllama serve runs/demo/sft/final --host 127.0.0.1 --port 8000
    # then open http://127.0.0.1:8000/ or use any OpenAI client:
    #   OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none").chat.completions.create(...)

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with "stream": true for
server-sent events; completions also with lists of prompts, token ids, echo and logprobs, as
lm-evaluation-harness's local-completions client sends them), GET /v1/models, GET /v1/models/{id},
POST /tokenize, POST /detokenize, GET /tokenizer_info (vLLM's), GET /health, GET / (the chat page).
Every request is validated (types, ranges, sizes) and every error is {"error": {"message": ...}},
as OpenAI's. A body is counted as it arrives and refused past 1 MB, whatever its encoding, or when it
is not whole within BODY_TIMEOUT_S, and a request's head (its line and headers) not whole within HEAD_TIMEOUT_S of
the connection's opening or of the answer before gets a 408 too. Tokenization runs in worker threads, so the event
loop (and /health) never waits for it. Each request has its own KV cache; one lock lets one request at a time run
a decoding step, so concurrent requests interleave safely; past MAX_IN_FLIGHT of them a request gets a 429. A client
that disconnects stops its generation, and a stop of the server (Ctrl-C, SIGTERM) cancels them all. Logprobs
of a list of prompts are scored in padded batches under the lock, and a one-token answer with logprobs
(lm-evaluation-harness's loglikelihood requests) is picked from that same forward.
"""

import html
import ipaddress
import json  # no `from __future__ import annotations`: FastAPI and pydantic read the request models' types
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Literal, NoReturn, get_args, get_origin

import torch

from babyllama.chat import Detokenizer, decode_stream, until_stop
from babyllama.chat_format import (
    CHAT_TEMPLATE,
    Conversation,
    conversation_from_messages,
    is_unicode,
    render_prompt,
    text_prompt,
)
from babyllama.errors import Terminated, UserError, agree, how_stopped, require
from babyllama.model import sample_next
from babyllama.sampling import DEVICE, MAX_TEMPERATURE, Sampling
from babyllama.tokenizer import Tokenizer

try:
    from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
except ImportError as e:  # pydantic comes with fastapi, in the [serve] extra
    raise UserError("serving needs fastapi and uvicorn: pip install 'babyllama[serve]'.") from e

MAX_BODY_BYTES = 1 << 20
MAX_TEXT_CHARS = 20_000  # a message's content, a prompt
MAX_MESSAGES = 128
# OpenAI takes 4 stop strings, vLLM any number: lm-eval adds its eos string to a task's `until`, so stock tasks send 5
# (gsm8k-cot-llama, humaneval); the holdback of the longest one (until_stop) bounds what they cost
MAX_STOPS, MAX_STOP_CHARS = 32, 100
MAX_NAME_CHARS = 256  # user, safety_identifier, prompt_cache_key
COMPLETION_MAX_TOKENS = 16  # an omitted max_tokens on /v1/completions, as OpenAI's legacy completions
MAX_PROMPTS = 32  # prompts in one /v1/completions request (lm-evaluation-harness sends its batch as a list)
MAX_LOGPROBS = 5  # the most likely tokens per position that `logprobs` may ask for, as OpenAI's limit
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, as OpenAI's limit
MAX_BATCH_POSITIONS = 2048  # (B, T) positions of one scoring forward, whose logits are (B, T, V)
MAX_SCORE_LOGITS = 1 << 25  # B * T * V of one scoring forward (128 MB in fp32), unless one sequence alone is more
MAX_LOGPROB_ENTRIES = 1 << 17  # log-probabilities in an answer (logprob_entries): about 4 MB of JSON, chat's 9
MAX_IN_FLIGHT = 16  # chat and completion requests answered at once (each holds a KV cache); more get a 429
BODY_TIMEOUT_S = 30.0  # a request body not received whole by then gets a 408 and its connection is closed
HEAD_TIMEOUT_S = 30.0  # a request head (its line and headers) not received whole by then: the same (head_deadline)
STOP_GRACE_S = 5  # how long a stop (Ctrl-C, SIGTERM) waits for the requests it cancelled to end
STOPPING = "the server is shutting down, so this answer was stopped before its end"
PAGE = Path(__file__).with_name("chat_page.html")


def unicode_text(text: str) -> str:
    if not is_unicode(text):
        raise ValueError("holds a lone surrogate (such as \\ud800), which is not Unicode text")
    return text


Text = Annotated[str, AfterValidator(unicode_text)]  # every text a request carries


# --- the requests (OpenAI's fields; max_tokens is checked against the context in the route) ---
# Each field's description says what it takes: a 400 names the field and quotes it (see refusal).


class Strict(BaseModel):
    """A request or a part of one: "5" is no number and "yes" no boolean, an unknown field is refused, and
    an explicit null is the field left out, as in OpenAI's API (the openai client sends suffix=None as null)."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def null_is_unset(cls, data: object) -> object:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


ONLY = "only {} is supported"
WHOLE = "an integer of at least 1"
NAME = f"a string of at most {MAX_NAME_CHARS} characters"


class TextPart(Strict):
    type: Literal["text"] = Field(description='only text parts are supported: {"type": "text", "text": "..."}')
    text: Text = Field(description="a string")


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"] = Field(  # developer: OpenAI's newer name for system
        description="one of system, developer, user, assistant")
    content: Text | list[TextPart] = Field(
        description=f"a string, or a list of text parts, of at most {MAX_TEXT_CHARS} characters")

    @field_validator("content")
    @classmethod
    def at_most_max_text_chars(cls, content: str | list[TextPart]) -> str | list[TextPart]:
        n = len(content) if isinstance(content, str) else sum(len(p.text) for p in content)
        if n > MAX_TEXT_CHARS:
            raise ValueError(f"holds {n} characters, more than the {MAX_TEXT_CHARS} a message may hold")
        return content

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    @property
    def chat_role(self) -> str:
        return "system" if self.role == "developer" else self.role


class StreamOptions(Strict):
    include_usage: bool = Field(False, description="true or false")  # a last chunk with the token counts


class TextFormat(Strict):
    type: Literal["text"] = Field(description=ONLY.format('"text"'))


class Common(Strict):
    """The fields of OpenAI's requests that are honoured, or accepted when they ask for the default
    (n 1, no penalties, no logit_bias); any other field is refused with a 400 that names it."""

    model: str | None = Field(None, description="a string")  # any name: the answer names the model served
    # None: the rest of the context (chat), 16 (completions)
    max_tokens: int | None = Field(None, ge=1, description=WHOLE)
    # temperature, top_p: None is the server's (greedy; OpenAI's default temperature is 1)
    temperature: float | None = Field(None, ge=0.0, le=MAX_TEMPERATURE,
                                      description=f"a number from 0 to {MAX_TEMPERATURE:g}")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="a number above 0 and at most 1")
    stop: Text | list[Text] | None = Field(None, description=f"a string or a list of at most {MAX_STOPS} strings, "
                                                             f"each of 1 to {MAX_STOP_CHARS} characters")
    stream: bool = Field(False, description="true or false")
    stream_options: StreamOptions | None = Field(None, description='{"include_usage": true or false}')
    n: int = Field(1, ge=1, le=1, description=ONLY.format(1))  # one choice per request
    # the same seed, prompt and settings: the same answer
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="an integer from -2**63 to 2**63 - 1")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description=ONLY.format(0))
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description=ONLY.format(0))
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description=ONLY.format("{}"))
    user: str | None = Field(None, max_length=MAX_NAME_CHARS, description=NAME)  # informational


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES,
                                    description=f"a list of 1 to {MAX_MESSAGES} messages")
    max_completion_tokens: int | None = Field(None, ge=1, description=WHOLE)  # the newer name of max_tokens
    logprobs: bool = Field(False, description="true or false")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description=f"an integer from 0 to {MAX_TOP_LOGPROBS}")
    response_format: TextFormat | None = Field(None, description=ONLY.format('{"type": "text"}'))
    modalities: list[Literal["text"]] | None = Field(None, description=ONLY.format('["text"]'))
    store: Literal[False] = Field(False, description=ONLY.format("false"))  # nothing is stored here
    metadata: dict[str, str] | None = Field(None, max_length=16, description="an object of at most 16 strings")
    safety_identifier: str | None = Field(None, max_length=MAX_NAME_CHARS, description=NAME)
    prompt_cache_key: str | None = Field(None, max_length=MAX_NAME_CHARS, description=NAME)


PROMPT = (f"a string of at most {MAX_TEXT_CHARS} characters, a list of 1 to {MAX_TEXT_CHARS} token ids, or a list of 1 "
          f"to {MAX_PROMPTS} of either")


def listed(prompt: str | list) -> bool:
    """Whether a completion's prompt is a list of prompts (strings or token-id lists), not one prompt."""
    return isinstance(prompt, list) and (not prompt or not isinstance(prompt[0], int))


class CompletionRequest(Common):
    prompt: Text | list[Text] | list[int] | list[list[int]] = Field(description=PROMPT)
    max_tokens: int | None = Field(None, ge=0, description="an integer of at least 1, or 0 with echo true")
    best_of: int = Field(1, ge=1, le=1, description=ONLY.format(1))
    echo: bool = Field(False, description="true or false")  # the prompt before the answer, in text and logprobs
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description=f"an integer from 0 to {MAX_LOGPROBS}")

    @field_validator("prompt")
    @classmethod
    def prompts_within_limits(cls, prompt: str | list) -> str | list:
        prompts = prompt if listed(prompt) else [prompt]
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            raise ValueError(f"{PROMPT}; got a list of {len(prompts)} {agree(len(prompts), 'prompt', 'prompts')}")
        for i, p in enumerate(prompts):
            if p == [] or len(p) > MAX_TEXT_CHARS:
                what = (f"a string of {len(p)} characters" if isinstance(p, str) else
                        f"a list of {len(p)} token {agree(len(p), 'id', 'ids')}")
                raise ValueError(f"{PROMPT}; got {what}{f' in prompt[{i}]' if listed(prompt) else ''}")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a string or a list of token ids."""
        return list(self.prompt) if listed(self.prompt) else [self.prompt]


class TokenizeRequest(Strict):  # vLLM's /tokenize, which lm-evaluation-harness's remote tokenizer calls
    model: str | None = Field(None, description="a string")
    prompt: Text = Field(max_length=MAX_TEXT_CHARS, description=f"a string of at most {MAX_TEXT_CHARS} characters")
    add_special_tokens: bool = Field(True, description="true or false")  # the <eos> a completion's prompt follows


class DetokenizeRequest(Strict):
    model: str | None = Field(None, description="a string")
    tokens: list[int] = Field(max_length=MAX_TEXT_CHARS, description=f"a list of at most {MAX_TEXT_CHARS} token ids")


def last_turn(body: ChatRequest) -> str:
    """The messages of a chat request's last question, never cut, in the request's terms: the last message, or the
    user messages after the last assistant message, which are joined into one question (the last user turn,
    messages[3] to messages[5])."""
    roles = [m.chat_role for m in body.messages]
    answered = max((i for i, role in enumerate(roles) if role == "assistant"), default=-1)
    turn = [i for i, role in enumerate(roles) if role == "user" and i > answered]
    if turn == [len(roles) - 1]:
        return "the last message"
    return f"the last user turn (messages[{turn[0]}]" + (f" to messages[{turn[-1]}])" if len(turn) > 1 else ")")


def refusal(errors: Sequence[dict], request: type[BaseModel]) -> str:
    """One sentence for pydantic's errors about a request: the most specific one (of a union, the member
    that got furthest), its field as the client wrote it (messages[0].content), what the field takes and
    what it got."""
    if not errors:
        return "body: not a valid request"
    e = max(errors, key=lambda e: (len(e["loc"]), e["type"] != "extra_forbidden"))
    if e["type"] == "json_invalid":
        return f"body: not valid JSON ({e.get('ctx', {}).get('error', 'a syntax error')})"
    if e["type"] == "extra_forbidden":  # loc ends with the unknown field's name
        where = ".".join(filter(None, (field_at(request, e["loc"][1:-1])[0], e["loc"][-1])))
        return f"{where}: this server does not support it (see the README for the fields it takes)"
    where, rule = field_at(request, e["loc"][1:])  # loc[0] is "body"
    where = where or "body"
    if e["type"] == "missing":
        return f"{where}: required, {rule}"
    if e["type"] == "value_error":
        return f"{where}: {e['ctx']['error']}"
    return f"{where}: {rule}; got {shown(e['input'])}"


def field_at(request: type[BaseModel], loc: Sequence[str | int]) -> tuple[str, str]:
    """The field at pydantic's loc as the client wrote it (messages[0].content[1].type; "" for the request
    itself) and what it takes (the description of its Field)."""
    where, rule, fields = "", "a JSON object of the request's fields (see the README)", request.model_fields
    keyed = False  # within an object of the client's keys (metadata)
    for part in loc:
        if isinstance(part, int):
            where += f"[{part}]"
        elif keyed:
            where += f"[{json.dumps(part, ensure_ascii=False)}]"
        elif part in fields:  # else a union member's name (str, list[TextPart]): the rule holds
            where, rule = f"{where}.{part}" if where else part, fields[part].description or rule
            annotation = fields[part].annotation
            fields = fields_within(annotation)
            keyed = any(get_origin(a) is dict for a in (annotation, *get_args(annotation)))
    return where, rule


def fields_within(annotation: object) -> dict:
    """The fields of the request model inside a field's type (Message's in list[Message]), else none."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation.model_fields
    return next((f for f in map(fields_within, get_args(annotation)) if f), {})


def shown(value: object) -> str:
    """A value of a request, short: the JSON of a small one, the size of a large one."""
    if isinstance(value, bytes):  # a body sent without Content-Type: application/json (curl -d's default)
        return (f"{len(value)} {agree(len(value), 'byte', 'bytes')} that were not read as JSON (send the body with "
                "Content-Type: application/json)")
    text = json.dumps(value, default=repr)
    if len(text) <= 40:
        return text
    if isinstance(value, str | list | dict):
        what, one, many = {str: ("a string", "character", "characters"), list: ("a list", "item", "items"),
                           dict: ("an object", "entry", "entries")}[type(value)]
        return f"{what} of {len(value)} {agree(len(value), one, many)}"
    return text[:37] + "..."


def stop_strings(stop: str | list[str] | None) -> list[str]:
    """The request's stop strings; raises ValueError, saying what it got, beyond MAX_STOPS or when one is empty or
    over MAX_STOP_CHARS characters."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    rule = Common.model_fields["stop"].description
    if len(stops) > MAX_STOPS:
        raise ValueError(f"stop: {rule}; got a list of {len(stops)} strings")
    for i, s in enumerate(stops):
        if not s or len(s) > MAX_STOP_CHARS:
            raise ValueError(f"{'stop' if isinstance(stop, str) else f'stop[{i}]'}: {rule}; got {shown(s)}")
    return stops


# --- generation ---


def logprob_token(tokenizer: Tokenizer, i: int) -> tuple[str, list[int] | None]:
    """A token as OpenAI's logprobs show it: its text and its UTF-8 bytes (Tokenizer.id_bytes, `▁的` with its
    space). A token that is only part of a character (or bytes that are not UTF-8) is written `bytes:\\xe4`,
    OpenAI's way, with its bytes; one that adds no text (`</s>`) is its vocabulary string, without bytes."""
    raw = tokenizer.id_bytes()[i]
    if raw is None:
        return tokenizer.id_to_piece(i), None
    try:
        return raw.decode(), list(raw)
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)


def never_ids(model, tokenizer: Tokenizer) -> torch.Tensor:
    """(K,) long on the model's device: the ids no answer holds (Tokenizer.suppress_tokens: <s>, pad, the model's
    rows beyond the vocabulary), which Generation.pick never picks and score lists in no top_logprobs."""
    return torch.tensor(tokenizer.suppress_tokens(model.cfg.vocab_size), dtype=torch.long,
                        device=model.rope_cos.device)


class ContextLengthExceeded(ValueError):
    """A request whose prompt, or prompt and max_tokens, do not fit the context: OpenAI's 400 with the code
    context_length_exceeded, which clients read to shorten the prompt."""


def text_offsets(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
    """Where each of ids begins in their text (decode_complete(ids)), in characters: the length of the whole
    characters that the ids before it make. So the byte tokens of a character made of several all begin where it
    begins, and a client that splits the tokens at len(context) counts them with the context; bytes that are not
    UTF-8 are the U+FFFD characters they decode to. Decoded once, incrementally (Detokenizer): the ids of a window
    (a character's bytes, a run of byte pieces that Llama 2's decoder reads as a whole) are placed when it is cut,
    by how much of the window's text before each stays in its final text (commonprefix), and those of the last at
    the end, where a character that the ids cut is no text."""
    decoded, offsets, pending = Detokenizer(tokenizer), [], []  # pending: (index, the window's text before it)

    def settle(text: str) -> None:
        for k, before in pending:
            offsets[k] = decoded.before + len(os.path.commonprefix((before, text)))
        pending.clear()

    for i in ids:
        if not decoded.cut:  # i joins the window: where it begins depends on the ids after it
            pending.append((len(offsets), decoded.text))
        offsets.append(decoded.length)
        decoded.add(i)
        if decoded.cut:
            settle(decoded.text)
    if pending:
        settle(decoded.complete() if decoded.text.endswith("\ufffd") else decoded.text)
    return offsets


def ids_before(tokenizer: Tokenizer, ids: list[int], chars: int) -> int:
    """How many of ids, from the first, hold the first chars characters of their text: those whose text begins
    before character chars (text_offsets), one straddling it included, with every byte token of a character made of
    several."""
    return next((n for n, at in enumerate(text_offsets(tokenizer, ids)) if at >= chars), len(ids))


class Cancelled(Exception):
    """A generation stopped before its end (Generation.cancel was set): its client left, or the server stops."""


@dataclass
class Generation:
    """One request's answer: its text pieces, then how it ended and how many tokens it took."""

    model: object
    tokenizer: Tokenizer
    lock: threading.Lock
    prompt: list[int]
    sampling: Sampling
    stops: list[str] = field(default_factory=list)
    seed: int | None = None
    echo: str | None = None  # the prompt's text, to put before the answer
    top_logprobs: int | None = None  # logprobs asked for: that many most likely tokens at each position
    ids: list[int] = field(default_factory=list)  # the answer's token ids
    said_eos: bool = False  # the answer ended with <eos>, which it does not hold
    score_only: bool = False  # max_tokens 0 with echo: the prompt is scored, nothing is generated
    finish_reason: str = "length"
    kept: int | None = None  # a stop string ended the answer: how many of ids answer_ids keeps (ids_before)
    shown: int = 0  # the characters of the answer's text (pieces): less a character that max_tokens cut
    picked: int | None = None  # the one token of an answer that picks (picks), from the scoring forward
    chosen: list[float] = field(default_factory=list)  # score: the log-probability of each of scored_ids()[1:]
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # score: the top_logprobs (id, logprob) there
    never: torch.Tensor | None = None  # never_ids(model, tokenizer), which build_app makes once for every request
    cancel: threading.Event = field(default_factory=threading.Event)  # set: Cancelled at the next token or batch

    def __post_init__(self):
        if self.never is None:
            self.never = never_ids(self.model, self.tokenizer)

    def tokens(self) -> Iterator[int]:
        """model.stream, one decoding step at a time under the shared lock; or the one token picked from
        the scoring forward (score). Raises Cancelled before the next step once cancel is set."""
        if self.score_only:
            return
        if self.picks:
            if self.picked != self.tokenizer.eos_id:
                self.ids.append(self.picked)
                yield self.picked
            return
        gen = self.model.stream(self.prompt, **self.sampling.generate_kwargs(), generator=self.generator(),
                                **self.tokenizer.generation_kwargs(self.model.cfg.vocab_size))
        try:
            while True:
                if self.cancel.is_set():
                    raise Cancelled
                with self.lock:
                    nxt = next(gen, None)
                if nxt is None:
                    return
                self.ids.append(nxt)
                yield nxt
        finally:
            gen.close()

    def generator(self) -> torch.Generator | None:
        """The request's seeded random generator, on the model's device; None without a seed."""
        if self.seed is None:
            return None
        return torch.Generator(self.model.rope_cos.device).manual_seed(self.seed)

    def pieces(self) -> Iterator[str]:
        """Text pieces until <eos>, max_tokens or a stop string; sets finish_reason, and kept after a stop."""
        pieces, shown = until_stop(decode_stream(self.tokenizer, self.tokens()), self.stops), 0
        while True:
            try:
                piece = next(pieces)
            except StopIteration as end:
                stopped = end.value
                break
            shown += len(piece)
            yield piece
        self.kept = ids_before(self.tokenizer, self.ids, shown) if stopped else None
        self.shown = shown
        room = min(self.sampling.max_new_tokens, self.model.cfg.max_seq_len - len(self.prompt))  # or the context
        self.said_eos = not stopped and len(self.ids) < room and not self.score_only
        if stopped or self.said_eos:
            self.finish_reason = "stop"

    @property
    def picks(self) -> bool:
        """Whether the answer is one token, scored: then the forward that scores the prompt also gives that
        token (pick), and no other forward runs (lm-evaluation-harness's loglikelihood requests)."""
        return self.top_logprobs is not None and self.sampling.max_new_tokens == 1 and not self.score_only

    def answer_ids(self) -> list[int]:
        """The answer's tokens and the <eos> that ended it, which the model generated as it did them, that both
        endpoints' logprobs list (vLLM's way; lm-eval needs the <eos>). After a stop string, which the text
        leaves out, only the tokens whose text begins before it (kept): the one that straddles its start
        stays, as the text holds its start; those of the stop string do not (usage counts them: generated)."""
        if self.kept is None:
            return self.ids + [self.tokenizer.eos_id] * self.said_eos
        return self.ids[: self.kept]

    def scored_ids(self) -> list[int]:
        """The ids whose logprobs are given: the prompt and answer_ids (the prompt alone before a picked token is
        picked)."""
        return self.prompt + self.answer_ids()

    def pick(self, logits: torch.Tensor, logp: torch.Tensor) -> None:
        """Pick the one new token from the logits (V,) after the prompt, as model.stream picks its first, and
        keep its log-probability from logp (V,) (the log-softmax of those logits)."""
        logits[self.never] = -float("inf")
        s = self.sampling
        self.picked = sample_next(logits, self.prompt, s.temperature, s.top_k, s.top_p, s.repetition_penalty,
                                  self.generator())
        self.chosen.append(logp[self.picked].item())

    def logprobs(self) -> dict:
        """OpenAI's legacy completions `logprobs` of the answer's tokens (with echo, of the prompt's too, the
        first one None as nothing precedes it): each token's text (token), its log-probability (score), the
        top_logprobs most likely tokens, and each token's text_offset in the choice's text: the length of
        the whole characters of the tokens before it (text_offsets), so the byte tokens of one character all begin
        where it begins, but at most the choice's text: the tokens that the text leaves out are at its end. An
        answer that ended with <eos> has it as its last token, as vLLM gives it, and so has one whose last tokens
        are a character that max_tokens cut, which the text leaves out (lm-evaluation-harness drops the last token
        of an echo, the one token it asks for, and would otherwise drop the prompt's)."""
        ids = self.scored_ids()
        start = 0 if self.echo is not None else len(self.prompt)
        text = lambda i: logprob_token(self.tokenizer, i)[0]
        top_dicts = [{text(i): v for i, v in row} for row in self.top]
        end = len(self.echo or "") + self.shown  # the choice's text
        return {"tokens": [text(i) for i in ids[start:]],
                "token_logprobs": ([None] + self.chosen)[start : len(ids)],  # a picked token a stop cut: scored
                "top_logprobs": ([None] + top_dicts)[start : len(ids)],
                "text_offset": [min(at, end) for at in text_offsets(self.tokenizer, ids[start:])]}

    def chat_logprobs(self) -> dict:
        """Chat's `logprobs`, {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]},
        of answer_ids (score), as completions' logprobs list them: the <eos> that ended the answer is `</s>` with
        bytes null, and completion_tokens counts it."""
        answer = self.answer_ids()
        n, m = len(self.prompt) - 1, len(answer)  # row n scores the answer's first token

        def entry(i: int, lp: float) -> dict:
            text, raw = logprob_token(self.tokenizer, i)
            return {"token": text, "logprob": lp, "bytes": raw}

        return {"content": [entry(i, lp) | {"top_logprobs": [entry(j, v) for j, v in row]}
                            for i, lp, row in zip(answer, self.chosen[n : n + m], self.top[n : n + m], strict=True)]}

    def usage(self) -> dict:
        """Token counts: the prompt's, and the tokens generated, with the <eos> that ended the answer (as logprobs
        list it) and a stop string's (which the text and logprobs leave out; OpenAI and vLLM count them too)."""
        n, m = len(self.prompt), len(self.ids) + self.said_eos
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}


def logprob_entries(gens: list[Generation]) -> int:
    """The most log-probabilities the answer of gens can hold: at each position scored (with echo the prompt's, then
    up to max_tokens of the answer's), its token's and its top_logprobs most likely tokens'."""
    return sum(((len(g.prompt) if g.echo is not None else 0) + (0 if g.score_only else g.sampling.max_new_tokens))
               * (1 + g.top_logprobs) for g in gens if g.top_logprobs is not None)


@torch.no_grad()
def score(gens: list[Generation]) -> None:
    """Score the generations that ask logprobs (their scored_ids) in batched forwards: each gets the
    log-probability of each id after those before it (natural log of the model's softmax over its fp32
    logits, before temperature or top_p, as `babyllama eval` scores) and its top_logprobs most likely
    (id, log-probability) there among the ids an answer can hold (not Tokenizer.suppress_tokens); one that
    picks takes its token from the same forward (Generation.pick).

    The sequences, sorted by length, are right-padded into (B, T) batches of at most MAX_BATCH_POSITIONS
    positions and MAX_SCORE_LOGITS logits (B * T * V; a sequence whose logits alone are more goes alone): causal
    attention never lets a position see the padding after it, so each sequence's log-probabilities are those of a
    forward of it alone, up to float rounding (1e-6). A batch is scored whole under the model's lock, so that one
    batch's logits at a time are held, whatever the requests in flight. Raises Cancelled between batches once the
    generations' cancel is set."""
    asked = sorted((g for g in gens if g.top_logprobs is not None), key=lambda g: len(g.scored_ids()))
    most = min(MAX_BATCH_POSITIONS, MAX_SCORE_LOGITS // gens[0].model.cfg.vocab_size)  # positions of a batch
    while asked:
        if asked[0].cancel.is_set():
            raise Cancelled
        n = 1  # the batch asked[:n], whose longest sequence is its last
        while n < len(asked) and (n + 1) * len(asked[n].scored_ids()) <= most:
            n += 1
        with asked[0].lock:  # its logits are freed as score_batch returns, before another batch's forward
            score_batch(asked[:n])
        asked = asked[n:]


def score_batch(batch: list[Generation]) -> None:
    """score for one batch: one forward, (B, T) -> logits (B, T, V), then each sequence's log-softmax (T, V)."""
    model, seqs = batch[0].model, [g.scored_ids() for g in batch]
    T = max(map(len, seqs))
    x = torch.tensor([s + [0] * (T - len(s)) for s in seqs], device=model.rope_cos.device)  # (B, T), padded with 0s
    logits, _ = model(x)
    for b, (g, s) in enumerate(zip(batch, seqs, strict=True)):
        n = len(s) - 1 + g.picks  # the rows that score an id, a picked token's too
        logp = torch.log_softmax(logits[b, :n].float(), dim=-1)  # (n, V): row t scores id t + 1
        rows = torch.arange(len(s) - 1, device=logp.device)
        ids = torch.tensor(s[1:], dtype=torch.long, device=logp.device)  # long: a prompt of one token has none
        g.chosen = logp[rows, ids].tolist()
        if g.picks:
            g.pick(logits[b, len(s) - 1].float().clone(), logp[len(s) - 1])
        top_v, top_i = logp.index_fill_(-1, g.never, -float("inf")).topk(g.top_logprobs, dim=-1)  # <s>, pad: in no
        g.top = [list(zip(i, v, strict=True)) for i, v in zip(top_i.tolist(), top_v.tolist(), strict=True)]  # answer


# --- the responses ---


def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
    """OpenAI's error shape, with its code when there is one (context_length_exceeded). A 413 or 408 closes the
    connection, so that the rest of the body is never read."""
    from fastapi.responses import JSONResponse

    headers = {"connection": "close"} if status in (408, 413) else None
    body = {"message": message, "type": kind} | ({"code": code} if code else {})
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def unparsable(cause: BaseException) -> str:
    """Why FastAPI could not parse a body (its 400 'There was an error parsing the body' is raised from it)."""
    if isinstance(cause, UnicodeDecodeError):
        return f"body: not UTF-8 JSON (byte 0x{cause.object[cause.start]:02x} at position {cause.start})"
    if isinstance(cause, RecursionError):
        return "body: JSON nested too deeply"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        digits = getattr(sys, "get_int_max_str_digits", lambda: 4300)()  # Python 3.10.7 and later
        return f"body: a number of more than {digits} digits"
    return f"body: not UTF-8 JSON ({cause})"


class BodyLimit:
    """ASGI middleware: a request body over max_bytes gets a 413, whether a Content-Length says so or
    the bytes of a chunked body pass the limit as they arrive; nothing past the limit is read. A body not
    received whole within timeout_s of the first read gets a 408 (a client that sends part of a body and
    waits held its connection open for ever)."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        import asyncio

        from starlette.exceptions import HTTPException

        too_large = f"request body over {self.max_bytes} bytes"
        length = dict(scope.get("headers", [])).get(b"content-length", b"0")
        if scope["type"] == "http" and (not length.isdigit() or int(length) > self.max_bytes):
            return await error(413 if length.isdigit() else 400, too_large if length.isdigit() else
                               "Content-Length is not a number")(scope, receive, send)
        received, whole, deadline = 0, False, None

        async def counted():
            nonlocal received, whole, deadline
            if whole:  # the body is read: what comes now is the client leaving, whenever it does
                return await receive()
            deadline = deadline or asyncio.get_running_loop().time() + self.timeout_s
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body did not arrive whole within {self.timeout_s:g} s"
                                    ) from None  # the app's handler answers with error(408, ...)
            whole = not message.get("more_body", False)
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, too_large)  # the app's handler answers with error(413, ...)
            return message

        await self.app(scope, counted if scope["type"] == "http" else receive, send)


def head_deadline(timeout_s: float) -> type:
    """uvicorn's HTTP protocol class (h11's, or httptools' when it is installed) with a deadline on each request's
    head (its request line and headers): timeout_s from the connection's opening, or from the end of the answer
    before, for the head to arrive whole; else the connection gets a 408 in OpenAI's JSON shape and is closed.
    uvicorn gives a head no deadline (its keep-alive timeout ends an idle connection only until a first byte comes),
    so a client that sent a byte of its headers every few seconds held a connection for ever (slowloris).
    The deadline builds on uvicorn internals (uvicorn_lacks): a uvicorn without them gets its own class back, and
    a one-line warning on stderr."""
    import asyncio

    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    missing = uvicorn_lacks(AutoHTTPProtocol)
    if missing:
        print(f"warning: the HTTP protocol of uvicorn {uvicorn.__version__} has no {', '.join(missing)}, on which "
              "babyllama's deadline on request heads builds, so this server runs without it (a client that sends "
              "its head slowly can hold a connection open).", file=sys.stderr, flush=True)
        return AutoHTTPProtocol
    body = json.dumps({"error": {"message": f"the request head did not arrive whole within {timeout_s:g} s",
                                 "type": "invalid_request_error"}}).encode()
    late = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body))

    class HeadDeadline(AutoHTTPProtocol):
        timer = None  # the deadline of the head awaited (asyncio.TimerHandle)

        def connection_made(self, transport):
            super().connection_made(transport)
            self.head_transport = transport
            self.await_head()

        def on_response_complete(self):  # (before super's: it may start a pipelined request, whose head is here)
            self.await_head()
            super().on_response_complete()

        def connection_lost(self, exc):
            self.timer.cancel()
            super().connection_lost(exc)

        def await_head(self) -> None:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = asyncio.get_running_loop().call_later(timeout_s, self.head_late)

        def head_late(self) -> None:
            """At the deadline: a 408 and the end of the connection, unless a request's head came (its cycle is
            answered, or was: then its answer's end set a new deadline)."""
            if (self.cycle is None or self.cycle.response_complete) and not self.head_transport.is_closing():
                self.head_transport.write(late)
                self.head_transport.close()

    return HeadDeadline


def uvicorn_lacks(protocol: type) -> list[str]:
    """What HeadDeadline builds on of uvicorn's HTTP protocol class that protocol lacks (pyproject does not pin
    uvicorn, whose internals these are): its on_response_complete, its request being answered (the attribute cycle,
    set by its __init__) and whether that answer is complete (response_complete, set by its module's
    RequestResponseCycle). Read from the classes and the names their __init__'s code uses: a few dictionary looks,
    no connection."""
    def sets(cls: type, name: str) -> bool:  # name is among those that the code of its __init__ uses
        return name in getattr(getattr(cls.__init__, "__code__", None), "co_names", ())

    cycle = getattr(sys.modules.get(protocol.__module__), "RequestResponseCycle", None)
    needs = {"on_response_complete()": callable(getattr(protocol, "on_response_complete", None)),
             "cycle": sets(protocol, "cycle"),
             "RequestResponseCycle.response_complete": cycle is not None and sets(cycle, "response_complete")}
    return [name for name, there in needs.items() if not there]


class InFlight:
    """The chat and completion requests being answered: at most `most` at once, each with its cancel event (in
    its scope, "babyllama.cancel"), which stop() sets for all of them when the server stops."""

    def __init__(self, most: int):
        self.most, self.stopped = most, False
        self.cancels: set[threading.Event] = set()

    def stop(self) -> None:
        """Cancel every request in flight (their generations end at their next token) and admit no more."""
        self.stopped = True
        for cancel in list(self.cancels):
            cancel.set()

    def admit(self, app):
        """ASGI middleware over app: a request to paths that generate gets a 429 past `most` at once, a 503 once
        stopped, else its cancel event for as long as it runs, a stream's too."""
        async def admitted(scope, receive, send):
            if scope["type"] != "http" or scope["path"] not in GENERATING:
                return await app(scope, receive, send)
            if self.stopped:
                return await error(503, "the server is shutting down", "server_error")(scope, receive, send)
            if len(self.cancels) >= self.most:
                return await error(429, f"the server is answering {self.most} requests, as many as it takes at "
                                   "once; send it again when one is done", "rate_limit_exceeded")(scope, receive, send)
            cancel = scope["babyllama.cancel"] = threading.Event()
            self.cancels.add(cancel)
            try:
                await app(scope, receive, send)
            finally:
                self.cancels.discard(cancel)

        return admitted


class HostCheck:
    """ASGI middleware: a request whose Host header names none of allowed_hosts (its port aside) gets a 400 in
    OpenAI's JSON shape with a sentence that says how to serve other names (a guard against DNS rebinding, as
    Starlette's TrustedHostMiddleware, whose plain-text 'Invalid host header' says nothing of --host)."""

    def __init__(self, app, allowed_hosts: Sequence[str]):
        self.app, self.allowed_hosts = app, [h.lower() for h in allowed_hosts]

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":  # (no websocket routes)
            host = dict(scope.get("headers", [])).get(b"host", b"").decode("latin-1")
            name = re.sub(r":\d*$", "", host).lower()  # [::1]:8000 -> [::1]
            if name not in self.allowed_hosts:
                names = ", ".join(self.allowed_hosts)
                return await error(400, f"Host header {host!r}: this server answers only {names}; start it with "
                                   "--host 0.0.0.0 (or this machine's address) to answer other names"
                                   )(scope, receive, send)
        await self.app(scope, receive, send)


async def whole_answer(gens: list[Generation], rid: str, created: int, name: str, chat: bool) -> dict:
    """respond's JSON object: the generations' answers, then their scores at once (score), which also pick the
    token of those that take one from it. Raises Cancelled when a generation is."""
    from fastapi.concurrency import iterate_in_threadpool, run_in_threadpool

    async def text(gen: Generation) -> str:
        return "".join([p async for p in iterate_in_threadpool(gen.pieces())])

    texts = [None if gen.picks else await text(gen) for gen in gens]
    await run_in_threadpool(score, gens)
    choices = []
    for index, (gen, answer) in enumerate(zip(gens, texts, strict=True)):
        answer = await text(gen) if answer is None else answer
        choice = {"index": index, "finish_reason": gen.finish_reason}
        logprobs = None
        if gen.top_logprobs is not None:
            logprobs = await run_in_threadpool(gen.chat_logprobs if chat else gen.logprobs)
        if chat:
            choices.append(choice | {"message": {"role": "assistant", "content": answer}, "logprobs": logprobs})
        else:
            choices.append(choice | {"text": (gen.echo or "") + answer, "logprobs": logprobs})
    return response_object(choices, gens, rid, created, name, chat)


def response_object(choices: list[dict], gens: list[Generation], rid: str, created: int, name: str,
                    chat: bool) -> dict:
    """A whole answer (chat.completion or text_completion) with its choices, and usage summed over them."""
    usage = {k: sum(g.usage()[k] for g in gens) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": name, "choices": choices, "usage": usage}


def chunk_event(index: int, delta: dict | str, finish: str | None, rid: str, created: int, name: str,
                chat: bool) -> str:
    """One server-sent event of a stream: a chat delta or a piece of completion text of choice index."""
    choice = {"index": index, "finish_reason": finish} | ({"delta": delta} if chat else {"text": delta})
    data = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": name, "choices": [choice]}
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def until_gone(receive, cancel: threading.Event) -> None:
    """Set cancel when the client leaves: once the body is read, ASGI's receive gives http.disconnect then."""
    while (await receive())["type"] != "http.disconnect":
        pass
    cancel.set()


async def respond(request, gens: list[Generation], name: str, chat: bool, stream: bool, usage: bool = False):
    """The whole answer as one JSON object, or a stream of events; either stops when the client leaves, and
    when the server stops (Generation.cancel) ends with OpenAI's error (a 503, or a stream's error event)
    (usage: a last chunk with no choices and the token counts, as stream_options.include_usage asks).
    A choice per generation (a completion's list of prompts), generated one after another."""
    import asyncio

    from fastapi.concurrency import iterate_in_threadpool
    from fastapi.responses import StreamingResponse

    rid, created = f"{'chat' if chat else 'text'}-{uuid.uuid4().hex[:16]}", int(time.time())
    if not stream:
        watch = asyncio.ensure_future(until_gone(request.receive, gens[0].cancel))
        try:
            return await whole_answer(gens, rid, created, name, chat)
        except Cancelled:  # the server stops (or the client left, and reads nothing)
            return error(503, STOPPING, "server_error")
        finally:
            watch.cancel()

    async def events():
        try:
            for index, gen in enumerate(gens):
                pieces = gen.pieces()
                try:
                    if chat:
                        yield chunk_event(index, {"role": "assistant", "content": ""}, None, rid, created, name, chat)
                    async for piece in iterate_in_threadpool(pieces):
                        if await request.is_disconnected():
                            return  # the finally below stops the generation
                        yield chunk_event(index, {"content": piece} if chat else piece, None, rid, created, name,
                                          chat)
                    yield chunk_event(index, {} if chat else "", gen.finish_reason, rid, created, name, chat)
                finally:
                    pieces.close()
        except Cancelled:  # the server stops: OpenAI's error event (the openai client raises it), and no [DONE]
            yield f"data: {json.dumps({'error': {'message': STOPPING, 'type': 'server_error'}})}\n\n"
            return
        if usage:
            data = response_object([], gens, rid, created, name, chat)
            yield f"data: {json.dumps(data | {'object': 'chat.completion.chunk' if chat else 'text_completion'})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


# --- the app: routes as thin wiring ---


REQUESTS = {"/v1/chat/completions": ChatRequest, "/v1/completions": CompletionRequest, "/tokenize": TokenizeRequest,
            "/detokenize": DetokenizeRequest}
GENERATING = ("/v1/chat/completions", "/v1/completions")  # the routes that InFlight counts and stops


def build_app(model, tokenizer: Tokenizer, model_name: str, sampling: Sampling | None = None,
              allowed_hosts: Sequence[str] | None = None):
    """The FastAPI app serving model (a Transformer, or anything with .cfg and .stream) and tokenizer;
    sampling: the temperature and top_p of requests that leave them out, the top_k and repetition
    penalty of all (default: sampling.Sampling, as chat and eval); allowed_hosts: the names a request's Host
    header may give (HostCheck: a 400 for any other), None for any. app.state.stop() cancels the requests in
    flight (InFlight.stop), as the server stops."""
    fastapi = require("fastapi", "serve")
    from fastapi import Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    max_ctx = model.cfg.max_seq_len
    defaults = sampling or Sampling()
    lock, never = threading.Lock(), never_ids(model, tokenizer)  # shared by every request's Generation
    app = fastapi.FastAPI(title="babyllama", version="1")

    flights = InFlight(MAX_IN_FLIGHT)
    app.state.stop = flights.stop
    app.add_middleware(flights.admit)  # the inner one: only requests that pass the others count
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed_hosts=allowed_hosts)
    # the outer one: a body too large is refused first
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES, timeout_s=BODY_TIMEOUT_S)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc):  # 404, 405, a body that cannot be parsed: the same JSON shape
        return error(exc.status_code, unparsable(exc.__cause__) if exc.__cause__ else str(exc.detail))

    @app.exception_handler(Exception)
    async def fault(request: Request, exc):  # a fault of the server's own: OpenAI's JSON shape, the traceback logged
        return error(500, f"the server failed on this request ({type(exc).__name__}); its log has the traceback",
                     "server_error")

    @app.exception_handler(fastapi.exceptions.RequestValidationError)
    async def invalid(request: Request, exc):
        return error(400, refusal(exc.errors(), REQUESTS.get(request.url.path, Common)))

    def generation(body: Common, prompt: list[int], max_tokens: int) -> Generation:
        if body.stream_options is not None and not body.stream:
            raise ValueError("stream_options: only with stream true")
        asked = {k: v for k, v in (("temperature", body.temperature), ("top_p", body.top_p)) if v is not None}
        sampling = replace(defaults, max_new_tokens=max_tokens, **asked)
        return Generation(model, tokenizer, lock, prompt, sampling, stop_strings(body.stop), body.seed, never=never)

    def room(prompt_tokens: int, max_tokens: int | None, what: str, name: str = "max_tokens") -> int:
        """max_tokens, or the rest of the context when it is None; ValueError when they do not fit."""
        available = max_ctx - prompt_tokens
        if available < 1:
            raise ContextLengthExceeded(f"{what} ({prompt_tokens} tokens) does not fit the context of {max_ctx} "
                                        "tokens")
        if max_tokens is not None and max_tokens > available:
            raise ContextLengthExceeded(f"{name} ({max_tokens}) does not fit the context: {what} takes "
                                        f"{prompt_tokens} of its {max_ctx} tokens, so {available} "
                                        f"{agree(available, 'is', 'are')} available")
        return max_tokens or available

    def kept_messages(body: ChatRequest, conv: Conversation) -> str:
        """What a chat prompt always keeps, in the request's terms; ValueError when its system text
        alone (the system and developer messages) leaves no room in the context."""
        if not conv.system:
            return last_turn(body)
        system = "the system text of " + ", ".join(
            f"messages[{i}]" for i, m in enumerate(body.messages) if m.chat_role == "system")
        size = len(tokenizer.encode(conv.system + "\n")) + 1  # and the shortest question's <bos>
        if size >= max_ctx:
            raise ContextLengthExceeded(f"{system} ({size - 1} tokens) does not fit the context of {max_ctx} tokens")
        return f"{system} with {last_turn(body)}"

    def chat_generation(body: ChatRequest) -> Generation:
        """The Generation of a chat request; ValueError, a 400, for what it cannot take. It tokenizes:
        called in a worker thread, off the event loop."""
        if body.max_tokens and body.max_completion_tokens and body.max_tokens != body.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ; give one of them")
        asked = body.max_completion_tokens or body.max_tokens
        name = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        conv = conversation_from_messages([(m.chat_role, m.text) for m in body.messages], add_generation_prompt=True)
        # the last message and the system text are never cut; older turns go as chat drops them,
        # leaving max_tokens, or without it half the context, for the answer
        last = len(render_prompt(tokenizer, Conversation(conv.turns[-1:], conv.system)))
        try:
            room(last, asked, "the last message", name)
        except ValueError:  # name what does not fit in the request's terms: it tokenizes the system text again
            room(last, asked, kept_messages(body, conv), name)
        if body.top_logprobs and not body.logprobs:
            raise ValueError("top_logprobs: only with logprobs true")
        if body.logprobs and body.stream:
            raise ValueError("logprobs: only without stream")
        budget = max_ctx - asked if asked else max(last, max_ctx - max_ctx // 2)
        prompt = render_prompt(tokenizer, conv, budget)
        gen = generation(body, prompt, asked or max_ctx - len(prompt))
        gen.top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return gen

    def completion_generation(body: CompletionRequest) -> list[Generation]:
        """The Generations of a completion request, one per prompt (as chat_generation); an omitted
        max_tokens is COMPLETION_MAX_TOKENS, OpenAI's default for completions, or the rest of the context
        when less. A text prompt follows <eos>, as documents do in the shards; token ids go in as given."""
        if body.max_tokens == 0 and not body.echo:  # 0: score the prompt only, as OpenAI's legacy completions
            raise ValueError("max_tokens: 0 only with echo true (to score the prompt)")
        if body.stream and (body.echo or body.logprobs is not None):
            raise ValueError(f"{'echo' if body.echo else 'logprobs'}: only without stream")
        gens = []
        for i, text in enumerate(body.prompts()):
            many = f"[{i}]" if listed(body.prompt) else ""
            if isinstance(text, str):
                prompt = text_prompt(tokenizer, text)
            elif (bad := next((t for t in text if not 0 <= t < tokenizer.vocab_size), None)) is not None:
                raise ValueError(f"prompt{many}: token id {bad} is not in the vocabulary of {tokenizer.vocab_size}")
            else:
                prompt, text = list(text), tokenizer.decode(text)
            if body.max_tokens == 0:  # the prompt scored, nothing generated: it may fill the context
                if len(prompt) > max_ctx:
                    raise ContextLengthExceeded(f"the prompt{many} ({len(prompt)} tokens) does not fit the context "
                                                f"of {max_ctx} tokens")
                gen = generation(body, prompt, 1)
                gen.score_only = True
            else:
                available = room(len(prompt), body.max_tokens, f"the prompt{many}")
                gen = generation(body, prompt, body.max_tokens or min(COMPLETION_MAX_TOKENS, available))
            gen.echo, gen.top_logprobs = text if body.echo else None, body.logprobs
            gens.append(gen)
        return gens

    specials = {text: getattr(tokenizer, name.replace("_token", "_id")) for name, text in
                tokenizer.special_tokens().items()}

    @app.post("/tokenize")
    def tokenize_route(body: TokenizeRequest):
        """The ids of a text as completions, chat and eval read it: `</s>` inside a text is text. A prompt that
        is exactly a special token's string (`</s>`) is its id: how lm-eval's remote tokenizer learns them."""
        ids = [specials[body.prompt]] if body.prompt in specials else tokenizer.encode(body.prompt)
        ids = ([tokenizer.eos_id] if body.add_special_tokens else []) + ids
        return {"tokens": ids, "count": len(ids), "max_model_len": max_ctx}

    @app.post("/detokenize")
    def detokenize_route(body: DetokenizeRequest):
        if (bad := next((t for t in body.tokens if not 0 <= t < tokenizer.vocab_size), None)) is not None:
            return error(400, f"tokens: token id {bad} is not in the vocabulary of {tokenizer.vocab_size}")
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info")
    def tokenizer_info():
        return {"tokenizer_class": type(tokenizer).__name__, **tokenizer.special_tokens(),
                "chat_template": CHAT_TEMPLATE, "model_max_length": max_ctx, "vocab_size": tokenizer.vocab_size}

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_name}

    card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "babyllama",
            "context_length": max_ctx}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")  # path: the served name holds a slash (sft/final)
    def retrieve_model(model_id: str):
        return card if model_id == model_name else error(404, f"model {model_id!r} does not exist: this server "
                                                              f"serves {model_name!r}")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await answer(request, body, lambda body: [chat_generation(body)], chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await answer(request, body, completion_generation, chat=False)

    async def answer(request: Request, body: Common, make_generations, chat: bool):
        try:
            gens = await run_in_threadpool(make_generations, body)
        except ContextLengthExceeded as e:
            return error(400, str(e), code="context_length_exceeded")
        except (ValueError, UserError) as e:  # what the request asks for cannot be done: its sentence
            return error(400, str(e))
        if (entries := logprob_entries(gens)) > MAX_LOGPROB_ENTRIES:  # an answer of tens of MB
            fewer = "max_tokens or top_logprobs" if chat else "prompts, max_tokens or logprobs, or echo false"
            return error(400, f"logprobs: the answer could hold {entries} log-probabilities (a token's and its top "
                              f"ones at each position scored), more than the {MAX_LOGPROB_ENTRIES} an answer may "
                              f"hold; ask for fewer {fewer}")
        for gen in gens:
            gen.cancel = request.scope["babyllama.cancel"]  # InFlight's: set when the server stops
        return await respond(request, gens, model_name, chat=chat, stream=body.stream,
                             usage=bool(body.stream_options and body.stream_options.include_usage))

    # the chat page, filled in once: each placeholder stands in HTML text or an attribute's value (escaped for both),
    # or a number in its script (serve's limits, which it keeps a request within)
    page_html = PAGE.read_text(encoding="utf-8")
    for key, value in (("MODEL", model_name), ("CONTEXT", max_ctx), ("TEMPERATURE", f"{defaults.temperature:g}"),
                       ("MAX_MESSAGES", MAX_MESSAGES), ("MAX_BODY_BYTES", MAX_BODY_BYTES)):
        page_html = page_html.replace("{{" + key + "}}", html.escape(str(value)))

    @app.get("/", response_class=HTMLResponse)
    def page():
        return page_html

    return app


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, device: str = DEVICE,
          sampling: Sampling | None = None) -> None:
    """Load a checkpoint and serve it with uvicorn until Ctrl-C or SIGTERM (sampling: see build_app). A stop cancels
    the requests in flight (their generations end at their next token) and raises, once they have ended,
    KeyboardInterrupt or Terminated for the CLI to say; a second stop, or STOP_GRACE_S without their end (a long
    forward under way), ends the process at once, as the CLI would (stop_now)."""
    from babyllama.checkpoint import load_checkpoint, model_name

    uvicorn = require("uvicorn", "serve")
    sock = listening_socket(host, port)  # a busy port is said before the model loads
    model, tokenizer, _ = load_checkpoint(checkpoint, device)
    name = model_name(checkpoint)
    print(f"serving {name} on http://{url_host(host)}:{port}/", file=sys.stderr, flush=True)
    app = build_app(model, tokenizer, name, sampling, loopback_names(host, sock.getsockname()[0]))

    stops: list[int] = []  # the signal of the stop, once one came
    grace = threading.Timer(STOP_GRACE_S, lambda: stop_now(stops[0]))
    grace.daemon = True

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # before uvicorn waits for the requests in flight: end them
            if stops:  # a second stop: at once (uvicorn's "force quit" left the tasks under way to print tracebacks)
                stop_now(stops[0])
            stops.append(sig)
            app.state.stop()
            grace.start()
            super().handle_exit(sig, frame)

    try:  # Server.run raises the stop's signal again once it has stopped, which uvicorn.run would swallow
        Server(uvicorn_config(app, fd=sock.fileno(), log_level="info")).run()
    finally:
        grace.cancel()
    if stops:  # raised again under the handler from before uvicorn's, it was ignored: SIGINT in `serve &`, whose
        raise KeyboardInterrupt if stops[-1] == signal.SIGINT else Terminated  # shell ignores it for the job


def uvicorn_config(app, **kwargs):
    """uvicorn's Config serving app (kwargs: where to listen, log_level), each request's head within
    HEAD_TIMEOUT_S (head_deadline)."""
    uvicorn = require("uvicorn", "serve")
    return uvicorn.Config(app, http=head_deadline(HEAD_TIMEOUT_S), **kwargs)


def stop_now(signum: int) -> NoReturn:
    """End the process at once, with what the CLI says of a stop of serve and its exit code (cli.stopped), without
    waiting for the work under way (a forward) to end."""
    print(f"babyllama: {how_stopped(signum)}.", file=sys.stderr,
          flush=True)
    os._exit(128 + signum)


def url_host(host: str) -> str:
    """host as a URL and a Host header write it: an IPv6 address in brackets ([::1])."""
    return f"[{host}]" if ":" in host else host


def loopback_names(host: str, address: str) -> list[str] | None:
    """The Host headers a server on host answers, given the address its socket was bound to (host resolved, once, by
    listening_socket): on a loopback address (the default) only this machine's own names and host itself
    (127.0.0.2), so that a web page whose name a DNS rebinding points at 127.0.0.1 cannot drive it from a browser;
    None (any) on another address, which the user chose to open."""
    if not ipaddress.ip_address(address).is_loopback:
        return None
    return list(dict.fromkeys(["127.0.0.1", "localhost", "[::1]", url_host(host).lower()]))


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port for uvicorn; UserError when host is empty, or the address is taken or not this
    machine's."""
    if not host.strip():
        raise UserError(f"--host {host!r} is empty: give the address to listen on (127.0.0.1: this machine only, "
                        "0.0.0.0: every interface).")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {url_host(host)}:{port}: {e.strerror or e}.") from None
    return sock
