"""HTTP handlers, one module per area; routes live in ``era_server.routes``."""
