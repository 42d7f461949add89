"""edgetp.net."""
