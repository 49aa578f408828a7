"""fxsparse.save: every output form saved and loaded gives the same outputs and masks; saves are atomic."""

from __future__ import annotations

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
