# openbagel: the OpenAI-compatible server with the embedded Shapes model.
#   CPU:  docker build -t openbagel .
#   CUDA: docker build -t openbagel:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#         docker run --gpus all -p 8000:8000 openbagel:cuda
# The CUDA wheels bundle the CUDA runtime; the host needs the NVIDIA driver and container toolkit.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/hf

RUN useradd --create-home --uid 1000 bagel \
    && mkdir -p /data \
    && chown bagel:bagel /data

WORKDIR /app
# torch first, from the index that matches the hardware; the rest from PyPI.
RUN pip install --index-url "${TORCH_INDEX}" "torch>=2.5,<2.15"
COPY pyproject.toml README.md ./
COPY openbagel ./openbagel
# This package itself; its dependency ranges are in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[serve]"

USER 1000:1000
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# Inside a container the server must bind all interfaces to be reachable through -p;
# publish the port on the host's loopback (-p 127.0.0.1:8000:8000) unless you mean to expose it.
ENTRYPOINT ["openbagel", "serve", "--host", "0.0.0.0", "--port", "8000", "--sessions-db", "/data/sessions.sqlite3"]
CMD []
