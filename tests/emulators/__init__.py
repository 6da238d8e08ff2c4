"""Local servers that speak the wire protocols of external systems, so the real client libraries run."""
