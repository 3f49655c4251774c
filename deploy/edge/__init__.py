"""The edge pipeline: from a run's ``best.pt`` to a gated bundle a robot can load.

* ``deploy.edge.inputs``: the images a detector sees at the edge (letterboxed, RGB, 0..1);
* ``deploy.edge.quantize``: INT8 with ONNX Runtime: calibration readers, per-client activation
  ranges merged on the server (federated calibration), signed or unsigned activations;
* ``deploy.edge.export``: ``fedyolo export``: Ultralytics' exporter, the bundle's
  ``model.json``, and the parity and accuracy gates;
* ``deploy.edge.bench``: ``fedyolo bench``: latency, throughput, memory, size and held-out mAP.

Nothing heavy is imported here.
"""

from deploy import DeployError


class EdgeError(DeployError):
    """An export, a gate or a benchmark that cannot run; the message names the file and why."""
