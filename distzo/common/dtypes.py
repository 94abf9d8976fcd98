"""The dtypes a parameter server serves, and their sizes: the one table (no torch, for zoctl plan).

``ITEMSIZE[name]`` is the bytes of one element: float32 the master, bfloat16/float16 the 16-bit
served copies (``distzo/zo/served.py``'s rounding).
"""

ITEMSIZE: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}

# fp32 optimizer-state values the parameter server keeps per parameter (train.optimizer; distzo/zo/optim.py)
STATE_VALUES = {"sgd": 0, "momentum": 1, "adam": 2}
