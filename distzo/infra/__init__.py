"""What the service processes share: gRPC channels, TLS and auth, request limits, metrics, logging, starting,
stopping and supervising processes, and the coordinator's client.
"""
