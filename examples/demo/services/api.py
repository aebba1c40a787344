"""An HTTP API over the kv: ``GET /`` answers with the schema version and the jobs done."""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kvclient import KV


class Handler(BaseHTTPRequestHandler):
    kv_port = 0

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self.reply({"ok": True})
        elif self.path == "/":
            kv = KV(self.kv_port)
            try:
                schema = kv.command("GET", "schema_version")
                jobs = kv.command("GET", "jobs_done")
            finally:
                kv.close()
            self.reply({"schema_version": schema, "jobs_done": jobs})
        else:
            self.send_error(404)

    def reply(self, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


if __name__ == "__main__":
    port, Handler.kv_port = int(sys.argv[1]), int(sys.argv[2])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"api listening on http://127.0.0.1:{port}/")
    server.serve_forever()
