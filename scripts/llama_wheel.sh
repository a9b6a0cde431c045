#!/usr/bin/env bash
# Builds llama-cpp-python from its source distribution with llama.cpp's RPC backend on, into a wheel
# cache outside the repository; reused while it is there and has RPC. Prints the wheel's path.
set -euo pipefail
version=${1:?usage: llama_wheel.sh VERSION}
cache=${R7B_CACHE:-$HOME/.cache/r7b-edge}
wheels="$cache/wheels"
python=${PYTHON:-python3}
mkdir -p "$wheels"

# The listing is read whole first: `grep -q` stopping early would make pipefail report a failure.
has_rpc() { local listing; listing=$("$python" -m zipfile -l "$1" 2>/dev/null) && grep -q 'libggml-rpc' <<<"$listing"; }

wheel=$(ls "$wheels"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -n1 || true)
if [ -n "$wheel" ] && ! has_rpc "$wheel"; then
  echo "llama_wheel: $wheel was built without the RPC backend; rebuilding it" >&2
  rm -f "$wheel"
  wheel=""
fi
if [ -z "$wheel" ]; then
  echo "llama_wheel: building llama-cpp-python $version with -DGGML_RPC=ON (about 12 minutes on 2 cores)" >&2
  tmp=$(mktemp -d "$wheels/.build.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  # --no-cache-dir: pip's own wheel cache ignores CMAKE_ARGS and could hand back a build without RPC.
  CMAKE_ARGS="${CMAKE_ARGS:-} -DGGML_RPC=ON" "$python" -m pip wheel -q --no-cache-dir --no-deps \
    --no-binary llama-cpp-python "llama-cpp-python==$version" -w "$tmp" >&2
  built=$(ls "$tmp"/llama_cpp_python-*.whl)
  has_rpc "$built" || { echo "llama_wheel: error: the build has no libggml-rpc" >&2; exit 1; }
  mv "$built" "$wheels/"
  wheel="$wheels/$(basename "$built")"
fi
echo "$wheel"
