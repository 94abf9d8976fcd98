"""Tasks and a job's inputs: prompt-and-label examples and batches, the catalog of real models and tasks, the
local presets and the shipped task (datasets/).
"""
