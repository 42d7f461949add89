"""edgetp.perf."""
