"""The multi-replica client: target parsing (default port 8033), round-robin over replicas,
client-side health checking, UNAVAILABLE retried before any output, streams that already
produced output never retried, message validation before sending, the `health` command."""

from __future__ import annotations

import json
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from granite_deploy.cli import main as cli_main
from granite_deploy.errors import InvalidField
from granite_deploy.serve.client import (DEFAULT_PORT, GraniteClient, StreamInterrupted, build_chat_request,
                                         channel_target, normalize_target, service_config)
from granite_deploy.serve.server import ServerConfig, ServerThread


# ============================================================================ targets

@pytest.mark.parametrize("given, want", [
    ("localhost", "localhost:8033"),
    ("localhost:9000", "localhost:9000"),
    ("10.0.0.7", "10.0.0.7:8033"),
    ("[::1]", "[::1]:8033"),
    ("::1", "[::1]:8033"),
    ("[fd00::5]:7", "[fd00::5]:7"),
    ("dns:///granite-deploy-headless", "dns:///granite-deploy-headless:8033"),
    ("dns:///granite-deploy-headless.ns.svc.cluster.local:8033", "dns:///granite-deploy-headless.ns.svc.cluster.local:8033"),
    ("dns://10.96.0.10/granite", "dns://10.96.0.10/granite:8033"),
    ("ipv4:10.0.0.1,10.0.0.2:9", "ipv4:10.0.0.1:8033,10.0.0.2:9"),
    ("unix:/run/granite.sock", "unix:/run/granite.sock"),
])
def test_normalize_target_default_port_is_the_servers(given, want):
    assert DEFAULT_PORT == 8033
    assert normalize_target(given) == want


@pytest.mark.parametrize("bad, says", [
    ("localhost:99999", "1..65535"),
    ("localhost:0", "1..65535"),
    ("host:http", "1..65535"),
    ("", "empty"),
    ("a b:1", "HOST[:PORT]"),
    ("[::1", "unclosed"),
    ("1:2:3:zz", "IPv6"),
])
def test_bad_targets_name_the_option(bad, says):
    with pytest.raises(InvalidField) as exc:
        normalize_target(bad)
    assert exc.value.field == "--target" and says in str(exc.value)


def test_several_targets_become_one_address_list():
    assert channel_target(["127.0.0.1:1", "127.0.0.2"]) == ("ipv4:127.0.0.1:1,127.0.0.2:8033", "127.0.0.1:1")
    assert channel_target(["[::1]:5", "::1"]) == ("ipv6:[::1]:5,[::1]:8033", "[::1]:5")
    uri, authority = channel_target(["localhost:7001", "127.0.0.1:7002"])  # host names resolved once
    assert uri.startswith(("ipv4:", "ipv6:")) and uri.endswith(":7002") and authority == "localhost:7001"
    with pytest.raises(InvalidField, match="cannot be combined"):
        channel_target(["dns:///x", "127.0.0.1"])
    with pytest.raises(InvalidField, match="one family"):
        channel_target(["127.0.0.1", "[::1]"])
    with pytest.raises(InvalidField, match="at least one"):
        channel_target([])


def test_service_config_round_robin_health_and_retry_policy():
    cfg = service_config()
    assert cfg["loadBalancingConfig"] == [{"round_robin": {}}]
    assert cfg["healthCheckConfig"] == {"serviceName": ""}
    (method,) = cfg["methodConfig"]
    assert {n["service"] for n in method["name"]} == {"fmaas.GenerationService", "granite.v1.ChatService"}
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert 2 <= method["retryPolicy"]["maxAttempts"] <= 5  # gRPC caps attempts at 5
    assert "methodConfig" not in service_config(retry=False)
    assert "healthCheckConfig" not in service_config(health_check=False)


# ============================================================================ message validation

@pytest.mark.parametrize("messages, field", [
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
    ([{"content": "hi"}], "messages[0].role"),
    ([{"role": "user", "content": 3}], "messages[0].content"),
    ([], "messages"),
])
def test_client_validates_messages_like_the_server(messages, field):
    with pytest.raises(InvalidField) as exc:
        build_chat_request(messages)
    assert exc.value.field == field


def test_client_validates_tools():
    with pytest.raises(InvalidField, match=r"tools\[0\]"):
        build_chat_request([{"role": "user", "content": "hi"}], tools=[{"type": "function", "function": {}}])
    # an assistant turn that only calls a tool needs no content
    req = build_chat_request([{"role": "user", "content": "hi"},
                              {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}])
    assert req.conversation.messages[1].tool_calls[0].name == "f"


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def test_client_cli_bad_input_exits_2_naming_the_field(tmp_path, capsys):
    no_content = _write(tmp_path / "a.json", [{"role": "user"}])
    wizard = _write(tmp_path / "b.json", [{"role": "wizard", "content": "x"}])
    cases = [
        (["client", "--target", "127.0.0.1:1", "--chat", no_content], "messages[0].content: is missing"),
        (["client", "--target", "127.0.0.1:1", "--chat", wizard], "messages[0].role: must be one of"),
        (["client", "--target", "localhost:99999", "--prompt", "hi"], "--target: port must be a number"),
        (["client", "--target", "dns:///a", "--target", "b", "--prompt", "hi"], "--target:"),
    ]
    for argv, says in cases:
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, (argv, err)


# ============================================================================ against servers

@pytest.fixture(scope="module")
def deploy_tiny_artifact(tiny_checkpoint, tmp_path_factory):
    from granite_deploy.export.exporter import export

    return export(str(tiny_checkpoint), tmp_path_factory.mktemp("deploy-client") / "tiny", validate=False)


@pytest.fixture(scope="module")
def replicas(deploy_tiny_artifact):
    servers = [ServerThread(ServerConfig(str(deploy_tiny_artifact), host="127.0.0.1", port=0, threads=1))
               for _ in range(2)]
    for st in servers:
        st.wait_ready()
    yield servers
    for st in servers:
        st.stop()


def _finished(st) -> float:
    return sum(st.server.metrics.value("requests_finished_total", stop_reason=r) for r in ("MAX_TOKENS", "EOS_TOKEN"))


def _set_health(st, status) -> None:
    st.call(st.server.health.set("", status))


def test_round_robin_over_replicas_and_health_checking(replicas):
    a, b = replicas
    with GraniteClient([a.target, b.target], timeout=30) as client:
        client.wait_ready(10)
        before = [_finished(a), _finished(b)]
        for _ in range(12):
            assert client.generate("Hello", max_new_tokens=3, min_new_tokens=3).generated_token_count == 3
        got = [_finished(a) - before[0], _finished(b) - before[1]]
        assert sum(got) == 12 and min(got) >= 4, got  # both replicas took calls (not all on one)

        _set_health(b, health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            time.sleep(0.5)  # the channel watches grpc.health.v1 and stops picking b
            before = [_finished(a), _finished(b)]
            for _ in range(6):
                client.generate("Hello", max_new_tokens=2, min_new_tokens=2)
            assert [_finished(a) - before[0], _finished(b) - before[1]] == [6, 0]
        finally:
            _set_health(b, health_pb2.HealthCheckResponse.SERVING)


def test_unavailable_before_output_is_retried_on_another_replica(deploy_tiny_artifact, replicas):
    """A replica that refuses with UNAVAILABLE (draining) before any output: gRPC's retry policy
    sends the call to the other one; without the policy some of the calls fail."""
    a = replicas[0]
    refuser = ServerThread(ServerConfig(str(deploy_tiny_artifact), host="127.0.0.1", port=0, threads=1)).wait_ready()
    refuser.server.scheduler.stop_accepting()  # answers UNAVAILABLE "shutting down" to new generations
    try:
        with GraniteClient([a.target, refuser.target], timeout=30, health_check=False) as client:
            for _ in range(6):
                assert client.generate("Hello", max_new_tokens=2, min_new_tokens=2).generated_token_count == 2
                msgs = list(client.generate_stream("Hello", max_new_tokens=2, min_new_tokens=2))
                assert msgs[-1].generated_token_count == 2
        refused = sum(smp.value for m in refuser.server.metrics.registry.collect() if m.name == "rejections"
                      for smp in m.samples if smp.name == "rejections_total")
        assert refused >= 1  # round_robin did send calls to it: they were retried on a
        with GraniteClient([a.target, refuser.target], timeout=30, health_check=False, retry=False) as client:
            codes = []
            for _ in range(6):
                try:
                    client.generate("Hello", max_new_tokens=2)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
            assert codes and set(codes) == {grpc.StatusCode.UNAVAILABLE}
    finally:
        refuser.stop()


def test_stream_that_produced_output_is_not_retried(deploy_tiny_artifact, replicas):
    """One replica dies mid-stream: the stream fails with StreamInterrupted (the status and how
    many messages had arrived), and no copy of it is started on the other replica."""
    a = replicas[0]
    victim = ServerThread(ServerConfig(str(deploy_tiny_artifact), host="127.0.0.1", port=0, threads=1)).wait_ready()
    try:
        with GraniteClient([victim.target], timeout=30) as client:
            stream = client.generate_stream("Hello", max_new_tokens=900, min_new_tokens=900)
            first = [next(stream), next(stream)]
            assert first[0].input_token_count > 0
            before_a = a.server.metrics.value("requests_finished_total", stop_reason="MAX_TOKENS")
            victim.stop()  # immediate stop: the call is cut while it streams
            with pytest.raises(StreamInterrupted) as exc:
                for _ in stream:
                    pass
            assert exc.value.received >= 2
            assert exc.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
            assert "not retried" in exc.value.details()
            assert isinstance(exc.value, grpc.RpcError)
            assert a.server.metrics.value("requests_finished_total", stop_reason="MAX_TOKENS") == before_a
    finally:
        victim.stop()


def test_health_command(replicas, capsys):
    a, b = replicas
    assert cli_main(["health", "--target", a.target]) == 0
    assert "SERVING" in capsys.readouterr().out
    _set_health(b, health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        assert cli_main(["health", "--target", b.target]) == 1
        assert "NOT_SERVING" in capsys.readouterr().out
    finally:
        _set_health(b, health_pb2.HealthCheckResponse.SERVING)
    assert cli_main(["health", "--target", a.target, "--service", "no.such.Service"]) == 1
    capsys.readouterr()
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli_main(["health", "--target", f"127.0.0.1:{port}", "--timeout", "1"]) == 1
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err and "Traceback" not in err


def test_dns_name_target_balances_over_its_addresses(replicas):
    """dns:///NAME:PORT (a headless Service's form): every address of the name is a subchannel;
    addresses that refuse (here ::1, the servers listen on 127.0.0.1 only) are skipped."""
    a = replicas[0]
    port = a.target.rsplit(":", 1)[1]
    with GraniteClient(f"dns:///localhost:{port}", timeout=30) as client:
        assert client.target == f"dns:///localhost:{port}"
        assert client.generate("Hello", max_new_tokens=2, min_new_tokens=2).generated_token_count == 2
