"""The editing service: an HTTP API over one edit store (``lemoe serve STORE``)."""

from lemoe.service.errors import ApiError
from lemoe.service.replicas import ServingReplicas
from lemoe.service.server import EditService, ServiceConfig, wait_until_idle

__all__ = ["ApiError", "EditService", "ServiceConfig", "ServingReplicas", "wait_until_idle"]
