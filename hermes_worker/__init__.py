"""hermes-worker: queue-driven inference for Hermes 4 (Celery on Redis in front of vLLM)."""

__version__ = "0.1.0"
