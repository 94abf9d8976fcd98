"""How blocks reach a parameter server's clients: the client, its two transports (shared memory, gRPC), the
shared-memory segments, their fence and copies, and the wire codec.
"""
