"""A service whose own start time is known: for benchmarks/startup.py.

    python _sleepy_service.py DELAY PORT TIMES [--announce]
    python _sleepy_service.py --startup

The first form sleeps DELAY seconds, then listens on PORT: from then on a
TCP probe succeeds. It takes ``time.time()`` as its very first statement and
again right after ``listen()`` returns, and writes both (``started <t>`` and
``listening <t>``) to the file TIMES, so the benchmark can compare them with
the library's event times. It prints nothing unless ``--announce`` is given;
then it also prints ``listening`` to stdout once listening, as many real
servers do, for a library that may take such a line as a hint. It accepts and
closes connections until it is killed.

The second form prints ``started <t>`` and exits: the cost of spawning the
script, measured alone.

Only ``os``, ``socket``, ``sys`` and ``time`` are imported, so the interpreter's own
start-up is all that runs before the first time stamp.
"""

import time

STARTED = time.time()

import os  # noqa: E402 - the start time is taken before anything else
import socket  # noqa: E402
import sys  # noqa: E402


def main(argv: list[str]) -> int:
    if argv == ["--startup"]:
        print(f"started {STARTED:.6f}", flush=True)
        return 0
    delay, port, times = float(argv[0]), int(argv[1]), argv[2]
    announce = argv[3:] == ["--announce"]
    time.sleep(delay)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
        listening = time.time()
        if announce:
            print("listening", flush=True)
        with open(times + ".tmp", "w") as out:
            out.write(f"started {STARTED:.6f}\nlistening {listening:.6f}\n")
        os.replace(times + ".tmp", times)  # the reader sees both lines or no file
        while True:
            conn, _ = sock.accept()
            conn.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
