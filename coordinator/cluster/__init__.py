"""The local cluster behind zoctl up: supervised processes on loopback or over simulated hosts, and its run
directory.
"""
