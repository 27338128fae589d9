"""Serving frontend: tokenizer, chat template, streaming detokenizer, tool-call parsing.

The reference for tokenization and chat rendering is transformers itself, loaded
from the same folder; the serving code must match it without importing it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from granite_deploy.serve.chat_template import ChatTemplateError
from granite_deploy.serve.detokenizer import IncrementalDetokenizer
from granite_deploy.serve.tokenizer import GraniteTokenizer, TokenizerFilesError
from granite_deploy.serve.tool_calls import ToolCallStreamParser, parse_tool_calls
from tool_schema import function_to_schema

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather for a city & return <json>",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Zürich"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "description": "Current time", "parameters": {}}}
DOCS = [
    {"doc_id": 1, "title": "Paris", "text": "Paris is the capital of France."},
    {"doc_id": 2, "title": "東京", "text": "Tokyo is the capital of Japan 🙂."},
]


@pytest.fixture(scope="module")
def hf_tok(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    return GraniteTokenizer.from_dir(tiny_checkpoint)


def _copy_tokenizer(src: Path, dst: Path, chat_template=None, drop_template=False) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "special_tokens_map.json"):
        shutil.copy(src / name, dst / name)
    config = json.loads((src / "tokenizer_config.json").read_text())
    if drop_template:
        config.pop("chat_template", None)
    elif chat_template is not None:
        config["chat_template"] = chat_template
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


# ------------------------------------------------------------------------------ chat rendering

CONVERSATIONS = {
    "plain": [{"role": "user", "content": "Hello, how are you?"}],
    "multi_turn": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me about 東京 🙂"},
    ],
    "system": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "assistant_tool_calls": [
        {"role": "user", "content": "Weather in Boston and the time?"},
        {
            "role": "assistant",
            "content": None,  # OpenAI clients send null content with tool calls
            "tool_calls": [
                {"type": "function", "function": {"name": "get_current_weather", "arguments": {"city": "Boston"}}},
                {"type": "function", "function": {"name": "get_time", "arguments": {}}},
            ],
        },
        {"role": "tool", "content": '{"temperature": 25, "sky": "sunny"}'},
    ],
    "consecutive_tool_responses": [
        {"role": "user", "content": "Weather in Boston and the time?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [{"name": "get_current_weather", "arguments": {"city": "Boston"}}],
        },
        {"role": "tool", "content": "25 degrees"},
        {"role": "tool", "content": "10:30"},
        {"role": "assistant", "content": "It is 25 degrees at 10:30."},
        {"role": "user", "content": "Thanks"},
    ],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_matches_transformers(tok, hf_tok, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    got = tok.render_chat(messages, add_generation_prompt=add_generation_prompt)
    assert got == want


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tools": [WEATHER_TOOL, TIME_TOOL]},
        {"documents": DOCS},
        {"tools": [WEATHER_TOOL], "documents": DOCS},
    ],
    ids=["tools", "documents", "tools+documents"],
)
@pytest.mark.parametrize("system", [False, True])
def test_chat_tools_and_documents_match_transformers(tok, hf_tok, kwargs, system):
    messages = CONVERSATIONS["system" if system else "plain"]
    want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    got = tok.render_chat(messages, **kwargs)
    assert got == want
    if "tools" in kwargs:
        assert "<tools>\n" + json.dumps(WEATHER_TOOL, ensure_ascii=False) in got  # no HTML escaping, no \u escapes


def test_continue_final_message_matches_transformers(tok, hf_tok):
    messages = CONVERSATIONS["plain"] + [{"role": "assistant", "content": "The answer is"}]
    want = hf_tok.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    got = tok.render_chat(messages, add_generation_prompt=False, continue_final_message=True)
    assert got == want and got.endswith("The answer is")


def test_chat_structure(tok):
    got = tok.render_chat(CONVERSATIONS["consecutive_tool_responses"])
    # Two consecutive tool messages share one user turn.
    assert got.count("<|start_of_role|>user<|end_of_role|>\n<tool_response>\n25 degrees\n</tool_response>"
                     "\n<tool_response>\n10:30\n</tool_response><|end_of_text|>") == 1
    assert got.endswith("<|start_of_role|>assistant<|end_of_role|>")
    assert not tok.render_chat(CONVERSATIONS["plain"], add_generation_prompt=False).endswith("<|end_of_role|>")


def _python_tool(city: str, unit: str = "celsius") -> dict:
    """Get the current weather.

    Args:
        city: The city to look up.
        unit: Temperature unit. (choices: ["celsius", "fahrenheit"])

    Returns:
        The weather report.
    """
    return {}


def test_python_function_tools_match_transformers(tok, hf_tok):
    from transformers.utils import get_json_schema

    assert function_to_schema(_python_tool) == get_json_schema(_python_tool)
    messages = CONVERSATIONS["plain"]
    want = hf_tok.apply_chat_template(messages, tools=[_python_tool], tokenize=False, add_generation_prompt=True)
    assert tok.render_chat(messages, tools=[function_to_schema(_python_tool)]) == want


OTHER_TEMPLATES = {
    # tojson options, loop controls, bos/eos from the special-token context, extra kwargs, dict(), namespace
    "tojson_loops": (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{% if loop.index > 3 %}{% break %}{% endif %}"
        "[{{ m.role }}] {{ m.content }}\n"
        "{% endfor %}"
        "{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}\n"
        "{{ dict(a=1, b='<&>') | tojson(sort_keys=True, separators=(',', ':')) }}\n"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
        "count={{ ns.n }} flag={{ custom_flag }}{{ eos_token }}\n"
        # None-valued keys are dropped; reasoning is aliased to reasoning_content/thinking
        "{% for m in messages %}{{ m.content is defined }}/{{ m.thinking | default('-') }} {% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    ),
    # whitespace control: trim_blocks and lstrip_blocks must be on
    "whitespace": (
        "{% for m in messages %}\n"
        "    {% if m.role == 'user' %}\n"
        "U: {{ m.content }}\n"
        "    {% else %}\n"
        "A: {{ m.content }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
        "{% generation %}gen{% endgeneration %}"
    ),
}


@pytest.mark.parametrize("name", sorted(OTHER_TEMPLATES))
def test_other_templates_match_transformers(tiny_checkpoint, tmp_path, name):
    from transformers import AutoTokenizer

    folder = _copy_tokenizer(Path(tiny_checkpoint), tmp_path / name, chat_template=OTHER_TEMPLATES[name])
    hf = AutoTokenizer.from_pretrained(folder)
    ours = GraniteTokenizer.from_dir(folder)
    messages = CONVERSATIONS["assistant_tool_calls"] + [
        {"role": "assistant", "content": "ok", "reasoning": "because"},
        {"role": "system", "content": "sys"},
    ]
    kwargs = {"tools": [WEATHER_TOOL], "custom_flag": "yes"}
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    assert ours.render_chat(messages, **kwargs) == want


def test_raise_exception_in_template(tiny_checkpoint, tmp_path):
    import jinja2
    from transformers import AutoTokenizer

    template = "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}ok"
    folder = _copy_tokenizer(Path(tiny_checkpoint), tmp_path / "raise", chat_template=template)
    messages = [{"role": "assistant", "content": "x"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="first message must be user"):
        AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=False)
    ours = GraniteTokenizer.from_dir(folder)
    with pytest.raises(ChatTemplateError, match="first message must be user"):
        ours.render_chat(messages)
    assert ours.render_chat([{"role": "user", "content": "x"}]) == "ok"


def test_sandbox_blocks_escapes(tiny_checkpoint, tmp_path):
    template = "{{ messages.__class__.__mro__ }}"
    folder = _copy_tokenizer(Path(tiny_checkpoint), tmp_path / "escape", chat_template=template)
    with pytest.raises(ChatTemplateError):
        GraniteTokenizer.from_dir(folder).render_chat(CONVERSATIONS["plain"])
    with pytest.raises(ChatTemplateError, match="compile"):
        from granite_deploy.serve.chat_template import compile_template

        compile_template("{% for %}")


def test_template_sources(tiny_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    src = Path(tiny_checkpoint)
    # transformers 5 layout: the template lives in chat_template.jinja
    jinja_dir = _copy_tokenizer(src, tmp_path / "jinja", drop_template=True)
    (jinja_dir / "chat_template.jinja").write_text("J:{% for m in messages %}{{ m.content }}{% endfor %}")
    assert GraniteTokenizer.from_dir(jinja_dir).render_chat(CONVERSATIONS["plain"]) == (
        AutoTokenizer.from_pretrained(jinja_dir).apply_chat_template(CONVERSATIONS["plain"], tokenize=False)
    )
    # older layout: a list of named templates; "default" is used
    named = [{"name": "default", "template": "D:{{ messages[0].content }}"}, {"name": "rag", "template": "R"}]
    list_dir = _copy_tokenizer(src, tmp_path / "list", chat_template=named)
    assert GraniteTokenizer.from_dir(list_dir).render_chat(CONVERSATIONS["plain"]) == "D:Hello, how are you?"
    # no template at all: a clear error
    none_dir = _copy_tokenizer(src, tmp_path / "none", drop_template=True)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        GraniteTokenizer.from_dir(none_dir).render_chat(CONVERSATIONS["plain"])


# ------------------------------------------------------------------------------ encode / decode

TEXTS = [
    "Hello world! The quick brown fox.",
    "def add(a, b):\n    return a + b\n",
    "emoji 🙂👍🏽🇫🇷 end",
    "東京 日本語 你好世界 한국어",
    "combining e\u0301 and cafe\u0301 naïve",
    "<|start_of_role|>user<|end_of_role|>hi<|end_of_text|>\n<tool_call>x</tool_call><think>t</think>",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert ids == hf_tok.encode(text)  # no BOS by default, like transformers for this artifact
    assert tok.decode(ids) == hf_tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)


def test_special_tokens_recognised(tok, hf_tok):
    ids = tok.encode("a<|end_of_text|>b<tool_call>")
    assert tok.eos_token_id in ids and tok.token_to_id("<tool_call>") in ids
    # <tool_call> is not special, so it survives skip_special_tokens; <|end_of_text|> does not
    assert tok.decode(ids, skip_special_tokens=True) == "ab<tool_call>"
    assert tok.eos_token_id == hf_tok.eos_token_id
    assert tok.pad_token_id == hf_tok.pad_token_id
    assert tok.vocab_size == len(hf_tok)
    assert tok.stop_token_ids == {hf_tok.eos_token_id}
    assert tok.id_to_token(tok.eos_token_id) == "<|end_of_text|>"
    assert tok.token_to_id("<|start_of_role|>") == hf_tok.convert_tokens_to_ids("<|start_of_role|>")


def test_missing_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerFilesError, match="tokenizer.json"):
        GraniteTokenizer.from_dir(tmp_path)
    assert issubclass(TokenizerFilesError, ValueError)


def test_fim_prompt(tok, tiny_checkpoint, tmp_path):
    prompt = tok.fim_prompt("def f(x):\n    ", "\n    return y\n")
    assert prompt == "<|fim_prefix|>def f(x):\n    <|fim_suffix|>\n    return y\n<|fim_middle|>"
    ids = tok.encode(prompt)
    assert ids[0] == tok.token_to_id("<|fim_prefix|>") and ids[-1] == tok.token_to_id("<|fim_middle|>")

    # a tokenizer without FIM tokens gives a clear error
    from tokenizers import Tokenizer, models, pre_tokenizers

    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel()
    plain.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="fim_prefix"):
        GraniteTokenizer.from_dir(tmp_path).fim_prompt("a", "b")


# ------------------------------------------------------------------------------ streaming detokenizer

STREAM_TEXTS = ["🙂👍🏽🇫🇷", "東京 你好世界", "e\u0301 cafe\u0301", "Hi 🙂! 東京<|end_of_text|>x👍🏽", "plain ascii text"]


def _stream(tok, ids, skip=False):
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


@pytest.mark.parametrize("text", STREAM_TEXTS)
@pytest.mark.parametrize("skip", [False, True])
def test_detokenizer_streams_whole_characters(tok, text, skip):
    ids = tok.encode(text)
    pieces = _stream(tok, ids, skip)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)


def test_detokenizer_holds_split_emoji(tok):
    ids = tok.encode("🙂")
    assert len(ids) > 1  # the tiny BPE splits the emoji into byte tokens: the case under test
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "🙂"
    assert detok.flush() == ""
    # each flag/skin-tone emoji appears only complete: every shown piece decodes cleanly on its own
    for text in ["👍🏽", "🇫🇷", "東京"]:
        for piece in _stream(tok, tok.encode(text)):
            assert piece == "" or piece in text


def test_detokenizer_invalid_bytes_match_decode(tok):
    # A lone continuation byte and a truncated emoji: decode shows U+FFFD, and so must the stream in total.
    lone = tok.encode("🙂")[-1]
    ids = tok.encode("a") + [lone] + tok.encode("b") + tok.encode("🙂")[:-1]
    assert "".join(_stream(tok, ids)) == tok.decode(ids)


# ------------------------------------------------------------------------------ tool calls

CALL1 = '<tool_call>\n{"name": "get_current_weather", "arguments": {"city": "Boston"}}\n</tool_call>'
CALL2 = '<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}\n</tool_call>'
BAD = '<tool_call>\n{"name": "get_time", "arguments": {"tz": \n</tool_call>'


def test_one_tool_call():
    out = parse_tool_calls(CALL1)
    assert out.content == "" and not out.malformed
    assert [(c.name, c.arguments) for c in out.tool_calls] == [("get_current_weather", {"city": "Boston"})]
    assert out.tool_calls[0].raw == CALL1


def test_two_tool_calls_with_string_arguments():
    out = parse_tool_calls(CALL1 + "\n" + CALL2)
    assert out.content == ""
    assert [(c.name, c.arguments) for c in out.tool_calls] == [
        ("get_current_weather", {"city": "Boston"}),
        ("get_time", {"tz": "UTC"}),
    ]


def test_malformed_tool_call_is_flagged_text():
    out = parse_tool_calls("Sure.\n" + BAD + "\n" + CALL1)
    assert out.malformed == [BAD] and out.has_malformed
    assert out.content == "Sure.\n" + BAD
    assert [c.name for c in out.tool_calls] == ["get_current_weather"]
    for bad in [
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        '<tool_call>{"name": "f", "arguments": "not json"}</tool_call>',
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        "<tool_call>[1, 2]</tool_call>",
    ]:
        out = parse_tool_calls(bad)
        assert out.content == bad and out.malformed == [bad] and out.tool_calls == []


def test_text_around_tool_calls():
    out = parse_tool_calls("Let me check the weather.\n" + CALL1 + "\nI will report back. 🙂")
    assert out.content == "Let me check the weather.I will report back. 🙂"
    assert len(out.tool_calls) == 1
    plain = "No tools here, just <b>html</b> and a stray </tool_call> tag.\n"
    assert parse_tool_calls(plain).content == plain


def test_unterminated_tool_call():
    text = 'Checking.<tool_call>\n{"name": "get_time"'
    out = parse_tool_calls(text)
    assert out.content == text and out.malformed == [text[len("Checking."):]] and not out.tool_calls


STREAM_CASES = [
    CALL1,
    CALL1 + "\n" + CALL2,
    "Sure.\n" + BAD + "\n" + CALL1 + "\n",
    "Let me check.\n\n" + CALL1 + "\nDone <tool_ca",
    'Checking.<tool_call>\n{"name": "get_time"',
    "plain text with < and <tool and </tool_call> \n",
]


@pytest.mark.parametrize("text", STREAM_CASES)
def test_stream_parser_matches_one_shot(text):
    want = parse_tool_calls(text)
    parser = ToolCallStreamParser()
    shown, calls = [], []
    for ch in text:
        delta, done = parser.feed(ch)
        shown.append(delta)
        calls.extend(done)
        assert "<tool_call>" not in "".join(shown) or want.malformed  # calls are never shown as text
    delta, done = parser.finish()
    shown.append(delta)
    calls.extend(done)
    assert "".join(shown) == want.content
    assert calls == want.tool_calls
    assert parser.malformed == want.malformed


def test_stream_parser_emits_call_when_closed():
    parser = ToolCallStreamParser()
    assert parser.feed("Hi <tool_") == ("Hi", [])
    text, calls = parser.feed(CALL1[len("<tool_"):])
    assert text == "" and [c.name for c in calls] == ["get_current_weather"]


# ------------------------------------------------------------------------------ runtime dependencies


def test_serving_frontend_imports_without_torch_or_transformers():
    code = (
        "import sys\n"
        "import granite_deploy.serve.tokenizer, granite_deploy.serve.chat_template\n"
        "import granite_deploy.serve.detokenizer, granite_deploy.serve.tool_calls\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_whole_serving_runtime_imports_without_torch_or_transformers():
    """The server, scheduler, generation core, ONNX Runtime engine and CLI: no torch (only export needs it)."""
    code = (
        "import sys\n"
        "import granite_deploy.cli, granite_deploy.artifact\n"
        "import granite_deploy.serve.server, granite_deploy.serve.client, granite_deploy.serve.scheduler\n"
        "import granite_deploy.engines, granite_deploy.engines.onnxruntime_engine\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
