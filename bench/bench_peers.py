"""granite-deploy's CPU engine side by side with onnxruntime-genai and llama.cpp, in one run.

The same random full-size checkpoint (bench/common.py) goes through each runtime's own
tool chain:
  * ours: `granite-deploy export` (fp32) and `granite-deploy quantize` (--int8, which is int8-dynamic;
    --int8-weight-only as a row of its own; --int4),
    the graph the engine picks on CPU (`decoder_ragged` where the artifact has it, else
    `decoder_cpu`), and (runtime `ourscpu`) the `decoder_cpu` graph next to a ragged default;
  * onnxruntime-genai: its model builder, `-p fp32|int8|int4 -e cpu`;
  * llama.cpp: built from the source vendored in the llama-cpp-python sdist, converted
    with its own convert_hf_to_gguf.py (F16) and quantised with its llama-quantize
    (Q8_0, Q4_0); measured with its llama-bench and llama-batched-bench.
Everything the peers need (a venv with onnxruntime-genai and gguf, the llama.cpp build,
their models) lives in a cache folder OUTSIDE the repository:
$GRANITE_DEPLOY_PEERS_DIR, default ~/.cache/granite-deploy/peers. Slow (builds take
tens of minutes on 2 cores the first time) and optional: never run in CI.

Each runtime runs in its own process at --threads threads; before each timed run the
script waits (up to --max-wait s) for the 1-minute load average to fall below
--idle-load and prints the load it got. It takes the shared benchmark lock
(/tmp/granite-bench.lock) itself around each build and each timed run, so run it
directly, NOT under `flock` (or pass --lock '' if you already hold the lock); consecutive
steps share one hold of at most --lock-budget s, then it is released for the others.

    python bench/bench_peers.py [--threads 2] [--steps 16] [--widths fp32,int8,int4]
                                [--runtimes ours,ortgenai,llamacpp]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


PEERS = Path(os.environ.get("GRANITE_DEPLOY_PEERS_DIR", common.CACHE.parent / "peers"))
ORTGENAI_VERSION = "0.18.0"
GGUF_VERSION = "0.19.0"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
MAIN_PYTHON = sys.executable

# width -> (our quantize method or None for fp32, onnxruntime-genai precision, llama.cpp type, bits per weight read)
WIDTHS = {
    "fp32": (None, "fp32", None, 32.0),
    "fp16": (None, None, "F16", 16.0),
    "int8": ("int8-dynamic", "int8", "Q8_0", 8.5),  # what `quantize --int8` makes
    "int4": ("int4", "int4", "Q4_0", 4.5),
}
# Our other methods at a width, each a row of its own (runtime kind `oursalt`) and a ratio row of its own.
ALT_METHODS = {"int8": ("int8",)}
ALT_LABEL = {"int8": "int8-weight-only"}  # by the quantize flag that makes it
WIDTH_LABEL = {"fp32": "32-bit", "fp16": "16-bit", "int8": "8-bit", "int4": "4-bit"}
COLUMNS = [("prefill_128", "prefill 128"), ("prefill_1024", "prefill 1024"),
           ("decode_b1_p128", "decode b1 (past 128)"), ("decode_b1_p1024", "decode b1 (past 1024)"),
           ("decode_b8_p128", "decode b8 aggregate (past 128)")]


def rss_now_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def log(msg: str) -> None:
    print(f"# {msg}", flush=True)


# ---------------------------------------------------------------- lock, idle machine, children

class Lock:
    """The shared benchmark lock. Consecutive steps share one hold of at most `budget`
    seconds (plus the step that crosses it); then it is released so others get a turn."""

    def __init__(self, path: str, budget: float = 480):
        self.path, self.budget = path, budget
        self._f = None
        self._since = 0.0

    def release(self) -> None:
        if self._f is not None:
            fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()
            self._f = None

    @contextlib.contextmanager
    def held(self, what: str):
        if not self.path:
            yield
            return
        if self._f is None:
            self._f = open(self.path, "a")
            t = time.perf_counter()
            fcntl.flock(self._f, fcntl.LOCK_EX)
            self._since = time.perf_counter()
            if self._since - t > 1:
                log(f"waited {self._since - t:.0f} s for {self.path} ({what})")
        try:
            yield
        finally:
            if time.perf_counter() - self._since > self.budget:
                log(f"releasing {self.path} after {time.perf_counter() - self._since:.0f} s")
                self.release()


def wait_idle(threshold: float, max_wait: float) -> float:
    """Wait until the 1-minute load average is below threshold (at most max_wait s); return it."""
    t = time.perf_counter()
    while os.getloadavg()[0] >= threshold and time.perf_counter() - t < max_wait:
        time.sleep(5)
    return os.getloadavg()[0]


def _hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_child(cmd: list[str], env: dict | None = None, quiet: bool = False) -> tuple[str, float]:
    """Run cmd; its stdout and its peak RSS in GiB. The peak is the child's own VmHWM, polled
    while it runs (wait4's ru_maxrss would include this process's RSS at fork time)."""
    import threading

    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL if quiet else None, text=True,
                         env={**os.environ, **(env or {})})
    peak = [0]

    def poll():
        while p.poll() is None:
            peak[0] = max(peak[0], _hwm_kib(p.pid))
            time.sleep(0.2)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    out = []
    for line in p.stdout:
        out.append(line)
        if line.startswith("#"):
            print(line, end="", flush=True)
    p.wait()
    watcher.join()
    if p.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} {' '.join(cmd[1:3])}... exited with {p.returncode}")
    return "".join(out), peak[0] / 2**20


def last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


# ---------------------------------------------------------------- peer tool chains (cached, outside the repo)

def peer_python() -> Path:
    """A venv for the peers' Python packages that sees the project's venv (torch, transformers) behind its own."""
    venv = PEERS / "venv"
    py = venv / "bin" / "python"
    if not (py.exists() and subprocess.run([str(py), "-c", "import onnxruntime_genai, gguf"],
                                           capture_output=True).returncode == 0):
        log(f"creating {venv} (onnxruntime-genai {ORTGENAI_VERSION}, gguf {GGUF_VERSION})")
        subprocess.run([MAIN_PYTHON, "-m", "venv", str(venv)], check=True)
        site = subprocess.run([MAIN_PYTHON, "-c", "import site; print(site.getsitepackages()[0])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        (next((venv / "lib").glob("python3*")) / "site-packages" / "zz_project_venv.pth").write_text(site + "\n")
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"onnxruntime-genai=={ORTGENAI_VERSION}",
                        f"gguf=={GGUF_VERSION}"], check=True)
    return py


def llama_cpp_dir() -> Path:
    """llama.cpp from the llama-cpp-python sdist, built (nice, 2 jobs) for llama-bench/-quantize/-batched-bench."""
    src = PEERS / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"
    tools = ("llama-bench", "llama-quantize", "llama-batched-bench")
    if all((src / "build" / "bin" / t).exists() for t in tools):
        return src
    sdist = PEERS / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not sdist.exists():
        PEERS.mkdir(parents=True, exist_ok=True)
        subprocess.run([MAIN_PYTHON, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(PEERS)], check=True)
    if not src.exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(PEERS, filter="data")
    log(f"building llama.cpp in {src}/build (nice, -j2; tens of minutes on 2 cores)")
    nice = ["nice", "-n", "19"]
    subprocess.run([*nice, "cmake", "-S", str(src), "-B", str(src / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*nice, "cmake", "--build", str(src / "build"), "-j2", "--target", *tools], check=True,
                   stdout=subprocess.DEVNULL)
    return src


def ortgenai_model(checkpoint: Path, precision: str, threads: int, lock: Lock) -> Path:
    out = PEERS / "models" / f"{checkpoint.name}-ortgenai-{precision}"
    if not (out / "genai_config.json").exists():
        py = peer_python()
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        with lock.held(f"onnxruntime-genai builder {precision}"):
            log(f"onnxruntime-genai builder -p {precision} -e cpu -> {out}")
            t = time.perf_counter()
            subprocess.run(["nice", "-n", "10", str(py), "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint),
                            "-o", str(tmp), "-p", precision, "-e", "cpu", "-c", str(PEERS / "ortgenai-cache")],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            log(f"built in {time.perf_counter() - t:.0f} s")
        tmp.rename(out)
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    if opts.get("intra_op_num_threads") != threads:
        opts.update(intra_op_num_threads=threads, inter_op_num_threads=1)
        cfg_path.write_text(json.dumps(cfg, indent=4))
    return out


CONVERT_WRAPPER = r"""
import sys
sys.path.insert(0, sys.argv[1])
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
import conversion.base as base
# The benchmark checkpoint carries a small BPE tokenizer (token ids are fed directly), whose
# pre-tokenizer hash llama.cpp does not list; speed does not depend on it.
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


def gguf_model(checkpoint: Path, kind: str, lock: Lock) -> Path:
    models = PEERS / "models"
    out = models / f"{checkpoint.name}-{kind}.gguf"
    if out.exists():
        return out
    src = llama_cpp_dir()
    f16 = models / f"{checkpoint.name}-F16.gguf"
    if not f16.exists():
        # llama.cpp's converter only knows layer_types "attention"; transformers 5 writes
        # "full_attention" (GRANITE.md): convert from a copy whose config says "attention".
        view = models / f"{checkpoint.name}-llamacpp-view"
        view.mkdir(parents=True, exist_ok=True)
        for f in checkpoint.iterdir():
            if f.name != "config.json" and not (view / f.name).exists():
                (view / f.name).symlink_to(f)
        cfg = json.loads((checkpoint / "config.json").read_text())
        cfg["layer_types"] = ["attention" if t in ("attention", "full_attention") else t for t in cfg["layer_types"]]
        (view / "config.json").write_text(json.dumps(cfg, indent=2))
        with lock.held("llama.cpp convert"):
            log(f"convert_hf_to_gguf --outtype f16 -> {f16}")
            subprocess.run(["nice", "-n", "10", str(peer_python()), "-c", CONVERT_WRAPPER, str(src), str(view),
                            "--outtype", "f16", "--outfile", str(f16) + ".partial"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.rename(str(f16) + ".partial", f16)
    if kind != "F16":
        with lock.held(f"llama-quantize {kind}"):
            log(f"llama-quantize {kind} -> {out}")
            subprocess.run(["nice", "-n", "10", str(src / "build" / "bin" / "llama-quantize"), str(f16),
                            str(out) + ".partial", kind, "2"], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        os.rename(str(out) + ".partial", out)
    return out


# ---------------------------------------------------------------- workers (each its own process)

def worker_ours(artifact: str, threads: int, steps: int, graph: str | None = None) -> dict:
    import numpy as np

    from granite_deploy.engines import Chunk, load_engine

    rng = np.random.default_rng(0)
    if graph is None:
        engine = load_engine(artifact, max_batch=8, threads=threads)
    else:  # a named graph of the artifact (the CPU flavour next to the engine's default ragged one)
        from granite_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine

        engine = OnnxRuntimeEngine(artifact, max_batch=8, threads=threads, graph=graph)
    res = {"graph": getattr(engine, "graph_name", "?"), "rss_loaded_gib": rss_now_gib()}
    engine.reserve(100)
    engine.step([Chunk(100, (1, 2, 3, 4), 0)])  # warm-up
    engine.release(100)
    for n in (128, 1024):
        engine.reserve(0)
        t = time.perf_counter()
        engine.step([Chunk(0, tuple(rng.integers(0, 1000, n).tolist()), 0)])
        res[f"prefill_{n}"] = n / (time.perf_counter() - t)
        times = []
        for i in range(steps):
            t = time.perf_counter()
            engine.step([Chunk(0, (int(rng.integers(0, 1000)),), n + i)])
            times.append(time.perf_counter() - t)
        res[f"decode_b1_p{n}"] = 1 / statistics.median(times[1:])
        engine.release(0)
        print(f"#   ours: prefill {n}: {res[f'prefill_{n}']:.1f} tok/s, decode b1: {res[f'decode_b1_p{n}']:.2f} tok/s",
              flush=True)
    # batch 8 at past 128: the cache is filled with random values instead of prefilling 8 x 128
    # tokens (attention's cost does not depend on the values; the peers prefill for real).
    for s in range(8):
        engine.reserve(s)
    engine._grow(128 + steps + 1)
    common.fill_cache(engine, 8, 128, rng)
    for s in range(8):
        engine.slots.set_length(s, 128)
    times = []
    for i in range(steps):
        chunks = [Chunk(s, (int(rng.integers(0, 1000)),), 128 + i) for s in range(8)]
        t = time.perf_counter()
        engine.step(chunks)
        times.append(time.perf_counter() - t)
    res["decode_b8_p128"] = 8 / statistics.median(times[1:])
    return res


def worker_ortgenai(model: str, threads: int, steps: int) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    rng = np.random.default_rng(0)
    m = og.Model(model)
    res = {"version": og.__version__, "rss_loaded_gib": rss_now_gib()}

    def run(batch: int, n: int, key: str | None):
        params = og.GeneratorParams(m)
        params.set_search_options(max_length=n + steps + 2, batch_size=batch)
        gen = og.Generator(m, params)
        ids = rng.integers(0, 1000, (batch, n)).astype(np.int32)
        t = time.perf_counter()
        gen.append_tokens(ids)
        if key:
            res[key] = batch * n / (time.perf_counter() - t)
        times = []
        for _ in range(steps + 1):  # the first call only picks the token append_tokens computed
            t = time.perf_counter()
            gen.generate_next_token()
            times.append(time.perf_counter() - t)
        return batch / statistics.median(times[2:])

    run(1, 4, None)  # warm-up
    for n in (128, 1024):
        res[f"decode_b1_p{n}"] = run(1, n, f"prefill_{n}")
        print(f"#   onnxruntime-genai: prefill {n}: {res[f'prefill_{n}']:.1f} tok/s, "
              f"decode b1: {res[f'decode_b1_p{n}']:.2f} tok/s", flush=True)
    res["decode_b8_p128"] = run(8, 128, None)
    return res


def measure_llamacpp(src: Path, model: Path, threads: int, steps: int, repeats: int) -> dict:
    """llama-bench and llama-batched-bench. Weight repacking (llama.cpp's default) is tried first; where it
    dies with SIGILL or SIGSEGV (the 2026-12-02 hosts: Q8_0/Q4_0 repacking on their AVX-512/AMX Xeon VMs)
    the whole measurement is redone with repacking off, and the result says so."""
    try:
        return _measure_llamacpp(src, model, threads, steps, repeats, repack=True)
    except RuntimeError as e:
        signal = next((name for code, name in (("-4", "SIGILL"), ("-11", "SIGSEGV")) if f"exited with {code}" in str(e)),
                      None)
        if signal is None:
            raise
        log(f"llama.cpp {model.name}: {signal} with weight repacking; measuring with --repack 0 / --no-repack")
        return {**_measure_llamacpp(src, model, threads, steps, repeats, repack=False), "repack": f"off ({signal})"}


def _measure_llamacpp(src: Path, model: Path, threads: int, steps: int, repeats: int, repack: bool) -> dict:
    bin_ = src / "build" / "bin"
    res, rss = {}, 0.0
    common_args = ["-m", str(model), "-t", str(threads), "-r", str(repeats), "-o", "json",
                   *([] if repack else ["--repack", "0"])]
    out, r = run_child([str(bin_ / "llama-bench"), *common_args, "-p", "128,1024", "-n", "0"], quiet=True)
    rss = max(rss, r)
    for row in json.loads(out):
        res[f"prefill_{row['n_prompt']}"] = row["avg_ts"]
    out, r = run_child([str(bin_ / "llama-bench"), *common_args, "-p", "0", "-n", str(steps), "-d", "128,1024"],
                       quiet=True)
    rss = max(rss, r)
    for row in json.loads(out):
        res[f"decode_b1_p{row['n_depth']}"] = row["avg_ts"]
    out, r = run_child([str(bin_ / "llama-batched-bench"), "-m", str(model), "-t", str(threads), "-tb", str(threads),
                        "-c", "4096", "-npp", "128", "-ntg", str(steps), "-npl", "8", "--output-format", "jsonl",
                        *([] if repack else ["--no-repack"])],
                       quiet=True)
    rss = max(rss, r)
    res["decode_b8_p128"] = last_json(out)["speed_tg"]
    res["peak_rss_gib"] = rss
    print(f"#   llama.cpp{'' if repack else ' (no repack)'}: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()),
          flush=True)
    return res


# ---------------------------------------------------------------- the run

def params_read_per_token(checkpoint: Path) -> int:
    """Weights read by one decode step: every layer matrix once and the (tied) head once."""
    c = json.loads((checkpoint / "config.json").read_text())
    h, layers, i = c["hidden_size"], c["num_hidden_layers"], c.get("shared_intermediate_size") or c["intermediate_size"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    per_layer = h * (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * hd + c["num_attention_heads"] * hd * h \
        + 3 * h * i
    return layers * per_layer + c["vocab_size"] * h * (1 if c.get("tie_word_embeddings") else 2)


def measure_plan(plan: list, args, lock: Lock) -> list[dict]:
    """One timed run of every (width, label, kind, path) in plan, in order."""
    results = []
    for w, label, kind, path in plan:
        with lock.held(label):
            load = wait_idle(args.idle_load, args.max_wait)
            log(f"{label}: 1-min load {load:.2f} at start")
            t = time.perf_counter()
            try:
                if kind == "llamacpp":
                    res = measure_llamacpp(llama_cpp_dir(), path, args.threads, args.steps, args.repeats)
                    if "repack" in res:
                        label = f"{label} (repack {res['repack']})"
                else:
                    py = MAIN_PYTHON if kind.startswith("ours") else str(peer_python())
                    out, rss = run_child([py, __file__, "--worker", kind, str(path), str(args.threads), str(args.steps)])
                    res = last_json(out)
                    res["peak_rss_gib"] = max(rss, res.pop("peak_rss_self_gib", 0.0))
            except Exception as e:  # noqa: BLE001
                log(f"{label}: failed: {e}")
                res = {"error": str(e)}
            if kind.startswith("ours") and "graph" in res:
                label = f"{label.split(' decoder_cpu')[0]} ({res['graph']})"
            res.update(width=w, label=label, kind=kind, load=load, seconds=time.perf_counter() - t)
            results.append(res)
    return results


def best_of(rounds: list[list[dict]]) -> list[dict]:
    """Per runtime, each speed cell's best over the rounds; memory and load their highest (not flattered)."""
    merged = []
    for runs in zip(*rounds):
        ok = [r for r in runs if "error" not in r] or [runs[-1]]
        best = dict(ok[-1])
        for key, _ in COLUMNS:
            values = [r[key] for r in ok if key in r]
            if values:
                best[key] = max(values)
        for key in ("peak_rss_gib", "rss_loaded_gib", "load"):
            values = [r[key] for r in ok if key in r]
            if values:
                best[key] = max(values)
        best["rounds"] = len(ok)
        merged.append(best)
    return merged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="granite-4.0-1b")
    ap.add_argument("--checkpoint-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="dtype of the random checkpoint every runtime starts from: bfloat16, as every released "
                         "Granite 4.0 checkpoint is; float32 gives every weight a full fp32 mantissa")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16, help="decode steps per measurement (median)")
    ap.add_argument("--repeats", type=int, default=2, help="llama-bench repetitions")
    ap.add_argument("--widths", default="fp32,fp16,int8,int4")
    ap.add_argument("--runtimes", default="ours,ourscpu,oursalt,ortgenai,llamacpp",
                    help="ourscpu: our engine on the decoder_cpu graph, where the default is decoder_ragged; "
                         "oursalt: our other quantisation methods at a width (ALT_METHODS)")
    ap.add_argument("--idle-load", type=float, default=1.5, help="wait for a 1-minute load average below this")
    ap.add_argument("--max-wait", type=float, default=90, help="longest wait for an idle machine, s")
    ap.add_argument("--lock", default="/tmp/granite-bench.lock", help="shared benchmark lock ('' for none)")
    ap.add_argument("--lock-budget", type=float, default=480, help="longest hold of the lock before letting others in, s")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every runtime this many times, round after round, and keep each cell's best "
                         "(a shared host's noise is mostly one-sided: a neighbour only ever slows a run down)")
    ap.add_argument("--prepare-only", action="store_true", help="build every model, measure nothing")
    ap.add_argument("--worker", nargs=4, metavar=("KIND", "PATH", "THREADS", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        kind, path, threads, steps = args.worker
        fn = {"ours": worker_ours, "ortgenai": worker_ortgenai,
              "ourscpu": lambda *a: worker_ours(*a, graph="decoder_cpu"),
              "oursalt": worker_ours}[kind]
        res = fn(path, int(threads), int(steps))
        res["peak_rss_self_gib"] = _hwm_kib(os.getpid()) / 2**20
        print(json.dumps(res), flush=True)
        return

    lock = Lock(args.lock, args.lock_budget)
    widths = [w for w in args.widths.split(",") if w]
    runtimes = [r for r in args.runtimes.split(",") if r]
    print(f"# machine: {common.machine()}", flush=True)
    with lock.held("checkpoint/artifacts"):
        checkpoint = common.random_checkpoint(args.model, args.checkpoint_dtype)
        artifact = common.artifact_for(checkpoint)
        ours_art = {w: artifact if WIDTHS[w][0] is None else common.quantized_artifact(artifact, WIDTHS[w][0])
                    for w in widths if w != "fp16"}
        alt_art = {(w, m): common.quantized_artifact(artifact, m) for w in widths for m in ALT_METHODS.get(w, ())
                   if "oursalt" in runtimes}

    # Every model first (each step under the lock on its own), then the timed runs.
    plan = []  # (width, runtime label, kind, path)
    for w in widths:
        method, ogp, gg, _ = WIDTHS[w]
        if "ours" in runtimes and w in ours_art:
            plan.append((w, f"granite-deploy {w}", "ours", ours_art[w]))
            # The engine's default graph is decoder_ragged where the artifact has it: measure the
            # decoder_cpu flavour too (a row of its own, not a peer).
            from granite_deploy.artifact import load_manifest

            if "ourscpu" in runtimes and "decoder_ragged" in load_manifest(ours_art[w]).graphs:
                plan.append((w, f"granite-deploy {w} decoder_cpu", "ourscpu", ours_art[w]))
        for (aw, m), path in alt_art.items():
            if aw == w:
                plan.append((w, f"granite-deploy {ALT_LABEL.get(m, m)}", "oursalt", path))
        if "ortgenai" in runtimes and ogp:
            try:
                plan.append((w, f"onnxruntime-genai {ogp}", "ortgenai", ortgenai_model(checkpoint, ogp, args.threads, lock)))
            except Exception as e:  # noqa: BLE001 (a peer that cannot be built is reported, the rest runs)
                log(f"onnxruntime-genai {ogp}: build failed: {e}")
        if "llamacpp" in runtimes and gg:
            try:
                plan.append((w, f"llama.cpp {gg}", "llamacpp", gguf_model(checkpoint, gg, lock)))
            except Exception as e:  # noqa: BLE001
                log(f"llama.cpp {gg}: build failed: {e}")
    if args.prepare_only:
        lock.release()
        for p in plan:
            log(f"ready: {p[1]}: {p[3]}")
        return

    with lock.held("bandwidth"):
        wait_idle(args.idle_load, args.max_wait)
        gemv_bw = common.measure_bandwidth_gbs(args.threads)
        bw = max(gemv_bw, common.stream_read_gbs(args.threads))
    n_params = params_read_per_token(checkpoint)
    log(f"bandwidth {bw:.1f} GB/s (GEMV {gemv_bw:.1f}); {n_params / 1e9:.3f} G weights read per decode step")

    rounds = []
    for round_no in range(max(1, args.rounds)):
        if args.rounds > 1:
            log(f"round {round_no + 1} of {args.rounds}")
        rounds.append(measure_plan(plan, args, lock))
    results = best_of(rounds)

    def cell(r, key, fmt="{:.3g}"):
        return fmt.format(r[key]) if key in r else "–"

    print(f"\n{args.model} architecture, random weights saved as {args.checkpoint_dtype}, {args.threads} threads, {args.steps} decode steps "
          f"(median), tokens/s, best of {max(1, args.rounds)} interleaved round(s). Machine: {common.machine()}. Bandwidth {bw:.1f} GB/s; floor = weights read per "
          f"step ({n_params / 1e9:.2f} G) at the width's bits per weight (fp32 32, F16 16, 8-bit 8.5, 4-bit 4.5).")
    header = ["width", "runtime", *[c[1] for c in COLUMNS], "peak RSS GiB", "RSS after load GiB", "b1 % of floor",
              "load at start"]
    rows = []
    for r in results:
        floor_tps = bw * 1e9 / (n_params * WIDTHS[r["width"]][3] / 8)
        rows.append([WIDTH_LABEL[r["width"]], r["label"], *[cell(r, k) for k, _ in COLUMNS],
                     cell(r, "peak_rss_gib", "{:.1f}"), cell(r, "rss_loaded_gib", "{:.1f}"),
                     f"{r['decode_b1_p128'] / floor_tps:.0%}" if "decode_b1_p128" in r else "–", f"{r['load']:.1f}"])
    common.print_table("Side by side", header, rows)

    rows = []
    for w, kind in [(w, k) for w in widths for k in ("ours", "oursalt")]:
        mine = next((r for r in results if r["width"] == w and r["kind"] == kind), None)
        peers = [r for r in results if r["width"] == w and not r["kind"].startswith("ours")]
        if not mine or not peers:
            continue
        row = [WIDTH_LABEL[w] + ("" if kind == "ours" else f" ({mine['label'].split()[1]})")]
        for key, _ in COLUMNS:
            best = max(peers, key=lambda r: r.get(key, 0))
            row.append(f"{mine[key] / best[key]:.2f}x ({best['label'].split()[0]})" if key in mine and best.get(key)
                       else "–")
        best_rss = min((r["peak_rss_gib"] for r in peers if "peak_rss_gib" in r), default=None)
        row.append(f"{mine['peak_rss_gib'] / best_rss:.2f}x" if best_rss and "peak_rss_gib" in mine else "–")
        rows.append(row)
    common.print_table("granite-deploy / best peer at the same width (target >= 1.10x; RSS: lower is better)",
                       ["width", *[c[1] for c in COLUMNS], "peak RSS vs lowest peer"], rows)
    print("\nversions: onnxruntime-genai " + ORTGENAI_VERSION + ", llama.cpp from llama-cpp-python "
          + LLAMA_CPP_PYTHON_VERSION + "; load = 1-minute load average when the run started (2 cores)")
    lock.release()
    (PEERS / "last_run.json").write_text(json.dumps({"bandwidth_gbs": bw, "results": results, "rounds": rounds}, indent=1, default=str))


if __name__ == "__main__":
    main()
