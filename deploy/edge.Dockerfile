# The edge image: the agent serving with torch. prunefleet with the `edge` extra (torch, safetensors): no
# torch-pruning, no matplotlib, no dataset. The slim edge without torch is deploy/Dockerfile.edge-onnx.
#   docker build -f deploy/edge.Dockerfile -t prunefleet-edge:0.1.0 .
FROM python:3.12-slim-bookworm

ARG TORCH_VERSION=2.14.1
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# the CPU build of torch first, so that the project's pin resolves against it
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"

WORKDIR /opt/prunefleet
COPY pyproject.toml README.md ./
COPY protos protos
COPY common common
COPY cloud cloud
COPY edge edge
COPY bench bench
RUN pip install ".[edge]"

RUN useradd --system --uid 10001 --create-home prunefleet \
 && mkdir -p /var/lib/prunefleet/cache \
 && chown -R prunefleet /var/lib/prunefleet
USER prunefleet
WORKDIR /var/lib/prunefleet
EXPOSE 50061 9101
CMD ["prunefleet-edge", "--help"]
