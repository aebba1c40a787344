"""A stand-in for an embedding model server: ``GET /embed?text=...`` returns a vector.

Started on demand: the demo declares it with ``autostart = false``, and the
first task that ``needs`` it has the scheduler start it.
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


def embed(text: str) -> list[float]:
    """Four numbers per text: not a model, but the same text always gets the same vector."""
    letters = [c for c in text.lower() if c.isalpha()]
    vowels = sum(c in "aeiou" for c in letters)
    return [
        float(len(text)),
        float(len(text.split())),
        round(vowels / max(1, len(letters)), 3),
        float(sum(map(ord, text)) % 97),
    ]


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        url = urlparse(self.path)
        if url.path == "/healthz":
            self.reply({"ok": True})
        elif url.path == "/embed":
            text = parse_qs(url.query).get("text", [""])[0]
            self.reply({"vector": embed(text)})
        else:
            self.send_error(404)

    def reply(self, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request would drown the service's log


if __name__ == "__main__":
    port = int(sys.argv[1])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"embedder listening on http://127.0.0.1:{port}/")
    server.serve_forever()
