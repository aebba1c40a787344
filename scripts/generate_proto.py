"""Regenerate the gRPC code in src/dspy_infra/remote/_generated from proto/.

Usage (from anywhere; needs the dev lock installed, which pins
betterproto2-compiler and grpcio-tools)::

    .venv/bin/python scripts/generate_proto.py            # rewrite the committed code
    .venv/bin/python scripts/generate_proto.py --out DIR  # write elsewhere (the staleness test)

betterproto2 writes its own ``message_pool.py`` (and ``google/protobuf`` when a
proto imports a well-known type) at the output root, so the output root is a
subpackage of ours, never a top-level directory on ``sys.path``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PACKAGE_DIR = ROOT / "src" / "dspy_infra" / "remote" / "_generated"
# google_protobuf_descriptors: the descriptors too (they need `protobuf` at
# runtime), which the server hands to its reflection service.
OPTIONS = "client_generation=async,server_generation=async,google_protobuf_descriptors"
# protobuf ships no type information (its stubs are the separate types-protobuf):
# mypy --strict is told so where the generated code imports it, and nowhere else.
_PROTOBUF_IMPORT = re.compile(r"^(from google\.protobuf[\w.]* import [^#\n]*?)$", re.MULTILINE)
_UNTYPED = "  # type: ignore[import-untyped]"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def generate(out: Path) -> None:
    """Write the generated package into ``out`` (created; emptied first)."""
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        # The plugin (protoc-gen-python_betterproto2) is found on PATH: put
        # the running interpreter's scripts first, so the pinned one is used.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        env = {**os.environ, "PATH": path}
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{PROTO_DIR}",
                f"--python_betterproto2_out={staging}",
                f"--python_betterproto2_opt={OPTIONS}",
                *(str(p.relative_to(PROTO_DIR)) for p in proto_files()),
            ],
            check=True,
            cwd=ROOT,  # the compiler formats with ruff: the same config every time
            env=env,
            stdout=subprocess.DEVNULL,
        )
        for module in staging.rglob("*.py"):
            text = module.read_text()
            marked = _PROTOBUF_IMPORT.sub(lambda m: m.group(1) + _UNTYPED, text)
            if marked != text:
                module.write_text(marked)
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(staging, out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR, help="output directory")
    args = parser.parse_args()
    generate(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
