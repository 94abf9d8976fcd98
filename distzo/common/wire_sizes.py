"""Sizes on the wire, shared by the config's validation and the gRPC channels.

Kept apart from ``distzo.common.config`` so that the control commands (``zoctl status`` and the like),
which build channels, do not import pydantic and the config schema.
"""

MAX_MESSAGE_BYTES = 64 << 20  # gRPC message limit of every channel (data-plane chunks are at most 16 MiB)
TOKEN_BYTES = 4 + 1 + 4  # a token on the wire: int32 id, int8 attention mask, int32 label (protos BatchData)
MESSAGE_HEADROOM = 1 << 20  # the rest of an assignment (forward specs, ids, protobuf framing)
MAX_DIRECTIONS = 4096  # (seed, g) pairs in one update (layout.q: at most this many)
INT64_MAX = (1 << 63) - 1  # protobuf int64: steps, versions, seeds, byte counts
INT32_MAX = (1 << 31) - 1  # protobuf int32: workers, node ranks, shards, rows, dev examples
