"""The Flower ServerApp of fedyolo, run preparation and the ``fedyolo`` command line."""
