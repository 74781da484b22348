"""SQL understanding over the real PostgreSQL parser."""
