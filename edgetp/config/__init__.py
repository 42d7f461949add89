"""edgetp.config."""
