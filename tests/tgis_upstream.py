"""Clients compiled at test time from the vendored upstream protos (protos/upstream/), not the
project's stubs.

``compile_upstream(name, tmp)`` runs grpcio-tools' protoc on
``protos/upstream/<name>/generation.proto`` into ``tmp`` (a FileDescriptorSet) and builds its
message classes in a private descriptor pool, so they never meet the project's
``generation_pb2`` (same file name and package) in protobuf's default pool. ``UpstreamClient``
calls the four fmaas RPCs by their wire paths with those classes' serializers: on the wire it
is exactly a client generated from IBM's (or vllm-tgis-adapter's) file.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

UPSTREAM = Path(__file__).resolve().parent.parent / "protos" / "upstream"
NAMES = ("ibm_tgis", "vllm_tgis_adapter")


def descriptor_set(name: str, tmp: Path) -> descriptor_pb2.FileDescriptorSet:
    """protoc's FileDescriptorSet of protos/upstream/<name>/generation.proto (compiled into tmp)."""
    from grpc_tools import protoc

    out = Path(tmp) / f"{name}.pb"
    src = UPSTREAM / name
    rc = protoc.main(["grpc_tools.protoc", f"-I{src}", f"-I{resources.files('grpc_tools') / '_proto'}",
                      f"--descriptor_set_out={out}", str(src / "generation.proto")])
    assert rc == 0, f"protoc failed on {src / 'generation.proto'}"
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


class Upstream:
    """Message classes of one upstream proto: ``up.GenerationRequest(...)``, ``up.pool``, ``up.file``."""

    def __init__(self, name: str, tmp: Path):
        self.name = name
        self.file_proto = descriptor_set(name, tmp).file[0]
        self.pool = descriptor_pool.DescriptorPool()
        self.file = self.pool.Add(self.file_proto) and self.pool.FindFileByName(self.file_proto.name)
        self._classes: dict[str, type] = {}

    def message(self, full_name: str) -> type:
        if full_name not in self._classes:
            self._classes[full_name] = message_factory.GetMessageClass(self.pool.FindMessageTypeByName(full_name))
        return self._classes[full_name]

    def __getattr__(self, short: str):
        if short.startswith("_"):
            raise AttributeError(short)
        try:
            return self.message(f"fmaas.{short}")
        except KeyError:
            pass
        for enum in self.file.enum_types_by_name.values():  # top-level enum values (SAMPLE, EOS_TOKEN, ...)
            if short in enum.values_by_name:
                return enum.values_by_name[short].number
        raise AttributeError(short)


class UpstreamClient:
    """The fmaas.GenerationService RPCs, serialized with an upstream proto's classes."""

    def __init__(self, up: Upstream, channel: grpc.Channel):
        self.up = up
        service = up.file.services_by_name["GenerationService"]
        for method in service.methods:
            req = up.message(method.input_type.full_name)
            resp = up.message(method.output_type.full_name)
            kind = channel.unary_stream if method.server_streaming else channel.unary_unary
            call = kind(f"/{service.full_name}/{method.name}", request_serializer=req.SerializeToString,
                        response_deserializer=resp.FromString)
            setattr(self, method.name, call)
