# One image, two roles:
#   service (default): python manage.py serve      -> daphne on $PORT (Cloud Run sets PORT)
#   worker:            python -m worker_agent      -> needs RENDEZVOUS_SERVICE_URL
# These are the commands the test suite runs (tests/test_commands.py keeps them in step).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    PORT=8080 \
    RENDEZVOUS_DATA_DIR=/app/var

WORKDIR /app
COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY manage.py ./
COPY rendezvous_project ./rendezvous_project
COPY registry ./registry
COPY worker_agent ./worker_agent

RUN useradd --system --uid 10001 --no-create-home --home-dir /app rendezvous \
    && mkdir -p /app/var && chown rendezvous /app/var
USER 10001

EXPOSE 8080
CMD ["python", "manage.py", "serve"]
