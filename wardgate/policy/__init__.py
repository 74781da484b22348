"""Decisions: who may reach which connection and how. Pure functions over data; no I/O."""
