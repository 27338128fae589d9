"""granite-deploy: Granite 4.0 checkpoints in, verified engine artifacts out, tokens streamed over gRPC."""

__version__ = "0.1.0"
