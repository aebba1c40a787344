"""Test helpers for dspy-infra and for people who implement its protocols.

:mod:`dspy_infra.testing.backend_conformance` is the behavioural suite that
every :class:`~dspy_infra.abc.ContainerBackend` passes. These modules import
pytest: use them from tests only.
"""
