"""fedyolo's data layer: synthetic fleet data, dataset loading, checks and client shards.

The flow is ``load_dataset`` (or ``generate`` then ``load_dataset``) -> ``check_dataset``
-> ``partition`` -> ``write_partition``; every user-fixable problem raises ``DataError``.
"""

from fl_client.data.check import ISSUE_KINDS, CheckReport, Issue, check_dataset, check_image
from fl_client.data.errors import DataError
from fl_client.data.formats import Dataset, Sample, label_path_for, load_dataset
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
    "Dataset",
    "Issue",
    "Partition",
    "Sample",
    "check_dataset",
    "check_image",
    "generate",
    "label_path_for",
    "load_dataset",
    "partition",
    "write_partition",
]
