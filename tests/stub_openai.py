"""A small OpenAI-compatible server for the API tests: a fixed next-token distribution, and faults on demand.

``StubServer.faults`` is consumed one per request, in order: ``"429"`` and ``"500"`` answer with that status
(and ``retry-after-ms: 1`` so the client retries at once), ``"timeout"`` answers after ``SLOW`` seconds,
``"no_logprobs"`` leaves the log-probabilities out, ``"few_logprobs"`` returns three of them and
``"sampled_end"`` answers as llama.cpp does when its own sample ends the response (no text, no log-probabilities). Without a
fault the server answers like a model whose next-token distribution is :data:`DISTRIBUTION` whatever the
text (the empty token ends the response), and whose sampled response is always :data:`RESPONSE`.
"""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# token text → probability at temperature 1; "" is the end-of-response token
DISTRIBUTION = {" good": 0.4, " bad": 0.25, " day": 0.15, "!": 0.1, "": 0.06, " the": 0.04}
RESPONSE = " a good day!"
SLOW = 2.0


class Handler(BaseHTTPRequestHandler):
    server: "StubServer"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, body))
        fault = self.server.faults.pop(0) if self.server.faults else None
        if fault in ("429", "500"):
            return self.reply(int(fault), {"error": {"message": f"injected {fault}", "type": "stub"}})
        if fault == "timeout":
            time.sleep(SLOW)
        chat = self.path.endswith("/chat/completions")
        k = body.get("top_logprobs") if chat else body.get("logprobs")
        k = 3 if fault == "few_logprobs" else k
        top = sorted(DISTRIBUTION.items(), key=lambda kv: -kv[1])[: k or 0]
        if fault == "sampled_end":  # llama.cpp when its own sample is the end: no tokens, no log-probabilities
            return self.reply(200, {"id": "stub", "object": "text_completion", "created": 0, "model": body["model"],
                                    "choices": [{"index": 0, "text": "", "finish_reason": "stop", "logprobs": None}]})
        if body.get("max_tokens") == 1:
            text, finish = max(DISTRIBUTION, key=DISTRIBUTION.get), "length"
        else:
            text, finish = RESPONSE, "stop"
        choice = {"index": 0, "finish_reason": finish}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
            if k and fault != "no_logprobs":
                choice["logprobs"] = {"content": [{"token": text, "logprob": math.log(DISTRIBUTION[text]), "bytes": None,
                                                   "top_logprobs": [{"token": t, "logprob": math.log(p), "bytes": None}
                                                                    for t, p in top]}]}
        else:
            choice["text"] = text
            if k and fault != "no_logprobs":
                choice["logprobs"] = {"tokens": [text], "token_logprobs": [math.log(DISTRIBUTION[text])],
                                      "top_logprobs": [{t: math.log(p) for t, p in top}], "text_offset": [0]}
            else:
                choice["logprobs"] = None
        self.reply(200, {"id": "stub", "object": "chat.completion" if chat else "text_completion", "created": 0,
                         "model": body["model"], "choices": [choice],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1 if body.get("max_tokens") == 1 else 4,
                                   "total_tokens": 2}})

    def reply(self, status: int, payload: dict):
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("retry-after-ms", "1")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout)

    def log_message(self, *args):
        pass


class StubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.faults: list[str] = []
        self.requests: list[tuple[str, dict]] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def stop(self):
        self.shutdown()
        self.server_close()
