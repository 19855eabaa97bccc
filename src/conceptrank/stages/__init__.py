"""The pipeline stages, each a pure function plus a ``run_*`` layer that reads and writes files."""
