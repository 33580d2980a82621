"""Backend choice and threads: ``set_backend`` is the process-wide default,
``use_backend`` a thread-local override that no other thread can see.

The regression: with only the process-global ``set_backend``, one thread
switching backends around its own work changed the backend of every other
thread's calls mid-training (a probe lost 176 of 200 steps). The tests below run
training steps in one thread while another switches in a tight loop, and
require every step to succeed bit-identically to the same steps run alone.
"""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlora
from fastlora._backend import backend_for, get_backend, has_triton, resolve_backend, set_backend, use_backend

STEPS = 200
CPU = torch.device("cpu")


def lora_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    return fastlora.apply_lora(model, r=4, alpha=8.0)


def train(model: nn.Module, expected_backend: str, failures: list) -> list[torch.Tensor]:
    """STEPS SGD steps on a fixed data stream; a step that raises, or that sees a
    backend other than ``expected_backend``, is recorded in ``failures``."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for step in range(STEPS):
        x, target = torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)
        try:
            seen = get_backend()
            if seen != expected_backend:
                raise AssertionError(f"step {step}: get_backend() is {seen!r}, expected {expected_backend!r}")
            loss = F.mse_loss(model(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        except Exception as exc:  # noqa: BLE001 - every failing step is counted, none stops the run
            failures.append((step, repr(exc)))
    return losses


def other_backend() -> str:
    # "triton" on CPU tensors without the interpreter fails loudly, as it did in
    # the probe; without Triton installed, "auto" (resolving to the reference
    # path on CPU) is still caught by the per-step get_backend() check.
    return "triton" if has_triton() else "auto"


@pytest.fixture
def busy_switching(monkeypatch):
    """TRITON_INTERPRET=0, so that a leaked "triton" raises on CPU tensors (as
    it does for a user without the interpreter) instead of silently running the
    slow interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def run_in_thread(target) -> None:
    errors = []

    def body():
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "worker thread did not finish in 120 s"
    if errors:
        raise errors[0]


def assert_same_run(model_a, losses_a, model_b, losses_b):
    assert len(losses_a) == len(losses_b) == STEPS
    for step, (a, b) in enumerate(zip(losses_a, losses_b)):
        assert torch.equal(a, b), f"step {step}: loss {a.item()!r} != {b.item()!r} alone"
    for (name, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert torch.equal(a, b), f"parameter {name} differs from the run alone"


def test_training_is_unaffected_by_use_backend_switching_in_another_thread(busy_switching):
    set_backend("reference")
    initial = lora_mlp()
    alone = copy.deepcopy(initial)
    alone_failures: list = []
    alone_losses = train(alone, "reference", alone_failures)
    assert alone_failures == []

    model, failures, losses = copy.deepcopy(initial), [], []
    done, switches, switcher_errors = threading.Event(), [0], []
    name = other_backend()

    def switcher():
        try:
            while not done.is_set():
                with use_backend(name):
                    assert get_backend() == name
                    switches[0] += 1
                    time.sleep(0)  # hand the GIL over while the override is active
        except BaseException as exc:  # noqa: BLE001
            switcher_errors.append(exc)

    thread = threading.Thread(target=switcher)
    thread.start()
    try:
        run_in_thread(lambda: losses.extend(train(model, "reference", failures)))
    finally:
        done.set()
        thread.join(timeout=60)
    assert switcher_errors == []
    assert switches[0] > 100, f"the switcher ran only {switches[0]} times: the threads barely overlapped"
    assert failures == [], f"{len(failures)} of {STEPS} steps failed, e.g. {failures[:3]}"
    assert_same_run(model, losses, alone, alone_losses)


def test_use_backend_shields_a_thread_from_set_backend_in_another(busy_switching):
    set_backend("reference")
    initial = lora_mlp()
    alone = copy.deepcopy(initial)
    alone_failures: list = []
    alone_losses = train(alone, "reference", alone_failures)

    model, failures, losses = copy.deepcopy(initial), [], []
    done, switches = threading.Event(), [0]
    name = other_backend()

    def trainer():
        with use_backend("reference"):
            losses.extend(train(model, "reference", failures))

    def switcher():
        while not done.is_set():
            set_backend(name)
            switches[0] += 1
            time.sleep(0)  # hand the GIL over while the other default is set
            set_backend("reference")

    thread = threading.Thread(target=switcher)
    thread.start()
    try:
        run_in_thread(trainer)
    finally:
        done.set()
        thread.join(timeout=60)
        set_backend("reference")
    assert switches[0] > 100, f"the switcher ran only {switches[0]} times: the threads barely overlapped"
    assert alone_failures == [] and failures == [], f"{len(failures)} of {STEPS} steps failed, e.g. {failures[:3]}"
    assert_same_run(model, losses, alone, alone_losses)


def test_override_is_invisible_to_other_threads():
    set_backend("reference")
    seen = []
    with use_backend("auto"):
        assert get_backend() == "auto"
        run_in_thread(lambda: seen.append(get_backend()))
    assert seen == ["reference"]

    # And the other way round: a thread's override does not reach this one.
    entered, release = threading.Event(), threading.Event()

    def holder():
        with use_backend("auto"):
            entered.set()
            assert release.wait(30)
            seen.append(get_backend())

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert entered.wait(30)
        assert get_backend() == "reference"
    finally:
        release.set()
        thread.join(timeout=30)
    assert seen == ["reference", "auto"]


def test_set_backend_is_process_wide():
    """The documented default: every thread without an override sees it."""
    set_backend("reference")
    seen = []
    run_in_thread(lambda: seen.append(get_backend()))
    set_backend("auto")
    run_in_thread(lambda: seen.append(get_backend()))
    assert seen == ["reference", "auto"]


def test_override_wins_over_the_process_default_and_the_environment(monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", "reference")
    set_backend("auto")  # clears the default: the environment applies
    assert get_backend() == "reference"
    with use_backend("auto"):
        assert get_backend() == "auto"
        set_backend("reference")  # changes the process default, not this thread's override
        assert get_backend() == "auto"
    assert get_backend() == "reference"


def test_nesting_reentry_and_exceptions_restore_the_previous_choice():
    set_backend("reference")
    outer, inner = use_backend("auto"), use_backend("reference")
    with outer:
        with inner:
            assert get_backend() == "reference"
            with outer:  # the same instance again, while active
                assert get_backend() == "auto"
            assert get_backend() == "reference"
        assert get_backend() == "auto"
    assert get_backend() == "reference"

    with pytest.raises(KeyError):
        with use_backend("auto"):
            with use_backend("reference"):
                raise KeyError("boom")
    assert get_backend() == "reference"


def test_use_backend_as_a_decorator():
    set_backend("reference")

    @use_backend("auto")
    def inside(depth: int) -> list[str]:
        return [get_backend()] + (inside(depth - 1) if depth else [])

    assert inside(2) == ["auto"] * 3
    assert get_backend() == "reference"


def test_out_of_order_exit_leaves_nothing_behind():
    """A suspended generator holding a block, closed after a later block began:
    the later block's exit must restore what was there before both."""
    set_backend("reference")

    def holds_auto():
        with use_backend("auto"):
            yield

    gen = holds_auto()
    next(gen)
    later = use_backend("reference")
    later.__enter__()
    gen.close()  # exits the earlier block first
    assert get_backend() == "reference"
    later.__exit__(None, None, None)
    assert get_backend() == "reference"  # not "auto": the closed block left no trace
    with use_backend("auto"):
        pass
    assert get_backend() == "reference"


def test_exit_on_a_thread_where_the_block_is_not_active_raises():
    block = use_backend("auto")
    block.__enter__()
    try:
        errors = []

        def wrong_thread():
            try:
                block.__exit__(None, None, None)
            except RuntimeError as exc:
                errors.append(str(exc))

        run_in_thread(wrong_thread)
        assert len(errors) == 1 and "not active" in errors[0]
    finally:
        block.__exit__(None, None, None)


X = torch.zeros(1)


def test_resolve_backend_reads_the_override(monkeypatch):
    # backend_for(x), what the fused ops call, answers as resolve_backend(x.device) does
    set_backend("reference")
    with use_backend("reference"):
        assert resolve_backend(CPU) == backend_for(X) == "reference"
    if not has_triton():
        pytest.skip("the rest needs triton installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with use_backend("triton"):
        assert resolve_backend(CPU) == backend_for(X) == "triton"
    with use_backend("auto"):
        assert resolve_backend(CPU) == backend_for(X) == "triton"  # auto: Triton present and interpreting
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend(CPU)
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend_for(X)
    assert resolve_backend(CPU) == backend_for(X) == "reference"


@pytest.mark.parametrize("bad", ["cuda", "", None, "Triton"])
def test_bad_names_are_refused_naming_the_argument(bad):
    with pytest.raises(ValueError, match=r"use_backend: name must be one of .*got"):
        use_backend(bad)
    with pytest.raises(ValueError, match=r"set_backend: name must be one of .*got"):
        set_backend(bad)


def test_a_compiled_function_follows_the_calling_threads_override():
    """torch.compile guards on the thread-local override: a graph traced under
    one backend is not reused under another (in this thread or another)."""
    set_backend("reference")

    def f(x):
        return x + 1 if get_backend() == "reference" else x - 1

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    zero = torch.zeros(1)
    assert compiled(zero).item() == 1
    with use_backend("auto"):
        assert compiled(zero).item() == -1
        seen = []
        run_in_thread(lambda: seen.append(compiled(zero).item()))
        assert seen == [1]
    assert compiled(zero).item() == 1
