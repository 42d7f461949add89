"""edgetp.runtime."""
