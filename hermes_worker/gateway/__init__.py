"""The HTTP gateway: an OpenAI-compatible front door over the queue (``hermes-worker gateway``).

A stateless FastAPI app: every request becomes, or reads, a job through
:class:`producers.client.AsyncHermesClient`, so all state lives in Redis and any number of
gateways can run behind a load balancer. Modules, in the order a request meets them:

* ``tenants.py``: API keys (stored hashed) to tenants, and their quotas.
* ``routing.py``: which deployment (queue and key prefix) a request's ``model`` goes to, and
  which models the live workers serve (their vitals in Redis).
* ``openai_shapes.py``: an OpenAI chat-completions request into a job body, and results and
  events back into OpenAI's ``chat.completion`` and ``chat.completion.chunk`` objects.
* ``errors.py``: every error in OpenAI's shape and status.
* ``sse.py``: Server-Sent Events framing and keep-alives.
* ``metrics.py``: the gateway's Prometheus metrics.
* ``batches.py``: ``/v1/files`` and ``/v1/batches`` (the batch package, hermes_worker/batch/)
  and the gateway's own batch runner.
* ``app.py``: the routes, the app and ``serve`` (uvicorn).

Only ``app.py`` and ``batches.py`` import FastAPI, and ``app.py`` uvicorn (the optional
``gateway`` extra); this package imports nothing on its own.
"""
