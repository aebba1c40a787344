"""Docker support shared by the docker backend and the docker runner."""

from dspy_infra.docker.images import build_image, busybox_image

__all__ = ["build_image", "busybox_image"]
