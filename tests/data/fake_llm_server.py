"""A tiny OpenAI-compatible chat server for the synthesis tests: real HTTP, deterministic replies.

Run as ``python fake_llm_server.py``; it prints its port on the first line of stdout. Replies depend
only on the prompt: QA prompts get a JSON array naming the document's first word, summary prompts
get ``SUMMARY[<first 3 words>]``, chain prompts ``COT[<n summaries>]``, query prompts ``QUERY[...]``.
Every third request fails with 503 (before any reply for that prompt), to exercise retries.
``GET /count`` returns how many chat requests were answered successfully; a prompt containing
``FAIL-ALWAYS`` always gets 503; a request with ``Authorization: Bearer bad`` gets 401.
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATE = {"requests": 0, "ok": 0}
LOCK = threading.Lock()


def reply_for(prompt: str) -> str:
    body = prompt.rsplit(":\n", 1)[-1].strip()
    words = body.split()
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
        with LOCK:
            STATE["requests"] += 1
            flaky = STATE["requests"] % 3 == 0
        if flaky or "FAIL-ALWAYS" in prompt:
            return self._send(503, {"error": "busy"})
        with LOCK:
            STATE["ok"] += 1
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": reply_for(prompt)}}]})


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()
    sys.exit(0)
