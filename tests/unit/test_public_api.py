"""The public surface (issue 10 item 4): what users import from ``qworker`` and ``qworker.dlq``."""

from __future__ import annotations

import inspect
from importlib.metadata import version

import pytest

import qworker
from qworker import dlq, errors


def test_every_name_in_all_resolves_and_the_version_comes_from_the_package_metadata() -> None:
    """``from qworker import *`` gives every listed name; ``__version__`` is the installed one."""
    for name in qworker.__all__:
        assert getattr(qworker, name) is not None, name
    for name in dlq.__all__:
        assert getattr(dlq, name) is not None, name
    assert qworker.__version__ == version("qworker")


def test_every_error_class_lives_in_errors_and_is_exported_from_the_package() -> None:
    """One errors module: each exception qworker defines is there, exported at the top, and the
    DLQ tool's errors are the same classes under qworker.dlq."""
    defined = {
        name
        for name, obj in vars(errors).items()
        if inspect.isclass(obj)
        and issubclass(obj, errors.QworkerError)
        and not name.startswith("_")
    }
    assert defined <= set(qworker.__all__)
    for name in defined:
        assert getattr(qworker, name) is getattr(errors, name)
    for name in ("QueueNotFound", "BrowseRefused", "FilterError", "BadTarget", "BadRecord"):
        assert getattr(dlq, name) is getattr(errors, name)


@pytest.mark.parametrize(
    "target",
    [
        qworker.App,
        qworker.App.handler,
        qworker.App.alert,
        qworker.RetryPolicy,
        qworker.CircuitBreaker,
        dlq.browse,
        dlq.stats,
        dlq.export,
        dlq.purge,
        dlq.replay,
        dlq.replay_records,
    ],
    ids=lambda t: t.__qualname__,
)
def test_every_public_parameter_is_documented_in_an_args_block(target: object) -> None:
    """Each parameter of the public entry points is named in its docstring's Args block."""
    func = target.__init__ if inspect.isclass(target) else target  # type: ignore[misc]
    doc = inspect.getdoc(target) or ""
    if "Args:" not in doc and inspect.isclass(target):
        doc = inspect.getdoc(func) or ""
    assert "Args:" in doc, f"{target} has no Args block"
    args = doc.split("Args:", 1)[1]
    params = [
        p
        for p in inspect.signature(func).parameters
        if p not in ("self", "cls") and not p.startswith("_")
    ]
    missing = [p for p in params if f"{p}:" not in args]
    assert missing == [], f"{target}: undocumented {missing}"
