# syntax=docker/dockerfile:1
#
# Two images from one file, one per program, each with only what it runs:
#
#   docker build --target agent    -t halfclose-agent:dev .     # CMD halfclose-agent
#   docker build --target operator -t halfclose-operator:dev .  # CMD halfclose-operator
#   make image                                                  # both
#
#   agent    = halfclose-core + halfclose-agent + halfclose (the node CLI, for
#              `kubectl exec ... halfclose scan`) + requirements/agent.txt; the
#              iptables/nft tools it reads pods' rules with. No kopf, no
#              kubernetes client (the agent speaks to the API server itself).
#   operator = halfclose-core + halfclose-operator + requirements/operator.txt.
#              No pyroute2, no iptables/nftables.
#
# The builder stage builds the four halfclose wheels with the pinned build
# backend; each program's stage then verifies its dependencies against the
# hashes pinned in requirements/<program>.txt and installs them and its wheels
# into a virtualenv; each final stage copies only that virtualenv onto the same
# slim base: no compiler, no build backend, no pip cache, no source tree.

# Every stage must use the same Python: the virtualenvs link to its interpreter.
# Pinned by digest: a tag can be re-pushed, a digest names one image for good.
ARG PYTHON_IMAGE=python:3.11.14-slim-trixie@sha256:193fdd0bbcb3d2ae612bd6cc3548d2f7c78d65b549fcaa8af75624c47474444d

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src

# The pins first, so these layers are rebuilt only when the pins change.
# --only-binary: every runtime dependency ships wheels for amd64 and arm64, so
# nothing is compiled and no toolchain is needed even here.
COPY requirements/ requirements/
RUN python -m venv /opt/build \
 && /opt/build/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: \
      -r requirements/build.txt

# The four distributions of the halfclose namespace package, built with the
# pinned build backend (no isolated build environment fetched from the index).
COPY core/ core/
COPY agent/ agent/
COPY operator/ operator/
COPY cli/ cli/
RUN /opt/build/bin/pip wheel --no-cache-dir --no-build-isolation --no-deps \
      --wheel-dir /wheels ./core ./agent ./operator ./cli

# Each program's virtualenv: its pinned dependencies, then its wheels without
# dependencies (they are all in place already): `pip check` proves the set is
# complete, the import proves the entry points load, and the last check proves
# the other program's stack stayed out. `python -P`: the working directory (the
# build context, with its top-level operator/ folder) never goes on sys.path.
FROM builder AS agent-venv
RUN python -m venv /opt/halfclose \
 && /opt/halfclose/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: \
      -r requirements/agent.txt \
 && /opt/halfclose/bin/pip install --no-cache-dir --no-index --no-deps \
      /wheels/halfclose_core-*.whl /wheels/halfclose_agent-*.whl /wheels/halfclose-[0-9]*.whl \
 && /opt/halfclose/bin/pip check \
 && /opt/halfclose/bin/python -P -c "import halfclose.agent.daemon.main, halfclose.cli.main" \
 && if /opt/halfclose/bin/python -P -c "import kopf" 2>/dev/null; then exit 1; fi \
 && if /opt/halfclose/bin/python -P -c "import kubernetes" 2>/dev/null; then exit 1; fi

FROM builder AS operator-venv
RUN python -m venv /opt/halfclose \
 && /opt/halfclose/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: \
      -r requirements/operator.txt \
 && /opt/halfclose/bin/pip install --no-cache-dir --no-index --no-deps \
      /wheels/halfclose_core-*.whl /wheels/halfclose_operator-*.whl \
 && /opt/halfclose/bin/pip check \
 && /opt/halfclose/bin/python -P -c "import halfclose.operator.main" \
 && if /opt/halfclose/bin/python -P -c "import pyroute2" 2>/dev/null; then exit 1; fi

# What both images share: labels, the unprivileged user, the environment.
FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.description="Finds and fixes TCP connections leaked half-closed in service-mesh sidecars" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/halfclose/halfclose"
# The operator's user. The agent's pod spec runs it as root instead: only root
# keeps capabilities across exec (see charts/halfclose/templates/agent/daemonset.yaml).
RUN groupadd --system --gid 65532 halfclose \
 && useradd --system --uid 65532 --gid 65532 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin halfclose
ENV PATH=/opt/halfclose/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

FROM runtime AS agent
LABEL org.opencontainers.image.title="halfclose-agent"
# The agent reads each pod's interception rules with the pod's own tools'
# formats: iptables-save and iptables-legacy-save (package iptables) and
# `nft -j list ruleset` (package nftables), run in the pod's network namespace
# through nsenter (util-linux, already in the base). Versions come from the
# pinned base image's Debian release; rebuilding picks up its security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables nftables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=agent-venv /opt/halfclose /opt/halfclose
USER 65532:65532
CMD ["halfclose-agent"]

# Last, so a plain `docker build .` gives the operator (as before the split).
FROM runtime AS operator
LABEL org.opencontainers.image.title="halfclose-operator"
COPY --from=operator-venv /opt/halfclose /opt/halfclose
USER 65532:65532
CMD ["halfclose-operator"]
