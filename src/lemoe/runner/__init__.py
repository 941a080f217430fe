"""Protocols and the lifelong runner."""

from lemoe.runner.checkpoint import CheckpointMismatch, RunCheckpoint
from lemoe.runner.protocol import Protocol
from lemoe.runner.runner import (
    RESULTS_FORMAT_VERSION,
    ResultsFormatError,
    format_table,
    read_results,
    run_protocol,
    write_results,
)

__all__ = [
    "RESULTS_FORMAT_VERSION",
    "CheckpointMismatch",
    "Protocol",
    "ResultsFormatError",
    "RunCheckpoint",
    "format_table",
    "read_results",
    "run_protocol",
    "write_results",
]
