"""Command-line entry points (``segfast ...`` / ``python -m segfast ...``)."""
