"""One MeZO-SGD step written once (plan, forwards, objective, update) with its defaults and precision, and the
in-process reference trainer.
"""
