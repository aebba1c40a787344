"""A configurable service for tests: sleep, print, listen, exit — as told."""

import argparse
import contextlib
import socket
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--delay", type=float, default=0.0, help="seconds before listening")
parser.add_argument("--port", type=int, help="listen on this TCP port")
parser.add_argument("--say", action="append", default=[], help="lines to print once up")
parser.add_argument("--exit-after", type=float, help="exit after this many seconds")
parser.add_argument("--code", type=int, default=0, help="exit code")
args = parser.parse_args()

time.sleep(args.delay)
server = None
if args.port:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", args.port))
    server.listen()
    server.settimeout(0.05)
for line in args.say:
    print(line, flush=True)
deadline = time.monotonic() + args.exit_after if args.exit_after is not None else None
while deadline is None or time.monotonic() < deadline:
    if server is None:
        time.sleep(0.05)
        continue
    with contextlib.suppress(TimeoutError):
        server.accept()[0].close()
sys.exit(args.code)
