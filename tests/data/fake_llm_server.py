"""A tiny OpenAI-compatible chat server for the synthesis tests: real HTTP, deterministic replies.

Run as ``python fake_llm_server.py``; it prints its port on the first line of stdout. Replies depend
only on the prompt (and the request's ``seed``): QA prompts get a JSON array naming the document's first
word, summary prompts get ``SUMMARY[<first 3 words>]``, chain prompts ``COT[<n summaries>]``, query
prompts ``QUERY[...]``; tag prompts the listed tags whose last part occurs in the document plus an
invented one; forward/refine/RAG chains end in ``Final answer: <last word>``; RL prompts holding
``K=k`` answer 42 for seeds below k and 41 otherwise; the reward judge answers min(10, words).
The first attempt of every third distinct request (by a hash of prompt and seed) fails with 503,
to exercise retries; its retry succeeds. (A global "every third request" counter made a request
fail over and over when concurrent workers' requests interleaved in step, exhausting its retries.)
``GET /count`` returns how many chat requests were answered successfully; a prompt containing
``FAIL-ALWAYS`` always gets 503; a request with ``Authorization: Bearer bad`` gets 401.
"""

from __future__ import annotations

import json
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATE = {"requests": 0, "ok": 0}
SEEN: set[tuple[str, object]] = set()  # (prompt, seed) of requests that have been answered or failed once
LOCK = threading.Lock()


def reply_for(prompt: str, seed: int | None = None) -> str:
    body = prompt.rsplit(":\n", 1)[-1].strip()
    words = body.split()
    last = words[-1] if words else ""
    if "knowledge-point tags" in prompt:
        listing = prompt.split("numbered:\n", 1)[1].split("\n\n", 1)[0].splitlines()
        tags = [line.split(". ", 1)[1] for line in listing]
        chosen = [t for t in tags if t.rsplit("/", 1)[-1].lower() in body.lower()]
        return "Tags: " + json.dumps(chosen + ["invented/tag"] + ([1] if "FIRST-BY-NUMBER" in body else []))
    if prompt.startswith("Solve the following problem. Think"):
        return f"STEP[{' '.join(words[:3])}]\nFinal answer: {last}"
    if prompt.startswith("Below is a problem and a draft"):
        draft = prompt.split("Draft chain of thought:\n", 1)[1].split("\n", 1)[0]
        return f"REFINED({draft})\nFinal answer: {last}"
    if "retrieved from a reference corpus" in prompt:
        passages = prompt.split("Passages:\n", 1)[1].split("\n\nQuestion:", 1)[0]
        cited = [line.split("] ", 1)[1].split()[0] for line in passages.splitlines() if line.startswith("[")]
        return f"USED{cited}\nFinal answer: {last}"
    if prompt.startswith("Solve the following problem. Reason"):
        # "... K=3": samples with seed < 3 answer 42 (right), the others 41; NOANSWER: no final line.
        if "NOANSWER" in body:
            return "I could not solve it."
        k = int(body.split("K=", 1)[1].split()[0])
        return f"Thinking.\nFinal answer: {42 if seed is not None and seed < k else 41}"
    if "strict reviewer" in prompt:
        return str(min(10, len(words)))
    if "JSON array" in prompt:
        pair = {"question": f"What comes first in {words[0]}?", "answer": words[0]}
        return "Sure:\n" + json.dumps([pair])
    if prompt.startswith("Summarize"):
        return "SUMMARY[" + " ".join(words[:3]) + "]"
    if "Summaries:" in prompt:
        return f"COT[{len(body.splitlines())}]"
    return "QUERY[" + body + "]"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass

    def _send(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"ok": STATE["ok"]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.headers.get("Authorization") == "Bearer bad":
            return self._send(401, {"error": "bad key"})
        prompt = body["messages"][-1]["content"]
        key = (prompt, body.get("seed"))
        with LOCK:
            STATE["requests"] += 1
            flaky = key not in SEEN and zlib.crc32(repr(key).encode()) % 3 == 0
            SEEN.add(key)
        if flaky or "FAIL-ALWAYS" in prompt:
            return self._send(503, {"error": "busy"})
        with LOCK:
            STATE["ok"] += 1
        content = reply_for(prompt, body.get("seed"))
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()
    sys.exit(0)
