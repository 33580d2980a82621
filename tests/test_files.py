"""fastlora._files: all-or-nothing writes (with every system call failing in
turn), and reads that refuse FIFOs, devices, directories and oversized files
without blocking."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
import threading
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastlora import _files
from fastlora._files import UnsafeFileError, check_regular_file, read_regular_file, write_files_atomically

posix_only = pytest.mark.skipif(os.name != "posix", reason="FIFOs, /dev/zero and fsync on folders are POSIX")


class InjectedFault(OSError):
    """The error a faulty system call raises (never raised by the real os module)."""


class FaultyOS:
    """What fastlora._files sees as ``os``: the real module, except that the
    functions named in ``faults`` raise on the calls that their predicate picks
    (1-based call numbers). ``close`` closes first, then raises (as a close
    that reports a deferred write error does); the others raise instead of acting.
    ``after`` names functions that act first and then raise ``exc`` (an
    interrupt landing just after a system call returned)."""

    def __init__(self, faults: dict, after: frozenset = frozenset({"close"}), exc: type[BaseException] = InjectedFault):
        self.faults, self.after, self.exc = faults, after, exc
        self.calls = {name: 0 for name in faults}

    def __getattr__(self, attr):
        real = getattr(os, attr)
        if attr not in self.faults:
            return real

        def call(*args, **kwargs):
            self.calls[attr] += 1
            fail = self.faults[attr](self.calls[attr])
            fault = self.exc(errno.EIO, f"injected: os.{attr} call {self.calls[attr]}") if fail else None
            if fail and self.exc is not InjectedFault:
                fault = self.exc()
            if fail and attr not in self.after:
                raise fault
            result = real(*args, **kwargs)
            if fail:
                raise fault
            return result

        return call


def snapshot(folder) -> dict | None:
    """Everything in ``folder`` (hidden files included): name -> bytes and mode, or link target."""
    if not os.path.lexists(folder):
        return None
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        st_ = os.lstat(path)
        if stat.S_ISLNK(st_.st_mode):
            out[name] = ("link", os.readlink(path))
        elif stat.S_ISDIR(st_.st_mode):
            out[name] = ("dir", snapshot(path))
        else:
            with open(path, "rb") as f:
                out[name] = (f.read(), stat.S_IMODE(st_.st_mode))
    return out


def populate(folder, files: dict, mode: int | None = None) -> None:
    os.makedirs(folder, exist_ok=True)
    for name, data in files.items():
        path = os.path.join(folder, name)
        with open(path, "wb") as f:
            f.write(data)
        if mode is not None:
            os.chmod(path, mode)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


OLD = {"adapter_model.safetensors": b"old weights" * 50, "adapter_config.json": b'{"r": 8}'}
NEW = {"adapter_model.safetensors": b"\x00new weights" * 300, "extra.bin": b"", "adapter_config.json": b'{"r": 16}'}
CALLS = ["makedirs", "open", "fchmod", "write", "fsync", "close", "link", "replace"]


def expected_after(before: dict | None, new: dict) -> dict:
    after = dict(before or {})
    for name, data in new.items():
        after[name] = (data, after[name][1] if name in after else 0o666 & ~current_umask())
    return after


# --------------------------------------------------------------------------- writing


def test_writes_every_file_and_creates_missing_folders(tmp_path):
    folder = tmp_path / "a" / "b" / "adapter"
    write_files_atomically(folder, {"x.json": b"{}", "y.bin": bytearray(b"\x00\x01"), "z": memoryview(b"zz")})
    assert snapshot(folder) == {
        "x.json": (b"{}", 0o666 & ~current_umask()),
        "y.bin": (b"\x00\x01", 0o666 & ~current_umask()),
        "z": (b"zz", 0o666 & ~current_umask()),
    }


def test_replacing_keeps_unrelated_files_and_the_replaced_files_modes(tmp_path):
    populate(tmp_path, OLD, mode=0o600)
    populate(tmp_path, {"README.md": b"untouched"})
    write_files_atomically(tmp_path, NEW)
    before = snapshot_of(OLD, 0o600) | {"README.md": (b"untouched", 0o666 & ~current_umask())}
    assert snapshot(tmp_path) == expected_after(before, NEW)


def snapshot_of(files: dict, mode: int) -> dict:
    return {name: (data, mode) for name, data in files.items()}


@pytest.mark.parametrize("exists", [True, False], ids=["replacing", "new-folder"])
@pytest.mark.parametrize("call", CALLS)
def test_each_failing_call_in_turn_leaves_the_previous_folder_byte_identical(tmp_path, monkeypatch, call, exists):
    folder = tmp_path / "parent" / "adapter"
    if exists:
        populate(folder, OLD, mode=0o640)
        populate(folder, {"README.md": b"untouched"})
    before = snapshot(folder)
    failures = 0
    for nth in range(1, 100):
        faulty = FaultyOS({call: lambda k, nth=nth: k == nth})
        monkeypatch.setattr(_files, "os", faulty)
        try:
            write_files_atomically(folder, NEW)
        except InjectedFault as exc:
            assert f"os.{call} call {nth}" in str(exc)  # the very error, re-raised
            monkeypatch.setattr(_files, "os", os)
            assert snapshot(folder) == before, f"os.{call} failing on call {nth} changed the folder"
            assert exists or not (tmp_path / "parent").exists()
            failures += 1
            continue
        finally:
            monkeypatch.setattr(_files, "os", os)
        break  # call number nth was never reached: every call has failed once
    # Hard links fall back to copies, so a failing os.link never fails the write.
    if call == "link" or (call == "fchmod" and not exists):
        assert failures == 0
    else:
        assert failures >= 1, f"os.{call} was never called"
    assert snapshot(folder) == expected_after(before, NEW)


def test_a_failing_replace_after_others_rolls_back_from_copies_when_hard_links_fail(tmp_path, monkeypatch):
    populate(tmp_path, OLD)
    before = snapshot(tmp_path)
    faulty = FaultyOS({"link": lambda k: True, "replace": lambda k: k == 2})
    monkeypatch.setattr(_files, "os", faulty)
    with pytest.raises(InjectedFault):
        write_files_atomically(tmp_path, NEW)
    assert snapshot(tmp_path) == before
    assert faulty.calls["link"] == 2  # both backups were copies


@pytest.mark.parametrize("after", [False, True], ids=["before-rename", "just-after-rename"])
def test_keyboard_interrupt_during_the_replacements_is_rolled_back_and_reraised(tmp_path, monkeypatch, after):
    populate(tmp_path, OLD)
    before = snapshot(tmp_path)
    faulty = FaultyOS(
        {"replace": lambda k: k == 2}, after=frozenset({"replace"} if after else set()), exc=KeyboardInterrupt
    )
    monkeypatch.setattr(_files, "os", faulty)
    with pytest.raises(KeyboardInterrupt):
        write_files_atomically(tmp_path, NEW)
    assert snapshot(tmp_path) == before


def test_a_failing_restore_keeps_the_backup_and_says_where(tmp_path, monkeypatch):
    populate(tmp_path, OLD)
    # replace 1: the weights go in; replace 2 (extra.bin) fails; the roll-back
    # first removes extra.bin (never renamed: nothing to do), then restoring the
    # weights is replace call 3, which fails too.
    monkeypatch.setattr(_files, "os", FaultyOS({"replace": lambda k: k in (2, 3)}))
    with pytest.raises(InjectedFault) as info:
        write_files_atomically(tmp_path, NEW)
    monkeypatch.setattr(_files, "os", os)
    notes = getattr(info.value, "__notes__", [])
    assert len(notes) == 1 and "could not restore" in notes[0], notes
    backup = notes[0].rsplit("previous contents are in ", 1)[1]
    with open(backup, "rb") as f:
        assert f.read() == OLD["adapter_model.safetensors"]
    # Everything else is back (or gone), and no temporary file remains.
    left = snapshot(tmp_path)
    assert left["adapter_config.json"][0] == OLD["adapter_config.json"]
    assert left["adapter_model.safetensors"][0] == NEW["adapter_model.safetensors"]
    assert sorted(left) == sorted([*OLD, os.path.basename(backup)])


def test_backups_that_cannot_be_removed_after_success_are_reported(tmp_path, monkeypatch):
    populate(tmp_path, OLD)
    monkeypatch.setattr(_files, "os", FaultyOS({"unlink": lambda k: True}))
    with pytest.warns(RuntimeWarning, match="backups could not be removed"):
        write_files_atomically(tmp_path, NEW)
    monkeypatch.setattr(_files, "os", os)
    for name, data in NEW.items():
        assert (tmp_path / name).read_bytes() == data


@posix_only
def test_a_symlink_target_is_replaced_not_written_through(tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_bytes(b"keep me")
    folder = tmp_path / "adapter"
    folder.mkdir()
    os.symlink(outside, folder / "adapter_config.json")
    write_files_atomically(folder, {"adapter_config.json": b"new"})
    assert outside.read_bytes() == b"keep me"
    assert not (folder / "adapter_config.json").is_symlink()
    assert (folder / "adapter_config.json").read_bytes() == b"new"


@posix_only
def test_a_symlink_target_is_restored_as_a_symlink(tmp_path, monkeypatch):
    outside = tmp_path / "outside.json"
    outside.write_bytes(b"keep me")
    folder = tmp_path / "adapter"
    folder.mkdir()
    os.symlink(outside, folder / "adapter_config.json")
    before = snapshot(folder)
    monkeypatch.setattr(_files, "os", FaultyOS({"fsync": lambda k: k == 3}))  # 2 files, then the folder
    with pytest.raises(InjectedFault):
        write_files_atomically(folder, {"adapter_config.json": b"new", "w.bin": b"w"})
    assert snapshot(folder) == before


def test_a_directory_target_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "adapter_config.json").mkdir()
    populate(tmp_path, {"adapter_model.safetensors": b"old"})
    before = snapshot(tmp_path)
    with pytest.raises(IsADirectoryError, match="adapter_config.json is a directory"):
        write_files_atomically(tmp_path, {"adapter_model.safetensors": b"new", "adapter_config.json": b"{}"})
    assert snapshot(tmp_path) == before


def test_a_folder_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "adapter").write_bytes(b"a file")
    with pytest.raises(FileExistsError):
        write_files_atomically(tmp_path / "adapter", {"x": b"x"})
    assert (tmp_path / "adapter").read_bytes() == b"a file"


@pytest.mark.parametrize(
    "files, error, match",
    [
        ({"../x": b""}, ValueError, "not a plain file name"),
        ({"a/b": b""}, ValueError, "not a plain file name"),
        ({"": b""}, ValueError, "not a plain file name"),
        ({"..": b""}, ValueError, "not a plain file name"),
        ({1: b""}, TypeError, "file names must be str"),
        ({"x": "text"}, TypeError, r"files\['x'\] must be bytes"),
        ([("x", b"")], TypeError, "files must be a mapping"),
    ],
)
def test_bad_arguments_are_refused_before_the_folder_is_created(tmp_path, files, error, match):
    with pytest.raises(error, match=match):
        write_files_atomically(tmp_path / "new", files)
    assert not (tmp_path / "new").exists()


def test_nothing_to_write_still_creates_the_folder(tmp_path):
    write_files_atomically(tmp_path / "new", {})
    assert snapshot(tmp_path / "new") == {}


NAMES = ["adapter_config.json", "adapter_model.safetensors", "README.md"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    before=st.dictionaries(st.sampled_from(NAMES), st.binary(max_size=64)),
    new=st.dictionaries(st.sampled_from(NAMES + ["extra.bin"]), st.binary(max_size=64), min_size=1),
    call=st.sampled_from(CALLS + [None]),
    nth=st.integers(1, 8),
    nested=st.booleans(),
)
def test_property_all_or_nothing(before, new, call, nth, nested):
    """For any previous folder, any new files, any one failing call: the folder
    ends exactly as before (on an error) or exactly updated (on success)."""
    with tempfile.TemporaryDirectory() as root:
        folder = os.path.join(root, "p", "adapter") if nested else root
        if before or not nested:
            populate(folder, before)
        previous = snapshot(folder)
        faulty = FaultyOS({call: lambda k: k == nth} if call else {})
        original, _files.os = _files.os, faulty
        try:
            write_files_atomically(folder, new)
        except InjectedFault:
            _files.os = original
            assert snapshot(folder) == previous
            return
        finally:
            _files.os = original
        assert snapshot(folder) == expected_after(previous, new)


# --------------------------------------------------------------------------- reading


def finishes(fn, timeout: float = 10.0):
    """Run ``fn`` in a daemon thread; its result or exception, failing the test
    (instead of hanging it) if the call blocks."""
    out: dict = {}

    def body():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            out["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"the call blocked for more than {timeout} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


both_readers = pytest.mark.parametrize(
    "reader", [read_regular_file, check_regular_file], ids=["read_regular_file", "check_regular_file"]
)


def test_reads_a_regular_file(tmp_path):
    (tmp_path / "f.json").write_bytes(b"0123456789")
    assert read_regular_file(tmp_path / "f.json", max_bytes=10, what="config") == b"0123456789"
    assert check_regular_file(str(tmp_path / "f.json"), max_bytes=10, what="config").st_size == 10
    (tmp_path / "empty").write_bytes(b"")
    assert read_regular_file(tmp_path / "empty", max_bytes=0, what="config") == b""


@posix_only
def test_a_symlink_to_a_regular_file_is_read(tmp_path):
    (tmp_path / "real.json").write_bytes(b"{}")
    os.symlink(tmp_path / "real.json", tmp_path / "adapter_config.json")
    assert read_regular_file(tmp_path / "adapter_config.json", max_bytes=2, what="config") == b"{}"


@posix_only
@both_readers
def test_a_fifo_is_refused_without_blocking(tmp_path, reader):
    fifo = tmp_path / "adapter_config.json"
    os.mkfifo(fifo)
    expected = r"adapter config '.*adapter_config.json' is a FIFO \(named pipe\); expected a regular file"
    with pytest.raises(UnsafeFileError, match=expected):
        finishes(lambda: reader(fifo, max_bytes=1 << 20, what="adapter config"))


@posix_only
@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
@both_readers
def test_a_symlink_to_dev_zero_named_like_the_file_is_refused(tmp_path, reader):
    link = tmp_path / "adapter_model.safetensors"
    os.symlink("/dev/zero", link)
    expected = r"is a symbolic link to '/dev/zero', a character device; expected a regular file"
    with pytest.raises(UnsafeFileError, match=expected):
        finishes(lambda: reader(link, max_bytes=1 << 20, what="adapter weights"))


@both_readers
def test_a_directory_is_refused(tmp_path, reader):
    (tmp_path / "adapter_config.json").mkdir()
    with pytest.raises(UnsafeFileError, match="is a directory; expected a regular file"):
        reader(tmp_path / "adapter_config.json", max_bytes=100, what="adapter config")


@both_readers
def test_a_file_larger_than_max_bytes_is_refused(tmp_path, reader):
    (tmp_path / "big").write_bytes(b"x" * 101)
    with pytest.raises(UnsafeFileError, match=r"is 101 bytes; expected at most max_bytes=100"):
        reader(tmp_path / "big", max_bytes=100, what="adapter config")


@both_readers
def test_the_callers_error_type_is_raised(tmp_path, reader):
    class AdapterFormatError(ValueError):
        pass

    (tmp_path / "d").mkdir()
    with pytest.raises(AdapterFormatError, match="my file"):
        reader(tmp_path / "d", max_bytes=100, what="my file", error=AdapterFormatError)


@both_readers
def test_missing_files_raise_file_not_found(tmp_path, reader):
    with pytest.raises(FileNotFoundError):
        reader(tmp_path / "absent", max_bytes=100, what="config")
    if os.name == "posix":
        os.symlink(tmp_path / "absent", tmp_path / "dangling")
        with pytest.raises(FileNotFoundError):
            reader(tmp_path / "dangling", max_bytes=100, what="config")


@both_readers
@pytest.mark.parametrize("max_bytes", [-1, 1.5, True, None])
def test_bad_max_bytes(tmp_path, reader, max_bytes):
    with pytest.raises(ValueError, match=r"max_bytes must be an int >= 0, got"):
        reader(tmp_path, max_bytes=max_bytes, what="config")


@posix_only
def test_a_fifo_swapped_in_after_the_stat_is_caught_by_fstat_without_blocking(tmp_path, monkeypatch):
    """The race: os.stat saw a regular file, the open finds a FIFO."""
    regular = tmp_path / "regular"
    regular.write_bytes(b"{}")
    fifo = tmp_path / "adapter_config.json"
    os.mkfifo(fifo)

    class Swapped(FaultyOS):
        def __getattr__(self, attr):
            if attr == "stat":
                return lambda path, *a, **k: os.stat(regular)
            return getattr(os, attr)

    monkeypatch.setattr(_files, "os", Swapped({}))
    with pytest.raises(UnsafeFileError, match="is a FIFO"):
        finishes(lambda: read_regular_file(fifo, max_bytes=100, what="adapter config"))


def test_a_file_growing_while_read_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 50)

    class Shrunk(FaultyOS):  # os.stat / os.fstat report 10 bytes, 50 are there
        def __getattr__(self, attr):
            if attr in ("stat", "fstat"):
                def small(*a, **k):
                    real = getattr(os, attr)(*a, **k)
                    return os.stat_result((*real[:6], 10, *real[7:10]))
                return small
            return getattr(os, attr)

    monkeypatch.setattr(_files, "os", Shrunk({}))
    with pytest.raises(UnsafeFileError, match="grew past 20 bytes while being read"):
        read_regular_file(path, max_bytes=20, what="config")


def test_unsafe_file_error_is_a_value_error():
    assert issubclass(UnsafeFileError, ValueError)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert UnsafeFileError("x").args == ("x",)
