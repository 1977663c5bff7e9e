"""A local HTTP reward server for the tests (127.0.0.1, a random free port, a thread)."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def digit_fraction(text: str) -> float:
    return sum(ch.isdigit() for ch in text) / max(len(text), 1)


@contextmanager
def reward_server(sleep_s: float = 0.0, fail_first: int = 0, token: str | None = None):
    """Yields ``(url, state)``; the server scores each completion's share of digits.

    ``sleep_s``: wait before answering; ``fail_first``: answer 503 to that many requests
    first; ``token``: answer 401 unless ``Authorization: Bearer <token>``. ``state`` records
    the requests' bodies (``bodies``) and counts them (``requests``).
    """
    state = {"requests": 0, "bodies": [], "fail_first": fail_first}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_POST(self):  # noqa: N802 - http.server's name
            state["requests"] += 1
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["bodies"].append(body)
            if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
                return self._send(401, {"error": "bad token"})
            if state["fail_first"] > 0:
                state["fail_first"] -= 1
                return self._send(503, {"error": "busy"})
            if sleep_s:
                time.sleep(sleep_s)
            texts = [
                c if isinstance(c, str) else "".join(m["content"] for m in c)
                for c in body["completions"]
            ]
            self._send(200, {"rewards": [digit_fraction(t) for t in texts]})

        def _send(self, code, obj):
            data = json.dumps(obj).encode()
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (time-out)
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/score", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
