"""What makes the parameter server's state survive: the update journal, snapshots, the data directory that holds
them, recovery from them, and replicas that follow a primary.
"""
