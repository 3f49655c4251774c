"""The server's data preparation: the synthetic fleet, dataset loading, checks and client shards.

Only the server side prepares data (``fedyolo run`` before the first round, ``fedyolo data
check``, the benchmarks); a client reads the shard it was given (``fl_client.data``).

The flow is ``load_dataset`` (or ``generate`` then ``load_dataset``) -> ``check_dataset``
-> ``partition`` -> ``write_partition``; every user-fixable problem raises ``DataError``.
"""

from fl_client.data.errors import DataError
from fl_server.data.check import ISSUE_KINDS, CheckReport, Issue, check_dataset, check_image
from fl_server.data.layout import load_dataset
from fl_server.data.partition import METHODS, ClientShard, Partition, partition, write_partition
from fl_server.data.samples import Dataset, Sample
from fl_server.data.synth import CLASS_MIXES, CLASSES, DOMAINS, generate

__all__ = [
    "CLASSES",
    "CLASS_MIXES",
    "DOMAINS",
    "ISSUE_KINDS",
    "METHODS",
    "CheckReport",
    "ClientShard",
    "DataError",
    "Dataset",
    "Issue",
    "Partition",
    "Sample",
    "check_dataset",
    "check_image",
    "generate",
    "load_dataset",
    "partition",
    "write_partition",
]
