"""Command R7B's real vocabulary for the tests, rebuilt from the file llama.cpp ships.

llama.cpp's source (inside the llama-cpp-python source distribution of the installed version)
carries `models/ggml-vocab-command-r.gguf`: Command-R's tokenizer (256,000 tokens, 253,333 merges,
pre-tokenizer `command-r`), with `.inp` / `.out` files holding test strings and the ids Hugging
Face's tokenizer gives them. Command R7B uses the same vocabulary and merges with its own chat
tokens in Command-R's reserved range. From that file this module builds, once per llama-cpp-python
version, under the cache (never the repository):

- `tokenizer.json`: a Hugging Face byte-level BPE tokenizer (NFC, single digits, GPT-2 regex)
  carrying Command R7B's special tokens (`R7B_ADDED`);
- a Hugging Face checkpoint folder: a tiny Cohere2 model (256,000-row tied embedding) with that
  tokenizer, the project's chat templates and random weights.

Command-R's tokenizer marks its chat tokens `special: false`; the checkpoint keeps that, so the
converter has to make them CONTROL by their shape. Where R7B's own tokens go is inferred:
public code that handles R7B output shows `<|END_THINKING|>` 255020 and `<|START_RESPONSE|>`
255021, and the stand-in lists R7B's eight turn tokens in order, `<|START_THINKING|>` first, with
`<|EXTRA_8_TOKEN|>` as the only `EXTRA_*` token left: the eight take Command-R's `EXTRA_0..7`
slots (255019-255026), `<|NEW_FILE|>` takes `EXTRA_9` (255028) and the four FIM tokens the
first ids Command-R leaves unused (255029-255032).

The source distribution comes from pip's ordinary client when it is not cached
(`pip download --no-deps --no-binary :all: llama-cpp-python==VERSION`). Every cache entry is
written beside its final path and renamed into place, so a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
STAND_IN = ROOT / "tests" / "fixtures" / "tiny-r7b"
VOCAB = "ggml-vocab-command-r.gguf"
VOCAB_FILES = (VOCAB, VOCAB + ".inp", VOCAB + ".out")
MEMBER_DIR = "vendor/llama.cpp/models/"
CASE_SEPARATOR = "\n__ggml_vocab_test__\n"  # llama.cpp's tests/test-tokenizer-0.cpp
BUILD_REV = 1  # bump when what is built from the vocabulary changes

# GGUF token types (gguf-py's TokenType), without importing gguf at module import.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Command R7B's tokens that Command-R's vocabulary does not have, by id (see the module docstring).
R7B_ADDED = {
    255019: "<|START_THINKING|>",
    255020: "<|END_THINKING|>",
    255021: "<|START_RESPONSE|>",
    255022: "<|END_RESPONSE|>",
    255023: "<|START_ACTION|>",
    255024: "<|END_ACTION|>",
    255025: "<|START_TOOL_RESULT|>",
    255026: "<|END_TOOL_RESULT|>",
    255028: "<|NEW_FILE|>",
    255029: "<|BEGINNING_OF_PREFIX_FIM_TOKEN|>",
    255030: "<|BEGINNING_OF_MIDDLE_FIM_TOKEN|>",
    255031: "<|BEGINNING_OF_SUFFIX_FIM_TOKEN|>",
    255032: "<|END_OF_MIDDLE_FIM_TOKEN|>",
}
FIRST_CHAT_ID = 255000
N_VOCAB = 256000
BOS_ID, EOS_ID, PAD_ID = 5, 255001, 0

# The tiny model: the embedding (256,000 x HIDDEN) is nearly all of it.
MODEL_DIMS = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=32, num_hidden_layers=4, sliding_window=64, max_position_embeddings=8192)


class VocabUnavailable(RuntimeError):
    """The vocabulary could not be found or fetched; the message says what to do."""


# -- where things live ----------------------------------------------------------------------------


def cache_root() -> Path:
    return Path(os.environ.get("R7B_CACHE") or Path.home() / ".cache" / "r7b-edge")


def llama_cpp_version() -> str:
    import llama_cpp

    return llama_cpp.__version__


@contextmanager
def _staged_dir(target: Path) -> Iterator[Path]:
    """A fresh folder beside `target`, renamed to it when the block succeeds (atomic for readers)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part"))
    try:
        tmp.chmod(0o755)
        yield tmp
        if target.exists():  # another process finished first; theirs is as good as ours
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _staged_file(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- the source distribution and the three vocabulary files ----------------------------------------


def sdist_path(version: str) -> Path:
    """The cached llama-cpp-python sdist, downloaded with pip when it is missing."""
    folder = cache_root() / "sdist"
    for name in (f"llama_cpp_python-{version}.tar.gz", f"llama-cpp-python-{version}.tar.gz"):
        if (folder / name).is_file():
            return folder / name
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download.") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={version}", "-d", tmp]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise VocabUnavailable(f"could not run pip to download llama-cpp-python {version}'s source: {exc}") \
                from None
        got = sorted(Path(tmp).glob("*.tar.gz"))
        if run.returncode != 0 or not got:
            last = (run.stderr or run.stdout).strip().splitlines()
            why = last[-1] if last else f"pip exited {run.returncode}"
            raise VocabUnavailable(
                f"Command-R's vocabulary comes from llama-cpp-python {version}'s source distribution, which is "
                f"not in {folder} and could not be downloaded ({why}); "
                f"run `{' '.join(cmd[:-2])} -d {folder}` with network access once")
        target = folder / got[0].name
        os.replace(got[0], target)
    return target


def vocab_dir(version: str | None = None) -> Path:
    """~/.cache/r7b-edge/vocab/VERSION/ holding the .gguf, .inp and .out files, extracted once."""
    version = version or llama_cpp_version()
    target = cache_root() / "vocab" / version
    if all((target / f).is_file() for f in VOCAB_FILES):
        return target
    sdist = sdist_path(version)
    if target.exists():  # an incomplete folder from an older layout
        shutil.rmtree(target)
    wanted = {MEMBER_DIR + f: f for f in VOCAB_FILES}
    with _staged_dir(target) as tmp, tarfile.open(sdist, "r:gz") as tar:
        found = set()
        for member in tar:
            # members are `llama_cpp_python-VERSION/vendor/llama.cpp/models/...`; only plain files are taken,
            # written under names chosen here (never a path from the archive)
            inner = member.name.split("/", 1)[-1]
            if inner in wanted and member.isfile():
                data = tar.extractfile(member).read()
                (tmp / wanted[inner]).write_bytes(data)
                found.add(wanted[inner])
        missing = sorted(set(VOCAB_FILES) - found)
        if missing:
            raise VocabUnavailable(f"{sdist} has no {MEMBER_DIR}{missing[0]}")
    return target


def vocab_cases(folder: Path) -> list[tuple[str, list[int]]]:
    """The (text, ids) cases, parsed as llama.cpp's tests/test-tokenizer-0.cpp parses them."""
    raw = (folder / (VOCAB + ".inp")).read_bytes().decode("utf-8")
    texts, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(CASE_SEPARATOR, pos)
        if nxt < 0:
            texts.append(raw[pos:])
            break
        texts.append(raw[pos:nxt])
        pos = nxt + len(CASE_SEPARATOR)
    lines = (folder / (VOCAB + ".out")).read_bytes().decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(texts) != len(lines):
        raise AssertionError(f"{VOCAB}.inp has {len(texts)} cases but .out has {len(lines)}")
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


# -- reading GGUF vocabularies -------------------------------------------------------------------


_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def _parse_metadata(buf: bytes) -> tuple[dict, dict]:
    """(metadata, where each array's elements start) of a trusted GGUF file's bytes."""
    if buf[:4] != b"GGUF":
        raise ValueError("not a GGUF file")
    _version, _n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    pos = 24
    starts: dict[str, int] = {}

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        pos += 8 + n
        return buf[pos - n:pos].decode("utf-8")

    def value(vtype: int, key: str = ""):
        nonlocal pos
        if vtype == _STRING:
            return string()
        if vtype == _ARRAY:
            etype, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            starts[key] = pos
            if etype in _SCALAR_FORMATS:
                fmt = "<" + _SCALAR_FORMATS[etype] * count
                out = list(struct.unpack_from(fmt, buf, pos))
                pos += struct.calcsize(fmt)
                return out
            return [value(etype) for _ in range(count)]
        fmt = "<" + _SCALAR_FORMATS[vtype]
        (out,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return out

    meta = {}
    for _ in range(n_kv):
        key = string()
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        meta[key] = value(vtype, key)
    return meta, starts


def read_gguf_metadata(path: Path) -> dict:
    """All metadata of a (trusted) GGUF file, arrays decoded in full.

    gguf-py's GGUFReader takes ~20 s on a 256k vocabulary (it keeps numpy views of every string
    part); this reads the same keys in about half a second.
    """
    return _parse_metadata(Path(path).read_bytes())[0]


def with_token_types(src: Path, dst: Path, types: dict[int, int]) -> Path:
    """A copy of a GGUF file with some token types changed in place (everything else byte-identical)."""
    buf = bytearray(Path(src).read_bytes())
    meta, starts = _parse_metadata(bytes(buf))
    start = starts["tokenizer.ggml.token_type"]
    for token_id, kind in types.items():
        struct.pack_into("<i", buf, start + 4 * token_id, kind)
    dst.write_bytes(bytes(buf))
    return dst


def read_gguf_vocab(path: Path) -> dict:
    """tokens, token_type, merges, pre, bos_token_id, ... of a GGUF file (`tokenizer.ggml.*`, prefix dropped)."""
    return {k.removeprefix("tokenizer.ggml."): v for k, v in read_gguf_metadata(path).items()
            if k.startswith("tokenizer.ggml.") and k != "tokenizer.ggml.scores"}


# -- the tokenizer.json ----------------------------------------------------------------------------


def r7b_token_table(vocab: dict) -> tuple[list[str | None], dict[int, bool]]:
    """Command R7B's tokens by id (None: unused) and its added tokens with their `special` flags.

    Command-R's tokenizer marks the eight tokens before its chat tokens special and every `<|...|>`
    token not special; R7B's own chat tokens are given the same flags.
    """
    tokens: list[str | None] = list(vocab["tokens"])
    added: dict[int, bool] = {}
    for i, (text, kind) in enumerate(zip(vocab["tokens"], vocab["token_type"])):
        if kind == CONTROL or (kind == USER_DEFINED and i >= FIRST_CHAT_ID):
            if text.startswith("[PAD"):
                tokens[i] = None  # the old converter's padding, not in Command-R's tokenizer
            else:
                added[i] = i < FIRST_CHAT_ID  # <PAD> ... <EOP_TOKEN> special; the <|...|> ones not
    for i, text in R7B_ADDED.items():
        tokens[i] = text
        added[i] = False
    return tokens, dict(sorted(added.items()))


def build_tokenizer_json(vocab: dict) -> dict:
    """A Hugging Face tokenizer.json equal to Command R7B's (see the module docstring)."""
    tokens, added = r7b_token_table(vocab)
    model_vocab = {t: i for i, t in enumerate(tokens) if t is not None}
    merges = [m.split(" ") for m in vocab["merges"]]
    added_tokens = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
                     "normalized": False, "special": special} for i, special in added.items()]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<BOS_TOKEN>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<BOS_TOKEN>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<BOS_TOKEN>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<BOS_TOKEN>": {"id": "<BOS_TOKEN>", "ids": [BOS_ID], "tokens": ["<BOS_TOKEN>"]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": model_vocab, "merges": merges},
    }


def _dump(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, indent=1).encode("utf-8")


def tokenizer_json(version: str | None = None) -> Path:
    """The cached tokenizer.json built from the vocabulary file."""
    version = version or llama_cpp_version()
    src = vocab_dir(version)
    target = cache_root() / "vocab" / version / f"build-{BUILD_REV}" / "tokenizer.json"
    if not target.is_file():
        _staged_file(target, _dump(build_tokenizer_json(read_gguf_vocab(src / VOCAB))))
    return target


# -- the checkpoint ----------------------------------------------------------------------------------


def _templates() -> list[dict[str, str]]:
    from r7b.templates import TEMPLATE_NAMES, template_source

    return [{"name": n, "template": template_source(n)} for n in TEMPLATE_NAMES]


def model_config() -> dict:
    cfg = json.loads((STAND_IN / "config.json").read_text(encoding="utf-8"))
    cfg.update(MODEL_DIMS, vocab_size=N_VOCAB, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return cfg


def _token_entry(text: str) -> dict:
    return {"content": text, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def tokenizer_config(tok: dict) -> dict:
    decoder = {str(a["id"]): {**_token_entry(a["content"]), "special": a["special"]} for a in tok["added_tokens"]}
    return {"add_bos_token": True, "add_eos_token": False, "add_prefix_space": False,
            "added_tokens_decoder": decoder, "bos_token": "<BOS_TOKEN>", "eos_token": "<|END_OF_TURN_TOKEN|>",
            "pad_token": "<PAD>", "unk_token": None, "clean_up_tokenization_spaces": False, "legacy": True,
            "merges_file": None, "model_max_length": 131072, "sp_model_kwargs": {},
            "spaces_between_special_tokens": False, "tokenizer_class": "CohereTokenizer",
            "use_default_system_prompt": False, "vocab_file": None, "chat_template": _templates()}


def _bf16(values: np.ndarray) -> np.ndarray:
    bits = values.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def safetensors_head(shapes: dict[str, tuple[int, ...]]) -> bytes:
    """A bf16 safetensors file's length-prefixed JSON header, the tensors laid out in `shapes`' order."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head


def write_safetensors(path: Path, cfg: dict, seed: int = 0) -> None:
    """Random bf16 weights (matrices N(0, 0.02), norms 1) with transformers' names and shapes."""
    from r7b.cohere2 import Cohere2Dims

    rng = np.random.default_rng(seed)
    shapes = Cohere2Dims.from_hf_config(cfg).hf_weights()
    with open(path, "wb") as fh:
        fh.write(safetensors_head(shapes))
        for shape in shapes.values():
            if len(shape) == 1:
                data = np.full(shape, 0x3F80, dtype=np.uint16)
            else:
                data = _bf16(rng.standard_normal(shape, dtype=np.float32) * 0.02)
            fh.write(data.tobytes())


def checkpoint_dir(version: str | None = None) -> Path:
    """A cached Hugging Face checkpoint folder: tiny Cohere2, Command R7B's real tokenizer."""
    version = version or llama_cpp_version()
    tok_path = tokenizer_json(version)
    cfg = model_config()
    extra = tokenizer_config({"added_tokens": []})
    key = hashlib.sha256(json.dumps([cfg, extra], sort_keys=True).encode()).hexdigest()[:12]
    target = tok_path.parent / f"checkpoint-{key}"
    if (target / "model.safetensors").is_file():
        return target
    tok = json.loads(tok_path.read_bytes())
    with _staged_dir(target) as tmp:
        shutil.copyfile(tok_path, tmp / "tokenizer.json")
        (tmp / "config.json").write_bytes(_dump(cfg))
        (tmp / "generation_config.json").write_bytes(_dump(
            {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}))
        (tmp / "tokenizer_config.json").write_bytes(_dump(tokenizer_config(tok)))
        (tmp / "special_tokens_map.json").write_bytes(_dump(
            {"bos_token": _token_entry("<BOS_TOKEN>"), "eos_token": _token_entry("<|END_OF_TURN_TOKEN|>"),
             "pad_token": _token_entry("<PAD>")}))
        write_safetensors(tmp / "model.safetensors", cfg)
    return target


# -- the Hugging Face reference for a fenced prompt ----------------------------------------------------


class Reference:
    """Hugging Face's tokenization of a prompt whose data is plain text.

    `special` is the tokenizer with Command R7B's added tokens; `plain` the same model without
    them, so text that spells a token stays text. A rendered, fenced prompt (see runtime/protect.py)
    is encoded as Hugging Face encodes a prompt whose template wrote the added tokens: split at the
    added tokens the template wrote, and every stretch between two of them, data included, encoded
    as one plain text (NFC, then the pre-tokenizer, then BPE).
    """

    def __init__(self, tok_json: dict):
        from tokenizers import Tokenizer

        self.special = Tokenizer.from_str(json.dumps(tok_json))
        self.plain = Tokenizer.from_str(json.dumps({**tok_json, "added_tokens": []}))
        self.added = {a["content"]: a["id"] for a in tok_json["added_tokens"]}
        self._longest_first = sorted(self.added, key=len, reverse=True)

    def encode_plain(self, text: str) -> list[int]:
        return self.plain.encode(text, add_special_tokens=False).ids if text else []

    def segments(self, pieces: list[tuple[str, bool]]) -> list[tuple[str, int | None]]:
        """(text, id) for each added token the template wrote, (text, None) for the plain stretches."""
        out: list[tuple[str, int | None]] = []
        plain = ""
        for text, is_data in pieces:
            if is_data:
                plain += text
                continue
            pos = 0
            while pos < len(text):
                hit = min(((text.find(t, pos), t) for t in self._longest_first if text.find(t, pos) >= 0),
                          key=lambda x: (x[0], -len(x[1])), default=None)
                if hit is None:
                    plain += text[pos:]
                    break
                at, token = hit
                plain += text[pos:at]
                if plain:
                    out.append((plain, None))
                    plain = ""
                out.append((token, self.added[token]))
                pos = at + len(token)
        if plain:
            out.append((plain, None))
        return out

    def encode_pieces(self, pieces: list[tuple[str, bool]]) -> list[int]:
        ids: list[int] = []
        for text, token_id in self.segments(pieces):
            ids.extend([token_id] if token_id is not None else self.encode_plain(text))
        return ids


def nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


# -- fixtures ---------------------------------------------------------------------------------------


def _or_fail(build):
    try:
        return build()
    except VocabUnavailable as exc:
        problem = str(exc)
    pytest.fail(f"real vocabulary unavailable: {problem}", pytrace=False)


@pytest.fixture(scope="session")
def real_vocab_dir() -> Path:
    """Folder with ggml-vocab-command-r.gguf(.inp, .out) for the installed llama-cpp-python."""
    return _or_fail(vocab_dir)


@pytest.fixture(scope="session")
def real_vocab(real_vocab_dir) -> dict:
    """tokens, token_type, merges, pre, ... of ggml-vocab-command-r.gguf."""
    return read_gguf_vocab(real_vocab_dir / VOCAB)


@pytest.fixture(scope="session")
def real_tokenizer_json(real_vocab_dir) -> dict:
    return json.loads(_or_fail(tokenizer_json).read_bytes())


@pytest.fixture(scope="session")
def real_reference(real_tokenizer_json) -> Reference:
    return Reference(real_tokenizer_json)


@pytest.fixture(scope="session")
def real_checkpoint(real_vocab_dir) -> Path:
    return _or_fail(checkpoint_dir)


@pytest.fixture(scope="session")
def real_gguf(real_checkpoint, tmp_path_factory) -> Path:
    """The real-vocabulary checkpoint converted with the project's converter (this session's code)."""
    try:
        from r7b.convert.convert import convert
    except ImportError:  # the module's name before the restructure
        from r7b.convert.hf_to_gguf import convert
    return convert(str(real_checkpoint), tmp_path_factory.mktemp("realvocab") / "r7b-realvocab-F16.gguf",
                   outtype="f16", progress=False)
