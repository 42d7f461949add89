"""The ground floor every layer may use: errors, settings, units, file readers, metrics.

* :mod:`~edgetp.core.errors`: :class:`EdgetpError` and the kinds a user meets (config, model,
  shard, cluster, security); the CLI prints them as one line.
* :mod:`~edgetp.core.settings`: every ``EDGETP_*`` environment variable, read here only.
* :mod:`~edgetp.core.units`: byte sizes (``1.5GiB``) read and written.
* :mod:`~edgetp.core.files`: JSON and YAML files read with errors that name the file.
* :mod:`~edgetp.core.metrics`: timers and counters of a step, on every node (uses torch).

It imports nothing of edgetp; everything else may import it.
"""
