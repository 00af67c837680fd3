# The cloud image: portfolio builder (trainer), cloud server, operator CLI and load generator.
# It installs prunefleet with the `cloud` extra (torch-pruning, matplotlib, torchvision, Pillow) and Fashion-MNIST from Debian.
#   docker build -f deploy/cloud.Dockerfile -t prunefleet-cloud:0.1.0 .
FROM python:3.12-slim-bookworm

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# Fashion-MNIST's IDX files, under /usr/share/datasets/fashion-mnist
RUN apt-get update \
 && apt-get install -y --no-install-recommends dataset-fashion-mnist \
 && rm -rf /var/lib/apt/lists/*

# the CPU build of torch first, so that the project's pin resolves against it
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /opt/prunefleet
COPY pyproject.toml README.md ./
COPY protos protos
COPY common common
COPY cloud cloud
COPY edge edge
COPY bench bench
RUN pip install ".[cloud]"

RUN useradd --system --uid 10001 --create-home prunefleet \
 && mkdir -p /var/lib/prunefleet/portfolio /var/lib/prunefleet/state /var/lib/prunefleet/cache \
 && chown -R prunefleet /var/lib/prunefleet
USER prunefleet
WORKDIR /var/lib/prunefleet
EXPOSE 50051 9100
CMD ["prunefleet", "--help"]
