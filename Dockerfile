# PolyAgents: one image for the web (daphne) and the worker (procrastinate) processes.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so code changes do not reinstall them.
COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY . .

# Static files (admin, API docs assets from drf-spectacular-sidecar, dashboard) baked into the image.
# DEBUG=true only lets settings load without secrets for this one build step.
RUN DEBUG=true python manage.py collectstatic --noinput --verbosity 0

RUN useradd --create-home --uid 10001 polyagents \
    && mkdir -p /app/data \
    && chown -R polyagents:polyagents /app/data
USER polyagents

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]

# A backlog of 2048 (daphne's -b/-p listen with 50: a burst of new connections beyond it waits
# on SYN retries).
CMD ["daphne", "-e", "tcp:port=8000:interface=0.0.0.0:backlog=2048", "polyagents_site.asgi:application"]
