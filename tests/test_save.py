"""fxsparse.save: every output form saved and loaded gives the same outputs and masks; saves are atomic."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import fxsparse


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def masks() -> dict[str, torch.Tensor]:
    return fxsparse.masks.magnitude(model(), 0.5)


X = torch.randn(3, 8)


def reload(emit: str, path: Path) -> tuple[torch.nn.Module, torch.Tensor]:
    out = fxsparse.transform(model(), masks(), emit=emit, example_inputs=(X,))
    expected = out(X) if emit != "export" else out.module()(X)
    fxsparse.save(out, path)
    if emit in ("script", "trace"):
        return torch.jit.load(str(path)), expected  # type: ignore[no-untyped-call]
    if emit == "export":
        return torch.export.load(path).module(), expected
    return torch.load(path, weights_only=False), expected


@pytest.mark.parametrize("emit", ["graph", "script", "trace", "export"])
def test_every_form_saved_and_loaded_is_the_same(emit: str, tmp_path: Path) -> None:
    loaded, expected = reload(emit, tmp_path / "model.pt")
    with torch.no_grad():
        assert torch.equal(loaded(X), expected)
    state = loaded.state_dict()
    for name, mask in masks().items():
        key = f"{name}_mask" if f"{name}_mask" in state else None
        if key is None:  # FakeSparsity keeps the mask inside its parametrization
            owner, _, tensor = name.rpartition(".")
            key = f"{owner}.parametrizations.{tensor}.0.mask"
        assert torch.equal(state[key].bool(), mask), (emit, name)


def test_a_parametrized_output_is_refused_with_the_way_out(tmp_path: Path) -> None:
    out = fxsparse.transform(model(), masks(), emit="parametrize")
    with pytest.raises(fxsparse.EmitError, match="save the emit='graph' output, which keeps them"):
        fxsparse.save(out, tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()


def test_state_dict_saved_atomically(tmp_path: Path) -> None:
    out = fxsparse.transform(model(), masks())
    path = fxsparse.save(out.state_dict(), tmp_path / "state.pt")
    again = fxsparse.transform(model(), {name: torch.ones_like(m) for name, m in masks().items()})
    again.load_state_dict(torch.load(path))
    assert torch.equal(again(X), out(X))


def test_an_interrupted_save_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = fxsparse.save(fxsparse.transform(model(), masks()), tmp_path / "model.pt")
    before = path.read_bytes()

    def half_then_fail(obj: object, target: str, *args: object, **kwargs: object) -> None:
        Path(target).write_bytes(before[: len(before) // 2])  # a torn write...
        raise KeyboardInterrupt  # ... cut short

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        fxsparse.save(fxsparse.transform(model(), {}), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_save_names_what_it_takes(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="save takes a module"):
        fxsparse.save(3, tmp_path / "x")


def test_saved_files_get_ordinary_permissions_and_follow_links(tmp_path: Path) -> None:
    out = fxsparse.transform(model(), masks())
    plain = tmp_path / "plain.pt"
    torch.save(out.state_dict(), plain)
    ours = fxsparse.save(out.state_dict(), tmp_path / "ours.pt")
    assert ours.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # not mkstemp's 0600
    plain.chmod(0o640)
    assert fxsparse.save(out.state_dict(), plain).stat().st_mode & 0o777 == 0o640  # an existing file's kept
    target, link = tmp_path / "target.pt", tmp_path / "link.pt"
    target.write_bytes(b"")
    link.symlink_to(target)
    fxsparse.save(out.state_dict(), link)
    assert link.is_symlink() and target.stat().st_size > 0
    for bad in ("", f"{tmp_path}/folder/", str(tmp_path)):
        with pytest.raises((ValueError, IsADirectoryError), match="save needs a file path"):
            fxsparse.save(out.state_dict(), bad)


# -- issue 14: a save never destroys what is not its own -------------------------------------------


def saving(kind: str) -> tuple[Callable[[Path], Path], type[fxsparse.FxsparseError]]:
    """A save of each kind, and the error it refuses with: fxsparse.save an EmitError, save_masks a MaskError."""
    if kind == "save":
        return lambda path: fxsparse.save(fxsparse.transform(model(), masks()).state_dict(), path), fxsparse.EmitError
    return lambda path: fxsparse.save_masks(masks(), path), fxsparse.MaskError


KINDS = ["save", "save_masks"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
@pytest.mark.parametrize("kind", KINDS)
def test_a_save_refuses_a_fifo_and_leaves_it_a_fifo(kind: str, tmp_path: Path) -> None:
    save, error = saving(kind)
    fifo, link = tmp_path / "pipe.safetensors", tmp_path / "link.safetensors"
    os.mkfifo(fifo)
    link.symlink_to(fifo)
    for target in (fifo, link):
        with pytest.raises(error, match=r"is a FIFO \(named pipe\), not a regular file"):
            save(target)
    assert stat.S_ISFIFO(fifo.stat().st_mode) and sorted(p.name for p in tmp_path.iterdir()) == [link.name, fifo.name]


@pytest.mark.parametrize("kind", KINDS)
def test_a_save_refuses_a_device_node(kind: str, tmp_path: Path) -> None:
    save, error = saving(kind)
    node = tmp_path / "null.pt"
    try:
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's, made in a temporary folder
    except (AttributeError, OSError):
        pytest.skip("cannot make a device node here (needs root, a POSIX system)")
    with pytest.raises(error, match="is a character device, not a regular file"):
        save(node)
    assert stat.S_ISCHR(node.stat().st_mode)


@pytest.mark.parametrize("kind", KINDS)
def test_a_save_refuses_a_read_only_file_even_as_root(kind: str, tmp_path: Path) -> None:
    save, error = saving(kind)
    path = tmp_path / "kept.pt"
    path.write_bytes(b"someone's data")
    path.chmod(0o444)  # root's open() writes it anyway; a user's refuses: the mode bits decide
    with pytest.raises(error, match=r"is read-only \(mode -r--r--r--\)"):
        save(path)
    assert path.read_bytes() == b"someone's data" and [p.name for p in tmp_path.iterdir()] == ["kept.pt"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_save_makes_no_folder_through_a_dangling_symlink(kind: str, tmp_path: Path) -> None:
    save, error = saving(kind)
    elsewhere = tmp_path / "elsewhere"
    (tmp_path / "folder").symlink_to(elsewhere / "missing")  # dangling
    with pytest.raises(error, match=r"is a symbolic link to .*, which does not exist"):
        save(tmp_path / "folder" / "sub" / "m.pt")
    (tmp_path / "file.pt").symlink_to(elsewhere / "m.pt")  # dangling, in a missing folder
    with pytest.raises(error, match="whose folder does not exist"):
        save(tmp_path / "file.pt")
    assert not elsewhere.exists()
    (tmp_path / "real").mkdir()
    (tmp_path / "to_real").symlink_to(tmp_path / "real")  # a link to a folder that exists works as ever
    assert save(tmp_path / "to_real" / "new" / "m.pt") == tmp_path / "real" / "new" / "m.pt"
    (tmp_path / "to_file.pt").symlink_to(tmp_path / "real" / "target.pt")  # so does one to a new file
    assert save(tmp_path / "to_file.pt").is_file() and (tmp_path / "to_file.pt").is_symlink()


@pytest.mark.parametrize("kind", KINDS)
def test_the_temporary_matches_no_glob_of_the_suffix_and_a_stale_one_is_removed(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save, _ = saving(kind)
    suffix = ".pt" if kind == "save" else ".safetensors"
    path = tmp_path / f"m{suffix}"
    stale = tmp_path / f".m{suffix}.fxsparse-tmp-abcd1234"  # left by a save killed earlier
    stale.write_bytes(b"half a file")
    in_use = tmp_path / f".m{suffix}.fxsparse-tmp-efgh5678"  # written by a save in progress: locked
    not_ours = [tmp_path / f".m{suffix}.fxsparse-tmp-abcd1234.data", tmp_path / f".m.abcd1234{suffix}"]
    for file in [in_use, *not_ours]:
        file.write_bytes(b"")
    seen_while_writing: list[list[str]] = []
    replace = os.replace

    def look_then_replace(source: str, target: str) -> None:
        seen_while_writing.append(sorted(p.name for p in tmp_path.glob(f"*{suffix}")))
        replace(source, target)

    monkeypatch.setattr(os, "replace", look_then_replace)
    with open(in_use, "rb") as held:
        fcntl = pytest.importorskip("fcntl")
        fcntl.flock(held, fcntl.LOCK_EX)
        save(path)
    assert seen_while_writing == [[f".m.abcd1234{suffix}"]]  # a user's own file; no temporary
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, in_use.name, *(p.name for p in not_ours)])


def test_concurrent_saves_never_remove_each_others_temporary(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "m.safetensors"
    versions = {i: torch.full((256, 256), i % 2 == 0) for i in range(48)}

    def save(i: int) -> Path:  # each save also removes the stale temporaries it finds: never one in use
        return fxsparse.save_masks({"w": versions[i], "i": torch.tensor(i)}, path)

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(save, versions)) == [path] * len(versions)
    loaded = fxsparse.load_masks(path)
    assert torch.equal(loaded["w"], versions[int(loaded["i"])])  # one whole save, not a mix
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_saving_never_sets_the_process_umask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``os.umask`` can only set the mask: setting it, even back at once, reaches files other threads make."""
    calls: list[int] = []
    monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or 0o022)
    fxsparse.save(torch.nn.Linear(2, 2), tmp_path / "model.pt")
    assert calls == []
    if os.path.exists("/proc/self/status"):  # the mode a plain open() gives, read where the system shows it
        assert (tmp_path / "model.pt").stat().st_mode & 0o777 == 0o666 & ~_process_umask()


def _process_umask() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
