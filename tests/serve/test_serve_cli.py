"""CLI hygiene of `serve`, `generate`, `render` and the top level: bad input exits 2 with one
line naming the option or file (never a traceback; `--debug` shows it), a missing extra is
named, the bearer token can come from a file or the environment, `--version` and `--help`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import grpc
import pytest

from granite_deploy.protos import granite_chat_pb2 as c
from granite_deploy.protos import granite_chat_pb2_grpc as cg

CLI = [sys.executable, "-m", "granite_deploy.cli"]


@pytest.fixture(scope="module")
def artifact(tiny_checkpoint, tmp_path_factory):
    from granite_deploy.export.exporter import export

    return export(str(tiny_checkpoint), tmp_path_factory.mktemp("cli") / "tiny", validate=False)


def run(*args, env=None, timeout=120, code=None):
    """Run the CLI; returns (returncode, stdout, stderr lines)."""
    proc = subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    return proc.returncode, proc.stdout, proc.stderr.strip().splitlines()


def one_line_error(args, want_code, *words, env=None, prefix_cmd=None):
    code, out, err = run(*args, env=env) if prefix_cmd is None else prefix_cmd()
    assert code == want_code, (code, err)
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    for w in words:
        assert w in err[0], err[0]
    return err[0]


def _json(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


@pytest.mark.parametrize("args,words", [
    (["serve", "{a}", "--port", "99999"], ["--port", "0..65535", "99999"]),
    (["serve", "{a}", "--port", "-1"], ["--port"]),
    (["serve", "{a}", "--metrics-port", "70000"], ["--metrics-port"]),
    (["serve", "{a}", "--http-port", "65536"], ["--http-port"]),
    (["serve", "{a}", "--threads", "-3"], ["--threads", ">= 1"]),
    (["serve", "{a}", "--port", "abc"], ["--port", "invalid int value"]),
    (["serve", "{a}", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["serve", "{a}", "--auth-token-file", "/nonexistent/token"], ["--auth-token-file", "/nonexistent/token"]),
    (["serve", "{a}", "--auth-token", ""], ["--auth-token", "empty"]),
    (["serve", "/nonexistent/artifact"], ["/nonexistent/artifact"]),
    (["generate", "{a}", "--prompt", "hi", "--threads", "0"], ["--threads"]),
    (["generate", "/nonexistent/artifact", "--prompt", "hi"], ["/nonexistent/artifact"]),
    (["render", "{a}", "--chat", "/nonexistent/chat.json"], ["--chat", "/nonexistent/chat.json", "no such file"]),
    (["generate", "{a}"], ["--prompt", "--chat"]),
])
def test_bad_options_exit_2_with_one_line(artifact, args, words):
    args = [str(artifact) if a == "{a}" else a for a in args]
    one_line_error(args, 2, *words)


@pytest.mark.parametrize("messages,words", [
    ([{"role": "wizard", "content": "x"}], ["messages[0].role", "wizard", "system, user, assistant, tool"]),
    ([{"role": "user"}], ["messages[0].content", "missing"]),
    ([{"role": "user", "content": 3}], ["messages[0].content", "string"]),
    ([], ["--chat", "non-empty list"]),
    ("{not json", ["--chat", "not valid JSON"]),
    ([{"content": "x"}], ["messages[0].role"]),
])
@pytest.mark.parametrize("command", ["render", "generate"])
def test_chat_files_are_validated_like_the_server(artifact, tmp_path, command, messages, words):
    chat = _json(tmp_path, "chat.json", messages)
    line = one_line_error([command, artifact, "--chat", chat], 2, *words)
    assert str(chat) in line


def test_tools_and_documents_files(artifact, tmp_path):
    chat = _json(tmp_path, "chat.json", [{"role": "user", "content": "hi"}])
    tools = _json(tmp_path, "tools.json", {"not": "a list"})
    one_line_error(["render", artifact, "--chat", chat, "--tools", tools], 2, "--tools", "JSON list")
    docs = _json(tmp_path, "docs.json", ["just a string"])
    one_line_error(["render", artifact, "--chat", chat, "--documents", docs], 2, "--documents[0]")


def test_missing_graph_file_is_named(artifact, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    (broken / "model.cpu.onnx").unlink()
    for args in (["generate", broken, "--prompt", "hi"], ["serve", broken, "--port", "0"],
                 ["generate", broken, "--prompt", "hi", "--skip-verify"]):
        code, _, err = run(*args)
        assert code in (2, 3) and len(err) == 1 and "Traceback" not in err[0], err
        assert "model.cpu.onnx" in err[0] and "missing" in err[0]


def _busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


def test_busy_ports_are_named(artifact):
    sock, port = _busy_port()
    try:
        one_line_error(["serve", artifact, "--port", "0", "--metrics-port", port, "--threads", "1"], 2,
                       "--metrics-port", str(port))
        one_line_error(["serve", artifact, "--port", port, "--threads", "1"], 2, "--port", str(port))
    finally:
        sock.close()


def _with_blocked_module(module, argv):
    """Run the CLI in a process where `module` cannot be imported (a missing extra)."""
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            f"from granite_deploy.cli import main; sys.exit(main({[str(a) for a in argv]!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr.strip().splitlines()


@pytest.mark.parametrize("module,argv,extra", [
    ("grpc", ["serve", "{a}", "--port", "0"], "serve"),
    ("onnxruntime", ["generate", "{a}", "--prompt", "hi"], "serve"),
    ("tokenizers", ["render", "{a}", "--chat", "{chat}"], "serve"),
    ("torch", ["export", "--model", "{ck}", "--output", "{out}"], "export"),
])
def test_missing_extra_is_named(artifact, tiny_checkpoint, tmp_path, module, argv, extra):
    chat = _json(tmp_path, "chat.json", [{"role": "user", "content": "hi"}])
    subs = {"{a}": str(artifact), "{chat}": str(chat), "{ck}": str(tiny_checkpoint), "{out}": str(tmp_path / "o")}
    argv = [subs.get(a, a) for a in argv]
    line = one_line_error(None, 2, f"{module} is not installed", f'pip install "granite-deploy[{extra}]"',
                          prefix_cmd=lambda: _with_blocked_module(module, argv))
    assert line.startswith(f"granite-deploy {argv[0]}: error:")


def test_debug_shows_the_traceback(artifact):
    code, _, err = run("--debug", "serve", artifact, "--threads", "-3")
    assert code == 2 and any("Traceback" in line for line in err) and "--threads" in err[-1]


def test_version_and_help():
    from granite_deploy import __version__

    code, out, _ = run("--version")
    assert code == 0 and out.strip() == f"granite-deploy {__version__}"
    code, out, _ = run("--help")
    assert code == 0
    for command in ("export", "verify", "sign", "demo", "generate", "render", "serve", "client", "health",
                    "build", "check-ops", "quantize"):
        assert f"    {command} " in out, command
    assert "exit status" in out and "2 bad input" in out and "3 verification" in out
    assert "GRANITE_DEPLOY_AUTH_TOKEN" in out


def _start(args, env=None):
    proc = subprocess.Popen(CLI + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    line = proc.stdout.readline()  # "serving ... on 127.0.0.1:PORT (...)"
    assert line.startswith("serving"), (line, proc.stderr.read() if proc.poll() is not None else "")
    port = int(line.split(" on ")[1].split(" ")[0].rsplit(":", 1)[1])
    return proc, port


def _tokenize(port, token=None):
    md = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return cg.ChatServiceStub(ch).Tokenize(c.TokenizeRequest(text="hi"), metadata=md, timeout=10)


@pytest.mark.parametrize("how", ["env", "file"])
def test_auth_token_from_env_or_file(artifact, tmp_path, how):
    token = "s3cret-token"
    args = ["serve", artifact, "--port", "0", "--threads", "1", "--skip-verify"]
    env = None
    if how == "env":
        env = {"GRANITE_DEPLOY_AUTH_TOKEN": token}
    else:
        path = tmp_path / "token"
        path.write_text(token + "\n")
        args += ["--auth-token-file", path]
    proc, port = _start(args, env)
    try:
        assert token not in " ".join(str(a) for a in proc.args)  # not visible in `ps`
        with pytest.raises(grpc.RpcError) as e:
            _tokenize(port)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _tokenize(port, token).token_count >= 1
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0


def test_validation_imports_without_grpc_or_numpy():
    """client, generate and the HTTP app share serve.validation: importing it pulls in nothing heavy."""
    code = ("import sys; import granite_deploy.serve.validation as v; "
            "bad = [m for m in ('grpc', 'numpy', 'tokenizers', 'onnxruntime', 'jinja2') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
