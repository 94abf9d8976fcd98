"""zoctl, the command line: its commands, the plan and control commands, which cluster a command talks to, the
summaries it prints.
"""
