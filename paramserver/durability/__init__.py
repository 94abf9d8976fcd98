"""What makes the parameter server's state survive: the update journal, snapshots, and replicas that follow a
primary.
"""
