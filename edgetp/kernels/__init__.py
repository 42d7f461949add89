"""edgetp.kernels.native."""
