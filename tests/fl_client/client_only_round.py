"""One real ClientApp train round in a process that is only a client (run by
``test_client_only.py``): reads a serialized Flower train message, runs fedyolo's ClientApp on
it, and prints which server-role packages ended up imported."""

from __future__ import annotations

import json
import sys
from pathlib import Path

SERVER_ONLY = ("ray", "optuna", "clearml", "boto3", "botocore", "docker", "onnx", "onnxruntime")


def main(message_file: str, partition_id: int) -> int:
    from flwr.app import Context, RecordDict
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    from fl_client.client_app import app

    proto = ProtoMessage()
    proto.ParseFromString(Path(message_file).read_bytes())
    msg = message_from_proto(proto)
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": partition_id},
        state=RecordDict(),
        run_config={},
    )
    reply = app(msg, ctx)
    out = {
        "error": reply.error.reason if reply.has_error() else None,
        "metrics": dict(next(iter(reply.content.metric_records.values()), {}))
        if not reply.has_error()
        else {},
        "server_only_imported": sorted({m.split(".")[0] for m in sys.modules} & set(SERVER_ONLY)),
    }
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
