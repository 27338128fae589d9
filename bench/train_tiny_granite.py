"""Train a small Granite-architecture model on CPU, so quantization accuracy can be measured on
weights that have learned something (random weights make perplexity and greedy agreement meaningless).

The text ships with Python: the docstrings of the standard library's modules, classes and functions
(`inspect.getdoc`), collected by importing every module in `sys.stdlib_module_names` that imports
cleanly. Whole modules are held out: those whose crc32(name) % 10 == 0 (about 10% of the text) go to
`heldout.txt`, never seen in training. The tokenizer is a byte-level BPE (about 2000 ids including
Granite's 96 added tokens at the end, as in export/tiny.py) trained on the training text only.

The model is `GraniteMoeHybridForCausalLM` (dense, 4 attention layers, hidden 256, 4 heads / 2 KV
heads, SwiGLU 512, RoPE, tied embeddings, Granite's multipliers), trained with AdamW for a few minutes.
The checkpoint folder (a normal Hugging Face folder with tokenizer files) and the held-out text are
cached; a second run reuses them.

    python bench/train_tiny_granite.py [--out DIR] [--minutes 8] [--force]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path

DEFAULT_OUT = Path(os.environ.get("GRANITE_DEPLOY_TRAINED_TINY",
                                  Path.home() / ".cache" / "granite-deploy" / "trained-tiny"))
BPE_VOCAB = 2000 - 96  # + Granite's 96 added tokens = 2000 ids
SKIP_MODULES = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "ensurepip", "venv",
    "webbrowser", "pydoc_data", "lib2to3", "msilib", "winreg", "winsound", "_winapi", "nt", "msvcrt",
    "sre_compile", "sre_constants", "sre_parse", "__hello__", "__phello__",
}
MODEL = dict(hidden_size=256, intermediate_size=512, shared_intermediate_size=512, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0,
             embedding_multiplier=12.0, attention_multiplier=1 / 64, residual_multiplier=0.22,
             logits_scaling=2.0, initializer_range=0.1)


def collect_docstrings() -> tuple[str, str, dict]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _collect_docstrings()


def _collect_docstrings() -> tuple[str, str, dict]:
    """(training text, held-out text, stats): stdlib docstrings and pydoc topics, split by module/topic."""
    import importlib
    import importlib.util
    import inspect
    import io
    import contextlib
    import warnings

    import pkgutil

    names = set()
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in SKIP_MODULES:
            continue
        names.add(top)
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.submodule_search_locations:
            for info in pkgutil.walk_packages(spec.submodule_search_locations, prefix=top + ".",
                                              onerror=lambda _: None):
                parts = info.name.split(".")
                if not any(p.startswith("_") or p in ("test", "tests", "idle_test") for p in parts[1:]):
                    names.add(info.name)

    units: dict[str, list[str]] = {}  # split unit (a top-level package, or one pydoc topic) -> documents
    seen: set[str] = set()
    modules = 0
    # The language reference's topics (the text `help("if")` shows), one unit per topic.
    try:
        from pydoc_data.topics import topics
    except ImportError:
        topics = {}
    for key in sorted(topics):
        doc = topics[key].strip()
        if len(doc) > 40 and doc not in seen:
            seen.add(doc)
            units.setdefault("topic:" + key, []).append(doc)
    for name in sorted(names):
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - any module that does not import cleanly is skipped
            continue
        modules += 1
        docs = units.setdefault("module:" + name.split(".")[0], [])  # a package and its submodules together
        objects = [mod] + [getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_")]
        for obj in objects:
            candidates = [obj]
            if inspect.isclass(obj) and getattr(obj, "__module__", None) == name:
                candidates += [getattr(obj, a, None) for a in sorted(vars(obj)) if not a.startswith("_")]
            elif obj is not mod and getattr(obj, "__module__", None) != name:
                continue
            for c in candidates:
                try:
                    doc = inspect.getdoc(c) if c is not None else None
                except Exception:  # noqa: BLE001
                    doc = None
                if doc and len(doc) > 40 and doc not in seen:
                    seen.add(doc)
                    docs.append(doc)
    # Hold out whole units, in crc32 order (a fixed pseudo-random order), until 10% of the characters.
    total = sum(len(d) for docs in units.values() for d in docs)
    train, held, held_chars = [], [], 0
    for key in sorted(units, key=lambda k: (zlib.crc32(k.encode()), k)):
        if held_chars < 0.1 * total:
            held += units[key]
            held_chars += sum(len(d) for d in units[key])
        else:
            train += units[key]
    stats = {"modules": modules, "train_docs": len(train), "heldout_docs": len(held)}
    return "\n\n".join(train), "\n\n".join(held), stats


def build_bpe(out_dir: Path, text: str) -> dict:
    """A byte-level BPE trained on `text`, with Granite's added tokens after it (as export/tiny.py)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    from granite_deploy.export.tiny import CHAT_TEMPLATE, GRANITE_ADDED_TOKENS, N_ADDED

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(text.split("\n\n"), trainer)
    by_offset = {off: (content, special) for off, content, special in GRANITE_ADDED_TOKENS}
    ids, added_decoder = {}, {}
    for off in range(N_ADDED):
        content, special = by_offset.get(off, (f"<|reserved_special_token_{off}|>", True))
        token = AddedToken(content, special=special, normalized=False)
        (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([token])
        ids[content] = tokenizer.token_to_id(content)
        added_decoder[str(ids[content])] = {"content": content, "lstrip": False, "normalized": False,
                                            "rstrip": False, "single_word": False, "special": special}
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added_decoder,
              "bos_token": "<|end_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|pad|>",
              "unk_token": None, "clean_up_tokenization_spaces": False, "model_max_length": 1024,
              "padding_side": "left", "tokenizer_class": "GPT2Tokenizer", "chat_template": CHAT_TEMPLATE}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": "<|end_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|pad|>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return ids


def train(out: Path, minutes: float = 6.0, seq_len: int = 128, batch: int = 16, lr: float = 3e-3,
          seed: int = 0) -> Path:
    import numpy as np
    import torch
    from tokenizers import Tokenizer
    from transformers import GenerationConfig, GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    from granite_deploy.export.tiny import tiny_config_kwargs

    t0 = time.perf_counter()
    train_text, held_text, stats = collect_docstrings()
    print(f"# text: {stats['modules']} stdlib modules, {len(train_text) / 1e6:.2f} M chars training, "
          f"{len(held_text) / 1e6:.2f} M chars held out ({time.perf_counter() - t0:.0f} s)", flush=True)
    stage = out.with_name(out.name + ".partial")
    if stage.exists():
        import shutil

        shutil.rmtree(stage)
    token_ids = build_bpe(stage, train_text)
    tok = Tokenizer.from_file(str(stage / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    eot = token_ids["<|end_of_text|>"]
    data = []
    for doc in train_text.split("\n\n"):
        data += tok.encode(doc, add_special_tokens=False).ids + [eot]
    data = torch.tensor(data, dtype=torch.long)
    print(f"# {data.numel() / 1e6:.2f} M training tokens, vocab {vocab}", flush=True)

    torch.manual_seed(seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    config = GraniteMoeHybridConfig(**tiny_config_kwargs(vocab, token_ids, **MODEL))
    model = GraniteMoeHybridForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    budget = minutes * 60
    warmup = 50
    gen = torch.Generator().manual_seed(seed)
    step, start, losses = 0, time.perf_counter(), []
    model.train()
    while True:
        elapsed = time.perf_counter() - start
        if elapsed > budget:
            break
        frac = elapsed / budget
        for g in opt.param_groups:  # warmup, then cosine to 10% over the time budget
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        idx = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=gen)
        x = torch.stack([data[i: i + seq_len] for i in idx.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            print(f"# step {step}: loss {np.mean(losses[-100:]):.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    model.save_pretrained(stage)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(stage)
    (stage / "heldout.txt").write_text(held_text, encoding="utf-8")
    record = {**stats, "params": n_params, "vocab": vocab, "train_tokens": int(data.numel()), "steps": step,
              "tokens_seen": step * batch * seq_len, "seq_len": seq_len, "batch": batch, "lr": lr,
              "minutes": round((time.perf_counter() - start) / 60, 2),
              "final_train_loss": float(np.mean(losses[-100:])), "python": sys.version.split()[0],
              "torch": torch.__version__, "config": MODEL}
    (stage / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(stage, out)
    print(f"# trained {n_params / 1e6:.1f} M params for {step} steps ({record['tokens_seen'] / 1e6:.1f} M tokens, "
          f"{record['minutes']} min): train loss {record['final_train_loss']:.3f}; saved {out}", flush=True)
    return out


def ensure_trained(out: Path = DEFAULT_OUT, minutes: float = 8.0, force: bool = False) -> Path:
    """The cached checkpoint folder (training it first if it is not there). Held-out text: out/heldout.txt."""
    if not force and (out / "training.json").is_file() and (out / "heldout.txt").is_file():
        return out
    return train(out, minutes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"checkpoint folder (default {DEFAULT_OUT})")
    ap.add_argument("--minutes", type=float, default=8.0, help="training time budget (default 8)")
    ap.add_argument("--force", action="store_true", help="train again even if the folder exists")
    args = ap.parse_args()
    out = ensure_trained(args.out, args.minutes, args.force)
    print(json.dumps(json.loads((out / "training.json").read_text()), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
