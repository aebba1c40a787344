"""Services: the dependency graph, probes, restart policy and log buffers.

Kept free of imports so that :mod:`dspy_infra.config` can use
:class:`~dspy_infra.services.status.ServiceStatus` without a cycle.
"""
