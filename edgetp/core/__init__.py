"""edgetp.core."""
