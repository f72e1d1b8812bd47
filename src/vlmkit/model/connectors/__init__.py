"""Connector families, one module each; each registers itself in `vlmkit.registry.CONNECTORS`
(found by the registries' discovery, `vlmkit.registry.load_plugins`)."""

from vlmkit.model.connectors.base import Connector, build_connector  # noqa: F401
