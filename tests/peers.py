"""Where `make peers` put llama.cpp's own tools (llama-bench, llama-server, ...), the yardstick.

scripts/peers.sh builds them from the same llama-cpp-python source distribution the project runs on,
into ``$R7B_CACHE/peers/<version>/bin`` (default ``~/.cache/r7b-edge``), with a ``STAMP`` file whose
first line is ``llama-cpp-python <version>``. ``peer_binary(name)`` finds one for the installed
llama_cpp, or says to run `make peers`.

    from peers import peer_binary          # tests/ is on sys.path under pytest
    subprocess.run([peer_binary("llama-bench"), "-m", model, "-o", "json"], check=True)

Run as a script to print a path: ``python tests/peers.py llama-bench``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TOOLS = (
    "llama-bench",
    "llama-server",
    "llama-perplexity",
    "llama-quantize",
    "llama-imatrix",
    "llama-batched-bench",
    "ggml-rpc-server",
    "rpc-server",  # a link to ggml-rpc-server, the name llama.cpp's docs use
)


class PeersNotBuilt(FileNotFoundError):
    """llama.cpp's tools for this llama-cpp-python version are not in the cache: run `make peers`."""


def cache_root() -> Path:
    return Path(os.environ.get("R7B_CACHE") or Path.home() / ".cache" / "r7b-edge")


def installed_version() -> str:
    """The installed llama-cpp-python's version (``llama_cpp.__version__``)."""
    import llama_cpp

    return llama_cpp.__version__


def peers_dir(version: str | None = None) -> Path:
    """``$R7B_CACHE/peers/<version>``, checked to hold a finished build of that version."""
    version = version or installed_version()
    root = cache_root() / "peers" / version
    stamp = root / "STAMP"
    try:
        first = stamp.read_text(encoding="utf-8").splitlines()[0]
    except (OSError, IndexError):
        first = ""
    if first != f"llama-cpp-python {version}":
        raise PeersNotBuilt(
            f"llama.cpp's tools for llama-cpp-python {version} are not built in {root}: run `make peers`"
        )
    return root


def peer_binary(name: str, version: str | None = None) -> Path:
    """Path of llama.cpp's tool ``name`` (e.g. ``llama-bench``) built for the installed llama_cpp."""
    if name not in TOOLS:
        raise ValueError(f"unknown llama.cpp tool {name!r}; `make peers` builds {', '.join(TOOLS)}")
    path = peers_dir(version) / "bin" / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise PeersNotBuilt(f"{path} is missing or not executable: run `make peers` again")
    return path


if __name__ == "__main__":
    try:
        for tool in sys.argv[1:] or TOOLS:
            print(peer_binary(tool))
    except (PeersNotBuilt, ValueError) as e:
        sys.exit(f"peers: error: {e}")
