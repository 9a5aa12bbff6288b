"""The worker: the Celery app's task and transport, the runtime loop that owns the engine,
one attempt's execution, leases, the stream writer, heartbeat, vitals and metrics."""
