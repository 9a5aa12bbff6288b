"""Batches: the OpenAI Batch API on the queue (``hermes-worker batch``, ``client.batches``,
the gateway's ``/v1/files`` and ``/v1/batches``).

* ``files.py``: the file store (inputs, outputs, error files);
* ``lines.py``: an input line into a job, a finished job into an output or error line;
* ``store.py``: the batch's record in Redis and the batch object;
* ``runner.py``: validating, feeding the queue in a window, collecting, resuming, cancel and
  expiry; ``BatchService`` runs every active batch.
"""
