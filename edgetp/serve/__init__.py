"""edgetp.serve: the OpenAI-compatible API server and the terminal chat, on top of a master.

Owns: ``edgetp serve``'s HTTP API (:mod:`.server` the server object and its lifecycle on
uvicorn, :mod:`.settings` what it serves, :mod:`.app` the FastAPI application,
:mod:`.schema` its OpenAPI document, :mod:`.metrics` its Prometheus metrics, :mod:`.protocol`
and :mod:`.validation` the request and answer models, :mod:`.intake` from a request body to a
job, :mod:`.jobs` an accepted request (the seam between the HTTP side and the engine side),
:mod:`.generation` the queue and the generation thread, :mod:`.responses` the answer bodies
and event streams, :mod:`.errors` OpenAI's error answers) and ``edgetp chat``
(:mod:`.chat`).

The engine side (:mod:`.generation`, :mod:`.jobs`) knows nothing of HTTP or of the protocol
models; the HTTP side (:mod:`.app`, :mod:`.schema`, :mod:`.protocol`, :mod:`.responses`)
never calls the engine but through the queue.

May import: :mod:`edgetp.runtime` and the layers below it (net, parallel, shard, model,
kernels, config, core). Never :mod:`edgetp.ops`, :mod:`edgetp.perf` or :mod:`edgetp.cli`. It
uses the master only through its public methods and properties.
"""
