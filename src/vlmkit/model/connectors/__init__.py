"""Connector families; importing this package registers them all."""

from vlmkit.model.connectors import mlp  # noqa: F401
from vlmkit.model.connectors.base import Connector, build_connector  # noqa: F401
