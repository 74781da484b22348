"""`make demo`: a local PostgreSQL with sample data, a demo user, and the gateway in front of it."""
