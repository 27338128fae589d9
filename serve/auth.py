"""An optional bearer token on every RPC (``authorization: Bearer <token>``); health checks are exempt."""

from __future__ import annotations

import hmac
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2

from .bridge import access_log, metadata_dict

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name  # grpc.health.v1.Health


def _deny_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts with `code`."""

    async def deny(_request, context):
        await context.abort(code, message)

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kw)
    return grpc.unary_unary_rpc_method_handler(deny, **kw)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` metadata; health checks are exempt."""

    def __init__(self, token: str, exempt_prefixes: tuple[str, ...] = (f"/{HEALTH_SERVICE}/",),
                 on_reject: Callable[[], None] | None = None):
        if not token:
            raise ValueError("--auth-token: must not be empty")
        self._token = token.encode("utf-8")
        self._exempt = exempt_prefixes
        self._on_reject = on_reject

    def _authorized(self, metadata) -> bool:
        for item in metadata or ():
            if item[0].lower() == "authorization":
                value = item[1].decode("utf-8", "replace") if isinstance(item[1], bytes) else item[1]
                scheme, _, credential = value.strip().partition(" ")
                if scheme.lower() == "bearer" and hmac.compare_digest(credential.strip().encode("utf-8"), self._token):
                    return True
        return False

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(self._exempt) or self._authorized(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if self._on_reject:
            self._on_reject()
        access_log.info("request_rejected", extra={"fields": {
            "event": "request_rejected", "rpc": method.strip("/"), "status": "UNAUTHENTICATED",
            "correlation_id": metadata_dict(handler_call_details.invocation_metadata).get("x-correlation-id", "")}})
        return _deny_handler(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token "
                             "(send metadata 'authorization: Bearer <token>')")
