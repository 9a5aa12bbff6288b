"""The wire contract: the job (request, validation, result), the Redis layout and the Celery
message. Shared by producers and workers; nothing here needs an engine."""
