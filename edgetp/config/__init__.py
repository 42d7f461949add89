"""Validated, torch-free inputs: what a user writes, checked before anything runs.

* :mod:`~edgetp.config.model`: a Hugging Face ``config.json`` as a :class:`ModelConfig`.
* :mod:`~edgetp.config.generation`: sampling and stopping settings of a request.
* :mod:`~edgetp.config.cluster` and :mod:`~edgetp.config.cluster_file`: the cluster file.
* :mod:`~edgetp.config.links`: link profiles and the link emulation's environment.
* :mod:`~edgetp.config.schema`: the pydantic base of the file schemas and edgetp's wording of
  their errors.

It imports only :mod:`edgetp.core` (and pydantic, yaml); never torch, ZeroMQ or safetensors
(an import-linter contract keeps it so). Every layer above may import it.
"""
