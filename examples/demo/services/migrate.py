"""A one-shot migration: writes the schema version into the kv, then exits 0."""

from __future__ import annotations

import sys

from kvclient import KV

SCHEMA_VERSION = "3"

if __name__ == "__main__":
    kv = KV(int(sys.argv[1]))
    kv.command("SET", "schema_version", SCHEMA_VERSION)
    kv.close()
    print(f"migrated the kv to schema version {SCHEMA_VERSION}")
