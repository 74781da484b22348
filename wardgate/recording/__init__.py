"""Recording of sessions and statements: a local write-ahead journal drained into the store."""
