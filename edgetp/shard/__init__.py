"""edgetp.shard."""
