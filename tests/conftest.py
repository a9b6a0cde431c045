"""Shared fixtures: the stand-in checkpoint and its GGUF conversions, made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAND_IN = Path(os.environ.get("R7B_STAND_IN", ROOT / "tests" / "fixtures" / "tiny-r7b"))
HELD_OUT = ROOT / "tests" / "fixtures" / "held-out"


@pytest.fixture(scope="session")
def stand_in() -> Path:
    """The stand-in Hugging Face snapshot (tests/fixtures/tiny-r7b)."""
    if not (STAND_IN / "model.safetensors").exists():
        pytest.fail(f"stand-in model missing at {STAND_IN}: run `make fixture`")
    return STAND_IN


@pytest.fixture(scope="session")
def held_out_text() -> dict[str, str]:
    """Held-out English and Spanish text the stand-in never trained on."""
    return {lang: (HELD_OUT / f"{lang}.txt").read_text(encoding="utf-8") for lang in ("en", "es")}


@pytest.fixture(scope="session")
def gguf_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="session")
def stand_in_gguf(stand_in, gguf_dir):
    """Factory: outtype ('f32', 'f16', 'bf16') -> converted GGUF path, converted once per session."""
    from r7b.convert.convert import convert

    cache: dict[str, Path] = {}

    def get(outtype: str = "f16") -> Path:
        if outtype not in cache:
            cache[outtype] = convert(str(stand_in), gguf_dir / f"tiny-r7b-{outtype.upper()}.gguf",
                                     outtype=outtype, progress=False)
        return cache[outtype]

    return get


@pytest.fixture(scope="session")
def edited_gguf(tmp_path_factory):
    """Factory: (source GGUF, {key: (value, GGUFValueType)}, name, remove=keys) -> an edited copy.

    `"tokenizer.chat_template"` replaces all chat templates (a string, or gguf-py's list of
    {"name", "template"}); the tensors are copied untouched. Uses gguf-py's own metadata editor.
    """
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    folder = tmp_path_factory.mktemp("edited")

    def edit(source: Path, changes: dict, name: str, remove: tuple[str, ...] = ()) -> Path:
        reader = gguf.GGUFReader(source)
        arch = reader.fields["general.architecture"].contents()
        out = folder / name
        writer = gguf.GGUFWriter(out, arch=arch, endianess=reader.endianess)
        new = {key: MetadataDetails(vtype, value) for key, (value, vtype) in changes.items()}
        copy_with_new_metadata(reader, writer, new, list(remove))
        return out

    return edit


@pytest.fixture(scope="session")
def hf_tokenizer(stand_in):
    """The reference tokenizer, straight from tokenizer.json with the `tokenizers` library."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(stand_in / "tokenizer.json"))


@pytest.fixture(scope="session")
def hf_model(stand_in):
    """transformers' Cohere2ForCausalLM on the stand-in, in float32: the independent reference."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(2)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(stand_in), dtype=torch.float32)
    return model.eval()


_SECURITY_TALLY: list[tuple[str, str]] = []


@pytest.fixture(scope="session")
def security_tally():
    """`record(check, line)`: how many cases a fuzz or corpus tried, shown at the end of the run."""

    def record(check: str, line: str) -> None:
        _SECURITY_TALLY.append((check, line))

    return record


def pytest_terminal_summary(terminalreporter) -> None:
    if _SECURITY_TALLY:
        terminalreporter.section("security checks")
        for check, line in _SECURITY_TALLY:
            terminalreporter.write_line(f"{check}: {line}")
