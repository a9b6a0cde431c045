#!/usr/bin/env bash
# Builds llama.cpp's own tools (llama-bench, llama-server, llama-perplexity, ...) as a yardstick,
# from the same llama-cpp-python source distribution the project runs on, into a cache outside the
# repository:  $R7B_CACHE/peers/<version>/bin/<tool>  plus  $R7B_CACHE/peers/<version>/STAMP.
# Nothing is downloaded prebuilt; once the sdist is cached the build runs offline. Rebuilt only
# when the version (or the cmake flags below) change; the finished tree appears in one rename.
#
# usage: scripts/peers.sh [VERSION]
#   VERSION defaults to the llama_cpp installed in .venv, else $LLAMA_CPP_VERSION, else the pin
#   in pyproject.toml.
set -euo pipefail

say() { echo "peers: $*" >&2; }
die() { echo "peers: error: $*" >&2; exit 1; }

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${R7B_CACHE:-$HOME/.cache/r7b-edge}
peers="$cache/peers"
sdists="$cache/sdist"

# --- which version -------------------------------------------------------------------------
version=${1:-}
source_of_version="argument"
if [ -z "$version" ] && [ -x "$root/.venv/bin/python" ]; then
  version=$("$root/.venv/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null || true)
  source_of_version=".venv's llama_cpp"
  if [ -n "$version" ] && [ -n "${LLAMA_CPP_VERSION:-}" ] && [ "$version" != "$LLAMA_CPP_VERSION" ]; then
    say "note: .venv has llama-cpp-python $version, LLAMA_CPP_VERSION is $LLAMA_CPP_VERSION; building $version"
  fi
fi
if [ -z "$version" ] && [ -n "${LLAMA_CPP_VERSION:-}" ]; then
  version=$LLAMA_CPP_VERSION
  source_of_version="LLAMA_CPP_VERSION"
fi
if [ -z "$version" ]; then
  version=$(sed -n 's/.*"llama-cpp-python[>=~]=\{1,2\}\([0-9][0-9a-z.]*\).*/\1/p' "$root/pyproject.toml" | head -n1)
  source_of_version="pyproject.toml"
fi
[ -n "$version" ] || die "cannot tell which llama-cpp-python version to build; pass it: scripts/peers.sh 0.3.36"
case $version in *[!0-9A-Za-z.+-]*) die "odd version string '$version'" ;; esac

# --- what to build, and how ----------------------------------------------------------------
targets=(llama-bench llama-server llama-perplexity llama-quantize llama-imatrix llama-batched-bench ggml-rpc-server)
# Offline and self-contained: static libraries; no prebuilt web UI from the Hugging Face bucket
# (LLAMA_USE_PREBUILT_UI), no npm, no OpenSSL (the peers never fetch models). LLAMA_CURL is gone
# from llama.cpp at this version (cmake warns "deprecated and will be ignored"), so it is not passed.
flags=(
  -DCMAKE_BUILD_TYPE=Release
  -DBUILD_SHARED_LIBS=OFF
  -DGGML_NATIVE=ON
  -DGGML_RPC=ON
  -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_EXAMPLES=OFF
  -DLLAMA_BUILD_APP=OFF
  -DLLAMA_BUILD_SERVER=ON
  -DLLAMA_BUILD_UI=OFF
  -DLLAMA_USE_PREBUILT_UI=OFF
  -DLLAMA_OPENSSL=OFF
)
jobs=${PEERS_JOBS:-${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}}

dest="$peers/$version"
stamp_text=$(printf 'llama-cpp-python %s\ncmake %s\ntargets %s\n' "$version" "${flags[*]}" "${targets[*]}")

up_to_date() {
  [ -f "$dest/STAMP" ] || return 1
  # the stamp's first three lines are what decides; the rest (date, host) is information
  [ "$(head -n3 "$dest/STAMP")" = "$stamp_text" ] || return 1
  local t
  for t in "${targets[@]}"; do [ -x "$dest/bin/$t" ] || return 1; done
}

if up_to_date; then
  say "llama.cpp tools of llama-cpp-python $version are up to date in $dest/bin"
  exit 0
fi

mkdir -p "$peers"
exec 9>"$peers/.lock"
flock -n 9 || { say "another peers build is running; waiting for it"; flock 9; }
if up_to_date; then   # the build we waited for did it
  say "llama.cpp tools of llama-cpp-python $version are up to date in $dest/bin"
  exit 0
fi

for tool in cmake c++ tar; do
  command -v "$tool" >/dev/null || die "'$tool' is not installed; llama.cpp's tools need cmake and a C/C++ compiler"
done

# --- the source distribution ---------------------------------------------------------------
sdist="$sdists/llama_cpp_python-$version.tar.gz"
if [ ! -f "$sdist" ]; then
  say "fetching the source distribution of llama-cpp-python $version into $sdists"
  mkdir -p "$sdists"
  python=${PYTHON:-python3}
  [ -x "$root/.venv/bin/python" ] && python="$root/.venv/bin/python"
  "$python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$sdists" >&2 \
    || die "no source distribution of llama-cpp-python $version in $sdists and pip could not download it"
  [ -f "$sdist" ] || die "pip downloaded no $sdist"
fi

# --- build ---------------------------------------------------------------------------------
# The work tree is kept if the build stops half-way, so a rerun resumes; it goes on success.
work="$peers/.work-$version"
src="$work/src"
build="$work/build"
log="$work/build.log"
mkdir -p "$work"
: >"$log"
start=$(date +%s)
say "building llama.cpp tools of llama-cpp-python $version (version from $source_of_version) with $jobs jobs"
say "log: $log"

if [ ! -f "$src/.extracted" ]; then
  say "unpacking vendor/llama.cpp from $(basename "$sdist")"
  rm -rf "$src"
  mkdir -p "$src"
  tar -xzf "$sdist" -C "$src" --strip-components=3 "llama_cpp_python-$version/vendor/llama.cpp" \
    || die "$sdist has no vendor/llama.cpp"
  touch "$src/.extracted"
fi

generator=()
if command -v ninja >/dev/null; then
  generator=(-G Ninja)
  # a build tree configured with the other generator cannot be reused
  grep -q 'CMAKE_GENERATOR:INTERNAL=Ninja' "$build/CMakeCache.txt" 2>/dev/null || rm -rf "$build"
fi

resumed=""
[ -f "$build/CMakeCache.txt" ] && resumed=", resuming an interrupted build"
say "configuring (cmake ${flags[*]})"
cmake -S "$src" -B "$build" "${generator[@]}" "${flags[@]}" >>"$log" 2>&1 \
  || { tail -n 20 "$log" >&2; die "cmake configure failed for llama-cpp-python $version (full log: $log)"; }

say "compiling ${targets[*]} (about 13 minutes on 2 cores)"
# ninja's [n/N] lines are the progress; the whole output also goes to the log
if ! cmake --build "$build" --config Release --target "${targets[@]}" -j "$jobs" 2>&1 | tee -a "$log" >&2; then
  die "compiling llama.cpp's tools failed for llama-cpp-python $version (full log: $log)"
fi

# --- install atomically: stage next to the destination, stamp last, one rename ---------------
stage=$(mktemp -d "$peers/.stage-$version.XXXXXX")
trap 'rm -rf "$stage"' EXIT
chmod 755 "$stage"
mkdir -p "$stage/bin"
for t in "${targets[@]}"; do
  [ -x "$build/bin/$t" ] || die "the build produced no $build/bin/$t"
  cp "$build/bin/$t" "$stage/bin/$t"
done
ln -s ggml-rpc-server "$stage/bin/rpc-server"   # the name llama.cpp's docs use
# it runs: prints its usage for --help (llama-quantize exits 1 after it; not found/crash is >= 126)
for t in "${targets[@]}"; do
  rc=0; out=$("$stage/bin/$t" --help 2>&1 </dev/null) || rc=$?
  [ "$rc" -lt 126 ] && [ -n "$out" ] || die "$t was built but does not run (--help gave exit status $rc)"
done
{
  echo "$stamp_text"
  echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m) in $(( $(date +%s) - start ))s$resumed, from $(basename "$sdist")"
  echo "compiler $(c++ --version | head -n1)"
} >"$stage/STAMP"

old="$peers/.old-$version.$$"
[ -e "$dest" ] && mv "$dest" "$old"
mv "$stage" "$dest"
trap - EXIT
rm -rf "$old" "$work"
say "done in $(( $(date +%s) - start ))s: $dest/bin"
ls -l "$dest/bin" >&2
