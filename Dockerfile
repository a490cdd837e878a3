# The demo service (python -m demo) for docker-compose.yml. Build context: the repository root.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# The package first, so that editing the demo does not reinstall the dependencies.
COPY pyproject.toml README.md ./
COPY fault_tolerant_pool ./fault_tolerant_pool
RUN pip install ".[asyncpg,psycopg,demo]"
COPY demo ./demo

RUN useradd --system --no-create-home demo
USER demo

ENV DEMO_HOST=0.0.0.0 \
    DEMO_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('DEMO_PORT', '8000'), timeout=2)"]
CMD ["python", "-m", "demo"]
