# syntax=docker/dockerfile:1
#
# One image, both programs: `halfclose-operator` (the default command) and
# `halfclose-agent` (the chart's DaemonSet sets `command: [halfclose-agent]`).
#
#   make image            # docker build -t halfclose:dev .
#
# The builder stage verifies every dependency against the hashes pinned in
# requirements/*.txt, builds the halfclose wheel and installs it all into a
# virtualenv; the final stage copies only that virtualenv onto the same slim
# base: no compiler, no build backend, no pip cache, no source tree.

# Both stages must use the same Python: the virtualenv links to its interpreter.
ARG PYTHON_IMAGE=python:3.11.14-slim-trixie

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src

# Dependencies first, so this layer is rebuilt only when the pins change.
# --only-binary: every runtime dependency ships wheels for amd64 and arm64, so
# nothing is compiled and no toolchain is needed even here.
COPY requirements/ requirements/
RUN python -m venv /opt/build \
 && /opt/build/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: \
      -r requirements/build.txt \
 && python -m venv /opt/halfclose \
 && /opt/halfclose/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: \
      -r requirements/runtime.txt

COPY core/ core/
COPY agent/ agent/
COPY operator/ operator/
COPY cli/ cli/
# The project wheels are built with the pinned build backend (no isolated build
# environment fetched from the index), then installed without dependencies:
# they are all in place already: `pip check` proves the set is complete and the
# import proves both entry points load.
RUN /opt/build/bin/pip wheel --no-cache-dir --no-build-isolation --no-deps \
      --wheel-dir /wheels ./core ./agent ./operator ./cli \
 && /opt/halfclose/bin/pip install --no-cache-dir --no-index --no-deps /wheels/halfclose*.whl \
 && /opt/halfclose/bin/pip check \
 && /opt/halfclose/bin/python -c "import halfclose.agent.daemon.main, halfclose.operator.main"

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="halfclose" \
      org.opencontainers.image.description="Finds and fixes TCP connections leaked half-closed in service-mesh sidecars" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/halfclose/halfclose"

# The agent reads each pod's interception rules with the pod's own tools'
# formats: iptables-save and iptables-legacy-save (package iptables) and
# `nft -j list ruleset` (package nftables), run in the pod's network namespace
# through nsenter (util-linux, already in the base). Versions come from the
# pinned base image's Debian release; rebuilding picks up its security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables nftables \
 && rm -rf /var/lib/apt/lists/*

# The operator's user. The agent's pod spec runs it as root instead: only root
# keeps capabilities across exec (see charts/halfclose/templates/agent/daemonset.yaml).
RUN groupadd --system --gid 65532 halfclose \
 && useradd --system --uid 65532 --gid 65532 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin halfclose

COPY --from=builder /opt/halfclose /opt/halfclose
ENV PATH=/opt/halfclose/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 65532:65532
CMD ["halfclose-operator"]
