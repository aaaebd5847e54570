# Prefect process worker for the `cpu` pool with the pipeline installed (CPU torch).
# Runs as a non-root user; LORA_RETRAIN_HOME is where prefect.yaml's pull step puts flow runs.
FROM python:3.11-slim
ENV LORA_RETRAIN_HOME=/opt/lora-retrain PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /opt/lora-retrain
COPY pyproject.toml requirements.lock README.md ./
COPY lora_core lora_core
COPY tasks tasks
COPY flows flows
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -c requirements.lock '.[postgres]' \
    && useradd --create-home --uid 10001 worker \
    && mkdir outputs && chown worker outputs
COPY configs configs
COPY data data
COPY prefect.yaml ./
USER worker
# --with-healthcheck serves http://localhost:8080/health for the compose health check.
CMD ["prefect", "worker", "start", "--pool", "cpu", "--type", "process", "--with-healthcheck"]
