"""An OpenAI-compatible HTTP server with a web chat page, on FastAPI + uvicorn.

    babyllama serve runs/demo/sft/final --host 127.0.0.1 --port 8000
    # then open http://127.0.0.1:8000/ or use any OpenAI client:
    #   OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none").chat.completions.create(...)

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with "stream": true for
server-sent events), GET /v1/models, GET /health, GET / (the chat page, no CDN).
Every request is validated (types, ranges, sizes) and gets a JSON error on 4xx. Each request
has its own KV cache; one lock lets one request at a time run a decoding step, so concurrent
requests interleave safely. A client that disconnects stops its generation.
"""

import json  # no `from __future__ import annotations`: FastAPI reads the local request models' types
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from babyllama.chat import Sampling, decode_stream, prompt_ids
from babyllama.errors import require
from babyllama.train.sft_data import Conversation

MAX_BODY_BYTES = 1 << 20
PAGE = Path(__file__).with_name("chat_page.html")


def build_app(model, tokenizer, model_name: str):
    fastapi = require("fastapi", "serve")
    from fastapi import Request
    from fastapi.concurrency import iterate_in_threadpool
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel, Field

    max_ctx = model.cfg.max_seq_len
    default_tokens = max(1, min(256, max_ctx // 2))
    lock = threading.Lock()

    class Message(BaseModel):
        role: Literal["system", "user", "assistant"]
        content: str = Field(max_length=20_000)

    class Common(BaseModel):
        model: str | None = None
        max_tokens: int = Field(default_tokens, ge=1, le=max_ctx)
        temperature: float = Field(0.0, ge=0.0, le=2.0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        stop: str | list[str] | None = None
        stream: bool = False

        def sampling(self) -> Sampling:
            return Sampling(self.max_tokens, self.temperature, 0, self.top_p)

        def stops(self) -> list[str]:
            stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
            if len(stops) > 4 or any(not s or len(s) > 100 for s in stops):
                raise ValueError("stop takes at most 4 non-empty strings of at most 100 characters")
            return stops

    class ChatRequest(Common):
        messages: list[Message] = Field(min_length=1, max_length=128)

    class CompletionRequest(Common):
        prompt: str = Field(max_length=20_000)

    app = fastapi.FastAPI(title="babyllama", version="1")

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
            return error(413, f"request body over {MAX_BODY_BYTES} bytes")
        return await call_next(request)

    @app.exception_handler(fastapi.exceptions.RequestValidationError)
    async def invalid(request: Request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", [])[1:])
        return error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}")

    def conversation(messages: list[Message]) -> Conversation:
        system = "\n".join(m.content for m in messages if m.role == "system")
        turns, user = [], None
        for m in (m for m in messages if m.role != "system"):
            if m.role == "user":
                if user is not None:
                    turns.append((user, ""))  # two user messages in a row: the first got no answer
                user = m.content
            elif user is not None:
                turns.append((user, m.content))
                user = None
        if user is None:
            raise ValueError("the last message must come from the user")
        return Conversation([*turns, (user, "")], system)

    def tokens(ids: list[int], s: Sampling) -> Iterator[int]:
        """model.stream, one decoding step at a time under the lock."""
        gen = model.stream(ids, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                           eos_id=tokenizer.eos_id)
        try:
            while True:
                with lock:
                    nxt = next(gen, None)
                if nxt is None:
                    return
                yield nxt
        finally:
            gen.close()

    def pieces(ids: list[int], s: Sampling, stops: list[str], state: dict) -> Iterator[str]:
        """Text pieces until eos, max_tokens or a stop string (not included); state gets the finish reason.

        The last len(longest stop) - 1 characters are held back until it is clear no stop begins there.
        """
        state["finish"], state["completion_tokens"] = "length", 0
        text, emitted = "", 0
        hold = max((len(x) for x in stops), default=1) - 1

        def counted(it):
            for t in it:
                state["completion_tokens"] += 1
                yield t

        for piece in decode_stream(tokenizer, counted(tokens(ids, s))):
            text += piece
            hits = [text.find(x) for x in stops if x in text]
            if hits:
                if min(hits) > emitted:
                    yield text[emitted : min(hits)]
                state["finish"] = "stop"
                return
            if len(text) - hold > emitted:
                yield text[emitted : len(text) - hold]
                emitted = len(text) - hold
        if len(text) > emitted:
            yield text[emitted:]
        if state["completion_tokens"] < s.max_new_tokens:
            state["finish"] = "stop"  # the model said <eos>

    async def respond(request: Request, ids: list[int], body: Common, kind: str):
        try:
            stops = body.stops()
        except ValueError as e:
            return error(400, str(e))
        state: dict = {}
        rid, created, name = f"{kind[:4]}-{uuid.uuid4().hex[:16]}", int(time.time()), body.model or model_name
        chat = kind == "chat"
        obj = "chat.completion" if chat else "text_completion"
        usage = lambda: {"prompt_tokens": len(ids), "completion_tokens": state["completion_tokens"],  # noqa: E731
                         "total_tokens": len(ids) + state["completion_tokens"]}
        if not body.stream:
            text = "".join([p async for p in iterate_in_threadpool(pieces(ids, body.sampling(), stops, state))])
            choice = {"index": 0, "finish_reason": state["finish"]}
            choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            return {"id": rid, "object": obj, "created": created, "model": name, "choices": [choice],
                    "usage": usage()}

        def chunk(delta: dict | str, finish: str | None = None) -> str:
            choice = {"index": 0, "finish_reason": finish}
            choice |= {"delta": delta} if chat else {"text": delta}
            data = {"id": rid, "object": obj + (".chunk" if chat else ""), "created": created, "model": name,
                    "choices": [choice]}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        async def events():
            gen = pieces(ids, body.sampling(), stops, state)
            try:
                if chat:
                    yield chunk({"role": "assistant", "content": ""})
                async for piece in iterate_in_threadpool(gen):
                    if await request.is_disconnected():
                        return  # the finally below stops the generation
                    yield chunk({"content": piece} if chat else piece)
                yield chunk({} if chat else "", state["finish"])
                yield "data: [DONE]\n\n"
            finally:
                gen.close()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "babyllama",
                                            "context_length": max_ctx}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        try:
            conv = conversation(body.messages)
        except ValueError as e:
            return error(400, str(e))
        question_ids = tokenizer.encode(conv.turns[-1][0])
        if len(question_ids) + body.max_tokens >= max_ctx:
            return error(400, f"the last message ({len(question_ids)} tokens) plus max_tokens ({body.max_tokens}) "
                              f"does not fit the context of {max_ctx} tokens")
        return await respond(request, prompt_ids(tokenizer, conv, max_ctx, body.max_tokens), body, "chat")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        ids = [tokenizer.eos_id, *tokenizer.encode(body.prompt)]
        if len(ids) + body.max_tokens > max_ctx:
            return error(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({body.max_tokens}) does not fit "
                              f"the context of {max_ctx} tokens")
        return await respond(request, ids, body, "text")

    @app.get("/", response_class=HTMLResponse)
    def page():
        page = PAGE.read_text(encoding="utf-8").replace("{{MODEL}}", model_name)
        return page.replace("{{MAX_TOKENS}}", str(default_tokens)).replace("{{CONTEXT}}", str(max_ctx))

    return app


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu") -> None:
    from babyllama.checkpoint import load_checkpoint

    uvicorn = require("uvicorn", "serve")
    model, tokenizer, _ = load_checkpoint(checkpoint, device)
    name = Path(checkpoint).resolve().parent.name + "/" + Path(checkpoint).name
    uvicorn.run(build_app(model, tokenizer, name), host=host, port=port, log_level="info")
