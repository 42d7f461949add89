"""Native decode kernels and step buffers: the fast path of a one-token step.

Owns the C matrix-vector kernels (``csrc/``, built on first use and loaded with ctypes by
:mod:`.native`; torch stays in charge when they cannot be built or are turned off) and the
buffers a module keeps from one decode step to the next (:mod:`.buffers`).

May import: edgetp.config and edgetp.core (and torch). Nothing above: the model and the
parallel linears call into it.
"""
