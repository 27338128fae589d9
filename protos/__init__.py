"""gRPC contracts: fmaas.GenerationService (generation.proto) and granite.v1.ChatService
(granite_chat.proto), with committed stubs (regenerate: python -m granite_deploy.protos.generate)."""
