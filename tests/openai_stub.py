"""A loopback OpenAI-compatible stub server whose answers a test scripts (modes per request: ok, 500,
garbage, slow, not_json_content, no_json_schema, plain_json_object, llama_server), shared by the openai
backend's tests and the reliability tests."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any


class Stub:
    """Shared state: a queue of behaviours for the next requests, and what the server saw."""

    def __init__(self) -> None:
        self.script: list[str] = []
        self.default = "ok"
        self.delay = 0.0
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()

    def next_mode(self) -> str:
        with self.lock:
            return self.script.pop(0) if self.script else self.default


def _answer(body: dict[str, Any]) -> str:
    fmt = body.get("response_format") or {}
    schema = (fmt.get("json_schema") or {}).get("schema") or {"properties": {"color": {"enum": ["black"]}}}
    out: dict[str, Any] = {}
    for name, prop in schema["properties"].items():
        if "enum" in prop:
            out[name] = prop["enum"][0]
        elif prop.get("type") == "object":
            out[name] = {k: ["stub phrase"] for k in prop["properties"]}
    return json.dumps(out)


def _completion(content: str) -> dict[str, Any]:
    return {"id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()), "model": "stub",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def make_handler(stub: Stub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

        def _send(self, status: int, payload: bytes, ctype: str = "application/json") -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout test)

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            with stub.lock:
                stub.requests.append(body)
                stub.in_flight += 1
                stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
            try:
                mode = stub.next_mode()
                if stub.delay:
                    time.sleep(stub.delay)
                if mode == "slow":
                    time.sleep(1.5)
                    mode = "ok"
                if mode == "500":
                    self._send(500, b'{"error": {"message": "boom", "type": "server_error"}}')
                elif mode == "garbage":
                    self._send(200, b"<html>definitely not a completion</html>", "text/html")
                elif mode == "not_json_content":
                    self._send(200, json.dumps(_completion("Sure! The colour is black.")).encode())
                elif mode in ("no_json_schema", "plain_json_object") and \
                        (body.get("response_format") or {}).get("type") == "json_schema":
                    self._send(400, b'{"error": {"message": "response_format json_schema is not supported"}}')
                elif mode == "plain_json_object" and "schema" in (body.get("response_format") or {}):
                    self._send(400, b'{"error": {"message": "response_format: unknown key schema"}}')
                elif mode == "llama_server" and (body.get("response_format") or {}).get("type") == "json_schema":
                    # llama-cpp-python's server: a 500 whose message names the field
                    self._send(500, b'{"error": {"message": "1 validation error: body.response_format.type: '
                                    b'Input should be text or json_object"}}')
                else:
                    self._send(200, json.dumps(_completion(_answer(body))).encode())
            finally:
                with stub.lock:
                    stub.in_flight -= 1

    return Handler
