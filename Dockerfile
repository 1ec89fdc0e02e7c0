# lora-registry image: one image for the API server, the migration job and the merge worker
# (docker-compose.yml picks the command). CPU-only torch keeps it a few hundred MB, not GBs.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src

# torch first, from the CPU index: resolving `.[all]` against PyPI alone would pull the multi-GB
# CUDA build. Its own layer, so code changes don't re-download it.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# Only what the package needs, listed explicitly so a local .venv or caches never reach a layer.
# README.md is pyproject.toml's `readme`: it must exist in the build context.
COPY pyproject.toml setup.py README.md ./
COPY registry ./registry
COPY cli ./cli
COPY worker ./worker
COPY migrations ./migrations
# gcc builds the merge engine's C kernels (worker/_kernels.c) and is removed in the same layer:
# the image keeps the compiled module, not the compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install ".[all]" \
    && cd / && python -c "from worker import engine; assert engine.kernels, 'C kernels not built'" \
    && apt-get purge -y --auto-remove gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# Run as an unprivileged user; its home is the working directory so the default file:// store
# and SQLite paths (used only when no LORA_REG_* URLs are given) stay writable.
RUN useradd --system --uid 10001 --create-home --home-dir /home/app app \
    && mkdir -p /var/lib/lora-reg && chown app /var/lib/lora-reg
# /var/lib/lora-reg: where docker-compose.yml has the server write its bootstrap admin token
# (a named volume takes this directory's owner, so the app user can write there).
USER app
WORKDIR /home/app

EXPOSE 8000
CMD ["lora-reg", "server", "--host", "0.0.0.0", "--port", "8000"]
