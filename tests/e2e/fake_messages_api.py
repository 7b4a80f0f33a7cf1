"""A fake Anthropic Messages API for tests: the streaming SSE events Claude Code reads, and a
scripted ``tool_use`` that makes the real agent act.

Every ``POST /v1/messages`` is recorded (path, headers, JSON body). The reply: a request that
carries tools and no ``tool_result`` yet gets the scripted tool call (``Write`` with the given
``file_path`` and ``content``); once the tool's result comes back (or for a request without tools,
such as a title or topic query) the reply is plain text.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def has_tool_result(body: dict) -> bool:
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, list) and any(isinstance(b, dict) and b.get("type") == "tool_result" for b in content):
            return True
    return False


class FakeMessagesAPI:
    def __init__(self, file_path: str, content: str, final_text: str = "Done: the file is written."):
        self.file_path, self.content, self.final_text = file_path, content, final_text
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.server: Optional[ThreadingHTTPServer] = None

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def reply(self, body: dict) -> tuple[list[dict], str]:
        """(content blocks, stop_reason) for this request."""
        if body.get("tools") and not has_tool_result(body):
            tool = {"type": "tool_use", "id": "toolu_e2e_1", "name": "Write",
                    "input": {"file_path": self.file_path, "content": self.content}}
            return [tool], "tool_use"
        return [{"type": "text", "text": self.final_text}], "end_turn"

    def stream(self, body: dict) -> bytes:
        blocks, stop = self.reply(body)
        model = body.get("model", "claude-test")
        out = [sse("message_start", {"type": "message_start", "message": {
            "id": "msg_e2e", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 1}}})]
        for index, block in enumerate(blocks):
            if block["type"] == "tool_use":
                start = dict(block, input={})
                delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
            else:
                start = {"type": "text", "text": ""}
                delta = {"type": "text_delta", "text": block["text"]}
            out.append(sse("content_block_start", {"type": "content_block_start", "index": index,
                                                   "content_block": start}))
            out.append(sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))
            out.append(sse("content_block_stop", {"type": "content_block_stop", "index": index}))
        out.append(sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                         "usage": {"output_tokens": 5}}))
        out.append(sse("message_stop", {"type": "message_stop"}))
        return b"".join(out)

    def start(self) -> "FakeMessagesAPI":
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self._send(200, "application/json", b"{}")

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = {}
                with api.lock:
                    api.requests.append({"path": self.path, "headers": dict(self.headers.items()), "body": body})
                if not self.path.startswith("/v1/messages") or "count_tokens" in self.path:
                    self._send(200, "application/json", json.dumps({"input_tokens": 10}).encode())
                    return
                if body.get("stream"):
                    self._send(200, "text/event-stream", api.stream(body))
                    return
                blocks, stop = api.reply(body)
                message = {"id": "msg_e2e", "type": "message", "role": "assistant", "model": body.get("model", ""),
                           "content": blocks, "stop_reason": stop, "stop_sequence": None,
                           "usage": {"input_tokens": 10, "output_tokens": 5}}
                self._send(200, "application/json", json.dumps(message).encode())

            def _send(self, status: int, kind: str, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def messages(self) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["path"].startswith("/v1/messages")]
