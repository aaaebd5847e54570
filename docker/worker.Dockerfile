# Prefect process worker with the pipeline installed (CPU). Runs as a non-root user.
FROM python:3.11-slim
ENV LORA_RETRAIN_HOME=/opt/lora-retrain PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /opt/lora-retrain
COPY pyproject.toml requirements.lock README.md ./
COPY lora_core lora_core
COPY tasks tasks
COPY flows flows
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -c requirements.lock . \
    && useradd --create-home --uid 10001 worker
COPY configs configs
COPY data data
COPY prefect.yaml ./
USER worker
