"""A tiny random-weight Granite 4.0 checkpoint, made on the spot.

Real Granite weights cannot be downloaded everywhere this project runs (CI
has no model hub), so the demo and the tests build a checkpoint with the real
architecture (`GraniteMoeHybridForCausalLM`), small dimensions, every Granite
multiplier different from 1, tied embeddings and RoPE, plus a byte-level BPE
tokenizer carrying Granite's special tokens in Granite's relative order and a
Granite-4.0-style chat template. The folder looks exactly like a hub
checkpoint, so the real loading code is what reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

# Granite's special tokens, in id order from 100256 (see GRANITE.md). Gaps in
# Granite's numbering are filled with reserved tokens so relative offsets match.
GRANITE_ADDED_TOKENS: list[tuple[int, str, bool]] = [
    # (offset from 100256, content, special)
    (0, "<|pad|>", True),
    (1, "<|end_of_text|>", True),
    (2, "<|fim_prefix|>", True),
    (3, "<|fim_middle|>", True),
    (4, "<|fim_suffix|>", True),
    (5, "<|fim_pad|>", True),
    (6, "<|filename|>", True),
    (7, "<|reponame|>", True),
    (8, "<|start_of_role|>", True),
    (9, "<|end_of_role|>", True),
    (14, "<tool_call>", False),
    (15, "</tool_call>", False),
    (16, "<tool_response>", False),
    (17, "</tool_response>", False),
    (18, "<think>", True),
    (19, "</think>", True),
    (24, "<tools>", True),
    (25, "</tools>", True),
    (26, "<documents>", True),
    (27, "</documents>", True),
]
N_ADDED = 96  # 100352 - 100256

# A Granite 4.0-style chat template (turn format, tools, documents and tool
# responses as GRANITE.md describes). Real checkpoints carry their own; the
# server always renders whatever template the artifact has.
CHAT_TEMPLATE = (
    "{%- set tools_prefix = 'You are a helpful assistant with access to the following tools. "
    "You may call one or more tools to assist with the user query.\\n\\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\\n<tools>' %}\n"
    "{%- set tools_suffix = '\\n</tools>\\n\\nFor each tool call, return a json object with function "
    "name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": "
    "<function-name>, \"arguments\": <args-json-object>}\\n</tool_call>.' %}\n"
    "{%- set documents_prefix = 'You are given a list of documents within <documents></documents> "
    "XML tags:\\n<documents>' %}\n"
    "{%- set documents_suffix = '\\n</documents>\\n\\nWrite the response to the user\\'s input by "
    "strictly aligning with the facts in the provided documents.' %}\n"
    "{%- if messages and messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = '' %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "{%- if tools %}\n"
    "    {%- set ns = namespace(text=tools_prefix) %}\n"
    "    {%- for tool in tools %}\n"
    "        {%- set ns.text = ns.text + '\\n' + (tool | tojson) %}\n"
    "    {%- endfor %}\n"
    "    {%- set system_message = system_message + ('\\n\\n' if system_message else '') + ns.text + tools_suffix %}\n"
    "{%- endif %}\n"
    "{%- if documents %}\n"
    "    {%- set ns = namespace(text=documents_prefix) %}\n"
    "    {%- for document in documents %}\n"
    "        {%- set ns.text = ns.text + '\\n' + (document | tojson) %}\n"
    "    {%- endfor %}\n"
    "    {%- set system_message = system_message + ('\\n\\n' if system_message else '') + ns.text + documents_suffix %}\n"
    "{%- endif %}\n"
    "{%- if system_message %}\n"
    "    {{- '<|start_of_role|>system<|end_of_role|>' + system_message + '<|end_of_text|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if message['role'] == 'tool' %}\n"
    "        {%- if loop.first or loop_messages[loop.index0 - 1]['role'] != 'tool' %}\n"
    "            {{- '<|start_of_role|>user<|end_of_role|>' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}\n"
    "        {%- if loop.last or loop_messages[loop.index0 + 1]['role'] != 'tool' %}\n"
    "            {{- '<|end_of_text|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' and message.get('tool_calls') %}\n"
    "        {{- '<|start_of_role|>assistant<|end_of_role|>' + (message['content'] or '') }}\n"
    "        {%- for call in message['tool_calls'] %}\n"
    "            {%- set fn = call['function'] if call.get('function') else call %}\n"
    "            {{- '\\n<tool_call>\\n' + ({'name': fn['name'], 'arguments': fn['arguments']} | tojson) + '\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|end_of_text|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_of_role|>assistant<|end_of_role|>' }}\n"
    "{%- endif %}"
)

# Training text for the tiny BPE: English, code, JSON and multi-byte scripts,
# so that merges exist for common words while emoji and CJK stay split across
# several byte tokens (which is what the UTF-8 streaming tests need).
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world! How are you today?",
    "Granite models are decoder-only transformers. They answer questions, call tools and read documents.",
    "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    '{"name": "get_current_weather", "arguments": {"city": "Boston", "unit": "celsius"}}',
    "What is the weather like in Boston? It is sunny and warm, about 25 degrees.",
    "The capital of France is Paris. The capital of Japan is Tokyo. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "Café naïve résumé — “quotes” ‘single’ … 東京 日本語 你好世界 한국어 🙂 👍🏽 🇫🇷 e\u0301",
    "system user assistant tool response document tools documents question answer because therefore",
]


def build_tokenizer(out_dir: Path, bpe_vocab_size: int = 416) -> dict:
    """Train and save a small byte-level BPE tokenizer with Granite's added tokens.

    Returns {content: id} for the added tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    base = tokenizer.get_vocab_size()
    by_offset = {off: (content, special) for off, content, special in GRANITE_ADDED_TOKENS}
    ids = {}
    for off in range(N_ADDED):
        content, special = by_offset.get(off, (f"<|reserved_special_token_{off}|>", True))
        token = AddedToken(content, special=special, normalized=False)
        if special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
        ids[content] = tokenizer.token_to_id(content)
        assert ids[content] == base + off, (content, ids[content], base + off)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))

    added_decoder = {}
    for content, idx in ids.items():
        special = by_offset.get(idx - base, (content, True))[1]
        added_decoder[str(idx)] = {
            "content": content, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False, "special": special,
        }
    tokenizer_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_decoder,
        "bos_token": "<|end_of_text|>",
        "eos_token": "<|end_of_text|>",
        "pad_token": "<|pad|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1024,
        "padding_side": "left",
        "tokenizer_class": "GPT2Tokenizer",
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    special_map = {"bos_token": "<|end_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|pad|>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return ids


def tiny_config_kwargs(vocab_size: int, token_ids: dict, **overrides) -> dict:
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        shared_intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=["attention"] * 3,
        max_position_embeddings=1024,
        position_embedding_type="rope",
        rope_theta=10000.0,
        embedding_multiplier=2.0,
        attention_multiplier=0.09,
        residual_multiplier=0.35,
        logits_scaling=2.5,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        num_local_experts=0,
        num_experts_per_tok=0,
        bos_token_id=token_ids["<|end_of_text|>"],
        eos_token_id=token_ids["<|end_of_text|>"],
        pad_token_id=token_ids["<|pad|>"],
        initializer_range=0.2,
    )
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        overrides["layer_types"] = ["attention"] * overrides["num_hidden_layers"]
    kwargs.update(overrides)
    return kwargs


def make_tiny_checkpoint(out_dir: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Write a tiny random Granite 4.0 checkpoint (weights, config, tokenizer) to out_dir."""
    import torch
    from transformers import GenerationConfig, GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    out_dir = Path(out_dir)
    token_ids = build_tokenizer(out_dir)
    vocab_size = max(token_ids.values()) + 1
    config = GraniteMoeHybridConfig(**tiny_config_kwargs(vocab_size, token_ids, **config_overrides))
    torch.manual_seed(seed)
    model = GraniteMoeHybridForCausalLM(config).eval()
    # Spread the random weights so that logits have clear winners: greedy
    # decoding then tests the graph, not float rounding between near-ties.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif "embed" in name:
                param.normal_(0.0, 1.0)
            else:
                param.normal_(0.0, 3.0 / param.shape[-1] ** 0.5)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a tiny model saves instantly; keep output clean
    try:
        model.save_pretrained(out_dir)
    finally:
        hf_logging.enable_progress_bar()
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    ).save_pretrained(out_dir)
    return out_dir
