"""Services and tasks in Docker containers, from a compose file and a few lines of config.

    python examples/docker_stack.py

Needs a running Docker engine and Debian's ``busybox-static`` (the example
builds ``local/busybox:latest`` from it, since no registry is needed). It
starts a web server and a client that reads from it by name on the
instance's network, runs two tasks in containers (one writes its result
file, one prints its result), and checks at the end that no container of
the example is left.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import aclosing
from pathlib import Path

import aiodocker
import anyio

from dspy_infra import AgentInfra
from dspy_infra.docker import busybox_image

COMPOSE = """
services:
  web:
    image: local/busybox:latest
    command: sh -c "mkdir /www && echo hello from web > /www/index.html && httpd -f -p 80 -h /www"
    ports: ["80"]
    healthcheck:
      test: ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:80/"]
  client:
    image: local/busybox:latest
    command: sh -c "wget -q -O - http://web:80/ && exec sleep 1000"
    depends_on:
      web: {condition: service_healthy}
"""

CONFIG = r"""
[infra]
project = "docker-example"
compose = "docker-compose.yml"   # brings backend = "docker" with it

[classes.boxed]
runner = "docker"
max_concurrency = 4
timeout = 30

[handlers.wordcount]   # writes its result file ({{ }} are literal braces)
image = "local/busybox:latest"
command = [
    'sh', '-c', 'printf "{{\"words\": %d}}" $(wc -w < "$0") > "$1"',
    '{payload_file}', '{result_file}',
]

[handlers.shout]       # prints its result as the last line of stdout
image = "local/busybox:latest"
command = ["sh", "-c", "echo '\"HELLO\"'"]
"""


async def leftovers() -> list[str]:
    async with aiodocker.Docker() as docker:
        found = await docker.containers.list(
            all=True, filters=json.dumps({"label": ["dspy-infra.project=docker-example"]})
        )
    return [c.id for c in found]


async def main() -> None:
    await busybox_image()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "docker-compose.yml").write_text(COMPOSE)
        (root / "dspy-infra.toml").write_text(CONFIG)
        async with AgentInfra.start(root / "dspy-infra.toml") as infra:
            for name, status in (await infra.services.status()).items():
                print(f"{name:8} {status.state.value:9} ports {dict(status.ports)}")
            async with aclosing(infra.services.logs("client", follow=True)) as lines:
                print(f"client read: {await anext(lines)!r}")
            count = await infra.submit_task("wordcount", "one two three", task_class="boxed")
            shout = await infra.submit_task("shout", None, task_class="boxed")
            print(f"wordcount = {(await count.result())['words']}")
            print(f"shout = {await shout.result()}")
    left = await leftovers()
    print(f"teardown clean: {len(left)} containers left")


if __name__ == "__main__":
    anyio.run(main)
