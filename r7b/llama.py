"""The thin llama.cpp layer: load a model, open a context, tokenize, route the log, pick threads.

Every part of the project that runs llama.cpp (the engine, `r7b imatrix`, `r7b eval`, `r7b bench`)
goes through these few calls, so a failure always comes back as one R7BError line with llama.cpp's
own reason, and every context is built the same way.
"""

from __future__ import annotations

import collections
import ctypes
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import llama_cpp as ll
from llama_cpp import _logger as llama_logger

from r7b.cohere2 import kv_type_id
from r7b.errors import R7BError
from r7b.memory import FULL_PRECISION_KV, flash_attn_path

FLASH_ATTN = {"auto": ll.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": ll.LLAMA_FLASH_ATTN_TYPE_ENABLED,
              "off": ll.LLAMA_FLASH_ATTN_TYPE_DISABLED}
_backend_ready = False


def resolve_flash_attn(flash_attn: str, kv_type: str = "f16", offloaded: bool = False,
                       n_ctx: int | None = None) -> str:
    """What "auto" means: llama.cpp's own choice where layers run on a GPU (Metal, CUDA), where
    flash attention wins; on the CPU, r7b.memory.flash_attn_path (off up to 32K tokens, much faster
    at depth; on beyond, and for a quantized V cache)."""
    path = flash_attn_path(flash_attn, kv_type, n_ctx)
    if flash_attn == "auto" and offloaded and kv_type in FULL_PRECISION_KV:
        return "auto"
    return path


def default_threads() -> int:
    """Physical-ish core count: llama.cpp decodes fastest with one thread per core."""
    return max(1, min(os.cpu_count() or 1, 8))


def init_backend(verbose: bool = False) -> None:
    global _backend_ready
    llama_logger.set_verbose(verbose)
    if not _backend_ready:
        ll.llama_backend_init()
        _backend_ready = True


class LlamaLog:
    """Routes llama.cpp's log for a while: per-tensor lines can drive a progress bar, errors are kept.

    Everything else is dropped, so a quantization shows one bar instead of a page of log. Nested
    captures pass every line on to the enclosing one.
    """

    _active: list["LlamaLog"] = []

    _STEP = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
    _ERROR = 4  # GGML_LOG_LEVEL_ERROR in this ggml (DEBUG=1, INFO=2, WARN=3)

    def __init__(self, progress: bool = False, desc: str = "") -> None:
        self.progress, self.desc = progress, desc
        self.bar: Any = None
        self.errors: list[str] = []
        self.recent: collections.deque[str] = collections.deque(maxlen=20)
        self.lines: list[str] = []
        self.keep_all = False
        self._callback = None
        self._saved: tuple[Any, Any] | None = None
        self._parent: LlamaLog | None = None

    def _on_log(self, level: int, text: bytes | None, _user: Any) -> None:
        line = (text or b"").decode("utf-8", "replace")
        if self.keep_all:
            self.lines.append(line)
        if line.strip():
            self.recent.append(line.strip())
            if level == self._ERROR:
                self.errors.append(line.strip())
        m = self._STEP.match(line)
        if m and self.progress:
            self._advance(int(m.group(1)), int(m.group(2)), m.group(3))
        if self._parent is not None:
            self._parent._on_log(level, text, _user)

    def _advance(self, done: int, total: int, name: str) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="tensor")
        self.bar.set_postfix_str(name, refresh=False)
        self.bar.update(done - self.bar.n)

    def __enter__(self) -> "LlamaLog":
        saved_cb, saved_ud = ll.llama_log_callback(), ctypes.c_void_p()
        ll.llama_log_get(ctypes.byref(saved_cb), ctypes.byref(saved_ud))
        self._saved = (saved_cb, saved_ud)
        self._callback = ll.llama_log_callback(self._on_log)
        ll.llama_log_set(self._callback, None)
        self._parent = LlamaLog._active[-1] if LlamaLog._active else None
        LlamaLog._active.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self in LlamaLog._active:
            LlamaLog._active.remove(self)
        if self._saved is not None:
            ll.llama_log_set(*self._saved)
        if self.bar is not None:
            self.bar.close()

    def text(self) -> str:
        return "".join(self.lines)

    def reason(self) -> str:
        """llama.cpp's own words for the last failure."""
        for line in reversed(self.recent):
            if "failed to quantize:" in line:
                return line.split("failed to quantize:", 1)[1].strip()
        lines = self.errors or list(self.recent)
        return lines[-1] if lines else "no reason given"


class LlamaModel:
    """A GGUF loaded by llama.cpp, with its vocabulary; `close()` frees it."""

    def __init__(self, path: str | os.PathLike, *, n_gpu_layers: int = 0, vocab_only: bool = False,
                 use_mmap: bool = True, configure: Callable[[Any], None] | None = None, verbose: bool = False,
                 placement: Any = None):
        """`placement` (an `r7b.rpc.Placement`) shares the layers between this CPU and RPC workers."""
        init_backend(verbose)
        self.path = Path(path)
        self.placement = placement
        self.offloaded = n_gpu_layers != 0
        params = ll.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers if n_gpu_layers >= 0 else 0x7FFFFFFF
        params.vocab_only = vocab_only
        params.use_mmap = use_mmap
        if placement is not None and not vocab_only:
            placement.configure(params)
        if configure is not None:
            configure(params)
        self._params = params  # keeps arrays it points to alive while loading
        with LlamaLog() as log:
            self.ptr = ll.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.ptr:
            raise R7BError(f"llama.cpp could not load {self.path}: {log.reason()}")
        self.vocab = ll.llama_model_get_vocab(self.ptr)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self.bos = ll.llama_vocab_bos(self.vocab)
        self.add_bos = bool(ll.llama_vocab_get_add_bos(self.vocab))
        self.n_swa = ll.llama_model_n_swa(self.ptr)

    def tokenize(self, text: str, *, special: bool, add_bos: bool = False) -> list[int]:
        """Tokenize; `special=False` keeps control-token text as plain text."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (ll.llama_token * cap)()
        n = ll.llama_tokenize(self.vocab, data, len(data), buf, cap, add_bos, special)
        if n < 0:
            raise R7BError("tokenization failed")
        return buf[:n]

    def token_text(self, token: int) -> bytes:
        return ll.llama_vocab_get_text(self.vocab, token)

    def token_texts(self) -> list[bytes]:
        return [self.token_text(i) for i in range(self.n_vocab)]

    def token_attr(self, token: int) -> int:
        return ll.llama_vocab_get_attr(self.vocab, token)

    def is_eog(self, token: int) -> bool:
        return bool(ll.llama_vocab_is_eog(self.vocab, token))

    def metadata(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = ll.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def new_context(self, *, n_ctx: int, n_batch: int = 512, n_threads: int | None = None, kv_type: str = "f16",
                    swa_full: bool = False, n_seq_max: int = 1, flash_attn: str = "auto",
                    cb_eval: Any = None, kv_unified: bool = False) -> Any:
        """A context on this model; one R7BError naming the size and cache type when llama.cpp refuses.

        `n_ctx` is the whole cache: with `n_seq_max` > 1 (and no `kv_unified`) each sequence gets
        an equal share of its own, as llama-server's slots do.
        """
        p = ll.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = p.n_ubatch = min(n_batch, n_ctx)
        p.n_threads = p.n_threads_batch = n_threads or default_threads()
        p.type_k = p.type_v = kv_type_id(kv_type)
        p.swa_full = swa_full
        p.n_seq_max = n_seq_max
        p.kv_unified = kv_unified
        p.flash_attn_type = FLASH_ATTN[resolve_flash_attn(flash_attn, kv_type, self.offloaded, n_ctx)]
        if cb_eval is not None:
            p.cb_eval, p.cb_eval_user_data = cb_eval, None
        with LlamaLog() as log:
            ctx = ll.llama_init_from_model(self.ptr, p)
        if not ctx:
            raise R7BError(f"llama.cpp could not create a context of {n_ctx} tokens with a {kv_type} KV cache "
                           f"for {self.path}: {log.reason()}")
        return ctx

    def close(self) -> None:
        if getattr(self, "ptr", None):
            ll.llama_model_free(self.ptr)
            self.ptr = None

    def __enter__(self) -> "LlamaModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def free_context(ctx: Any) -> None:
    if ctx:
        ll.llama_free(ctx)


class Batch:
    """A reusable `llama_batch` for one sequence's tokens at explicit positions."""

    def __init__(self, capacity: int, n_seq_max: int = 1):
        self.capacity = capacity
        self.ptr = ll.llama_batch_init(capacity, 0, n_seq_max)

    def fill(self, tokens: Sequence[int], start: int, outputs: Callable[[int], bool] | bool = False,
             seq: int = 0) -> Any:
        """Tokens at positions start, start+1, ...; `outputs(pos)` says which rows get logits."""
        b = self.ptr
        b.n_tokens = len(tokens)
        for j, tok in enumerate(tokens):
            pos = start + j
            b.token[j] = int(tok)
            b.pos[j] = pos
            b.n_seq_id[j] = 1
            b.seq_id[j][0] = seq
            b.logits[j] = outputs(pos) if callable(outputs) else outputs
        return b

    def close(self) -> None:
        if self.ptr is not None:
            ll.llama_batch_free(self.ptr)
            self.ptr = None

    def __enter__(self) -> "Batch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
