"""edgetp: tensor-parallel Llama-family inference across a cluster of home devices."""

__version__ = "0.1.0"
