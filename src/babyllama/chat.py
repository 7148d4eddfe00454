"""A multi-turn chat REPL in the chat format, printing tokens as they come.

    babyllama chat runs/demo/sft/final [--temperature 0.7 --top_p 0.9 --max_new_tokens 256]
    echo "你好" | babyllama chat runs/demo/sft/final          # from a pipe: one answer per line

A byte order mark before the first line (a file saved by Notepad) is skipped.
Commands: /reset forgets the conversation, /exit (or Ctrl-D) leaves; any other line that starts
with / is an unknown command, and a line with bytes that are not text in stdin's encoding is
refused, each with one line, without asking the model. The history is trimmed, oldest turns
first, so that the prompt and the answer fit the context window, and keeps only the turns that can still
fit (kept_turns), so a question costs no more late in a long conversation; a question that does not fit
whole (with the system text) is refused the same way, with the line serve's 400 gives. Ctrl-C ends the
line it cuts (an answer, the prompt) before the CLI says `babyllama: interrupted.` An answer's control characters
other than newline and tab are shown as \\xNN (visible), not sent to the terminal.
"""

from __future__ import annotations

import sys
from collections.abc import Generator, Iterable, Iterator, Sequence

from babyllama.chat_format import Conversation, is_unicode, prompt_budget, render_prompt
from babyllama.errors import UserError
from babyllama.sampling import DEVICE, Sampling
from babyllama.tokenizer import Tokenizer


def prompt_ids(tokenizer: Tokenizer, conv: Conversation, max_seq_len: int, max_new_tokens: int) -> list[int]:
    """The prompt for the answer to conv's last turn, older turns dropped (chat_format's truncation) so that
    max_new_tokens, but at most half the context, fit after it. The last question and the system text are
    never cut, as serve keeps them: when they take more, the answer gets the rest of the context.
    Raises ValueError, the line to show, when they leave no room for one token of answer (serve's 400)."""
    last = len(render_prompt(tokenizer, Conversation(conv.turns[-1:], conv.system)))
    if last >= max_seq_len:
        what = "--system with this question" if conv.system else "this question"
        raise ValueError(f"{what} ({last} tokens) does not fit the context of {max_seq_len} tokens, so it is not "
                         "asked")
    return render_prompt(tokenizer, conv, max(last, prompt_budget(max_seq_len, max_new_tokens)))


class Detokenizer:
    """The text of ids added one at a time, decoded incrementally as TGI's and vLLM's detokenizers do.

    Once some text is decoded, each id decodes only the ids since the last cut (the window) after an anchor
    token (Tokenizer.anchor_id, which makes them decode as inside the text: a leading space is kept), and
    their text is what they add to the anchor's. So n ids cost O(n) decoded ids, not the O(n^2) of decoding
    all again per id. The window is cut after an id whose text does not end in U+FFFD (a character not
    complete yet, or bytes that are not UTF-8) and that is no byte piece decoding with the next ones
    (Tokenizer.grouped_byte_ids). After each add, decode(all ids) is the text of the windows cut so far
    (`before` characters) and then the window's text."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.grouped = tokenizer, tokenizer.grouped_byte_ids()
        self.head: list[int] = []  # [] while nothing is decoded (the text's start), then [anchor]
        self.head_text = ""
        self.window: list[int] = []
        self.text = ""  # the window's text
        self.before = 0  # characters of the text before the window
        self.cut = False  # the window ends after its last id: the next id starts a new one

    def add(self, i: int) -> str:
        """The window's text with id i added; the window is cut after it when its text is complete."""
        if self.cut:
            self.before, self.window = self.length, []
            if not self.head:
                self.head = [self.tokenizer.anchor_id()]
                self.head_text = self.tokenizer.decode(self.head)
        self.window.append(i)
        self.text = self.tokenizer.decode(self.head + self.window)[len(self.head_text) :]
        self.cut = bool(self.head or self.text) and not self.text.endswith("\ufffd") and i not in self.grouped
        return self.text

    @property
    def length(self) -> int:
        """Characters of the text of all ids so far: len(tokenizer.decode(ids))."""
        return self.before + len(self.text)

    def complete(self) -> str:
        """The window's text less a character that the end of the ids cuts (Tokenizer.decode_complete)."""
        return self.tokenizer.decode_complete(self.head + self.window)[len(self.head_text) :]


def decode_stream(tokenizer: Tokenizer, ids: Iterator[int]) -> Iterator[str]:
    """Text pieces as ids arrive (Detokenizer: O(n) decoded ids); a character split over several ids comes
    out whole, and one that the end of the ids cuts (max_new_tokens) not at all (Tokenizer.decode_complete).
    The pieces are those of decoding all ids each time."""
    d = Detokenizer(tokenizer)
    shown = 0  # characters given
    for i in ids:
        text = d.add(i)
        if text.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for the next id
            continue
        if d.length > shown:
            yield text[shown - d.before :]
        shown = d.length
    if d.text.endswith("\ufffd"):  # ended inside a character?
        text = d.complete()
        if d.before + len(text) > shown:
            yield text[shown - d.before :]


def until_stop(pieces: Iterable[str], stops: Sequence[str]) -> Generator[str, None, bool]:
    """The text of pieces up to the first stop string (not included), streamed; returns whether one came.

    A stop string can span pieces, so the last len(longest stop) - 1 characters are held back
    until it is clear that no stop string begins there (as OpenAI's API streams `stop`).
    """
    text, shown = "", 0
    hold = max((len(s) for s in stops), default=1) - 1
    for piece in pieces:
        text += piece
        hits = [i for s in stops if (i := text.find(s, shown)) >= 0]  # none begins before shown: it would have ended
        if hits:
            if min(hits) > shown:
                yield text[shown : min(hits)]
            return True
        if len(text) - hold > shown:
            yield text[shown : len(text) - hold]
            shown = len(text) - hold
    if len(text) > shown:
        yield text[shown:]
    return False


def reply(model, tokenizer: Tokenizer, conv: Conversation, s: Sampling) -> Iterator[str]:
    """Stream the answer to the last turn of conv. Raises ValueError, at the call, as prompt_ids."""
    ids = prompt_ids(tokenizer, conv, model.cfg.max_seq_len, s.max_new_tokens)
    tokens = model.stream(ids, **s.generate_kwargs(), **tokenizer.generation_kwargs(model.cfg.vocab_size))
    return decode_stream(tokenizer, tokens)


def check_system(tokenizer: Tokenizer, system: str, max_seq_len: int) -> None:
    """Raise UserError when the system text, which every prompt begins with, leaves no room in the context
    for a question's <bos> and one token of answer (as serve refuses such system messages)."""
    size = len(tokenizer.encode(system + "\n")) if system else 0
    if size + 1 >= max_seq_len:
        raise UserError(f"--system ({size} tokens) does not fit the context of {max_seq_len} tokens; pass a "
                        "shorter one.")


def refusal(line: str, encoding: str) -> str:
    """Why a line of chat's input, stripped and not a command it runs, is not a question for the model;
    "" when it is one: a line that starts with one / (an unknown command: /help, /reset extra), or one
    with bytes that are not text in encoding (read with errors="surrogateescape"), as the data readers
    refuse them. The line is echoed as visible writes it: a typed ESC [31m must not reach the terminal raw."""
    if not is_unicode(line):  # first: the bytes of /\xff, echoed, could not be written to the terminal
        return f"this line has bytes that are not {encoding} text, so it is not asked; type it again"
    if line.startswith("/") and not line.startswith("//"):
        return f"unknown command {visible(line)}; the commands are /reset, /exit (// asks a line that starts with /)"
    return ""


# C0 controls but \n and \t, DEL and C1 controls: a sampled answer's ESC [2J would clear the terminal, BEL ring it
CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if chr(c) not in "\n\t"}


def visible(text: str) -> str:
    """text with each control character but newline and tab written as \\xNN (ESC as the 4 characters \\x1b),
    so that an answer shows what it holds and cannot move the cursor, retitle or clear the terminal."""
    return text.translate(CONTROLS)


class Terminal:
    """stdout, knowing whether its last line is unfinished (a prompt, an answer so far), so that what stops chat
    (Ctrl-C: the CLI's `babyllama: interrupted.` on stderr) begins a line of its own."""

    def __init__(self):
        self.open = False

    def write(self, text: str) -> None:
        if text:  # before the print: a stop within it leaves at worst an empty line, never a joined one
            self.open = not text.endswith("\n")
        print(text, end="", flush=True)


def kept_turns(history: list[tuple[str, str, int]], max_seq_len: int) -> list[tuple[str, str, int]]:
    """The (question, answer, ids) turns of history less the oldest that no prompt can hold again: a prompt that
    holds a turn holds every newer one, so a turn goes once the newer turns alone take more than max_seq_len ids
    (ids: question <bos> answer <eos>, as truncate_conversation counts them). Each question then renders a bounded
    history, whose cost does not grow with the conversation, into the prompt it got from the whole of it."""
    newer = 0  # ids of the turns after turn i
    for i in range(len(history) - 1, -1, -1):
        if newer > max_seq_len:
            return history[i + 1 :]
        newer += history[i][2]
    return history


def chat(checkpoint: str, sampling: Sampling, system: str = "", device: str = DEVICE) -> None:
    from babyllama.checkpoint import load_checkpoint

    model, tokenizer, _ = load_checkpoint(checkpoint, device)
    check_system(tokenizer, system, model.cfg.max_seq_len)
    sys.stdin.reconfigure(errors="surrogateescape")  # bytes that are not text: lone surrogates (is_unicode)
    out = Terminal()
    try:
        converse(model, tokenizer, sampling, system, out)
    except BaseException:  # Ctrl-C, SIGTERM: the half-written answer or prompt ends its line first
        if out.open:
            out.write("\n")
        raise


def converse(model, tokenizer: Tokenizer, sampling: Sampling, system: str, out: Terminal) -> None:
    """Answer stdin's lines until /exit or its end (the module docstring)."""
    tty = sys.stdin.isatty()
    if tty:
        out.write("babyllama chat: /reset to start over, /exit to leave\n")
    history: list[tuple[str, str, int]] = []  # (question, answer, ids): kept_turns
    first = True
    while True:
        if tty:
            out.write("\n用户> ")
        line = sys.stdin.readline()
        if not line:
            break
        if first:  # a file saved with a byte order mark (Notepad): it is no text, and "\ufeff/exit" no command
            line, first = line.removeprefix("\ufeff"), False
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            history = []
            out.write("(conversation reset)\n")
            continue
        if not text:
            continue
        if note := refusal(text, sys.stdin.encoding):
            out.write(note + "\n")
            continue
        text = text[1:] if text.startswith("//") else text  # "//usr 是什么" asks "/usr 是什么"
        try:
            pieces = reply(model, tokenizer, Conversation([*((q, a) for q, a, _ in history), (text, "")], system),
                           sampling)
        except ValueError as e:  # not read whole: not asked, and the conversation goes on without it
            out.write(f"{e}\n")
            continue
        if tty:
            out.write("助手> ")
        answer = ""
        for piece in pieces:
            answer += piece
            out.write(visible(piece))
        out.write("\n")
        size = sum(len(ids) + 1 for ids in tokenizer.encode_batch([text, answer]))
        history = kept_turns([*history, (text, answer, size)], model.cfg.max_seq_len)
