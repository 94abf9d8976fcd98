"""The zeroth-order math and its kernels: the perturbation generator (numba, Triton), the served copy's
rounding, MeZO-SGD, the optimizers, update windows.
"""
