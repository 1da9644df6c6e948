#!/usr/bin/env bash
# Idempotently builds llama.cpp's llama-server, llama-perplexity and llama-quantize for the benchmarks that
# compare strata with llama.cpp (benchmarks/serving.py, benchmarks/quantization.py): .bench/llama.cpp
# (git-ignored).
#
#   bash benchmarks/llama_cpp_env.sh
#
# The sources are the llama.cpp tree vendored in llama-cpp-python's source distribution on PyPI
# (`pip download --no-binary :all: llama-cpp-python==0.3.36`), so nothing but the package registry is needed.
# The build is not -march=native (GGML_NATIVE=OFF; a native build was seen to crash at thread-pool start on
# AMX machines): the x86 features are switched on one by one from what /proc/cpuinfo lists, so the binary
# still uses every vector unit of this CPU. A stamp names the version and the features; delete it to rebuild.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${LLAMA_CPP_DIR:-$ROOT/.bench/llama.cpp}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PIP="${PIP:-$ROOT/.venv/bin/python -m pip}"
TARGETS=(llama-server llama-perplexity llama-quantize)

flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
has() { [[ "$flags" == *" $1 "* ]]; }
onoff() { if has "$1"; then echo ON; else echo OFF; fi; }
FEATURES=(
    -DGGML_SSE42="$(onoff sse4_2)" -DGGML_AVX="$(onoff avx)" -DGGML_AVX2="$(onoff avx2)"
    -DGGML_FMA="$(onoff fma)" -DGGML_F16C="$(onoff f16c)" -DGGML_BMI2="$(onoff bmi2)"
    -DGGML_AVX_VNNI="$(onoff avx_vnni)" -DGGML_AVX512="$(onoff avx512f)"
    -DGGML_AVX512_VBMI="$(onoff avx512vbmi)" -DGGML_AVX512_VNNI="$(onoff avx512_vnni)"
    -DGGML_AVX512_BF16="$(onoff avx512_bf16)" -DGGML_AMX_TILE="$(onoff amx_tile)"
    -DGGML_AMX_INT8="$(onoff amx_int8)" -DGGML_AMX_BF16="$(onoff amx_bf16)"
)
STAMP="$DIR/.built-$VERSION-$(echo "${FEATURES[*]}" | sha256sum | cut -c1-12)"
if [[ -f "$STAMP" ]]; then
    echo "llama_cpp_env: $DIR is built (llama-cpp-python $VERSION's llama.cpp)"
    exit 0
fi

mkdir -p "$DIR"
SDIST="$DIR/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
    echo "llama_cpp_env: downloading llama-cpp-python $VERSION's source distribution"
    $PIP download --quiet --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$DIR"
fi
SRC="$DIR/src"
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    rm -rf "$SRC" "$DIR/unpacked"
    mkdir -p "$DIR/unpacked"
    tar xzf "$SDIST" -C "$DIR/unpacked"
    mv "$DIR/unpacked/llama_cpp_python-$VERSION/vendor/llama.cpp" "$SRC"
    rm -rf "$DIR/unpacked"
fi

echo "llama_cpp_env: configuring (${FEATURES[*]})"
cmake -S "$SRC" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF "${FEATURES[@]}" \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DBUILD_SHARED_LIBS=OFF >"$DIR/configure.log" 2>&1 \
    || { tail -30 "$DIR/configure.log"; exit 1; }
echo "llama_cpp_env: building ${TARGETS[*]} (several minutes on 2 cores)"
cmake --build "$DIR/build" --config Release -j "$(nproc)" --target "${TARGETS[@]}" >"$DIR/build.log" 2>&1 \
    || { tail -30 "$DIR/build.log"; exit 1; }
rm -f "$DIR"/.built-*
touch "$STAMP"
echo "llama_cpp_env: built $DIR/build/bin/{$(IFS=,; echo "${TARGETS[*]}")}"
