"""Flower internals fedyolo relies on: they live in ``fl_client.flower_adapter`` (the warm
worker needs them and the client imports nothing of the server); re-exported for the server."""

from fl_client.flower_adapter import (
    recorddict_from_bytes,
    recorddict_to_bytes,
    varint_size,
    wire_bytes,
)

__all__ = ["recorddict_from_bytes", "recorddict_to_bytes", "varint_size", "wire_bytes"]
