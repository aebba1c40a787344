"""A background worker: says when it is ready, then counts the jobs it does in the kv."""

from __future__ import annotations

import sys
import time

from kvclient import KV

if __name__ == "__main__":
    kv = KV(int(sys.argv[1]))
    print(f"worker ready (schema version {kv.command('GET', 'schema_version')})")
    while True:
        kv.command("INCR", "jobs_done")
        time.sleep(0.1)
