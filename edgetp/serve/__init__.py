"""edgetp.serve: the OpenAI-compatible API server and the terminal chat, on top of a master.

Owns: ``edgetp serve``'s HTTP API (:mod:`.server` the server object and its lifecycle,
:mod:`.settings` what it serves, :mod:`.http_handler` the ``http.server`` layer,
:mod:`.intake` from a request body to a job, :mod:`.jobs` an accepted request,
:mod:`.generation` the queue and the generation thread, :mod:`.responses` the answer bodies
and event streams, :mod:`.errors` OpenAI's error answers) and ``edgetp chat``
(:mod:`.chat`).

May import: :mod:`edgetp.runtime` and the layers below it (net, parallel, shard, model,
kernels, config, core). Never :mod:`edgetp.ops`, :mod:`edgetp.perf` or :mod:`edgetp.cli`. It
uses the master only through its public methods and properties.
"""
