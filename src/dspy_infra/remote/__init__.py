"""gRPC access to an :class:`~dspy_infra.AgentInfra`: the server and the remote client.

Needs the ``grpc`` extra (grpclib, betterproto2 and protobuf), imported here at the
top: importing this package without it fails at once, naming what is missing.
The protocol is in ``proto/``; ``_generated`` is written by
``scripts/generate_proto.py`` and never edited by hand.
"""

from dspy_infra.remote.client import (
    RemoteAgentInfra,
    RemoteServices,
    RemoteWorkflows,
    ServerUnavailable,
    UnsupportedCall,
)
from dspy_infra.remote.server import DEFAULT_ADDRESS, RemoteServer, serve

__all__ = [
    "DEFAULT_ADDRESS",
    "RemoteAgentInfra",
    "RemoteServer",
    "RemoteServices",
    "RemoteWorkflows",
    "ServerUnavailable",
    "UnsupportedCall",
    "serve",
]
