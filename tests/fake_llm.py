"""A local HTTP server that speaks the OpenAI chat-completions protocol, for the interpret
tests: a rule-based 'model' (it explains a latent by the word marked most often, and judges a
description "the word X" by whether X is in the excerpt, or in its marked tokens), and
scripted misbehaviour (429, 5xx, a malformed reply, a timeout, a refusal)."""

from __future__ import annotations

import collections
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MARKED = re.compile(r"<<(.+?)>>")


def rule_answer(messages: list[dict[str, str]], prefix: str = "") -> str:
    """What the rule-based model says to a conversation (`prefix`: put before every
    explanation, e.g. markup that must reach the report as text)."""
    system, user = messages[0]["content"], messages[-1]["content"]
    if "Say in one short phrase" in system:
        words = [w.strip().lower() for w in MARKED.findall(user) if w.strip()]
        if not words:
            return prefix + "nothing in particular"
        return f"{prefix}the word {collections.Counter(words).most_common(1)[0][0]}"
    label = re.search(r"Description: (.*)", user).group(1).strip().lower()
    excerpt = re.search(r"Excerpt: (.*)", user).group(1)
    word = label.split("the word ")[-1].strip()
    if "marked tokens" in system:  # fuzzing: is the word among the marked tokens?
        hit = any(word == m.strip().lower() for m in MARKED.findall(excerpt))
    else:  # detection: is the word in the text?
        hit = word in excerpt.lower()
    return "Yes." if hit else "No."


class FakeLLM:
    """The server, on 127.0.0.1 and a free port; `script` lists what the next requests get
    ("429", "500", "malformed", "slow", "400", "401-echo"), then the rule-based answer."""

    def __init__(self, delay: float = 0.0, prefix: str = "") -> None:
        self.script: list[str] = []
        self.prefix = prefix
        self.requests: list[dict] = []
        self.auth: list[str] = []
        self.delay = delay
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append(body)
                    fake.auth.append(self.headers.get("Authorization", ""))
                    act = fake.script.pop(0) if fake.script else "ok"
                if fake.delay:
                    time.sleep(fake.delay)
                if act == "slow":
                    time.sleep(2.0)
                    act = "ok"
                if act in ("429", "500"):
                    self.send_response(int(act))
                    self.send_header("Retry-After", "0")
                    self.end_headers()
                    return
                if act in ("400", "401-echo"):
                    self.send_response(int(act[:3]))
                    self.end_headers()
                    echo = self.headers.get("Authorization", "") if act == "401-echo" else ""
                    self.wfile.write(f"bad request {echo}".encode())
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                if act == "malformed":
                    self.wfile.write(b'{"choices": [ this is not json')
                    return
                answer = rule_answer(body["messages"], fake.prefix)
                reply = {"choices": [{"message": {"role": "assistant", "content": answer}}]}
                self.wfile.write(json.dumps(reply).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeLLM:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
