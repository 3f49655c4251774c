"""What a client reads of its data: its shard's ``data.yaml``, YOLO label lines, data errors.

``read_data_yaml`` is the one reader of a ``data.yaml`` (the server's dataset loader uses it
too) and ``fl_client.data.labels.parse_line`` the one parser of a YOLO label line. Preparing a
dataset (the synthetic fleet, checks, partitioning into shards) is the server's job:
``fl_server.data``.
"""

from fl_client.data.errors import DataError, Issue
from fl_client.data.formats import DataYaml, label_path_for, read_data_yaml
from fl_client.data.labels import LabelLine, LabelLineError, parse_line

__all__ = [
    "DataError",
    "DataYaml",
    "Issue",
    "LabelLine",
    "LabelLineError",
    "label_path_for",
    "parse_line",
    "read_data_yaml",
]
