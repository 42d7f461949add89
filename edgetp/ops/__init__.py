"""edgetp.ops."""
