"""edgetp.serve."""
