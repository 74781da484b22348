"""PostgreSQL engine: a sans-IO wire codec and the asyncio adapter around it."""
