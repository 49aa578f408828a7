"""Shared state and swallowed errors (issue 13): calls from several threads, global state left as
found, and errors that are fxsparse's own or torch's surfacing instead of being taken for a model
that cannot be traced."""

from __future__ import annotations

import functools
import gc
import logging
import operator
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import fxsparse
import fxsparse._capture

from reference import fake_sparsity


class Served(nn.Module):
    """A model with two kept modules: attention (FX cannot trace it) and a hooked linear whose hook yields."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 8)
        self.fc.register_forward_hook(lambda module, args, output: time.sleep(0.0005))  # widens any race

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.attn(x, x, x)
        return self.fc(y)


def test_calls_from_several_threads_leave_kept_modules_intact() -> None:
    torch.manual_seed(0)
    model = Served().eval()
    # Soft masks: a product left behind as the weight would be masked again, and show.
    masks = {"attn.in_proj_weight": torch.rand(24, 8), "fc.weight": torch.rand(8, 8)}
    out = fxsparse.transform(model, masks)
    assert {
        n.meta["fxsparse"]["module"] for n in out.graph.nodes if n.meta.get("fxsparse", {}).get("role") == "called"
    } == {
        "attn",
        "fc",
    }
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        expected = fake_sparsity(model, masks)(x)
        assert torch.equal(out(x), expected)
    parameters = dict(out.named_parameters())
    barrier = threading.Barrier(8)
    wrong: list[float] = []

    def serve() -> None:
        barrier.wait()
        for _ in range(50):
            with torch.no_grad():
                y = out(x)
            if not torch.equal(y, expected):
                wrong.append(float((y - expected).abs().max()))

    threads = [threading.Thread(target=serve) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []
    assert dict(out.named_parameters()) == parameters  # the same Parameter objects, none replaced
    assert out.get_parameter("fc.weight") is parameters["fc.weight"]
    with torch.no_grad():
        assert torch.equal(out(x), expected)


GC_SEEN: list[bool] = []  # outside the model: fxsparse runs a copy of it


class Probe(nn.Module):
    """Records whether the garbage collector is on while its forward runs (during capture too)."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.fail = fail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        GC_SEEN.append(gc.isenabled())
        if self.fail:
            raise ValueError("the model's own error")
        return self.fc(x)


@pytest.fixture
def gc_enabled() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("fail", [False, True])
def test_the_model_runs_with_the_garbage_collector_as_found(gc_enabled: None, capture: str, fail: bool) -> None:
    GC_SEEN.clear()
    x = torch.randn(2, 4)
    try:
        fxsparse.transform(Probe(fail), {"fc": torch.ones(4, 4)}, capture=capture, example_inputs=(x,))
        assert not fail
    except fxsparse.TraceError:
        assert fail
    assert GC_SEEN and all(GC_SEEN)  # on while the model's forward ran (traced or exported)
    assert gc.isenabled()
    gc.disable()
    try:
        fxsparse.transform(Probe(fail), {"fc": torch.ones(4, 4)}, capture=capture, example_inputs=(x,))
    except fxsparse.TraceError:
        assert fail
    finally:
        assert not gc.isenabled()  # as found: off
        gc.enable()


def test_concurrent_export_captures_leave_the_fake_tensor_logger_as_found(gc_enabled: None) -> None:
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level, filters = logger.level, list(logger.filters)
    logger.setLevel(logging.INFO)
    try:
        x = torch.randn(2, 4)
        errors: list[BaseException] = []
        barrier = threading.Barrier(6)

        def capture(index: int) -> None:
            barrier.wait()
            try:
                for _ in range(3):
                    wrong = torch.randn(2, 5) if index % 2 else x  # every other thread fails inside torch.export
                    try:
                        fxsparse.transform(
                            nn.Sequential(nn.Linear(4, 4)),
                            {"0": torch.ones(4, 4)},
                            capture="export",
                            example_inputs=(wrong,),
                        )
                    except fxsparse.TraceError:
                        assert index % 2
            except BaseException as exc:  # reported below, from the main thread
                errors.append(exc)

        threads = [threading.Thread(target=capture, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert logger.level == logging.INFO
        assert logger.filters == filters
        assert gc.isenabled()
    finally:
        logger.setLevel(level)


def test_missing_private_torch_helper_warns_instead_of_dropping_input_checks_silently(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch.export._unlift

    monkeypatch.delattr(torch.export._unlift, "_get_input_paths")
    with pytest.warns(UserWarning, match="cannot read torch.export's input guards.*_get_input_paths"):
        out = fxsparse.transform(
            nn.Sequential(nn.Linear(4, 4)),
            {"0": torch.ones(4, 4)},
            capture="export",
            example_inputs=(torch.randn(2, 4),),
        )
    with pytest.raises(ValueError, match="as when it was exported"):
        out(torch.randn(3, 4))  # fxsparse's own size checks still run


def test_an_internal_error_surfaces_as_itself_and_auto_does_not_export_instead(monkeypatch: pytest.MonkeyPatch) -> None:
    exported: list[Any] = []
    monkeypatch.setattr(fxsparse._capture, "export", lambda *args, **kwargs: exported.append(args))
    # A lookup in fxsparse's tracer that fails: the KeyError is raised in fxsparse's own frame.
    monkeypatch.setattr(fxsparse._capture.Tracer, "path_of_module", functools.partial(operator.getitem, {}))
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(KeyError):
        fxsparse.transform(model, {"0": torch.ones(4, 4)}, capture="auto", example_inputs=(torch.randn(2, 4),))
    assert exported == []


def test_an_fxsparse_error_while_tracing_into_a_torch_module_is_not_taken_for_untraceable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    create_node = fxsparse._capture.Tracer.create_node

    def failing(self: fxsparse._capture.Tracer, kind: str, target: Any, *args: Any, **kwargs: Any) -> torch.fx.Node:
        if any("attn" in str(path) for path in self.module_stack):
            raise fxsparse.MaskError("raised by fxsparse while tracing into the attention")
        return create_node(self, kind, target, *args, **kwargs)

    monkeypatch.setattr(fxsparse._capture.Tracer, "create_node", failing)
    model = Served().eval()
    with pytest.raises(fxsparse.MaskError, match="while tracing into the attention"):
        fxsparse.transform(model, {"attn.in_proj_weight": torch.ones(24, 8)}, capture="fx")


def test_transform_never_switches_the_garbage_collector_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The collector is process-wide: switching it off, even around fxsparse's own steps, reaches other threads."""
    switched_off: list[str] = []
    monkeypatch.setattr(gc, "disable", lambda: switched_off.append("gc.disable"))
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.MultiheadAttention(4, 2))
    fxsparse.transform(model[:2], {"0": torch.ones(4, 4)})
    fxsparse.transform(model[:2], {"0": torch.ones(4, 4)}, capture="export", example_inputs=(torch.randn(2, 4),))
    assert switched_off == []
