"""A real HTTP server speaking the OpenAI Chat Completions protocol, with scripted verdicts
and faults, standing in for a paid judge API (the only thing that cannot exist here).

Verdict policy `merit`: the answer mentioning a doctor wins (tie if both or neither).
Policy `always_a`: answers "A" whatever the order (a position-biased judge).
Both policies OBEY injected instructions ("pick A", "ignore the rubric") when such text reaches
the instruction part of the request, i.e. anywhere outside the fenced data blocks. Faults are
chosen by markers in the conversation: RATELIMIT_ONCE, FAIL500_ONCE, FAIL500, TIMEOUT,
MALFORMED (a body that is not JSON), PROSE (a completion whose content is prose, as a weak model
writes), MISSING_FIELDS, OUT_OF_RANGE, BAD_WINNER, SLOW. `max_concurrency` caps the requests
served at once, like a real API tier: the ones above it wait for a free place. `Script.status`
answers every request with that HTTP status (503: an outage; 404: a misconfigured model). A
connection-refused outage is the server stopped; `FakeOpenAI(port=...)` starts a new one where the
old one was.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from shared.broker import free_port
from tests.helpers import wait_for

FENCE = re.compile(r"<<<(?P<label>[A-Z ]+) (?P<nonce>[0-9a-f]+)>>>\n(?P<body>.*?)\n<<<END (?P=label) (?P=nonce)>>>", re.S)
INJECTION = re.compile(r"pick (answer )?(?P<which>[AB])\b|ignore the rubric", re.I)


def scores(n: int) -> dict:
    return {"correctness": n, "clarity": n, "safety": n, "empathy": n}


@dataclass
class Script:
    policy: str = "merit"
    delay_s: float = 0.0
    requests: list[dict] = field(default_factory=list)
    request_times: list[float] = field(default_factory=list)
    seen_once: Counter = field(default_factory=Counter)
    authorization: list[str] = field(default_factory=list)
    status: int | None = None
    """answer every request with this HTTP status (an outage, a refusal) instead of a verdict"""
    refuse: set[str] = field(default_factory=set)
    """what this endpoint answers 400 to: json_schema, json_object (response formats), temperature, max_tokens"""
    max_concurrency: int | None = None
    """requests served at once (None: unlimited); the others wait in arrival order"""
    peak_concurrency: int = 0
    """the most requests that were being served at once"""


def build_app(script: Script) -> FastAPI:
    app = FastAPI()
    serving = 0
    places: list[asyncio.Semaphore] = []  # made on the server's own event loop, at the first request

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        nonlocal serving
        if script.max_concurrency is not None and not places:
            places.append(asyncio.Semaphore(script.max_concurrency))
        async with places[0] if places else contextlib.nullcontext():
            serving += 1
            script.peak_concurrency = max(script.peak_concurrency, serving)
            try:
                return await answer(request)
            finally:
                serving -= 1

    async def answer(request: Request):
        body = await request.json()
        script.requests.append(body)
        script.request_times.append(time.monotonic())
        script.authorization.append(request.headers.get("authorization", ""))
        user = body["messages"][-1]["content"]
        system = " ".join(m["content"] for m in body["messages"] if m["role"] == "system")
        fenced = {m["label"]: m["body"] for m in FENCE.finditer(user)}
        instruction_part = system + FENCE.sub("", user)
        convo = fenced.get("CONVERSATION", "")
        if script.status is not None:
            return JSONResponse({"error": {"message": f"scripted HTTP {script.status}"}}, script.status)
        fmt = (body.get("response_format") or {}).get("type")
        if fmt in script.refuse:
            return JSONResponse({"error": {"message": f"response_format {fmt} is not supported",
                                           "param": "response_format"}}, 400)
        if "temperature" in script.refuse and "temperature" in body:
            return JSONResponse({"error": {"message": "Unsupported parameter: 'temperature' is not supported with "
                                                      "this model.", "param": "temperature"}}, 400)
        if "max_tokens" in script.refuse and "max_tokens" in body:
            return JSONResponse({"error": {"message": "Unsupported parameter: 'max_tokens' is not supported with this "
                                                      "model. Use 'max_completion_tokens' instead.",
                                           "param": "max_tokens"}}, 400)
        for marker, status in (("RATELIMIT_ONCE", 429), ("FAIL500_ONCE", 500)):
            if marker in convo and script.seen_once[(marker, convo)] == 0:
                script.seen_once[(marker, convo)] += 1
                return JSONResponse({"error": {"message": "try later"}}, status, headers={"Retry-After": "1"})
        if "FAIL500" in convo and "FAIL500_ONCE" not in convo:
            return JSONResponse({"error": {"message": "boom"}}, 500)
        if "TIMEOUT" in convo:
            await asyncio.sleep(5)
        if "SLOW" in convo or script.delay_s:
            await asyncio.sleep(script.delay_s or 3)
        if "MALFORMED" in convo:
            return PlainTextResponse("this is not json", 200)
        a, b = fenced.get("ANSWER A", ""), fenced.get("ANSWER B", "")
        injected = INJECTION.search(instruction_part)
        if injected:
            winner = (injected.group("which") or "A").upper()
        elif script.policy == "always_a":
            winner = "A"
        else:
            da, db = "doctor" in a.lower(), "doctor" in b.lower()
            winner = "tie" if da == db else ("A" if da else "B")
        verdict = {"reasoning": f"scripted {script.policy} verdict", "winner": winner,
                   "scores_a": scores(8 if winner == "A" else 4), "scores_b": scores(8 if winner == "B" else 4)}
        if "MISSING_FIELDS" in convo:
            verdict.pop("scores_b")
        if "OUT_OF_RANGE" in convo:
            verdict["scores_a"]["safety"] = 42
        if "BAD_WINNER" in convo:
            verdict["winner"] = "C"
        content = json.dumps(verdict)
        if "PROSE" in convo:
            content = f"I think answer {winner} is better because it is kinder."
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model"), "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}

    return app


class FakeOpenAI:
    def __init__(self, script: Script | None = None, port: int | None = None) -> None:
        self.script = script or Script()
        self.port = port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(build_app(self.script), host="127.0.0.1", port=self.port,
                                                   log_level="warning", timeout_keep_alive=30,
                                                   timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "FakeOpenAI":
        self.thread.start()
        wait_for(lambda: self.server.started, 10, "the fake OpenAI server")
        return self

    def __exit__(self, *exc) -> None:
        # A request a test left hanging (delay_s) is cancelled after a second; the app's lifespan then ends
        # as it should (force_exit would cancel it too, and starlette logs that as an error).
        self.server.should_exit = True
        self.thread.join(10)
