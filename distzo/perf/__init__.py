"""The step-time model behind zoctl plan: what a step costs, on which model, cluster and layout, and the
peers' steps by the same rates.
"""
