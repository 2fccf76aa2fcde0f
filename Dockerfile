# One image for every Selaras process: `selaras serve profile`, `selaras serve recommend`, `selaras train`,
# `selaras personas`, and `dask worker` for distributed training. Build from the repository root:
#   docker build -t selaras:latest .

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies first (pinned by constraints.txt), so code changes do not re-download them.
COPY pyproject.toml constraints.txt README.md ./
COPY services ./services
# hadolint ignore=DL3013
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade pip \
    && /opt/venv/bin/pip install -c constraints.txt ".[dask]"

FROM python:3.11-slim
# LightGBM needs OpenMP at run time; the slim image does not have it. Debian's current security build is wanted,
# so the version is not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 selaras \
    && useradd --system --uid 10001 --gid selaras --home-dir /app --shell /usr/sbin/nologin selaras \
    && mkdir -p /data \
    && chown selaras:selaras /data
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY feature_repo ./feature_repo
COPY experiments.yaml ./experiments.yaml
# The package is installed into site-packages, so the repository paths are given explicitly. HOME is /tmp:
# the root filesystem may be read-only (Kubernetes), and DuckDB and Feast keep small caches under HOME.
# Fails closed: production by default (no start without SELARAS_API_KEYS); development (no auth) only when
# asked for with `-e SELARAS_ENVIRONMENT=development`.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    SELARAS_ENVIRONMENT=production \
    SELARAS_DATA_DIR=/data \
    SELARAS_FEATURE_REPO=/app/feature_repo \
    RECOMMEND_EXPERIMENTS_FILE=/app/experiments.yaml \
    SELARAS_PORT=8002
USER 10001:10001
VOLUME ["/data"]
EXPOSE 8001 8002
# Alive = the process answers /healthz on its port (SELARAS_PORT: 8001 profile, 8002 recommend).
HEALTHCHECK --interval=15s --timeout=3s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('SELARAS_PORT', '8002')}/healthz\", timeout=2)"]
ENTRYPOINT ["selaras"]
CMD ["serve", "recommend", "--host", "0.0.0.0", "--port", "8002"]
