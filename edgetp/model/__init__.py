"""edgetp.model.llama."""
