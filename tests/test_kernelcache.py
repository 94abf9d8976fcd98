"""Numba's kernel cache is keyed by the source of every kernel module, not only the kernel's own file."""

from __future__ import annotations

import shutil
from pathlib import Path

from distzo.zo import kernelcache, optim, served, zkernels


def test_an_edit_of_any_kernel_module_gives_a_fresh_cache_folder(tmp_path):
    for name in kernelcache.KERNEL_MODULES:
        shutil.copy(kernelcache.HERE / name, tmp_path / name)
    before = kernelcache.source_hash(tmp_path)
    assert before == kernelcache.source_hash()
    # served.py's rounding is inlined into zkernels' fused update: editing served.py alone must move the cache
    (tmp_path / "served.py").write_text((tmp_path / "served.py").read_text() + "\n# an edit\n")
    assert kernelcache.source_hash(tmp_path) != before


def test_the_kernels_are_cached_in_the_folder_of_the_current_sources():
    want = f"numba-{kernelcache.source_hash()}"
    for kernel in (served.cast_kernel, zkernels._perturb_kernel, optim._stateful_kernel):
        assert Path(kernel._cache._cache_path).name == want, kernel
