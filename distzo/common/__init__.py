"""What every layer shares, light (no torch): the job config and its text, error classes, strict JSON, dtype
and wire sizes, durable metadata, directory locks, the local cache.
"""
