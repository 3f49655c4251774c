"""fedyolo's data layer: synthetic fleet data, dataset loading, checks and client shards.

One package for the server (prepare, held-out set), the client (its ``data.yaml``, drift
statistics, fault injection), the CLI and the benchmarks: ``read_data_yaml`` is the one
reader of a ``data.yaml`` and ``fl_client.data.labels.parse_line`` the one parser of a
YOLO label line.

The flow is ``load_dataset`` (or ``generate`` then ``load_dataset``) -> ``check_dataset``
-> ``partition`` -> ``write_partition``; every user-fixable problem raises ``DataError``.
"""

from fl_client.data.check import ISSUE_KINDS, CheckReport, Issue, check_dataset, check_image
from fl_client.data.errors import DataError
from fl_client.data.formats import (
    Dataset,
    DataYaml,
    Sample,
    label_path_for,
    load_dataset,
    read_data_yaml,
)
from fl_client.data.labels import LabelLine, LabelLineError, parse_line
from fl_client.data.partition import METHODS, ClientShard, Partition, partition, write_partition
from fl_client.data.synth import CLASS_MIXES, CLASSES, DOMAINS, generate

__all__ = [
    "CLASSES",
    "CLASS_MIXES",
    "DOMAINS",
    "ISSUE_KINDS",
    "METHODS",
    "CheckReport",
    "ClientShard",
    "DataError",
    "DataYaml",
    "Dataset",
    "Issue",
    "LabelLine",
    "LabelLineError",
    "Partition",
    "Sample",
    "check_dataset",
    "check_image",
    "generate",
    "label_path_for",
    "load_dataset",
    "parse_line",
    "partition",
    "read_data_yaml",
    "write_partition",
]
