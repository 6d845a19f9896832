"""The language models that explain latents and judge examples: any OpenAI-compatible chat
endpoint over HTTP (vLLM, llama.cpp's server, Ollama, OpenAI), or a local transformers model
(offline). Both answer two kinds of request:

    chat(messages, max_tokens) -> str     an explanation
    judge(messages) -> bool               a yes/no answer (the scores)

`Calls` puts a disk cache in front of a backend (the same request to the same model is never
sent twice, and answers already given survive an interrupted run) and runs an endpoint's
requests a few at a time. An API key is read from the environment when a request is sent and
appears nowhere else: not in the cache, the config, a log line or an error."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ..core.device import choose_device, choose_dtype
from ..core.errors import SamesheepError
from ..lm.models import fingerprint, load_model

Message = dict[str, str]
YES = re.compile(r"\b(yes|true|1)\b", re.IGNORECASE)
NO = re.compile(r"\b(no|false|0)\b", re.IGNORECASE)


class Backend(Protocol):
    name: str
    """What identifies this backend's answers in the cache: kind, model, endpoint."""
    parallel: bool
    """Whether several requests may run at once."""

    def check(self) -> None: ...

    def chat(self, messages: list[Message], max_tokens: int) -> str: ...

    def judge(self, messages: list[Message]) -> bool: ...


def parse_judgement(text: str) -> bool:
    """A yes/no answer read from free text: the first yes-like or no-like word wins; an
    answer with neither counts as no (a scorer that cannot answer must not score)."""
    yes, no = YES.search(text), NO.search(text)
    return bool(yes and (not no or yes.start() < no.start()))


class OpenAIChat:
    """An OpenAI-compatible /chat/completions endpoint: greedy (temperature 0) completions;
    429, 5xx, timeouts and dropped connections tried again with doubling waits (a server's
    Retry-After honoured); a malformed reply tried again, then named in one line."""

    parallel = True

    def __init__(
        self, base_url: str, model: str, api_key_env: str, timeout: float, retries: int
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.retries = retries
        self.name = f"openai|{base_url.rstrip('/')}|{model}"

    def check(self) -> None:
        """Fail in one line, before any work, where nothing listens at the endpoint."""
        url = urllib.parse.urlsplit(self.url)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname, port), timeout=min(self.timeout, 10.0)).close()
        except OSError as e:
            raise SamesheepError(
                f"cannot reach {self.url}: {e.strerror or e} (is the server running? set "
                "interpret.base_url)"
            ) from None

    def chat(self, messages: list[Message], max_tokens: int) -> str:
        return self._complete(messages, max_tokens)

    def judge(self, messages: list[Message]) -> bool:
        return parse_judgement(self._complete(messages, 3))

    def _complete(self, messages: list[Message], max_tokens: int) -> str:
        payload = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        data = json.dumps(payload).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env, "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        problem, hint = "", None
        for attempt in range(self.retries + 1):
            if attempt:  # doubling waits with jitter, or what the server asked for
                wait = min(0.25 * 2 ** (attempt - 1), 8.0) * (0.5 + random.random())
                time.sleep(min(hint, 30.0) if hint is not None else wait)
                hint = None
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    body = response.read()
            except urllib.error.HTTPError as e:
                if e.code == 429 or e.code >= 500:
                    problem, hint = f"HTTP {e.code}", _retry_after(e)
                    continue
                raise SamesheepError(
                    f"{self.url} refused the request: HTTP {e.code} {_scrub(_body(e), key)}"
                ) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, ConnectionRefusedError | socket.gaierror):
                    raise SamesheepError(
                        f"cannot reach {self.url}: {_scrub(str(reason), key)} (is the server "
                        "running? set interpret.base_url)"
                    ) from None
                problem = f"no answer within {self.timeout:g} s" if _timed_out(e) else str(reason)
                continue
            try:
                reply = json.loads(body)
                content = reply["choices"][0]["message"]["content"]
                if not isinstance(content, str):
                    raise TypeError("content is not text")
                return content
            except (ValueError, KeyError, IndexError, TypeError) as e:
                problem = f"a malformed reply ({type(e).__name__})"
                continue
        raise SamesheepError(
            f"{self.url} failed {self.retries + 1} times, last with {_scrub(problem, key)}"
        )


def _retry_after(e: urllib.error.HTTPError) -> float | None:
    try:
        return float(e.headers.get("Retry-After", ""))
    except (TypeError, ValueError):
        return None


def _timed_out(e: BaseException) -> bool:
    return isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError)


def _body(e: urllib.error.HTTPError) -> str:
    try:
        return " ".join(e.read().decode("utf-8", "replace").split())[:200]
    except OSError:
        return ""


def _scrub(text: str, key: str) -> str:
    """Text with the API key blanked out, in case a server echoes it."""
    return text.replace(key, "***") if key else text


class LocalChat:
    """A causal language model run here with transformers: greedy generation for
    explanations, and for a judgement the next token's logits of "yes" against "no" (one
    forward pass, which a small model answers far more reliably than free text)."""

    parallel = False

    def __init__(self, source: str, trust_remote_code: bool = False) -> None:
        device = choose_device("auto")
        self.lm = load_model(source, choose_dtype("auto", device), device, trust_remote_code)
        self.device = device
        self.torch = torch
        self.name = f"local|{source}|{fingerprint(source)}"
        tok = self.lm.tokenizer
        self.yes = _word_ids(tok, ("yes", "Yes", " yes", " Yes"))
        self.no = _word_ids(tok, ("no", "No", " no", " No"))
        self.lock = threading.Lock()

    def _ids(self, messages: list[Message]) -> Any:
        tok = self.lm.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:  # a base model: the conversation as plain text
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
            ids = tok(text + "Assistant:", add_special_tokens=True)["input_ids"]
        return self.torch.tensor([list(ids)], device=self.device)

    def check(self) -> None:
        """Nothing to check: the model loaded."""

    def chat(self, messages: list[Message], max_tokens: int) -> str:
        ids = self._ids(messages)
        tok = self.lm.tokenizer
        with self.lock, self.torch.inference_mode():
            out = self.lm.model.generate(
                ids,
                attention_mask=self.torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            )
        return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    def judge(self, messages: list[Message]) -> bool:
        ids = self._ids(messages)
        with self.lock, self.torch.inference_mode():
            logits = self.lm.model(input_ids=ids).logits[0, -1].float()
        return bool(logits[self.yes].max() > logits[self.no].max())


def _word_ids(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """The first token of each spelling of a word (the model's likely first answer token)."""
    ids = {tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words}
    return sorted(ids)


def make_backend(spec: str, cfg: Any, trust_remote_code: bool = False) -> Backend:
    """The backend a spec names: "local:<model source>" or "openai:<model name>"."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise SamesheepError(
            f"interpret backend {spec!r} must be local:<model source> or openai:<model name>"
        )
    if kind == "local":
        return LocalChat(rest, trust_remote_code)
    if kind == "openai":
        return OpenAIChat(cfg.base_url, rest, cfg.api_key_env, cfg.timeout, cfg.retries)
    raise SamesheepError(f"unknown interpret backend {kind!r} in {spec!r} (use local: or openai:)")


@dataclass(frozen=True)
class Request:
    """One question for a backend: an explanation (max_tokens > 0) or a judgement (0)."""

    messages: tuple[tuple[str, str], ...]
    max_tokens: int

    @classmethod
    def of(cls, messages: list[Message], max_tokens: int = 0) -> Request:
        return cls(tuple((m["role"], m["content"]) for m in messages), max_tokens)

    def as_messages(self) -> list[Message]:
        return [{"role": r, "content": c} for r, c in self.messages]


class Calls:
    """A backend behind a disk cache (JSON lines, appended as answers arrive, so an
    interrupted run keeps them), run `concurrency` requests at a time where it allows."""

    def __init__(self, backend: Backend, cache: Path, concurrency: int = 4) -> None:
        self.backend = backend
        self.path = cache
        self.concurrency = max(1, concurrency) if backend.parallel else 1
        self.lock = threading.Lock()
        self.answers: dict[str, Any] = {}
        self.sent = 0
        if cache.is_file():
            for line in cache.read_text(encoding="utf-8").splitlines():
                try:
                    item = json.loads(line)
                    self.answers[item["key"]] = item["answer"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by an interrupted run

    def key(self, request: Request) -> str:
        blob = json.dumps([self.backend.name, request.messages, request.max_tokens])
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def ask(self, requests: Sequence[Request]) -> list[Any]:
        """The answers, in order: cached ones read back, the others asked (once each)."""
        keys = [self.key(r) for r in requests]
        todo = {k: r for k, r in zip(keys, requests, strict=True) if k not in self.answers}

        def one(item: tuple[str, Request]) -> None:
            key, request = item
            messages = request.as_messages()
            if request.max_tokens > 0:
                answer: Any = self.backend.chat(messages, request.max_tokens)
            else:
                answer = self.backend.judge(messages)
            with self.lock:
                self.answers[key] = answer
                self.sent += 1
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": key, "answer": answer}) + "\n")

        if self.concurrency > 1 and len(todo) > 1:
            with ThreadPoolExecutor(self.concurrency) as pool:
                for _ in pool.map(one, todo.items()):
                    pass
        else:
            for item in todo.items():
                one(item)
        return [self.answers[k] for k in keys]
