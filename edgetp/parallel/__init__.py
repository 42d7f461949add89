"""edgetp.parallel.linears."""
