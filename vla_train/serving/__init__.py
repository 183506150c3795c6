"""Serving a trained policy: the server (server.py), its client (client.py), the wire format (wire.py) and
the safety layer (safety.py)."""

from vla_train.serving.client import PolicyClient, PolicyServerError

__all__ = ["PolicyClient", "PolicyServerError"]
