"""Test setup shared by every tier.

* ``TRITON_INTERPRET=1`` is set here, before anything imports a kernel module
  (``@triton.jit`` reads it at decoration time), so the Triton kernels run on
  CPU tensors through the interpreter.
* Tests marked ``interpreter`` run with the Triton backend forced; tests marked
  ``gpu`` run with "auto" on CUDA tensors (``bench/gpu_check.sh`` runs them with
  ``TRITON_INTERPRET=0``); every other test runs with the reference backend
  forced, so a reference-path test never silently exercises the (slow)
  interpreter and vice versa.
* AOT tests compile in a subprocess without the interpreter variable.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastlora  # noqa: E402
from fastlora._backend import has_triton, interpreting  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _backend_for_tier(request):
    if request.node.get_closest_marker("interpreter") is not None:
        if not has_triton():
            pytest.skip("needs triton (pip install 'fastlora[test]'); it is absent")
        if not interpreting():
            pytest.skip("TRITON_INTERPRET=0 in this run (a GPU run); the interpreter tier runs on CPU")
        fastlora.set_backend("triton")
    elif request.node.get_closest_marker("gpu") is not None:
        if not torch.cuda.is_available() or not has_triton():
            pytest.skip("the GPU tier needs a CUDA device and triton; neither CI nor the dev machines have one")
        fastlora.set_backend("auto")
    else:
        fastlora.set_backend("reference")
    yield
    fastlora.set_backend("auto")
