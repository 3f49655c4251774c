"""Flower internals fedyolo relies on, in one place (the server's and the warm worker's).

Flower's public API has no way to size a message as it goes over the wire, nor to turn a
``RecordDict`` into bytes and back, so ``wire_bytes`` (the server's traffic figures) and
``recorddict_to_bytes`` / ``recorddict_from_bytes`` (the warm worker's frames,
``fl_client.worker``) use Flower's serializer module (``flwr.common.serde``, not part of the
``flwr.app`` API) and its protobuf classes (``flwr.proto``). Here, in ``fl_client``, because the
client's worker needs them and ``fl_client`` imports nothing of the server;
``fl_server.flower_adapter`` re-exports them. ``tests/fl_server/test_library_adapters.py`` checks
the assumptions (the functions exist; the sum of parts equals the serialized size; a record
survives the round trip), so an upgrade that breaks them fails loudly.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Message, RecordDict
from flwr.common.serde import (
    message_to_proto,
    metadata_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict


def varint_size(n: int) -> int:
    """Bytes of protobuf's base-128 varint encoding of ``n`` >= 0."""
    return max(1, (n.bit_length() + 6) // 7)


def wire_bytes(msg: Message, content_sizes: dict[int, int] | None = None) -> int:
    """Bytes of a message as Flower serializes it for the wire (protobuf, before gRPC framing).

    ``content_sizes`` caches the serialized size of a content object by ``id``: a strategy sends
    one shared content to every node, and serializing yolov8n's 12 MB record costs ~0.1 s
    (measured), so it is sized once per round instead of once per node. The total is exact:
    protobuf's size of a message field is tag (1 byte) + varint length + the field's size.
    """
    if content_sizes is None or msg.has_error():
        return message_to_proto(msg).ByteSize()
    key = id(msg.content)
    if key not in content_sizes:
        content_sizes[key] = recorddict_to_proto(msg.content).ByteSize()
    size = content_sizes[key]
    head = ProtoMessage(metadata=metadata_to_proto(msg.metadata)).ByteSize()
    return head + 1 + varint_size(size) + size


def recorddict_to_bytes(rd: RecordDict) -> bytes:
    """``rd`` as Flower's protobuf ``RecordDict`` message, serialized."""
    return recorddict_to_proto(rd).SerializeToString()


def recorddict_from_bytes(data: bytes) -> RecordDict:
    """The ``RecordDict`` of :func:`recorddict_to_bytes`; protobuf's or Flower's decoding raises
    on bytes that are not one (the caller names them)."""
    return recorddict_from_proto(ProtoRecordDict.FromString(data))


def deactivate_node(
    superlink: str, root_certificates: str | None, private_key: Path, node_id: int
) -> None:
    """Sign off node ``node_id``'s session on the SuperLink, as a SuperNode does on SIGTERM:
    Flower's ``DeactivateNode`` through its own Fleet HTTP client, signed with the node's key by
    its node-auth interceptor (the SuperLink accepts it only for the key's own node). For
    ``deploy.supernode``: the session a crashed SuperNode left. PRIVATE: ``flwr.proto``,
    ``flwr.supercore`` and ``flwr.supernode``'s Fleet client (Flower 1.41)."""
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest  # pylint: disable=E0611
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    key = load_ssh_private_key(private_key.read_bytes(), None)
    interceptors = [
        RuntimeVersionHttpInterceptor(component_name="SuperNode"),
        NodeAuthHttpInterceptor(key, key.public_key()),
    ]
    with FleetHttpClient.from_server_address(
        superlink, False, root_certificates, interceptors=interceptors
    ) as client:
        client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
