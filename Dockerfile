# syntax=docker/dockerfile:1
# Two images from one file (compose.yaml builds both):
#   worker (the default, last stage): vLLM on CUDA plus hermes-worker[gpu];
#       entrypoint `hermes-worker run`, configured by HERMES_* env vars.
#   producer: slim Python plus hermes-worker[gateway] without an engine: the HTTP gateway,
#       the client, the queue CLI, producers/examples.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# vLLM's own CUDA image, at the release the `gpu` extra pins (vllm==0.32.0): pip finds the
# pin satisfied and keeps the base's CUDA build of vllm and torch.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0

FROM ${PYTHON_IMAGE} AS producer
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /opt/hermes-worker
COPY pyproject.toml README.md ./
COPY hermes_worker ./hermes_worker
COPY producers ./producers
RUN pip install --no-cache-dir ".[gateway]" \
    && useradd --uid 10001 --create-home hermes
USER hermes
CMD ["python", "producers/examples/chat_stream.py"]

FROM ${VLLM_IMAGE} AS worker
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HOME=/models/hf
WORKDIR /opt/hermes-worker
COPY pyproject.toml README.md ./
COPY hermes_worker ./hermes_worker
COPY producers ./producers
# /models/hf belongs to the worker's user, so a named volume mounted there is writable.
RUN python3 -m pip install --no-cache-dir ".[gpu]" \
    && useradd --uid 10001 --create-home hermes \
    && mkdir -p /models/hf && chown hermes:hermes /models/hf
USER hermes
# Fresh heartbeat in Redis = engine up and the runtime loop turning (hermes_worker/cli/health.py).
# Loading a 405B checkpoint takes many minutes: hence the long start period.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30m --retries=3 \
    CMD ["hermes-worker", "health"]
# Exec form: the worker is PID 1 and gets SIGTERM itself (graceful shutdown: running jobs get
# HERMES_SHUTDOWN_GRACE_S, the rest go back to the queue), and `hermes-worker health` finds
# it by its default name, <container host name>:1.
ENTRYPOINT ["hermes-worker", "run"]
