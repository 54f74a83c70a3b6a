# The controller and agent image (one image, `fleet` entrypoint).
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
COPY ollama_fleet ollama_fleet
COPY agent agent
COPY controller controller
COPY broker broker
COPY web web
RUN pip install --no-compile ".[postgres]"
RUN useradd --system --create-home fleet
USER fleet
ENTRYPOINT ["fleet"]
