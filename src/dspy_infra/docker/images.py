"""Building images locally, for machines that cannot pull from a registry.

Air-gapped clusters and CI machines often have no registry at hand;
:func:`build_image` builds from a directory (a ``docker build`` without the
CLI) and :func:`busybox_image` makes a tiny image from the host's static
busybox, enough for tests, examples and benchmarks.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import aiodocker
import anyio.to_thread

__all__ = ["build_image", "busybox_image"]

_BUSYBOX_DOCKERFILE = b'FROM scratch\nCOPY rootfs/ /\nCMD ["sh"]\n'


async def build_image(context: Path | str, tag: str, *, dockerfile: str = "Dockerfile") -> str:
    """Build ``context`` (a directory with a Dockerfile) as ``tag``; return the image id."""
    archive = await anyio.to_thread.run_sync(_tar_directory, Path(context))
    return await _build(archive, tag, dockerfile)


async def busybox_image(tag: str = "local/busybox:latest", *, busybox: str | None = None) -> str:
    """An image with the host's static busybox and all its applets; built once, then reused.

    ``busybox`` is the binary to use (default: ``busybox`` on PATH, which
    must be statically linked: Debian's ``busybox-static``).
    """
    async with aiodocker.Docker() as docker:
        try:
            image = await docker.images.inspect(tag)
            return str(image["Id"])
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise
    archive = await anyio.to_thread.run_sync(_busybox_context, busybox)
    return await _build(archive, tag, "Dockerfile")


async def _build(archive: bytes, tag: str, dockerfile: str) -> str:
    async with aiodocker.Docker() as docker:
        await docker.images.build(
            fileobj=io.BytesIO(archive),
            encoding="identity",
            tag=tag,
            rm=True,
            path_dockerfile=dockerfile,
        )
        image = await docker.images.inspect(tag)
    return str(image["Id"])


def _tar_directory(context: Path) -> bytes:
    if not context.is_dir():
        raise FileNotFoundError(f"build context {str(context)!r} is not a directory")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(context, arcname=".")
    return buffer.getvalue()


def _busybox_context(busybox: str | None) -> bytes:
    binary = busybox or shutil.which("busybox")
    if binary is None:
        raise FileNotFoundError("no busybox binary: install busybox-static")
    applets = subprocess.run(
        [binary, "--list"], check=True, capture_output=True, text=True
    ).stdout.split()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        _add_bytes(tar, "Dockerfile", _BUSYBOX_DOCKERFILE)
        for directory in ("rootfs", "rootfs/bin", "rootfs/tmp"):
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if directory.endswith("tmp") else 0o755
            tar.addfile(info)
        tar.add(binary, arcname="rootfs/bin/busybox")
        for applet in applets:
            if applet != "busybox":
                info = tarfile.TarInfo(f"rootfs/bin/{applet}")
                info.type = tarfile.SYMTYPE
                info.linkname = "busybox"
                tar.addfile(info)
    return buffer.getvalue()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
