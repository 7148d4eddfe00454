"""The OpenAI-compatible server against a live uvicorn on 127.0.0.1, driven by the openai client."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import httpx
import pytest

from babyllama.chat import Sampling, reply
from babyllama.chat_format import Conversation
from tests.conftest import running, sharp_model, tiny_config
from tests.test_tokenizer import tokenizer_of

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")


class SlowModel:
    """The model with a small delay per forward, so a generation lasts long enough to interrupt; it counts the
    tokens it streams (calls) and the shape of each input given to it whole (forwards: the scoring ones)."""

    def __init__(self, model, delay: float):
        self.model, self.delay, self.calls, self.forwards = model, delay, 0, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, idx, *args, **kwargs):
        self.forwards.append(tuple(idx.shape))
        return self.model(idx, *args, **kwargs)

    def stream(self, *args, **kwargs):
        for token in self.model.stream(*args, **kwargs):
            self.calls += 1
            time.sleep(self.delay)
            yield token


@pytest.fixture(scope="module")
def server(bpe_tokenizer):
    model = SlowModel(sharp_model(tiny_config(vocab_size=600, max_seq_len=128)), delay=0.0)
    for url in running(model, bpe_tokenizer):
        yield {"url": url, "model": model, "tokenizer": bpe_tokenizer}


def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0)


def whole_characters_before(tok, ids: list[int]) -> list[int]:
    """text_offset's definition: for each of ids, how many characters of their text (decode_complete) the ids
    before it make whole, decoding each prefix: O(n^2) ids."""
    text = tok.decode_complete(ids)
    return [len(os.path.commonprefix((tok.decode(ids[:t]), text))) for t in range(len(ids))]


def alone(server, question: str, max_tokens: int) -> str:
    conv = Conversation([(question, "")])
    return "".join(reply(server["model"].model, server["tokenizer"], conv, Sampling(max_new_tokens=max_tokens)))


def test_chat_completion_plain_and_streaming(server):
    c = client(server)
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "你好"}], max_tokens=12)
    text = r.choices[0].message.content
    assert text == alone(server, "你好", 12) and text
    assert r.usage.completion_tokens <= 12 and r.choices[0].finish_reason in ("stop", "length")
    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "你好"}],
                                            max_tokens=12, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert [m.id for m in c.models.list().data] == ["tiny"]
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"


def test_models_retrieve_answers_the_served_model_and_404s_another(server):
    for url in running(server["model"], server["tokenizer"], "sft/final"):  # as serve names a checkpoint
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        model = c.models.retrieve("sft/final")
        assert (model.id, model.object, model.owned_by) == ("sft/final", "model", "babyllama")
        assert model.model_dump() == c.models.list().data[0].model_dump()
        with pytest.raises(openai.NotFoundError) as e:
            c.models.retrieve("gpt-4")
        assert e.value.body["message"] == "model 'gpt-4' does not exist: this server serves 'sft/final'"


def test_completions_and_stop_strings(server):
    c = client(server)
    full = c.completions.create(model="tiny", prompt="今天天气", max_tokens=20).choices[0].text
    streamed = "".join(x.choices[0].text for x in c.completions.create(model="tiny", prompt="今天天气", max_tokens=20,
                                                                        stream=True))
    assert streamed == full and len(full) > 3
    stop = full[2:4]
    cut = c.completions.create(model="tiny", prompt="今天天气", max_tokens=20, stop=[stop]).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_a_stop_string_leaves_its_tokens_out_of_logprobs_and_counts_them_in_usage(server):
    """With a stop string the logprobs listed the tokens of the stop string too, past the text (text_offset beyond
    its end). They list the tokens whose text begins before the stop string, one straddling its start included;
    usage counts every token generated (the stop string's too, as OpenAI bills them), whole or streamed, and chat
    lists the same tokens."""
    c = client(server)
    ask = dict(model="tiny", prompt="今天天气", max_tokens=20)
    full = c.completions.create(**ask, logprobs=1).choices[0]
    tokens, offsets = full.logprobs.tokens, full.logprobs.text_offset
    ends = [*offsets[1:], len(full.text)]
    k = next(k for k in range(1, len(tokens) - 2) if ends[k] - offsets[k] >= 2)  # a token of 2 characters or more
    for at, listed in ((offsets[k], k), (offsets[k] + 1, k + 1)):  # at a token's start; inside it: it straddles
        stop = full.text[at : ends[k + 1]]
        assert full.text.index(stop) == at
        r = c.completions.create(**ask, logprobs=1, stop=[stop])
        cut = r.choices[0]
        assert (cut.text, cut.finish_reason) == (full.text[:at], "stop")
        assert cut.logprobs.tokens == tokens[:listed] and cut.logprobs.text_offset == offsets[:listed]
        assert cut.logprobs.token_logprobs == full.logprobs.token_logprobs[:listed]
        assert r.usage.completion_tokens >= k + 2  # generated up to the stop string's end, at least
        chunks = list(c.completions.create(**ask, stop=[stop], stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    chat = dict(model="tiny", messages=[{"role": "user", "content": "你好"}], max_tokens=20, logprobs=True)
    whole = c.chat.completions.create(**chat).choices[0]
    content = whole.logprobs.content
    text = whole.message.content
    stop = text[len(text) // 2 :][:2]
    r = c.chat.completions.create(**chat, stop=[stop])
    listed = [x.token for x in r.choices[0].logprobs.content]
    assert r.choices[0].message.content == text[: text.index(stop)]
    assert listed == [x.token for x in content[: len(listed)]]
    assert len(listed) < r.usage.completion_tokens < len(content)


def test_a_list_of_prompts_gets_a_choice_each_the_answer_it_gets_alone(server):
    c, tok = client(server), server["tokenizer"]
    texts = ["今天天气", "北京是", "质量很好"]
    alone = [c.completions.create(model="tiny", prompt=t, max_tokens=6).choices[0].text for t in texts]
    ids = [[tok.eos_id, *tok.encode(t)] for t in texts]  # the ids a text prompt becomes: <eos> first
    for prompt in (texts, ids):
        r = c.completions.create(model="tiny", prompt=prompt, max_tokens=6)
        assert [x.text for x in sorted(r.choices, key=lambda x: x.index)] == alone
        assert r.usage.prompt_tokens == sum(map(len, ids))
    streamed = ["", "", ""]
    for chunk in c.completions.create(model="tiny", prompt=texts, max_tokens=6, stream=True):
        for x in chunk.choices:
            streamed[x.index] += x.text
    assert streamed == alone
    assert c.completions.create(model="tiny", prompt=ids[0], max_tokens=6).choices[0].text == alone[0]


def test_echo_and_logprobs_are_the_models_log_softmax(server):
    import torch

    tok, model = server["tokenizer"], server["model"].model
    prompt = [tok.eos_id, *tok.encode("今天天气很好")]
    r = client(server).completions.create(model="tiny", prompt=prompt, max_tokens=3, echo=True, logprobs=2)
    choice = r.choices[0]
    answer = model.generate(prompt, max_new_tokens=3, **tok.generation_kwargs(model.cfg.vocab_size))
    ids = prompt + answer
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0][0, :-1].float(), dim=-1)  # (T-1, V)
    expected = [logp[t, ids[t + 1]].item() for t in range(len(ids) - 1)]
    lp = choice.logprobs
    assert choice.text == tok.decode(prompt) + tok.decode_complete(answer)  # a character cut short is left out
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-5)
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])
    greedy = lp.top_logprobs[len(prompt):]  # the answer is greedy: each token is its position's most likely
    assert [max(t.values()) for t in greedy] == pytest.approx(lp.token_logprobs[len(prompt):], abs=1e-5)
    assert lp.text_offset == [min(at, len(choice.text)) for at in whole_characters_before(tok, ids)]
    plain = client(server).completions.create(model="tiny", prompt=prompt, max_tokens=3, logprobs=0).choices[0]
    assert plain.logprobs.token_logprobs == pytest.approx(expected[-3:], abs=1e-5)
    assert plain.logprobs.top_logprobs == [{}, {}, {}] and plain.logprobs.text_offset[0] == 0


def test_an_answer_holds_at_most_max_logprob_entries_log_probabilities(server, monkeypatch):
    """32 prompts with echo and logprobs 5 at a long context made an answer of tens of MB: a request whose answer
    could hold more than MAX_LOGPROB_ENTRIES log-probabilities (each position scored: its token's and its top
    ones) gets a 400 that says what to ask less of."""
    from babyllama import serve

    monkeypatch.setattr(serve, "MAX_LOGPROB_ENTRIES", 180)
    url = server["url"]
    ask = lambda n: {"prompt": [[5] * 10] * n, "echo": True, "max_tokens": 5, "logprobs": 5}  # n * 15 * (1 + 5)
    chat = lambda n: {"messages": [{"role": "user", "content": "你好"}], "max_tokens": n, "logprobs": True,
                      "top_logprobs": 19}  # n * (1 + 19)
    held = lambda lp: sum(v is not None for v in lp["token_logprobs"]) + sum(len(t or {}) for t in lp["top_logprobs"])
    r = httpx.post(url + "/v1/completions", json=ask(2), timeout=60)  # 180: at the limit
    assert r.status_code == 200 and sum(held(c["logprobs"]) for c in r.json()["choices"]) <= 180
    r = httpx.post(url + "/v1/chat/completions", json=chat(9), timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"]["content"]
    assert httpx.post(url + "/v1/chat/completions", json={**chat(20), "logprobs": False, "top_logprobs": None},
                      timeout=60).status_code == 200  # no logprobs: not counted
    over = {"/v1/completions": (ask(3), 270, "prompts, max_tokens or logprobs, or echo false"),
            "/v1/chat/completions": (chat(10), 200, "max_tokens or top_logprobs")}
    for path, (body, entries, fewer) in over.items():
        r = httpx.post(url + path, json=body, timeout=60)
        assert (r.status_code, r.json()) == (400, {"error": {"type": "invalid_request_error", "message":
            f"logprobs: the answer could hold {entries} log-probabilities (a token's and its top ones at each "
            f"position scored), more than the 180 an answer may hold; ask for fewer {fewer}"}})


def test_chat_logprobs_are_the_models_log_softmax_of_the_answer(server):
    import torch

    from babyllama.chat_format import render_prompt

    tok, model = server["tokenizer"], server["model"].model
    r = client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "今天天气"}],
                                               max_tokens=5, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    prompt = render_prompt(tok, Conversation([("今天天气", "")]))
    answer = model.generate(prompt, max_new_tokens=5, **tok.generation_kwargs(model.cfg.vocab_size))
    ids = prompt + answer
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0][0, :-1].float(), dim=-1)  # (T-1, V)
    expected = [logp[t, ids[t + 1]].item() for t in range(len(prompt) - 1, len(ids) - 1)]
    assert [c.logprob for c in content] == pytest.approx(expected, abs=1e-5) and len(content) == len(answer)
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-5)
               for c in content)  # greedy: each token is its position's most likely
    assert b"".join(bytes(c.bytes) for c in content).decode(errors="replace") == tok.decode(answer)  # the text's bytes
    plain = client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "今天天气"}],
                                                   max_tokens=5)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    for extra, said in (({"logprobs": True, "stream": True}, "logprobs: only without stream"),
                        ({"top_logprobs": 2}, "top_logprobs: only with logprobs true")):
        bad = httpx.post(server["url"] + "/v1/chat/completions", json=body | extra, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["message"] == said


@pytest.mark.parametrize(("body", "said"), [
    ({"prompt": [[5, 6], [600]]}, "prompt[1]: token id 600 is not in the vocabulary of 600"),
    ({"prompt": [-1]}, "prompt: token id -1 is not in the vocabulary of 600"),
    ({"prompt": [[]]}, "prompt: a string of at most 20000 characters"),
    ({"prompt": "今天", "echo": True, "stream": True}, "echo: only without stream"),
    ({"prompt": "今天", "logprobs": 1, "stream": True}, "logprobs: only without stream"),
    ({"prompt": "今天", "logprobs": 6}, "logprobs: an integer from 0 to 5; got 6"),
    ({"prompt": ["今天", "明" * 300]}, "the prompt[1] ("),
])
def test_bad_prompt_lists_are_named(server, body, said):
    r = httpx.post(server["url"] + "/v1/completions", json={"max_tokens": 2, **body}, timeout=30)
    assert r.status_code == 400 and said in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"])
@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain"])
def test_a_body_sent_as_curl_d_sends_it_gets_a_400_that_says_the_content_type(server, path, content_type):
    """A tester's `curl -d '{...}'` (form-encoded by default) got a 500: the body came as bytes to the error."""
    r = httpx.post(server["url"] + path, content=b'{"prompt": "a", "max_tokens": 1}', timeout=30,
                   headers={"Content-Type": content_type})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == ("body: a JSON object of the request's fields (see the README); got 32 "
                                            "bytes that were not read as JSON (send the body with Content-Type: "
                                            "application/json)")


@pytest.mark.parametrize("kind", ["bpe", "llama2", "metaspace", "chatglm2"])
def test_a_logprobs_token_is_its_text_and_bytes_and_part_of_a_character_is_written_as_openai_does(
        kind, bpe_tokenizer, tmp_path):
    from babyllama.serve import logprob_token

    tok = tokenizer_of(kind, bpe_tokenizer, tmp_path)
    pieces = [logprob_token(tok, tok._byte_id(b)) for b in "中".encode()]  # <0xE4> or a byte-level BPE's ä
    assert pieces == [("bytes:\\xe4", [0xE4]), ("bytes:\\xb8", [0xB8]), ("bytes:\\xad", [0xAD])]
    assert logprob_token(tok, tok.encode("a the")[-1]) == (" the", [32, 116, 104, 101])  # ▁the: its space kept
    assert logprob_token(tok, tok.eos_id) == ("</s>", None) and logprob_token(tok, tok.bos_id) == ("<s>", None)
    text = "你好 the 中文。"
    lead = b"" if kind == "bpe" else b" "  # the ▁ that SentencePiece puts before a text and decoding drops
    assert b"".join(bytes(raw) for _, raw in map(partial(logprob_token, tok), tok.encode(text))) == lead + text.encode()


def test_logprobs_of_partial_characters_in_completions_and_chat_are_openais(server):
    """"中" as three byte tokens: `bytes:\\xe4` and its bytes, never the vocabulary's `ä` or `<0xE4>`."""
    from babyllama.serve import Generation, score

    tok, model = server["tokenizer"], server["model"].model
    zhong = [tok._byte_id(b) for b in "中".encode()]
    prompt = [tok.eos_id, *tok.encode("你好"), *zhong, *tok.encode(" the")]
    r = httpx.post(server["url"] + "/v1/completions", json={"prompt": prompt, "max_tokens": 0, "echo": True,
                                                            "logprobs": 1}, timeout=30).json()["choices"][0]
    tokens = ["</s>", "你", "好", "bytes:\\xe4", "bytes:\\xb8", "bytes:\\xad", " the"]
    assert r["logprobs"]["tokens"] == tokens and r["text"] == "你好中 the"
    assert r["logprobs"]["text_offset"] == whole_characters_before(tok, prompt)
    assert r["logprobs"]["text_offset"][3:6] == [2, 2, 2]  # 中's bytes all begin where it does
    gen = Generation(model, tok, threading.Lock(), prompt[:3], Sampling(max_new_tokens=3), ids=zhong, top_logprobs=2)
    score([gen])
    content = gen.chat_logprobs()["content"]
    assert [(c["token"], c["bytes"]) for c in content] == [("bytes:\\xe4", [0xE4]), ("bytes:\\xb8", [0xB8]),
                                                           ("bytes:\\xad", [0xAD])]
    assert [len(c["top_logprobs"]) for c in content] == [2, 2, 2]


class Scripted:
    """The model, but its stream yields the given ids whatever it is asked (the scoring forwards are the model's)."""

    def __init__(self, model, ids: list[int]):
        self.model, self.ids = model, ids

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def stream(self, *args, **kwargs):
        yield from self.ids


def test_logprobs_of_a_character_that_max_tokens_cut_are_at_the_end_of_the_text(server):
    """An answer whose last tokens are "中"'s first two bytes, which max_tokens cut: the text leaves the character
    out, and its tokens' text_offset pointed past the text (its second at len(text) + 1, counting the U+FFFD that
    the text does not hold). The tokens stay listed, as the </s> that ended an answer is (vLLM lists every token
    generated, and lm-eval drops an answer's last token: the one it asks for, a byte token or not), each at the end
    of the text, which is where a token that adds nothing to it is; usage counts them; chat lists them the same."""
    from babyllama.serve import Generation, score

    tok, model = server["tokenizer"], server["model"].model
    zhong = [tok._byte_id(b) for b in "中".encode()]
    prompt = [tok.eos_id, *tok.encode("你好")]
    gen = Generation(Scripted(model, zhong[:2]), tok, threading.Lock(), prompt, Sampling(max_new_tokens=2),
                     echo=tok.decode(prompt), top_logprobs=1)
    text = gen.echo + "".join(gen.pieces())
    score([gen])
    lp = gen.logprobs()
    assert text == "你好" and (gen.finish_reason, gen.usage()["completion_tokens"]) == ("length", 2)
    assert lp["tokens"] == ["</s>", "你", "好", "bytes:\\xe4", "bytes:\\xb8"]
    assert lp["text_offset"] == [0, 0, 1, 2, 2] and len(lp["token_logprobs"]) == 5
    assert [(c["token"], c["bytes"]) for c in gen.chat_logprobs()["content"]] == [("bytes:\\xe4", [0xE4]),
                                                                                  ("bytes:\\xb8", [0xB8])]


def test_top_logprobs_list_only_ids_an_answer_can_hold(server, monkeypatch):
    """A token that generation never produces (Tokenizer.suppress_tokens: <s>, pad) is no top alternative, though
    each listed logprob stays the model's own (the ids scored keep theirs)."""
    from babyllama.serve import Generation, score

    tok, model = server["tokenizer"], server["model"].model
    prompt = [tok.eos_id, *tok.encode("今天天气很好")]

    def top_of(gen: Generation) -> list[list[tuple[int, float]]]:
        score([gen])
        return gen.top

    before = top_of(Generation(model, tok, threading.Lock(), prompt, Sampling(max_new_tokens=1), echo="",
                               top_logprobs=3, score_only=True))
    never = {i for row in before for i, _ in row[:2]}  # every position's two likeliest, declared unproducible
    monkeypatch.setattr(type(tok), "suppress_tokens", lambda self, vocab_size: tuple(sorted(never)))
    after = top_of(Generation(model, tok, threading.Lock(), prompt, Sampling(max_new_tokens=1), echo="",
                              top_logprobs=3, score_only=True))
    assert all(i not in never for row in after for i, _ in row) and [len(row) for row in after] == [3] * len(after)
    kept = [[(i, v) for i, v in row if i not in never] for row in before]  # the same ids, the same logprobs:
    assert [[i for i, _ in a[: len(k)]] for a, k in zip(after, kept, strict=True)] == [[i for i, _ in k] for k in kept]
    assert [v for a, k in zip(after, kept, strict=True) for _, v in a[: len(k)]] == pytest.approx(
        [v for k in kept for _, v in k], abs=1e-6)


def test_the_ids_no_answer_holds_are_listed_once_per_server(server, monkeypatch):
    """Tokenizer.suppress_tokens, made a tensor on the model's device, is built when the app is, not again for
    each scoring batch and each picked token."""
    tok, calls = server["tokenizer"], []
    real = type(tok).suppress_tokens

    def counted(self, vocab_size):
        calls.append(vocab_size)
        return real(self, vocab_size)

    monkeypatch.setattr(type(tok), "suppress_tokens", counted)
    for url in running(server["model"].model, tok):
        for echo in (True, False):  # a scoring batch alone, then one that picks its token too
            r = httpx.post(url + "/v1/completions", json={"prompt": "今天天气", "max_tokens": 1, "echo": echo,
                                                          "logprobs": 2}, timeout=30)
            assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["top_logprobs"][-1]) == 2
    assert calls == [600]


@pytest.mark.parametrize("kind", ["bpe", "llama2", "metaspace", "chatglm2"])
def test_text_offsets_are_where_each_tokens_character_begins(kind, bpe_tokenizer, tmp_path):
    """`床前` as `</s>`, `bytes:\\xe5\\xba`, `bytes:\\x8a`, `前` had text_offset [0, 0, 1, 1]: 床's last byte at 1,
    with 前, so a client splitting at len(context) took it for the continuation's. A token begins after the whole
    characters before it: [0, 0, 0, 1]; bytes that are not UTF-8 are the U+FFFD they decode to, a character that the
    ids cut is no text. Random ids, byte runs and texts, for each kind of tokenizer."""
    from babyllama.serve import text_offsets

    tok = tokenizer_of(kind, bpe_tokenizer, tmp_path)
    rng = random.Random(2)
    cases = [tok.encode("床前明月光，疑是 地上霜 😀 a")]
    for _ in range(30):
        raw = [tok._byte_id(b) for b in "".join(rng.choice(["床", "😀", "é", " ", "a"]) for _ in range(12)).encode()]
        cases += [[rng.randrange(tok.vocab_size) for _ in range(30)],
                  [b if rng.random() < 0.8 else rng.randrange(tok.vocab_size) for b in raw]]
    for ids in cases:
        assert text_offsets(tok, ids) == whole_characters_before(tok, ids), ids
    chuang = [tok._byte_id(b) for b in "床".encode()]
    assert text_offsets(tok, [tok.eos_id, *chuang, *tok.encode("前")])[:4] == [0, 0, 0, 0]


def test_logprobs_decode_each_id_about_once(server, monkeypatch):
    """text_offset decodes incrementally (chat.Detokenizer) and each token's text and bytes come from one table
    (Tokenizer.id_bytes): a 120-token echo decodes a short window per token, not each prefix again."""
    from babyllama.serve import Generation, score

    tok = server["tokenizer"]
    prompt = [tok.eos_id, *tok.encode("今天天气很好，the 中文 𠀀 " * 12)][:120]
    gen = Generation(server["model"].model, tok, threading.Lock(), prompt, Sampling(max_new_tokens=1),
                     echo=tok.decode(prompt), top_logprobs=5, score_only=True)  # the text that offsets point into
    score([gen])
    tok.id_bytes()  # built once per tokenizer
    offsets = whole_characters_before(tok, prompt)  # the definition: 7,140 ids decoded
    decoded, decode = [], type(tok).decode
    monkeypatch.setattr(type(tok), "decode", lambda self, ids: decoded.append(len(ids)) or decode(self, ids))
    assert gen.logprobs()["text_offset"] == offsets
    assert len(prompt) + 1 <= len(decoded) <= len(prompt) + 7  # a call per id (+ the anchor's), and at the end
    assert max(decoded) <= 8  # decode_complete's of a character that the ids cut: 𠀀's 4 bytes at most, + 3


def test_a_list_of_prompts_is_scored_in_batches_with_the_logprobs_each_gets_alone(server, monkeypatch):
    """lm-evaluation-harness's loglikelihood requests (token ids, echo, logprobs 1, max_tokens 1): one padded
    forward for the list, whose last rows also pick each answer's token, and the numbers of each prompt alone."""
    import torch

    from babyllama import serve

    tok, model, slow = server["tokenizer"], server["model"].model, server["model"]
    zhong = [tok._byte_id(b) for b in "中".encode()]
    prompts = [[tok.eos_id, *tok.encode(t)] for t in ("今天天气很好", "北京是", "the 质量", "好")]
    prompts[2] += zhong  # ends inside a character
    body = {"model": "tiny", "echo": True, "logprobs": 2, "temperature": 0}
    post = lambda prompt, **kw: httpx.post(server["url"] + "/v1/completions", json=body | kw | {"prompt": prompt},  # noqa: E731
                                           timeout=30).json()["choices"]
    assert list(map(len, prompts)) == [11, 6, 10, 2]
    big, V = 1 << 25, model.cfg.vocab_size  # the budget of logits (B * T * V): a sequence over it goes alone
    for max_tokens, batches, limit, logits in (
            (1, [(4, 11)], 2048, big), (1, [(2, 6), (1, 10), (1, 11)], 14, big), (3, [(4, 14)], 2048, big),
            (1, [(2, 6), (1, 10), (1, 11)], 2048, 14 * V), (1, [(1, 2), (1, 6), (1, 10), (1, 11)], 2048, 5 * V)):
        monkeypatch.setattr(serve, "MAX_BATCH_POSITIONS", limit)
        monkeypatch.setattr(serve, "MAX_SCORE_LOGITS", logits)
        alone = [post(p, max_tokens=max_tokens)[0] for p in prompts]
        slow.forwards.clear()
        streamed = slow.calls
        together = sorted(post(prompts, max_tokens=max_tokens), key=lambda c: c["index"])
        assert slow.forwards == batches  # sorted by length, within the limits of positions and logits
        assert slow.calls - streamed == (0 if max_tokens == 1 else sum(len(c["logprobs"]["tokens"]) for c in alone)
                                         - sum(map(len, prompts)))  # one token: from the scoring forward, no stream
        for a, b, prompt in zip(alone, together, prompts, strict=True):
            assert (b["text"], b["finish_reason"], b["logprobs"]["tokens"], b["logprobs"]["text_offset"]) == (
                a["text"], a["finish_reason"], a["logprobs"]["tokens"], a["logprobs"]["text_offset"])
            (lp, top), (lp_alone, top_alone) = ([c["logprobs"][k][1:] for k in ("token_logprobs", "top_logprobs")]
                                                for c in (b, a))
            assert lp == pytest.approx(lp_alone, abs=1e-5) and list(map(list, top)) == list(map(list, top_alone))
            answer = model.generate(prompt, max_new_tokens=max_tokens, **tok.generation_kwargs(model.cfg.vocab_size))
            ids = prompt + answer
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids]))[0][0, :-1].float(), dim=-1)  # (T-1, V)
            expected = [logp[t, ids[t + 1]].item() for t in range(len(ids) - 1)]
            assert b["logprobs"]["token_logprobs"][1 : len(ids)] == pytest.approx(expected, abs=1e-5)
            assert b["text"] == tok.decode(prompt) + tok.decode_complete(answer)


def test_max_tokens_0_with_echo_scores_the_prompt_alone(server):
    tok = server["tokenizer"]
    prompt = [tok.eos_id, *tok.encode("今天天气很好")]
    post = lambda body: httpx.post(server["url"] + "/v1/completions", json=body, timeout=30)  # noqa: E731
    scored = post({"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1}).json()["choices"][0]
    longer = post({"prompt": prompt, "max_tokens": 2, "echo": True, "logprobs": 1}).json()["choices"][0]
    assert scored["text"] == tok.decode(prompt) and scored["finish_reason"] == "length"
    # one forward of 7 positions against one of 9: the same values up to float rounding (score's docstring)
    assert scored["logprobs"]["token_logprobs"][0] is None
    assert scored["logprobs"]["token_logprobs"][1:] == pytest.approx(
        longer["logprobs"]["token_logprobs"][1 : len(prompt)], abs=1e-5)
    full = post({"prompt": [5] * 128, "max_tokens": 0, "echo": True, "logprobs": 0})  # the whole context: no room
    assert full.status_code == 200 and len(full.json()["choices"][0]["logprobs"]["tokens"]) == 128
    r = post({"prompt": prompt, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["message"] == (
        "max_tokens: 0 only with echo true (to score the prompt)")


def test_tokenize_detokenize_and_tokenizer_info_as_vllm_serves_them(server):
    tok, url = server["tokenizer"], server["url"]
    post = lambda path, body: httpx.post(url + path, json=body, timeout=30).json()  # noqa: E731
    ids = tok.encode("今天天气")
    assert post("/tokenize", {"prompt": "今天天气"})["tokens"] == [tok.eos_id, *ids]  # as a completion's prompt
    assert post("/tokenize", {"prompt": "今天天气", "add_special_tokens": False}) == {
        "tokens": ids, "count": len(ids), "max_model_len": 128}
    info = httpx.get(url + "/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == tok.id_to_piece(tok.eos_id) and info["chat_template"].startswith("{%")
    bos, eos = info["bos_token"], info["eos_token"]  # alone, they are their ids: how lm-eval learns them
    assert [post("/tokenize", {"prompt": t, "add_special_tokens": False})["tokens"] for t in (bos, eos)] == [
        [tok.bos_id], [tok.eos_id]]
    inside = post("/tokenize", {"prompt": f"{bos}今天天气{eos}", "add_special_tokens": False})["tokens"]
    assert inside == tok.encode(f"{bos}今天天气{eos}")  # inside a text, text: as completions and eval read it
    assert post("/detokenize", {"tokens": ids}) == {"prompt": "今天天气"}
    r = httpx.post(url + "/detokenize", json={"tokens": [600]}, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "tokens: token id 600 is not in the vocabulary of 600"


def test_eight_concurrent_streams_get_their_own_answers(server):
    questions = [f"问题{i}：天空为什么是蓝色的" * (1 + i % 3) for i in range(8)]

    def ask(q):
        stream = client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}],
                                                        max_tokens=16, stream=True)
        return "".join(ch.choices[0].delta.content or "" for ch in stream)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, questions))
    assert answers == [alone(server, q, 16) for q in questions]
    assert len(set(answers)) > 1


@pytest.mark.parametrize("body, fragment", [
    ('{"messages": [', "JSON"),
    ('{"messages": [{"role": "user", "content": 5}]}', "content"),
    ('{"messages": [{"role": "hacker", "content": "x"}]}', "role"),
    ('{"messages": [], "max_tokens": 5}', "messages"),
    ('{"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}', "max_tokens"),
    ('{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', "temperature"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "starts with the assistant"),  # not "last message"
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}', "last message"),
    ('{"messages": [{"role": "user", "content": "x"}], "stop": ' + str(list(map(str, range(33)))).replace("'", '"')
     + "}", "stop"),
    ('{"messages": [{"role": "user", "content": "' + "很长" * 200 + '"}], "max_tokens": 8}', "context"),
    ('{"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}', "max_tokens"),
    ('{"messages": [{"role": "user", "content": "x"}], "max_tokens": true}', "max_tokens"),
    ('{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream"),
    ('{"messages": [{"role": "user", "content": "x"}], "n": 2}', "n"),
    (b'{"messages": [{"role": "user", "content": "\xff"}]}', "body: not UTF-8 JSON (byte 0xff at position 43)"),
    (b'{"messages": ' + b"[" * 100_000, "body: JSON nested too deeply"),
    ('{"messages": [{"role": "user", "content": "x"}], "max_tokens": 9' + "9" * 5000 + "}",
     "body: a number of more than 4300 digits"),
])
def test_bad_requests_get_4xx_json(server, body, fragment):
    r = httpx.post(server["url"] + "/v1/chat/completions", content=body,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert fragment.lower() in r.json()["error"]["message"].lower()


@pytest.mark.parametrize("message, said", [
    ({"role": "user", "content": None}, "messages[0].content: required, a string, or a list of text parts, of at "
                                        "most 20000 characters"),
    ({"role": "user", "content": 5}, "messages[0].content: a string, or a list of text parts, of at most 20000 "
                                     "characters; got 5"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/a.png"}}]},
     'messages[0].content[0].type: only text parts are supported: {"type": "text", "text": "..."}; got "image_url"'),
    ({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text"}]},
     "messages[0].content[1].text: required, a string"),
    ({"role": "user", "content": "x" * 300_000},
     "messages[0].content: holds 300000 characters, more than the 20000 a message may hold"),
    ({"role": "user", "content": [{"type": "text", "text": "x" * 15_000}] * 2},
     "messages[0].content: holds 30000 characters, more than the 20000 a message may hold"),
    ({"role": "tool", "content": "x"}, 'messages[0].role: one of system, developer, user, assistant; got "tool"'),
    ({"role": "user", "content": "x", "name": "bob"},
     "messages[0].name: this server does not support it (see the README for the fields it takes)"),
])
def test_a_bad_message_is_named_as_the_client_wrote_it_with_what_is_allowed(server, message, said):
    r = httpx.post(server["url"] + "/v1/chat/completions", json={"messages": [message]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"] == said


@pytest.mark.parametrize("metadata, said", [
    ({"k": 5}, 'metadata["k"]: an object of at most 16 strings; got 5'),
    ({"a": "x", "键 b": ["y"]}, 'metadata["键 b"]: an object of at most 16 strings; got ["y"]'),
    ({str(i): "v" for i in range(17)}, "metadata: an object of at most 16 strings; got an object of 17 entries"),
    ({"k": ["y" * 40]}, 'metadata["k"]: an object of at most 16 strings; got a list of 1 item'),
])
def test_a_bad_metadata_value_names_its_key(server, metadata, said):
    body = {"messages": [{"role": "user", "content": "x"}], "metadata": metadata}
    r = httpx.post(server["url"] + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"] == said


STOP = "a string or a list of at most 32 strings, each of 1 to 100 characters"
PROMPTS = "a string of at most 20000 characters, a list of 1 to 20000 token ids, or a list of 1 to 32 of either"


@pytest.mark.parametrize("body, said", [
    ({"prompt": "x", "stop": [str(i) for i in range(33)]}, f"stop: {STOP}; got a list of 33 strings"),
    ({"prompt": "x", "stop": ["a", ""]}, f'stop[1]: {STOP}; got ""'),
    ({"prompt": "x", "stop": "y" * 101}, f"stop: {STOP}; got a string of 101 characters"),
    ({"prompt": ["x"] * 33}, f"prompt: {PROMPTS}; got a list of 33 prompts"),
    ({"prompt": [[5, 6]] * 64}, f"prompt: {PROMPTS}; got a list of 64 prompts"),  # lm-eval's --batch_size 64
    ({"prompt": []}, f"prompt: {PROMPTS}; got a list of 0 prompts"),
    ({"prompt": [[5], []]}, f"prompt: {PROMPTS}; got a list of 0 token ids in prompt[1]"),
    ({"prompt": "x" * 20_001}, f"prompt: {PROMPTS}; got a string of 20001 characters"),
    ({"prompt": ["x", "y" * 20_001]}, f"prompt: {PROMPTS}; got a string of 20001 characters in prompt[1]"),
    ({"prompt": [5] * 20_001}, f"prompt: {PROMPTS}; got a list of 20001 token ids"),
])
def test_a_request_over_a_limit_is_told_what_it_sent(server, body, said):
    r = httpx.post(server["url"] + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"] == said


def test_lm_evals_five_stop_strings_are_taken(server):
    """lm-eval adds its eos string to a task's `until`: gsm8k-cot-llama and humaneval send 5 (OpenAI's limit is 4)."""
    until = ["<|eot_id|>", "<|start_header_id|>user<|end_header_id|>", "Q:", "</s>", "<|im_end|>"]
    r = httpx.post(server["url"] + "/v1/completions", json={"prompt": "天空", "max_tokens": 4, "stop": until},
                   timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length"), r.text


def test_unknown_routes_and_methods_get_the_same_json_error(server):
    for r in (httpx.get(server["url"] + "/v1/nothing"), httpx.get(server["url"] + "/v1/chat/completions")):
        assert r.status_code in (404, 405) and r.json()["error"]["message"]


def test_oversized_body_is_refused(server):
    r = httpx.post(server["url"] + "/v1/completions", content=b"x" * (2 << 20),
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "error" in r.json()


def assert_stopped(model) -> None:
    """The slowed model's generation, whose client hung up, stopped well before its 60 tokens and stays stopped."""
    time.sleep(0.5)
    calls = model.calls
    time.sleep(0.5)
    assert model.calls == calls < 40


def test_disconnect_stops_generation(server):
    model = server["model"]
    model.delay, model.calls = 0.03, 0
    try:
        with httpx.stream("POST", server["url"] + "/v1/completions", timeout=10,
                          json={"prompt": "一", "max_tokens": 60, "stream": True}) as r:
            next(r.iter_lines())  # the first event, then hang up
        time.sleep(0.5)
        assert_stopped(model)
    finally:
        model.delay = 0.0


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def chat_page(server, on_request=None):
    """The server's chat page in headless chromium (through Playwright), closed after; on_request sees each request
    the page sends."""
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        page = browser.new_page()
        if on_request:
            page.on("request", on_request)
        page.goto(server["url"] + "/")
        yield page
        browser.close()


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (apt-get install chromium)")
def test_web_page_streams_an_answer(server, tmp_path):
    with chat_page(server) as page:
        page.fill("#input", "你好")
        page.press("#input", "Enter")
        page.wait_for_selector(".assistant[data-done=true]", timeout=20000)
        shown = page.inner_text(".assistant")
        page.screenshot(path=str(tmp_path / "chat_page.png"))
        page.fill("#max_tokens", "999999")  # more than the context: the server refuses
        page.fill("#input", "再说一遍")
        page.press("#input", "Enter")
        page.wait_for_selector(".assistant >> nth=1", timeout=20000)
        page.wait_for_function("document.querySelectorAll('.assistant')[1].dataset.done === 'true'", timeout=20000)
        failed = page.locator(".assistant").nth(1).inner_text()
    # the page leaves max tokens empty: the answer may take the rest of the context of 128 tokens
    assert shown.strip() == alone(server, "你好", 128).strip() and shown.strip()
    assert failed.startswith("error: ") and "does not fit the context" in failed
    assert (tmp_path / "chat_page.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (apt-get install chromium)")
def test_web_page_does_not_send_on_the_enter_that_ends_an_ime_composition(server):
    """Pinyin (any IME) commits a composition with Enter: its keydown (isComposing, or keyCode 229 in browsers that
    send that instead) sent the half-typed question; only an Enter outside a composition sends."""
    with chat_page(server) as page:
        page.fill("#input", "ni hao")
        for init in ("{key: 'Enter', isComposing: true}", "{key: 'Enter', keyCode: 229}"):
            page.evaluate(f"document.getElementById('input').dispatchEvent(new KeyboardEvent('keydown', "
                          f"{{...{init}, bubbles: true, cancelable: true}}))")
        composing = (page.input_value("#input"), page.locator(".user").count())
        page.fill("#input", "你好")
        page.press("#input", "Enter")
        page.wait_for_selector(".assistant[data-done=true]", timeout=20000)
        sent = (page.input_value("#input"), page.locator(".user").all_inner_texts())
    assert composing == ("ni hao", 0) and sent == ("", ["你好"])


STOPPED_STREAM = ('data: {"choices": [{"index": 0, "delta": {"content": "半"}, "finish_reason": null}]}\n\n'
                  'data: {"error": {"message": "the server is shutting down, so this answer was stopped before its '
                  'end", "type": "server_error"}}\n\n')


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (apt-get install chromium)")
def test_web_page_leaves_a_refused_question_out_and_drops_the_oldest_turns(server):
    """The tester's cases: the page kept a question whose answer failed (a 400, a 500 that is not JSON, no server),
    so the next one was joined to it and failed too until reset; and it never dropped a turn, so the 65th exchange
    got `messages: a list of 1 to 128 messages; got 129` forever. A question that gets no whole answer is now shown
    refused and left out, and the oldest exchanges go (the system message stays) to keep a request within 128
    messages and 1 MB; one question at a time (Enter while an answer comes leaves the text in the box)."""
    model, sent = server["model"], []
    url = "**/v1/chat/completions"
    asked = lambda r: r.url.endswith("/v1/chat/completions") and sent.append(json.loads(r.post_data))  # noqa: E731
    with chat_page(server, asked) as page:

        def ask(text: str) -> str:
            """The answer's bubble once done."""
            n = page.locator(".assistant").count()
            page.fill("#input", text)
            page.press("#input", "Enter")
            page.wait_for_function(f"document.querySelectorAll('.assistant')[{n}]?.dataset.done === 'true'",
                                   timeout=20000)
            return page.locator(".assistant").nth(n).inner_text()

        page.fill("#max_tokens", "999999")
        too_many = ask("第一个问题")  # 400
        page.fill("#max_tokens", "4")
        page.route(url, lambda r: r.fulfill(status=500, content_type="text/plain", body="Internal Server Error"))
        crashed = ask("第二个问题")
        page.unroute(url)
        page.route(url, lambda route: route.abort())
        down = ask("第三个问题")
        page.unroute(url)
        page.route(url, lambda r: r.fulfill(status=200, content_type="text/event-stream", body=STOPPED_STREAM))
        stopped = ask("第四个问题")  # serve stopped while it answered: its error event, no [DONE]
        page.unroute(url)
        answered = ask("你好")
        refused = page.locator(".user.refused").all_inner_texts()
        system = [{"role": "system", "content": "系统"}]
        history = [m for i in range(64) for m in ({"role": "user", "content": f"问{i}"},
                                                   {"role": "assistant", "content": f"答{i}"})]
        page.evaluate("h => { messages = h; }", system + history)
        trimmed = ask("再来")
        kept = page.evaluate("messages")
        long = [m for i in range(40) for m in ({"role": "user", "content": "长" * 19000 + str(i)},
                                               {"role": "assistant", "content": "好"})]
        page.evaluate("h => { messages = h; }", long)
        big = ask("最后")
        model.delay = 0.2
        try:
            page.fill("#input", "慢一点")
            page.press("#input", "Enter")
            busy = page.is_disabled("#send")  # the answer is coming
            page.fill("#input", "插队")
            page.press("#input", "Enter")  # while the answer comes: not asked, and still in the box
            page.wait_for_function("document.querySelectorAll('.assistant')[7].dataset.done === 'true'",
                                   timeout=20000)
            waiting = page.input_value("#input")
        finally:
            model.delay = 0.0
    assert too_many.startswith("error: ") and "does not fit the context" in too_many
    assert crashed == "error: the server answered 500 Internal Server Error"
    assert down.startswith("error: ") and len(down) > len("error: ")
    assert stopped == "半\nerror: the server is shutting down, so this answer was stopped before its end"
    assert refused == ["第一个问题", "第二个问题", "第三个问题", "第四个问题"]
    assert [b["messages"] for b in sent[:5]] == [[{"role": "user", "content": q}] for q in
                                                 ("第一个问题", "第二个问题", "第三个问题", "第四个问题", "你好")]
    sent = sent[1:]  # (the stopped stream's request)
    assert answered == alone(server, "你好", 4) and answered
    question = {"role": "user", "content": "再来"}
    assert sent[4]["messages"] == system + history[2:] + [question]  # 130 messages: the oldest exchange goes
    turns = [(u["content"], a["content"]) for u, a in zip(history[2::2], history[3::2], strict=True)] + [("再来", "")]
    assert trimmed == "".join(reply(model.model, server["tokenizer"], Conversation(turns, "系统"),
                                    Sampling(max_new_tokens=4)))
    assert kept == sent[4]["messages"] + [{"role": "assistant", "content": trimmed}]
    size = len(json.dumps(sent[5], ensure_ascii=False, separators=(",", ":")).encode())
    k = len(sent[5]["messages"]) - 1
    older = {**sent[5], "messages": long[-k - 2 :] + sent[5]["messages"][-1:]}
    assert sent[5]["messages"] == long[-k:] + [{"role": "user", "content": "最后"}] and k < len(long)
    assert size <= 1 << 20 < len(json.dumps(older, ensure_ascii=False, separators=(",", ":")).encode())
    assert not big.startswith("error")
    assert busy and len(sent) == 7 and sent[6]["messages"][-1]["content"] == "慢一点" and waiting == "插队"


def test_the_chat_page_is_filled_in_once_with_the_servers_limits(bpe_tokenizer, tmp_path, monkeypatch):
    """The page drops the oldest exchanges to keep a request within serve's limits (the page test shows how): it
    kept copies of them, and was read and filled in again at every GET. serve fills its limits in, once."""
    from starlette.testclient import TestClient

    from babyllama import serve

    monkeypatch.setattr(serve, "PAGE", Path(shutil.copy(serve.PAGE, tmp_path)))
    app = serve.build_app(sharp_model(tiny_config(vocab_size=600, max_seq_len=128)), bpe_tokenizer, "tiny")
    serve.PAGE.unlink()
    page = TestClient(app).get("/").text
    assert f"const MAX_MESSAGES = {serve.MAX_MESSAGES}, MAX_BODY_BYTES = {serve.MAX_BODY_BYTES};" in page
    assert "<h1>babyllama · tiny</h1>" in page and 'max="128"' in page and "{{" not in page


# Every request parameter of the official client: (name, value, honoured). A value the server cannot
# honour must get a 400 that names the field; the test fails when the client grows a parameter.
CHAT_PARAMS = [
    ("max_tokens", 4, True), ("max_completion_tokens", 4, True), ("temperature", 0.7, True), ("top_p", 0.9, True),
    ("stop", ["。"], True), ("n", 1, True), ("n", 3, False), ("seed", 7, True), ("user", "u1", True),
    ("metadata", {"k": "v"}, True), ("store", False, True), ("store", True, False), ("safety_identifier", "s", True),
    ("prompt_cache_key", "k", True), ("frequency_penalty", 0.0, True), ("frequency_penalty", 0.5, False),
    ("presence_penalty", 0.0, True), ("presence_penalty", 0.5, False), ("logit_bias", {}, True),
    ("logit_bias", {"5": 10}, False), ("logprobs", False, True), ("logprobs", True, True),
    ("top_logprobs", 0, True), ("top_logprobs", 2, False), ("top_logprobs", 21, False),
    ("response_format", {"type": "text"}, True),
    ("response_format", {"type": "json_object"}, False), ("modalities", ["text"], True),
    ("modalities", ["text", "audio"], False), ("audio", {"voice": "alloy", "format": "mp3"}, False),
    ("function_call", "auto", False), ("functions", [{"name": "f", "parameters": {}}], False),
    ("tools", [{"type": "function", "function": {"name": "f"}}], False), ("tool_choice", "auto", False),
    ("parallel_tool_calls", True, False), ("prediction", {"type": "content", "content": "x"}, False),
    ("reasoning_effort", "low", False), ("service_tier", "auto", False), ("verbosity", "low", False),
    ("web_search_options", {}, False), ("moderation", {"input": True}, False),
    ("prompt_cache_options", {"key": "x"}, False), ("prompt_cache_retention", "24h", False),
    ("stream_options", {"include_usage": True}, True), ("seed", 2**64, False),
]
COMPLETION_PARAMS = [
    ("max_tokens", 4, True), ("temperature", 0.7, True), ("top_p", 0.9, True), ("stop", "。", True), ("n", 1, True),
    ("n", 2, False), ("seed", 7, True), ("user", "u1", True), ("best_of", 1, True), ("best_of", 2, False),
    ("echo", False, True), ("echo", True, True), ("logprobs", 2, True), ("logprobs", 6, False), ("suffix", "x", False),
    ("frequency_penalty", 0.0, True), ("presence_penalty", 0.3, False), ("logit_bias", {"5": 1}, False),
    ("stream_options", {"include_usage": True}, True),
]


def test_every_openai_request_field_is_honoured_or_refused_by_name(server):
    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_params

    c = client(server)
    for params, known, call in (
        (chat_params.CompletionCreateParamsBase, CHAT_PARAMS,
         lambda **kw: c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "你好"}], **kw)),
        (completion_create_params.CompletionCreateParamsBase, COMPLETION_PARAMS,
         lambda **kw: c.completions.create(model="tiny", prompt="今天", **kw)),
    ):
        assert set(params.__annotations__) - {"model", "messages", "prompt"} == {name for name, _, _ in known}
        for name, value, honoured in known:
            kw = {name: value} if name in ("max_tokens", "max_completion_tokens") else {name: value, "max_tokens": 4}
            if name == "stream_options":
                chunks = list(call(stream=True, **kw))
                assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
            elif honoured:
                call(**kw)
            else:
                with pytest.raises(openai.BadRequestError) as e:
                    call(**kw)
                assert name in str(e.value), (name, str(e.value))


def test_null_is_the_field_left_out_as_in_openais_api(server):
    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_params

    hi = {"role": "user", "content": "你好"}
    for path, params, base in (("/v1/chat/completions", chat_params.CompletionCreateParamsBase, {"messages": [hi]}),
                               ("/v1/completions", completion_create_params.CompletionCreateParamsBase,
                                {"prompt": "今天"})):
        post = lambda body: httpx.post(server["url"] + path, json=body, timeout=30)  # noqa: B023
        for name in sorted(set(params.__annotations__) - set(base) | {"stream"}):  # every field the client sends
            omitted = base if name == "max_tokens" else {**base, "max_tokens": 4}
            r, plain = post({**omitted, name: None}), post(omitted)
            assert r.status_code == plain.status_code == 200, (path, name, r.text)
            assert r.json()["choices"] == plain.json()["choices"], (path, name)
        r = post({**base, next(iter(base)): None})  # messages / prompt: required
        assert r.status_code == 400 and next(iter(base)) in r.json()["error"]["message"], r.text
    chat = lambda messages: httpx.post(server["url"] + "/v1/chat/completions", timeout=30,
                                       json={"messages": messages, "max_tokens": 4}).json()["choices"]
    assert chat([{**hi, "name": None}]) == chat([hi])  # in a message too
    c = client(server)  # the openai client sends suffix=None as null
    assert c.completions.create(model="tiny", prompt="今天", max_tokens=4, suffix=None).choices[0].text == \
        c.completions.create(model="tiny", prompt="今天", max_tokens=4).choices[0].text


def test_seed_makes_sampling_repeatable(server):
    c = client(server)
    ask = lambda seed: c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "讲个故事"}],
                                                 max_tokens=16, temperature=1.0, seed=seed).choices[0].message.content
    assert ask(3) == ask(3)
    assert len({ask(s) for s in range(4)}) > 1


def test_a_stop_after_a_character_of_byte_tokens_keeps_all_its_tokens_in_logprobs(bpe_tokenizer):
    """"龘X" with stop "X": the text is "龘", made of three byte tokens, but the logprobs kept only the first
    (`bytes:\\xe9`), which decodes to U+FFFD: the cut counted the U+FFFD of a character not complete yet as a
    character of the text. They keep the character's three tokens, not the stop string's."""
    from babyllama.serve import Generation, ids_before, score

    tok = bpe_tokenizer
    ids = tok.encode("龘X")
    assert ids == [168, 125, 249, 58]  # three byte tokens, then "X"
    assert [ids_before(tok, ids, n) for n in range(3)] == [0, 3, 4]
    model = sharp_model(tiny_config(vocab_size=600))
    gen = Generation(Scripted(model, ids), tok, threading.Lock(), [tok.eos_id], Sampling(max_new_tokens=8),
                     ["X"], top_logprobs=0)
    assert "".join(gen.pieces()) == "龘" and gen.finish_reason == "stop"
    score([gen])
    lp = gen.logprobs()
    assert gen.answer_ids() == [168, 125, 249] and tok.decode(gen.answer_ids()) == "龘"
    assert (lp["tokens"], lp["text_offset"]) == (["bytes:\\xe9", "bytes:\\xbe", "bytes:\\x98"], [0, 0, 0])
    assert len(gen.chat_logprobs()["content"]) == 3 and gen.usage()["completion_tokens"] == 4


def test_a_stop_after_a_broken_lead_byte_keeps_the_stop_strings_token_out_of_logprobs(bpe_tokenizer):
    """[byte 0xe4, "X"] with stop "X": the text is the U+FFFD of a lead byte that "X" broke, but the logprobs (and
    answer_ids) kept "X" too, as if the broken character were still in progress: only a character in progress may
    pull in later tokens."""
    from babyllama.serve import Generation, ids_before, score

    tok = bpe_tokenizer
    ids = [tok._byte_id(0xE4), *tok.encode("X")]
    assert len(ids) == 2 and tok.decode(ids) == "\ufffdX"
    assert [ids_before(tok, ids, n) for n in range(3)] == [0, 1, 2]
    model = sharp_model(tiny_config(vocab_size=600))
    gen = Generation(Scripted(model, ids), tok, threading.Lock(), [tok.eos_id], Sampling(max_new_tokens=8),
                     ["X"], top_logprobs=0)
    assert "".join(gen.pieces()) == "\ufffd" and gen.finish_reason == "stop"
    score([gen])
    lp = gen.logprobs()
    assert gen.answer_ids() == ids[:1] and (lp["tokens"], lp["text_offset"]) == (["bytes:\\xe4"], [0])


def test_finish_reason_is_length_when_the_context_runs_out(bpe_tokenizer):

    from babyllama.serve import Generation, score
    from tests.conftest import favours_control_ids

    model = favours_control_ids(sharp_model(tiny_config(vocab_size=600, max_seq_len=32)), {300: 100.0})  # no <eos>
    for prompt, max_tokens, reason, made in (([5] * 28, 10, "length", 4), ([5] * 10, 6, "length", 6)):
        gen = Generation(model, bpe_tokenizer, threading.Lock(), prompt, Sampling(max_new_tokens=max_tokens))
        "".join(gen.pieces())
        assert (gen.finish_reason, len(gen.ids)) == (reason, made)  # the context, then max_tokens
    eos = favours_control_ids(sharp_model(tiny_config(vocab_size=600, max_seq_len=32)), {2: 100.0})
    gen = Generation(eos, bpe_tokenizer, threading.Lock(), [5] * 10, Sampling(max_new_tokens=6))
    "".join(gen.pieces())
    assert (gen.finish_reason, len(gen.ids)) == ("stop", 0)
    gen.echo, gen.top_logprobs = "", 1  # the <eos> it said ends its logprobs: lm-eval drops an echo's last token
    score([gen])
    lp = gen.logprobs()
    assert len(lp["tokens"]) == 11 and lp["tokens"][-1] == bpe_tokenizer.id_to_piece(2)
    assert lp["token_logprobs"][-1] == pytest.approx(0.0, abs=1e-4)  # its logit was raised by 100


def test_the_eos_that_ends_an_answer_is_listed_and_counted_alike_in_completions_and_chat(bpe_tokenizer):
    """Completions listed the </s> that ended an answer in its logprobs (lm-eval needs it) but completion_tokens
    did not count it, and chat listed it nowhere: both endpoints list it (chat's bytes null), as vLLM does, and
    completion_tokens counts what the logprobs list."""
    from babyllama.serve import Generation, score
    from tests.conftest import favours_control_ids, running

    tok = bpe_tokenizer
    eos = favours_control_ids(sharp_model(tiny_config(vocab_size=600, max_seq_len=32)), {2: 100.0})  # says </s>
    for url in running(eos, tok):
        chat = httpx.post(url + "/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4, "logprobs": True}).json()
        done = httpx.post(url + "/v1/completions", timeout=30, json={"prompt": "你好", "max_tokens": 4,
                                                                     "logprobs": 0}).json()
        streamed = [json.loads(line[6:]) for line in httpx.post(url + "/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}).text.splitlines() if line.startswith("data: {")]
    [content] = chat["choices"][0]["logprobs"]["content"]
    assert (content["token"], content["bytes"], chat["choices"][0]["message"]["content"]) == ("</s>", None, "")
    assert done["choices"][0]["logprobs"]["tokens"] == ["</s>"] and done["choices"][0]["text"] == ""
    assert chat["usage"]["completion_tokens"] == done["usage"]["completion_tokens"] == 1
    assert streamed[-1]["usage"]["completion_tokens"] == 1
    model = sharp_model(tiny_config(vocab_size=600))  # an answer of two tokens, then the </s> that ended it
    ids = tok.encode("你好")[:2]
    gen = Generation(model, tok, threading.Lock(), [tok.eos_id, 300], Sampling(max_new_tokens=8), ids=ids,
                     said_eos=True, top_logprobs=1)
    score([gen])
    content, listed = gen.chat_logprobs()["content"], gen.logprobs()
    assert [c["token"] for c in content] == listed["tokens"] == [tok.decode([i]) for i in ids] + ["</s>"]
    assert [c["logprob"] for c in content] == listed["token_logprobs"] and content[-1]["bytes"] is None
    assert gen.usage() == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_odd_but_valid_requests_and_what_a_user_broke(server):
    url = server["url"] + "/v1/chat/completions"
    hi = [{"role": "user", "content": "你好"}]
    ask = lambda **kw: httpx.post(url, json={"messages": hi, "max_tokens": 4, **kw}, timeout=30)
    plain = ask().json()["choices"][0]["message"]["content"]
    two_parts = [{"type": "text", "text": "你"}, {"type": "text", "text": "好"}]
    parts = ask(messages=[{"role": "user", "content": two_parts}])
    assert parts.json()["choices"][0]["message"]["content"] == plain  # content parts, as the client sends them
    dev = ask(messages=[{"role": "developer", "content": "简短"}, *hi]).json()
    system = ask(messages=[{"role": "system", "content": "简短"}, *hi]).json()
    assert dev["choices"][0]["message"]["content"] == system["choices"][0]["message"]["content"]
    assert ask(model="gpt-4").json()["model"] == "tiny"  # the answer names the model served
    assert ask(temperature=1e-40).status_code == 200  # greedy in the limit, not inf / nan
    refused = [({"seed": -(2**64)}, "seed"), ({"stream_options": {"include_usage": True}}, "stream_options"),
               ({"temperature": float("nan")}, "temperature"), ({"messages": [{**hi[0], "name": "bob"}]}, "name")]
    for kw, field in refused:
        r = httpx.post(url, content=json.dumps({"messages": hi, "max_tokens": 4, **kw}, allow_nan=True),
                       headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400 and field in r.json()["error"]["message"], (kw, r.text)

    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(1200):
            yield b"x" * 1000
        yield b'"}]}'

    r = httpx.post(url, content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413  # no Content-Length: counted while read
    assert ask().status_code == 200


def test_a_chunked_body_over_the_limit_gets_413_without_being_read_whole(server):
    sent = 0

    def hundred_megabytes():
        nonlocal sent
        yield b'{"prompt": "'
        for _ in range(1000):
            sent += 100_000
            yield b"x" * 100_000
        yield b'"}'

    r = httpx.post(server["url"] + "/v1/completions", content=hundred_megabytes(), timeout=60,
                   headers={"content-type": "application/json"})  # no Content-Length: chunked
    assert r.status_code == 413 and r.json()["error"]["message"] == "request body over 1048576 bytes"
    assert sent < 20_000_000  # the server hung up after the first megabyte (and what the sockets buffer)
    host, port = server["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:  # refused on the header alone
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n{")
        assert s.recv(4096).startswith(b"HTTP/1.1 413 ")


def test_malformed_framing_is_uvicorns_bare_400_as_the_readme_says(server):
    host, port = server["url"].removeprefix("http://").split(":")
    for length in (b"-5", b"1" * 30, b"1e3"):
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n{}")
            head = s.recv(4096).split(b"\r\n")
        assert head[0] == b"HTTP/1.1 400 Bad Request" and b"content-type: text/plain; charset=utf-8" in head


def test_every_error_has_the_openai_shape(server):
    url = server["url"]
    for method, path, body in [
        ("GET", "/nothing", None), ("DELETE", "/v1/models", None), ("POST", "/health", None),
        ("POST", "/v1/chat/completions", b"{"), ("POST", "/v1/chat/completions", b"[]"),
        ("POST", "/v1/chat/completions", b""), ("POST", "/v1/chat/completions", b'{"messages": "hi"}'),
        ("POST", "/v1/chat/completions", b'{"messages": [' + b", ".join([b'{"role": "user", "content": "x"}'] * 200)
         + b"]}"),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "stop": ["a", 5]}'),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "metadata": {"k": 5}}'),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": ["x"]}]}'),
        ("POST", "/v1/completions", b'{"prompt": "' + b"x" * 30_000 + b'"}'), ("POST", "/v1/completions", b"{}"),
        ("POST", "/v1/completions", b'{"prompt": "x", "seed": ' + b"9" * 50 + b"}"),
        ("POST", "/v1/completions", b'{"prompt": 5}'), ("POST", "/v1/completions", b'{"prompt": "x", "tools": []}'),
        ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": 1000}'),
        ("POST", "/v1/completions", b'{"prompt": "x", "stop": ""}'), ("POST", "/v1/completions", b"x" * (2 << 20)),
        ("POST", "/v1/completions", b"[" * 100_000), ("POST", "/v1/completions", b'{"prompt": "\\ud800"}'),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "system", "content": "a\\udfff"}, '
                                         b'{"role": "user", "content": "hi"}]}'),
        ("POST", "/v1/chat/completions",
         b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}'),
    ]:
        r = httpx.request(method, url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
        error = r.json().get("error")
        assert 400 <= r.status_code < 500 and set(r.json()) == {"error"}, (path, body and body[:40], r.text)
        assert isinstance(error["message"], str) and error["message"], r.text
        assert not re.search(r"\.\d+\.|function-|Input should|Value should|Field required", error["message"]), r.text


NUMBERS = ["0", "1", "-1", "1.5", "5e-324", "1e-300", "1e308", "-1e308", "1e400", "NaN", "Infinity", "-Infinity",
           "18446744073709551616", "-9223372036854775809"]


@pytest.mark.parametrize("path, fields", [
    ("/v1/chat/completions", ["max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n",
                              "frequency_penalty", "presence_penalty", "top_logprobs", "logit_bias"]),
    ("/v1/completions", ["max_tokens", "temperature", "top_p", "seed", "n", "best_of", "logprobs",
                         "frequency_penalty", "presence_penalty"]),
])
def test_numeric_fields_at_their_extremes_get_an_answer_or_a_400(server, path, fields):
    base = '"messages": [{"role": "user", "content": "你好"}]' if "chat" in path else '"prompt": "你好"'
    for field in fields:
        for number in NUMBERS:
            value = f'{{"5": {number}}}' if field == "logit_bias" else number
            tokens = "" if field.startswith("max_") else ', "max_tokens": 2'
            r = httpx.post(server["url"] + path, content=f'{{{base}{tokens}, "{field}": {value}}}', timeout=30,
                           headers={"content-type": "application/json"})
            if r.status_code == 200:
                assert r.json()["choices"][0]["finish_reason"] in ("stop", "length"), (field, number)
            else:
                assert r.status_code == 400 and field in r.json()["error"]["message"], (field, number, r.text)


def test_health_answers_while_a_large_request_is_tokenized(bpe_tokenizer, tmp_path, monkeypatch):
    from babyllama.tokenizer import load_tokenizer
    from tests.conftest import generated_corpus

    bpe_tokenizer.save(tmp_path / "tok")
    slow = load_tokenizer(tmp_path / "tok")
    encode = slow._encode_many
    monkeypatch.setattr(slow, "_encode_many", lambda texts: time.sleep(0.4) or encode(texts))  # a 1 MB request's
    messages = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(generated_corpus(126))]
    body = {"messages": [*messages, {"role": "user", "content": "你好"}], "max_tokens": 4}
    for url in running(sharp_model(tiny_config(vocab_size=600, max_seq_len=128)), slow):
        with ThreadPoolExecutor(1) as pool:
            big = pool.submit(httpx.post, url + "/v1/chat/completions", json=body, timeout=60)
            waits = []
            while not big.done():
                start = time.perf_counter()
                assert httpx.get(url + "/health", timeout=60).json()["status"] == "ok"
                waits.append(time.perf_counter() - start)
                time.sleep(0.05)
        assert big.result().status_code == 200
        assert len(waits) >= 3 and max(waits) < 0.5, waits


def test_omitted_max_tokens_takes_the_rest_of_the_context_in_chat_and_too_many_say_what_fits(server):
    from babyllama.chat_format import render_prompt, text_prompt
    from babyllama.evaluate import answer

    tok, ctx, url = server["tokenizer"], 128, server["url"] + "/v1"
    question = "判断这条评论的情感是正面还是负面：" + "这本书写得很好，" * 5  # longer than half the context
    prompt = len(render_prompt(tok, Conversation([(question, "")])))
    assert ctx // 2 < prompt < ctx
    chat = lambda **kw: httpx.post(url + "/chat/completions", timeout=60,
                                   json={"messages": [{"role": "user", "content": question}], **kw})
    r = chat()
    assert r.status_code == 200, r.text
    rest = Sampling(max_new_tokens=ctx - prompt)  # eval's answer with the room serve gives: the question not cut
    assert r.json()["choices"][0]["message"]["content"].strip() == answer(server["model"].model, tok, question, rest)
    assert r.json()["usage"]["prompt_tokens"] == prompt and r.json()["usage"]["completion_tokens"] <= ctx - prompt
    assert chat(max_tokens=ctx - prompt).status_code == 200
    r = chat(max_tokens=ctx - prompt + 1)
    assert r.status_code == 400 and r.json()["error"]["message"] == (
        f"max_tokens ({ctx - prompt + 1}) does not fit the context: the last message takes {prompt} of its "
        f"{ctx} tokens, so {ctx - prompt} are available")
    text = "今天天气很好，" * 6
    n = len(text_prompt(tok, text))
    r = httpx.post(url + "/completions", json={"prompt": text, "max_tokens": ctx}, timeout=60)
    assert r.status_code == 400 and f"so {ctx - n} are available" in r.json()["error"]["message"]
    r = httpx.post(url + "/completions", json={"prompt": [5] * (ctx - 1), "max_tokens": 2}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["message"].endswith("so 1 is available"), r.text


def test_a_prompt_that_does_not_fit_names_the_message_to_blame(server):
    from babyllama.chat_format import render_prompt

    tok, ctx = server["tokenizer"], 128
    ask = lambda *messages, **kw: httpx.post(server["url"] + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": role, "content": text} for role, text in messages], **kw}).json()["error"]["message"]
    long, mid, short = "很长的系统提示" * 100, "今天天气很好，" * 6, "今天天气很好，" * 4
    n = len(tok.encode(long + "\n"))
    assert n > ctx and len(tok.encode("x")) == 1
    assert ask(("system", long), ("user", "x")) == f"the system text of messages[0] ({n} tokens) does not fit " \
        f"the context of {ctx} tokens"  # not 'the last message', which is 1 token
    assert ask(("developer", "a"), ("user", "x"), ("system", long), ("user", "y")) == \
        f"the system text of messages[0], messages[2] ({len(tok.encode('a' + chr(10) + long + chr(10)))} tokens) " \
        f"does not fit the context of {ctx} tokens"
    both = len(render_prompt(tok, Conversation([(mid, "")], mid)))
    assert len(tok.encode(mid + "\n")) < ctx < both
    assert ask(("system", mid), ("user", mid)) == f"the system text of messages[0] with the last message ({both} " \
        f"tokens) does not fit the context of {ctx} tokens"
    fits = len(render_prompt(tok, Conversation([(short, "")], short)))
    assert ask(("user", "x"), ("assistant", "y"), ("system", short), ("user", short), max_tokens=ctx) == (
        f"max_tokens ({ctx}) does not fit the context: the system text of messages[2] with the last message takes "
        f"{fits} of its {ctx} tokens, so {ctx - fits} are available")


def test_a_request_that_does_not_fit_the_context_has_openais_code(server):
    """serve's 400 for a prompt, or prompt and max_tokens, longer than the context said so in words alone: it has
    OpenAI's code context_length_exceeded too (the openai client's APIError.code), and other 400s have none."""
    url, ctx = server["url"] + "/v1", 128
    user = {"messages": [{"role": "user", "content": "你好"}]}
    for route, body in (("/chat/completions", {**user, "max_tokens": ctx}),
                        ("/chat/completions", {"messages": [{"role": "user", "content": "很长的问题" * 100}]}),
                        ("/chat/completions", {"messages": [{"role": "system", "content": "很长的系统提示" * 100},
                                                            {"role": "user", "content": "x"}]}),
                        ("/completions", {"prompt": [5] * ctx}),
                        ("/completions", {"prompt": [5] * (ctx + 1), "max_tokens": 0, "echo": True}),
                        ("/completions", {"prompt": [[5], [5] * (ctx - 1)], "max_tokens": 2})):
        r = httpx.post(url + route, json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"].get("code") == "context_length_exceeded", (body, r.text)
        assert "does not fit the context" in r.json()["error"]["message"]
    r = httpx.post(url + "/completions", json={"prompt": [5, 600]}, timeout=60)
    assert r.status_code == 400 and r.json() == {"error": {
        "message": "prompt: token id 600 is not in the vocabulary of 600", "type": "invalid_request_error"}}
    with pytest.raises(openai.BadRequestError) as e:
        client(server).completions.create(model="tiny", prompt=[5] * ctx)
    assert e.value.code == "context_length_exceeded"


def test_omitted_max_tokens_on_completions_is_openais_16_or_the_rest_of_the_context(server):
    from babyllama.chat_format import text_prompt

    tok, ctx, url = server["tokenizer"], 128, server["url"] + "/v1/completions"
    text = "今天天气很好，" * 6  # this model says no <eos> for 49 tokens after it
    assert len(text_prompt(tok, text)) == 79
    r = httpx.post(url, json={"prompt": text}, timeout=60).json()
    assert (r["usage"]["completion_tokens"], r["choices"][0]["finish_reason"]) == (16, "length")
    assert r["choices"][0]["text"] == httpx.post(url, json={"prompt": text, "max_tokens": 16}, timeout=60).json()[
        "choices"][0]["text"]
    text = "今天天气很好，" * 9  # 118 tokens: 10 are left
    r = httpx.post(url, json={"prompt": text}, timeout=60).json()
    assert len(text_prompt(tok, text)) == 118 and r["usage"]["completion_tokens"] == ctx - 118


def test_temperature_has_one_range_the_requests_and_the_servers(server, tmp_path):
    from tests.conftest import run_cli

    ask = lambda t: httpx.post(server["url"] + "/v1/completions", timeout=30,
                               json={"prompt": "今天", "max_tokens": 2, "temperature": t})
    assert ask(2).status_code == 200
    assert ask(2.5).json()["error"]["message"] == "temperature: a number from 0 to 2; got 2.5"
    r = run_cli("serve", tmp_path / "no-such-checkpoint", "--temperature", "2.5")  # refused before the checkpoint loads
    assert r.returncode == 2 and r.stderr.splitlines()[-1] == (  # not "(max_new_tokens >= 1, ...": no flag of serve
        "babyllama: error: temperature = 2.5 is out of range (temperature in [0, 2]).")
    assert run_cli("serve", tmp_path / "no-such-checkpoint", "--temperature", "2").returncode == 2  # the checkpoint's


def test_a_busy_port_is_one_sentence_before_the_model_loads(tmp_path):
    from babyllama.errors import UserError
    from babyllama.serve import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"^cannot listen on 127.0.0.1:{port}: Address already in use.$"):
            serve(str(tmp_path / "no-such-checkpoint"), port=port)  # the port is checked first
    with pytest.raises(UserError, match="^cannot listen on 192.0.2.1:8000: "):  # an address not on this machine
        serve(str(tmp_path / "no-such-checkpoint"), host="192.0.2.1", port=8000)


def test_a_prompt_of_one_token_is_scored_with_logprobs(server):
    """An empty text prompt is <eos> alone, which nothing precedes: with logprobs it was a 500 (an empty index of
    floats); its logprobs are None, and an answer's first token gets the model's own log-probability."""
    import torch

    tok, model = server["tokenizer"], server["model"].model
    url = server["url"] + "/v1/completions"
    r = httpx.post(url, json={"prompt": [""], "max_tokens": 0, "echo": True, "logprobs": 1}, timeout=30)
    lp = r.json()["choices"][0]["logprobs"]
    assert r.status_code == 200
    assert (lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]) == (["</s>"], [None], [None])
    for prompt in ("", [tok.eos_id]):
        r = httpx.post(url, json={"prompt": prompt, "max_tokens": 1, "logprobs": 1, "temperature": 0}, timeout=30)
        lp = r.json()["choices"][0]["logprobs"]
        with torch.no_grad():
            expected = torch.log_softmax(model(torch.tensor([[tok.eos_id]]))[0][0, -1].float(), dim=-1)
        expected[list(tok.suppress_tokens(model.cfg.vocab_size))] = -float("inf")
        assert r.status_code == 200 and lp["token_logprobs"] == pytest.approx([expected.max().item()], abs=1e-5)


def test_a_fault_of_the_server_is_openais_json_shape(server, monkeypatch):
    """A fault of the server's own (here a scoring that fails) answered a plain-text "Internal Server Error", which
    an OpenAI client cannot read: a 500 in OpenAI's error shape."""
    from babyllama import serve

    def broken(gens):
        raise RuntimeError("broken")

    monkeypatch.setattr(serve, "score", broken)
    r = httpx.post(server["url"] + "/v1/completions", json={"prompt": "你好", "max_tokens": 1, "logprobs": 1},
                   timeout=30)
    assert (r.status_code, r.json()) == (500, {"error": {
        "message": "the server failed on this request (RuntimeError); its log has the traceback",
        "type": "server_error"}})


def test_a_server_on_a_loopback_address_answers_only_its_own_names(tmp_path, bpe_tokenizer, monkeypatch):
    """DNS rebinding: a web page whose name was pointed at 127.0.0.1 could drive the default server from a browser
    (any Host header was answered). On a loopback address only this machine's names are; on another, any. The name
    was resolved twice, to bind and to check it: it is resolved once, the address bound is the one checked."""
    import uvicorn
    from starlette.testclient import TestClient

    from babyllama.checkpoint import save_checkpoint
    from babyllama.serve import loopback_names, serve

    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=600, max_seq_len=128)), bpe_tokenizer)
    apps, protocols, resolved, getaddrinfo = [], [], [], socket.getaddrinfo
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: apps.append(self.config.app) or
                        protocols.append(self.config.http))
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *args, **kwargs: resolved.append(host) or
                        getaddrinfo(host, *args, **kwargs))
    serve(str(tmp_path / "ck"), host="localhost", port=0)
    assert resolved == ["localhost"]  # once: the name checked is the address listened on
    assert protocols[0].__name__ == "HeadDeadline"  # serve's uvicorn has the tests' deadline on request heads
    for base, status in [("http://127.0.0.1:8000", 200), ("http://localhost:8000", 200), ("http://[::1]:8000", 200),
                         ("http://evil.example:8000", 400), ("http://127.0.0.1.evil.example", 400)]:
        assert TestClient(apps[0], base_url=base).get("/health").status_code == status, base
    r = TestClient(apps[0], base_url="http://myhost:8000").post("/v1/completions", json={"prompt": "x"})
    assert (r.status_code, r.json()) == (400, {"error": {"type": "invalid_request_error", "message":
        "Host header 'myhost:8000': this server answers only 127.0.0.1, localhost, [::1]; start it with --host "
        "0.0.0.0 (or this machine's address) to answer other names"}})
    assert loopback_names("localhost", "127.0.0.1") == loopback_names("::1", "::1") == ["127.0.0.1", "localhost",
                                                                                         "[::1]"]
    assert loopback_names("0.0.0.0", "0.0.0.0") is None and loopback_names("myhost", "192.0.2.1") is None


def sent_raw(url: str, path: str, body: dict) -> socket.socket:
    """A connection that has sent a whole POST of body as JSON to path, its answer not read."""
    data = json.dumps(body).encode()
    conn = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    conn.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return conn


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "一", "max_tokens": 60}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "一"}], "max_tokens": 60}),
])
def test_a_client_that_leaves_stops_its_whole_answer_too(server, path, body):
    """Without stream the answer was generated to its end after its client had gone (an OpenAI client's timeout and
    2 retries left 3 generations running): the server watches for the client's leaving as it generates."""
    model = server["model"]
    model.delay, model.calls = 0.03, 0
    try:
        with sent_raw(server["url"], path, body):
            deadline = time.time() + 10
            while model.calls < 3 and time.time() < deadline:  # generating: then hang up
                time.sleep(0.01)
        assert_stopped(model)
    finally:
        model.delay = 0.0


SLOW_SERVE = """import sys, time
from babyllama import model, serve
delay, serve.STOP_GRACE_S = float(sys.argv.pop(1)), float(sys.argv.pop(1))
stream = model.Transformer.stream
def slow(self, *args, **kwargs):  # each token after the first takes delay s, under the model's lock
    for token in stream(self, *args, **kwargs):
        yield token
        time.sleep(delay)
model.Transformer.stream = slow
from babyllama.cli import main
sys.exit(main())
"""


@pytest.fixture(scope="module")
def slow_serve(tmp_path_factory, bpe_tokenizer):
    """A function that starts `babyllama serve` on a tiny checkpoint in a process whose tokens take delay s each and
    whose stop waits grace s (STOP_GRACE_S), with a streamed and a whole request generating: (process, the stream's
    lines so far, the whole answer once it comes; a connection that the server closed leaves them so)."""
    import os
    import subprocess
    import sys

    from babyllama.checkpoint import save_checkpoint

    ck, script, procs = tmp_path_factory.mktemp("ck") / "final", tmp_path_factory.mktemp("slow") / "slow_serve.py", []
    save_checkpoint(ck, sharp_model(tiny_config(vocab_size=600, max_seq_len=128)), bpe_tokenizer)
    script.write_text(SLOW_SERVE)

    def start(delay: float, grace: float, background: bool = False):  # background: SIGINT ignored, as `serve &`
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if background else None
        proc = subprocess.Popen([sys.executable, script, str(delay), str(grace), "serve", ck, "--port", str(port)],
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                preexec_fn=ignore)
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        assert any("Uvicorn running" in line for line in proc.stderr)
        lines, whole = [], []
        body = {"prompt": "一", "max_tokens": 100, "temperature": 0}

        def whole_answer():
            with contextlib.suppress(httpx.HTTPError):
                whole.append(httpx.post(url + "/v1/completions", json=body, timeout=60))

        def streamed():
            with contextlib.suppress(httpx.HTTPError), httpx.stream("POST", url + "/v1/completions", timeout=60,
                                                                   json=body | {"stream": True}) as r:
                lines.extend(line for line in r.iter_lines() if line)

        for answer in (whole_answer, streamed):
            threading.Thread(target=answer, daemon=True).start()
        deadline = time.time() + 30
        while not lines and time.time() < deadline:  # its first token
            time.sleep(0.02)
        time.sleep(0.2)  # the whole request generates too
        return proc, lines, whole

    yield start
    for proc in procs:  # one that a failed test left running
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("stop, code, said, background", [(signal.SIGINT, 130, "interrupted", False),
                                                          (signal.SIGINT, 130, "interrupted", True),
                                                          (signal.SIGTERM, 143, "stopped by SIGTERM", False)])
def test_a_stop_cancels_the_generations_in_flight_and_exits_as_the_readme_says(slow_serve, stop, code, said,
                                                                               background):
    """Ctrl-C and SIGTERM exited 0 without the stop's line, after every generation in flight had run to its end:
    they are cancelled at their next token, each client gets OpenAI's error (a 503, or a stream's error event), and
    the CLI says the stop and exits 128 + the signal. So does a SIGINT to `serve &` (background: the shell starts
    it with SIGINT ignored, so that uvicorn's raising it again after its shutdown did nothing: exit 0, no line)."""
    proc, lines, whole = slow_serve(delay=0.05, grace=30, background=background)
    proc.send_signal(stop)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=30)
    waited = time.monotonic() - sent
    assert (proc.returncode, err.splitlines()[-1]) == (code, f"babyllama: {said}.") and "Traceback" not in err, err
    assert waited < 5, f"the stop took {waited:.1f} s"  # not the 100 tokens' 5 s, and the exit of the process
    stopped = {"error": {"message": "the server is shutting down, so this answer was stopped before its end",
                         "type": "server_error"}}
    deadline = time.time() + 5
    while not whole and time.time() < deadline:
        time.sleep(0.02)
    assert (whole[0].status_code, whole[0].json()) == (503, stopped)
    assert json.loads(lines[-1].removeprefix("data: ")) == stopped and 2 <= len(lines) < 100  # no [DONE]


@pytest.mark.parametrize("twice", [True, False])
def test_a_second_stop_or_a_forward_that_outlasts_the_grace_ends_the_server_at_once(slow_serve, twice):
    """A second Ctrl-C printed some 120 lines of CancelledError tracebacks: a second stop ends the process at once,
    and so does a stop whose cancelled generations do not end within STOP_GRACE_S (a long forward under way), with
    the stop's line and code."""
    proc, lines, whole = slow_serve(delay=60, grace=30 if twice else 0.5)  # the second token takes a minute
    proc.send_signal(signal.SIGINT)
    if twice:
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=30)
    assert (proc.returncode, err.splitlines()[-1]) == (130, "babyllama: interrupted.") and "Traceback" not in err, err
    assert time.monotonic() - sent < 5


class OneBatchAtATime(SlowModel):
    """SlowModel that counts, at each forward, the logits of earlier forwards still held (overlaps)."""

    def __init__(self, model):
        super().__init__(model, delay=0.0)
        self.held, self.overlaps = [], 0

    def __call__(self, idx, *args, **kwargs):
        import weakref

        self.overlaps += any(ref() is not None for ref in self.held)
        logits, loss = super().__call__(idx, *args, **kwargs)
        self.held.append(weakref.ref(logits))
        return logits, loss


def test_concurrent_scoring_holds_one_batchs_logits_at_a_time(bpe_tokenizer, monkeypatch):
    """A request of 63 KB (32 prompts, echo, logprobs, a vocabulary of 65536) took 1.5 GB, and 4 at once 4.2 GB:
    the log-softmax of each batch's (B, T, V) logits ran outside the model's lock, several requests at once. Now a
    batch is scored whole under the lock, its logits freed before the next forward, and a batch holds at most
    MAX_SCORE_LOGITS logits (here 3 of these prompts' worth)."""
    from babyllama import serve

    model = OneBatchAtATime(sharp_model(tiny_config(vocab_size=600, max_seq_len=128)))
    monkeypatch.setattr(serve, "MAX_SCORE_LOGITS", 3 * 40 * 600)
    body = {"prompt": [[5 + i] * 40 for i in range(12)], "max_tokens": 0, "echo": True, "logprobs": 5}
    for url in running(model, bpe_tokenizer):
        with ThreadPoolExecutor(4) as pool:
            answers = [pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=60) for _ in range(4)]
            codes = [a.result().status_code for a in answers]
    assert codes == [200] * 4 and model.forwards == [(3, 40)] * 16 and model.overlaps == 0


def test_requests_past_max_in_flight_get_a_429_and_other_routes_are_answered(bpe_tokenizer, monkeypatch):
    """Each request in flight holds a KV cache and its scores, so memory grew with the clients: past MAX_IN_FLIGHT
    at once a request gets OpenAI's 429, which its client retries; other routes are answered all the same."""
    from babyllama import serve

    model = SlowModel(sharp_model(tiny_config(vocab_size=600, max_seq_len=128)), delay=0.05)
    monkeypatch.setattr(serve, "MAX_IN_FLIGHT", 2)
    body = {"prompt": "一", "max_tokens": 60}
    for url in running(model, bpe_tokenizer):
        with sent_raw(url, "/v1/completions", body), sent_raw(url, "/v1/completions", body | {"stream": True}):
            deadline = time.time() + 10
            while model.calls < 2 and time.time() < deadline:
                time.sleep(0.01)
            r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
            assert (r.status_code, r.json()) == (429, {"error": {"type": "rate_limit_exceeded", "message":
                "the server is answering 2 requests, as many as it takes at once; send it again when one is done"}})
            assert httpx.get(url + "/health").status_code == 200
        time.sleep(0.3)  # both clients left: their places are free
        assert httpx.post(url + "/v1/completions", json={"prompt": "一", "max_tokens": 2}).status_code == 200


def test_a_body_that_does_not_arrive_whole_in_time_gets_a_408_and_its_connection_closed(bpe_tokenizer, monkeypatch):
    """900 connections that sent their headers and part of a body stayed open for as long as they liked (a few
    thousand exhaust the server's file descriptors): a body has BODY_TIMEOUT_S to arrive whole."""
    from babyllama import serve

    model = sharp_model(tiny_config(vocab_size=600, max_seq_len=128))
    monkeypatch.setattr(serve, "BODY_TIMEOUT_S", 0.5)
    for url in running(model, bpe_tokenizer):
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as conn:
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b'Content-Length: 100\r\n\r\n{"prompt": ')
            conn.settimeout(10)
            sent, answer = time.monotonic(), b""
            while chunk := conn.recv(4096):  # until the server closes the connection
                answer += chunk
            assert 0.4 < time.monotonic() - sent < 3
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower()
        assert json.loads(body) == {"error": {"type": "invalid_request_error",
                                              "message": "the request body did not arrive whole within 0.5 s"}}
        r = httpx.post(url + "/v1/completions", json={"prompt": "一", "max_tokens": 2})  # a whole one in time
        assert r.status_code == 200


def test_a_head_that_does_not_arrive_whole_in_time_gets_a_408_and_its_connection_closed(bpe_tokenizer, monkeypatch):
    """A connection that sent part of a request line, or of its headers a byte every few seconds, or nothing at all,
    stayed open for ever (uvicorn gives a head no deadline; slowloris): a head has HEAD_TIMEOUT_S to arrive whole,
    from the connection's opening or from the answer before on a kept-alive connection."""
    from babyllama import serve

    model = sharp_model(tiny_config(vocab_size=600, max_seq_len=128))
    monkeypatch.setattr(serve, "HEAD_TIMEOUT_S", 1.0)
    late = {"error": {"type": "invalid_request_error", "message": "the request head did not arrive whole within 1 s"}}

    def answer_to(*parts: bytes, pause: float = 0.0) -> tuple[bytes, float]:
        """What the server sends a connection that sends parts, pause s apart, until it closes; and when it closed."""
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as conn:
            opened = time.monotonic()
            for i, part in enumerate(parts):
                time.sleep(pause * (i > 0))
                conn.sendall(part)
            conn.settimeout(10)
            answer = b""
            while chunk := conn.recv(4096):  # until the server closes the connection
                answer += chunk
            return answer, time.monotonic() - opened

    for url in running(model, bpe_tokenizer):
        for parts, pause in [([b"GET /health HT"], 0.0), ([b"GET /health HTTP/1.1\r\nHo", b"s", b"t", b":"], 0.25),
                             ([], 0.0)]:
            answer, took = answer_to(*parts, pause=pause)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert 0.9 < took < 3 and head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower()
            assert json.loads(body) == late
        # a head whole at 0.6 s is answered; the next one's deadline is 1 s after that answer, not after the opening
        answer, took = answer_to(b"GET /health HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n\r\n", b"GET /he", pause=0.6)
        assert answer.count(b"HTTP/1.1 200 OK") == 1 and answer.count(b"HTTP/1.1 408 ") == 1 and 1.5 < took < 3
        r = httpx.get(url + "/health")  # a whole head in time
        assert r.status_code == 200


def test_a_uvicorn_without_what_the_head_deadline_builds_on_serves_without_it(monkeypatch, capsys):
    """head_deadline subclasses uvicorn's protocol and reads its internals (cycle, cycle.response_complete,
    on_response_complete), which pyproject does not pin: a uvicorn without them gets its own protocol back and a
    one-line warning, not a server whose every connection fails."""
    import asyncio

    import uvicorn
    import uvicorn.protocols.http.auto as auto

    from babyllama.serve import head_deadline

    assert head_deadline(1.0).__name__ == "HeadDeadline" and capsys.readouterr().err == ""  # this uvicorn's

    class Other(asyncio.Protocol):  # a uvicorn's protocol that keeps its request under another name
        def __init__(self, config, server_state, app_state, _loop=None):
            self.request = None

        def on_response_complete(self) -> None: ...

    monkeypatch.setattr(auto, "AutoHTTPProtocol", Other)
    assert head_deadline(1.0) is Other
    assert capsys.readouterr().err == (
        f"warning: the HTTP protocol of uvicorn {uvicorn.__version__} has no cycle, RequestResponseCycle."
        "response_complete, on which babyllama's deadline on request heads builds, so this server runs without it "
        "(a client that sends its head slowly can hold a connection open).\n")


def test_the_page_escapes_the_checkpoints_name(bpe_tokenizer):
    """`serve 'runs/x<b>"&/fin al<i>'` put the folder's name into the page's HTML as it was."""
    model = sharp_model(tiny_config(vocab_size=600, max_seq_len=128))
    for url in running(model, bpe_tokenizer, 'x<b>"&/fin al<i>'):
        page = httpx.get(url + "/").text
    assert "<h1>babyllama · x&lt;b&gt;&quot;&amp;/fin al&lt;i&gt;</h1>" in page and "<b>" not in page


def test_a_prompt_whose_last_user_turn_does_not_fit_names_its_messages(server):
    """128 user messages "a" were said to be "the last message (256 tokens)": consecutive user messages are joined
    into one question, the last user turn, which is named by its first and last message."""
    ask = lambda *messages: httpx.post(server["url"] + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": role, "content": text} for role, text in messages]}).json()["error"]["message"]
    many = ask(*[("user", "今天天气很好")] * 40)
    assert re.fullmatch(r"the last user turn \(messages\[0\] to messages\[39\]\) \(\d+ tokens\) does not fit the "
                        r"context of 128 tokens", many), many
    turn = ask(("user", "x"), ("assistant", "y"), ("user", "今天天气很好" * 20), ("system", "z"))
    assert turn.startswith("the system text of messages[3] with the last user turn (messages[2]) ("), turn
    joined = ask(("user", "x"), ("assistant", "y"), ("user", "今天天气很好" * 10), ("system", "z"),
                 ("user", "今天天气很好" * 10))
    assert joined.startswith("the system text of messages[3] with the last user turn (messages[2] to messages[4]) ("
                             ), joined


def test_a_server_answers_the_address_it_listens_on_and_names_it_as_a_url_does(tmp_path, bpe_tokenizer, monkeypatch,
                                                                                capsys):
    """`--host 127.0.0.2` refused requests to its own URL (Host: 127.0.0.2 was none of this machine's names);
    `--host ::1` printed http://::1:8751/, which is no URL; `--host ""` said "cannot listen on :8750: Name or
    service not known"."""
    import uvicorn
    from starlette.testclient import TestClient

    from babyllama.checkpoint import save_checkpoint
    from babyllama.errors import UserError
    from babyllama.serve import loopback_names, serve

    save_checkpoint(tmp_path / "ck", sharp_model(tiny_config(vocab_size=600, max_seq_len=128)), bpe_tokenizer)
    apps = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: apps.append(self.config.app))
    assert loopback_names("127.0.0.2", "127.0.0.2") == ["127.0.0.1", "localhost", "[::1]", "127.0.0.2"]
    serve(str(tmp_path / "ck"), host="127.0.0.2", port=0)
    for base, status in [("http://127.0.0.2:8751", 200), ("http://localhost:8751", 200), ("http://127.0.0.3", 400)]:
        assert TestClient(apps[0], base_url=base).get("/health").status_code == status, base
    serve(str(tmp_path / "ck"), host="::1", port=0)
    assert capsys.readouterr().err.splitlines()[-1] == f"serving {tmp_path.name}/ck on http://[::1]:0/"
    assert TestClient(apps[1], base_url="http://[::1]:8751").get("/health").status_code == 200
    for host in ("", " "):
        with pytest.raises(UserError) as e:
            serve(str(tmp_path / "ck"), host=host, port=8750)
        assert str(e.value) == f"--host {host!r} is empty: give the address to listen on (127.0.0.1: this machine " \
                               "only, 0.0.0.0: every interface)."
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=re.escape(f"cannot listen on [::1]:{port}: Address already in use.")):
            serve(str(tmp_path / "ck"), host="::1", port=port)
