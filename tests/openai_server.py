"""A small, real OpenAI-compatible server for the tests: named LoRA adapters on one base model.

``transformers serve`` cannot serve named LoRA adapters, and vLLM is not installed in CI; this
server stands in for ``vllm serve BASE --enable-lora --lora-modules agent1=DIR ...``: standard
library ``http.server`` on top of comapoi's own model loading and greedy generation.

    python tests/openai_server.py --base-model DIR --tokenizer DIR --adapter agent1=DIR [--adapter ...] [--port 0]
    python tests/openai_server.py --base-model DIR --tokenizer DIR --serve-base teacher   (a teacher for data build)
    python tests/openai_server.py ... --rules rules   (a rule-based teacher for data build, see ``rule_answer``)

Prints ``READY <port>`` on standard output once the model is loaded. Endpoints:
``GET /v1/models`` (the adapter names) and ``POST /v1/chat/completions`` (``model`` = an adapter
name, ``messages``, ``max_tokens``; greedy whatever ``temperature`` says; one request at a time).

``--scripted`` loads no model: a threaded server whose answers are a fixed, parseable text, with
the misbehaviours the engine must survive (the tests of the HTTP client pick one per server):

    python tests/openai_server.py --scripted --adapter agent1=- [--chat MODE] [--models MODE]
        [--fail-first N --fail-status 503 [--retry-after S]] [--redirect-to URL] [--log FILE]

``--chat``: ok, echo-key (the Authorization header in the answer), number, blank, null,
usage-list, short-body, huge (2 MB), drip (a byte every 0.5 s), redirect (302/307 to
``--redirect-to``); ``--delay S`` before each answer. ``--models``: ok, list, data5, no-id, escape (a name with an escape
sequence). ``--log`` gets one JSON line per request (path, authorization, time).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _load(base_model: str, tokenizer: str, adapters: dict[str, Path]) -> Any:
    from comapoi_cli.models.loading import load_model

    return load_model(base_model, adapters=adapters, tokenizer=tokenizer, device="cpu", quant="none")


def rule_answer(messages: list[dict[str, str]]) -> str:
    """A teacher by rules, for ``data build`` tests: text asks get a fixed profile; list asks get, on the
    first try, prose with a year and coordinates (which the build must reject), and on a retry the
    label followed by the similar POIs (or the trajectory's POIs); users whose id is 3 mod 4 always
    get prose, so their trajectories end in the rejects file."""
    import re

    prompt = next((m["content"] for m in messages if m.get("role") == "user"), "")
    retry = len(messages) > 2 and "cannot be used" in messages[-1].get("content", "")
    user = re.search(r"(?:user_id|User_id): (\d+)", prompt)
    label = re.search(r"True Next POI Information.*?POI ID (\d+)", prompt)
    listing = "comma-separated ids only" in prompt
    if not listing:
        return "The user keeps to a few familiar places and moves between them, mostly in the evening."
    if (user and int(user.group(1)) % 4 == 3) or not retry:
        return "The user will most likely return in 2012 to the place at 40.7583,-73.9773 near home."
    similar = re.search(r"Similar POI List: ([\d, ]+)", prompt)
    pool = [int(x) for x in re.findall(r"\d+", similar.group(1))] if similar else []
    pool += [int(x) for x in re.findall(r"POI ID (\d+) \(", prompt)]
    truth = int(label.group(1)) if label else None
    if "least likely" in prompt:
        ids = [i for i in dict.fromkeys(reversed(pool)) if i != truth][:20]
    else:
        ids = list(dict.fromkeys(([truth] if truth is not None else []) + pool))[:25]
    return ", ".join(map(str, ids))
def scripted(args: argparse.Namespace, names: list[str]) -> None:
    """A server without a model that misbehaves as ``--chat``/``--models``/``--fail-first`` say."""
    import threading
    from http.server import ThreadingHTTPServer

    lock = threading.Lock()
    state = {"chat": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: Any) -> None:
            return

        def _log(self) -> None:
            if args.log:
                with lock, open(args.log, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"path": self.path, "method": self.command, "time": time.time(),
                                             "authorization": self.headers.get("Authorization")}) + "\n")

        def _raw(self, status: int, data: bytes, headers: dict[str, str] | None = None, length: int | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data) if length is None else length))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()

        def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
            self._raw(status, json.dumps(body).encode("utf-8"), headers)

        def do_GET(self) -> None:
            self._log()
            if self.path.rstrip("/") != "/v1/models":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            entries: Any = [{"id": n, "object": "model"} for n in names]
            if args.models == "list":
                self._send(200, entries)
            elif args.models == "data5":
                self._send(200, {"data": 5})
            elif args.models == "no-id":
                self._send(200, {"data": [{"object": "model"}, *entries[1:]]})
            elif args.models == "escape":
                self._send(200, {"data": [{"id": "evil\x1b[31mRED"}, *entries[1:]]})
            else:
                self._send(200, {"object": "list", "data": entries})

        def do_POST(self) -> None:
            self._log()
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            with lock:
                state["chat"] += 1
                number = state["chat"]
            if number <= args.fail_first:
                headers = {"Retry-After": str(args.retry_after)} if args.retry_after is not None else None
                self._send(args.fail_status, {"error": {"message": f"scripted failure {number}"}}, headers)
                return
            if args.delay:
                time.sleep(args.delay)
            mode = args.chat
            if mode == "redirect":
                self._raw(args.redirect_status, b"", {"Location": args.redirect_to + self.path})
                return
            content: Any = json.dumps({"next_poi_id": [1, 2, 3]})
            usage: Any = {"prompt_tokens": 7}
            if mode == "echo-key":
                content = f"your key is {(self.headers.get('Authorization') or '').removeprefix('Bearer ')}"
            elif mode == "number":
                content = 42
            elif mode == "blank":
                content = "   "
            elif mode == "null":
                content = None
            elif mode == "usage-list":
                usage = [1, 2]
            elif mode == "huge":
                content = "7" * 2_000_000
            answer = {"id": "x", "object": "chat.completion", "model": body.get("model"),
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}], "usage": usage}
            data = json.dumps(answer).encode("utf-8")
            if mode == "short-body":
                self._raw(200, data[: len(data) // 2], length=len(data))
                self.close_connection = True
            elif mode == "drip":
                self._raw(200, b"", length=len(data))
                try:
                    for byte in data:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(0.5)
                except OSError:
                    pass
                self.close_connection = True
            else:
                self._raw(200, data)

    class Server(ThreadingHTTPServer):
        request_queue_size = 256  # many clients connect at once (the default backlog of 5 resets some)
        daemon_threads = True

    server = Server(("127.0.0.1", args.port), Handler)
    print(f"READY {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-model")
    parser.add_argument("--tokenizer")
    parser.add_argument("--adapter", action="append", default=[], help="NAME=DIR")
    parser.add_argument("--serve-base", action="append", default=[], help="NAME: serve the base model itself under NAME")
    parser.add_argument("--rules", action="append", default=[], help="NAME: answer data build's teacher prompts by rule_answer")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--scripted", action="store_true", help="no model: scripted answers and faults")
    parser.add_argument("--chat", default="ok")
    parser.add_argument("--models", default="ok")
    parser.add_argument("--fail-first", type=int, default=0)
    parser.add_argument("--fail-status", type=int, default=503)
    parser.add_argument("--retry-after", type=float, default=None)
    parser.add_argument("--redirect-to", default="")
    parser.add_argument("--redirect-status", type=int, default=307)
    parser.add_argument("--log", default=None)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each chat answer")
    args = parser.parse_args(argv)
    adapters = {}
    for item in args.adapter:
        name, _, folder = item.partition("=")
        adapters[name] = Path(folder)
    if not adapters and not args.serve_base and not args.rules:
        parser.error("give --adapter NAME=DIR, --serve-base NAME or --rules NAME")
    served = [*adapters, *args.serve_base, *args.rules]
    if args.scripted:
        scripted(args, list(adapters))
        return
    if not args.base_model or not args.tokenizer:
        parser.error("--base-model and --tokenizer are needed (or --scripted)")
    loaded = _load(args.base_model, args.tokenizer, adapters)
    from comapoi_cli.models.generation import generate, render_prompts

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:  # quiet
            return

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._send(status, {"error": {"message": message, "type": "invalid_request_error", "code": status}})

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "comapoi-tests"}
                                                             for n in served]})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._error(404, f"no route {self.path}")
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                name, messages = body["model"], body["messages"]
                max_tokens = int(body.get("max_tokens") or 16)
            except (ValueError, KeyError, TypeError) as exc:
                self._error(400, f"bad request: {exc}")
                return
            if name not in served:
                self._error(404, f"The model `{name}` does not exist.")
                return
            if name in args.rules:
                self._send(200, {"id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "model": name,
                                 "created": int(time.time()), "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                     "role": "assistant", "content": rule_answer(messages)}}]})
                return
            ids = render_prompts(loaded.tokenizer, [messages])[0]
            if loaded.max_context and len(ids) + max_tokens > loaded.max_context:
                self._error(400, f"This model's maximum context length is {loaded.max_context} tokens; "
                                 f"the request has {len(ids)} + {max_tokens}.")
                return
            loaded.use_adapter(name if name in adapters else None)
            text = generate(loaded, [ids], batch_size=1, max_new_tokens=max_tokens)[0]
            self._send(200, {"id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
                             "model": name, "choices": [{"index": 0, "finish_reason": "length",
                                                         "message": {"role": "assistant", "content": text}}],
                             "usage": {"prompt_tokens": len(ids)}})

    server = HTTPServer(("127.0.0.1", args.port), Handler)
    print(f"READY {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
