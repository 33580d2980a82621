"""Test setup shared by every tier.

* ``TRITON_INTERPRET=1`` is set here, before anything imports a kernel module
  (``@triton.jit`` reads it at decoration time), so the Triton kernels run on
  CPU tensors through the interpreter.
* Tests marked ``interpreter`` run with the Triton backend forced; every other
  test runs with the reference backend forced, so a reference-path test never
  silently exercises the (slow) interpreter and vice versa.
* AOT tests compile in a subprocess without the interpreter variable.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastlora  # noqa: E402
from fastlora._backend import has_triton  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _backend_for_tier(request):
    if request.node.get_closest_marker("interpreter") is not None:
        if not has_triton():
            pytest.skip("needs triton (pip install 'fastlora[test]'); it is absent")
        fastlora.set_backend("triton")
    else:
        fastlora.set_backend("reference")
    yield
    fastlora.set_backend("auto")
