"""Protocols and the lifelong runner."""

from lemoe.runner.checkpoint import CheckpointMismatch, RunCheckpoint
from lemoe.runner.protocol import Protocol
from lemoe.runner.runner import format_table, run_protocol, write_results

__all__ = ["CheckpointMismatch", "Protocol", "RunCheckpoint", "format_table", "run_protocol", "write_results"]
