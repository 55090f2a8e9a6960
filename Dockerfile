# syntax=docker/dockerfile:1
#
# The flywheel image: the library, the Ray Serve app and the Airflow DAGs, on Python 3.11.
# One image runs every flywheel process: Ray head/workers (serving and training), the MLflow
# server and the Airflow components (the Helm chart and infra/docker-compose.yaml use it).
#
#   docker build -t flywheel:0.1.0 --build-arg CODE_VERSION=$(git rev-parse HEAD) .   # CPU
#   docker build -t flywheel:0.1.0-gpu --build-arg VARIANT=gpu .      # CUDA build of torch
#
# The GPU variant keeps the slim base: CUDA wheels of torch carry their own CUDA libraries, so
# the node only needs the NVIDIA driver and container toolkit.

ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

# cpu | gpu: which torch build to install.
ARG VARIANT=cpu
# Package index of that torch build; override for another CUDA line or a mirror.
ARG TORCH_INDEX_URL=""
# Packages to add beyond the project and its `k8s` extra (MLflow basic-auth, boto3 for S3).
ARG EXTRA_PACKAGES=""
# The commit this image is built from (e.g. --build-arg CODE_VERSION=$(git rev-parse HEAD)):
# recorded on every model version the image trains.
ARG CODE_VERSION=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

# torch first and exact: anything looser lets a dependency pull a different (multi-GB) build.
RUN set -eux; \
    index="${TORCH_INDEX_URL}"; \
    if [ -z "$index" ]; then \
      if [ "$VARIANT" = "gpu" ]; then index=https://download.pytorch.org/whl/cu128; \
      else index=https://download.pytorch.org/whl/cpu; fi; \
    fi; \
    pip install --index-url "$index" torch==2.13.0

# Dependencies and the package, before the DAGs so DAG edits rebuild only the last layers.
WORKDIR /opt/flywheel
COPY pyproject.toml README.md ./
COPY components ./components
COPY serving ./serving
RUN pip install ".[k8s]" ${EXTRA_PACKAGES}

COPY dags ./dags

# A non-root user (UID/GID 1000, as the Helm chart's securityContext expects) and the folders
# it writes: the flywheel home and the Airflow home.
RUN groupadd --gid 1000 flywheel \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash flywheel \
    && mkdir -p /var/lib/flywheel /opt/airflow \
    && chown flywheel:flywheel /var/lib/flywheel /opt/airflow

ENV FLYWHEEL_HOME=/var/lib/flywheel \
    FLYWHEEL_CODE_VERSION=${CODE_VERSION} \
    FLYWHEEL_DAGS_FOLDER=/opt/flywheel/dags \
    AIRFLOW_HOME=/opt/airflow \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/flywheel/dags \
    AIRFLOW__CORE__LOAD_EXAMPLES=False

USER 1000:1000
# Serve API, MLflow, Airflow API/UI, Ray dashboard.
EXPOSE 8000 5000 8080 8265
CMD ["flywheel", "--help"]
