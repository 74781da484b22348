"""PII masking of results: detectors, rules, and the per-result plan that rewrites rows."""
