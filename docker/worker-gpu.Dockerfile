# Prefect process worker for the `gpu` pool: CUDA runtime + cuDNN, the CUDA build of torch and
# onnxruntime-gpu (CUDA execution provider). Runs `lora-train`; non-root user.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}
# The torch version comes from requirements.lock; this index holds its CUDA 12.8 build.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV LORA_RETRAIN_HOME=/opt/lora-retrain \
    LORA_TRAIN_OUTPUT_DIR=/var/lib/lora-train \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
WORKDIR /opt/lora-retrain
COPY pyproject.toml requirements.lock README.md ./
COPY lora_core lora_core
COPY tasks tasks
COPY flows flows
# onnxruntime and onnxruntime-gpu provide the same module: swap in the GPU build, same version.
RUN pip install --index-url ${TORCH_INDEX} "$(grep '^torch==' requirements.lock)" \
    && pip install -c requirements.lock '.[postgres]' \
    && ORT_VERSION="$(pip show onnxruntime | sed -n 's/^Version: //p')" \
    && pip uninstall -y onnxruntime \
    && pip install "onnxruntime-gpu==${ORT_VERSION}" \
    && python -c "import torch; assert torch.version.cuda, 'torch is a CPU build'" \
    && useradd --create-home --uid 10001 worker \
    && mkdir -p "${LORA_TRAIN_OUTPUT_DIR}" && chown worker "${LORA_TRAIN_OUTPUT_DIR}"
COPY configs configs
COPY prefect.yaml ./
USER worker
CMD ["prefect", "worker", "start", "--pool", "gpu", "--type", "process", "--with-healthcheck"]
