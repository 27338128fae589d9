"""protos/generation.proto against the two vendored upstream contracts, at the descriptor level.

- vllm-tgis-adapter's proto: identical descriptors (every message, field number, type, label,
  explicit presence, oneof, enum value, service and method), comments aside.
- IBM's proto (TGIS): every message, field, enum value and method IBM defines is ours with
  IBM's number and type; what we add is exactly the adapter's extension, and the one presence
  difference is the adapter's `optional` temperature (same wire type and tag).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from granite_deploy.protos import generation_pb2

from tgis_upstream import UPSTREAM, descriptor_set

PROTO = Path(__file__).resolve().parents[2] / "protos" / "generation.proto"

# What vllm-tgis-adapter adds to IBM's contract (and we therefore serve on top of IBM's).
ADAPTER_ADDED_FIELDS = {
    ("fmaas.BatchedGenerationRequest", "adapter_id"),
    ("fmaas.SingleGenerationRequest", "adapter_id"),
    ("fmaas.BatchedTokenizeRequest", "prefix_id"),
    ("fmaas.BatchedTokenizeRequest", "adapter_id"),
    ("fmaas.DecodingParameters", "format"),
    ("fmaas.DecodingParameters", "json_schema"),
    ("fmaas.DecodingParameters", "regex"),
    ("fmaas.DecodingParameters", "choice"),
    ("fmaas.DecodingParameters", "grammar"),
    ("fmaas.DecodingParameters.StringChoices", "choices"),
}
ADAPTER_ADDED_TYPES = {"fmaas.DecodingParameters.StringChoices", "fmaas.DecodingParameters.ResponseFormat"}
# fields whose presence (proto3 `optional`) the adapter changed; the wire tag and type are IBM's
ADAPTER_PRESENCE = {("fmaas.SamplingParameters", "temperature")}


def _ours(tmp_path) -> descriptor_pb2.FileDescriptorProto:
    from grpc_tools import protoc

    out = tmp_path / "ours.pb"
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO.parent}", f"-I{resources.files('grpc_tools') / '_proto'}",
                      f"--descriptor_set_out={out}", str(PROTO)])
    assert rc == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]


def _flatten(file: descriptor_pb2.FileDescriptorProto):
    """{message full name: DescriptorProto}, {enum full name: {value: number}}."""
    messages, enums = {}, {}

    def walk(prefix, msgs, enum_list):
        for e in enum_list:
            enums[f"{prefix}.{e.name}"] = {v.name: v.number for v in e.value}
        for m in msgs:
            name = f"{prefix}.{m.name}"
            messages[name] = m
            walk(name, m.nested_type, m.enum_type)

    walk(file.package, file.message_type, file.enum_type)
    return messages, enums


def _field(msg: descriptor_pb2.DescriptorProto, f: descriptor_pb2.FieldDescriptorProto):
    oneof = msg.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") and not f.proto3_optional else ""
    return {"number": f.number, "type": f.type, "type_name": f.type_name, "label": f.label,
            "optional": f.proto3_optional, "oneof": oneof}


@pytest.fixture(scope="module")
def protos(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("upstream-protos")
    return {"ours": _ours(tmp), **{n: descriptor_set(n, tmp).file[0] for n in ("ibm_tgis", "vllm_tgis_adapter")}}


def test_vendored_files_are_the_recorded_upstream_copies():
    import hashlib

    readme = (UPSTREAM / "README.md").read_text()
    for name in ("ibm_tgis", "vllm_tgis_adapter"):
        digest = hashlib.sha256((UPSTREAM / name / "generation.proto").read_bytes()).hexdigest()
        assert f"`{name}/generation.proto`: `{digest}`" in readme, name
        assert "Apache License" in (UPSTREAM / name / "LICENSE").read_text()


def test_identical_to_vllm_tgis_adapter(protos):
    ours, theirs = protos["ours"], protos["vllm_tgis_adapter"]
    for f in (ours, theirs):
        f.ClearField("source_code_info")
    assert ours.package == theirs.package == "fmaas" and ours.syntax == theirs.syntax == "proto3"
    # field order, names, numbers, types, labels, presence, oneofs, enums, services: all equal
    assert ours == theirs


def test_committed_stubs_describe_the_same_file(protos):
    runtime = descriptor_pb2.FileDescriptorProto()
    generation_pb2.DESCRIPTOR.CopyToProto(runtime)
    compiled = descriptor_pb2.FileDescriptorProto()
    compiled.CopyFrom(protos["ours"])
    compiled.ClearField("source_code_info")
    for msgs in (compiled.message_type,):
        stack = list(msgs)
        while stack:
            m = stack.pop()
            for f in m.field:
                f.ClearField("json_name")  # CopyToProto leaves the default json names out
            stack.extend(m.nested_type)
    assert runtime == compiled


def test_ibm_fields_have_ibm_numbers_and_types(protos):
    ours_msgs, ours_enums = _flatten(protos["ours"])
    ibm_msgs, ibm_enums = _flatten(protos["ibm_tgis"])
    assert set(ibm_msgs) <= set(ours_msgs) and set(ibm_enums) <= set(ours_enums)
    assert set(ours_msgs) | set(ours_enums) == set(ibm_msgs) | set(ibm_enums) | ADAPTER_ADDED_TYPES
    checked, added = 0, set()
    for name, ours in ours_msgs.items():
        ibm = ibm_msgs.get(name)
        ibm_fields = {f.name: _field(ibm, f) for f in ibm.field} if ibm else {}
        ours_fields = {f.name: _field(ours, f) for f in ours.field}
        assert set(ibm_fields) <= set(ours_fields), name
        for field, spec in ours_fields.items():
            if field not in ibm_fields:
                added.add((name, field))
                continue
            expected = dict(ibm_fields[field])
            if (name, field) in ADAPTER_PRESENCE:
                assert expected["optional"] is False and spec["optional"] is True
                expected["optional"] = True
            assert spec == expected, (name, field)
            checked += 1
    assert added == ADAPTER_ADDED_FIELDS
    assert checked >= 60
    for name, values in ibm_enums.items():
        assert ours_enums[name] == values, name
    # the number IBM clients rely on most, pinned explicitly (tests/protos/test_protos.py once had it wrong)
    stopping = {f.name: f for f in ours_msgs["fmaas.StoppingCriteria"].field}
    assert stopping["time_limit_millis"].type == descriptor_pb2.FieldDescriptorProto.TYPE_UINT32


def test_same_service_and_methods_as_both(protos):
    def methods(file):
        (service,) = file.service
        return service.name, [(m.name, m.input_type, m.output_type, m.client_streaming, m.server_streaming)
                              for m in service.method]

    assert methods(protos["ours"]) == methods(protos["ibm_tgis"]) == methods(protos["vllm_tgis_adapter"])
