"""One root for the project's errors, and the refusal that owns its wording."""

from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil

import pytest

from tasks.errors import BouwsteenError, PreflightRefused

PACKAGES = ["tasks", "flows", "blocks", "deployments", "lab"]
# Programs uploaded to hosts as they are run with the standard library alone: they cannot import
# the project, so their few errors stay their own.
STANDALONE = {"tasks.programs.primary_detector", "tasks.programs.etcd_leader_away"}
# Private control flow inside one parser, never raised past it.
PRIVATE = {"tasks.pgquartz.loader._DuplicateKey"}


def project_exceptions() -> list[type[BaseException]]:
    found = []
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}."):
            if info.name in STANDALONE:
                continue
            module = importlib.import_module(info.name)
            for _, obj in inspect.getmembers(module, inspect.isclass):
                if (issubclass(obj, BaseException) and obj.__module__ == module.__name__
                        and f"{obj.__module__}.{obj.__name__}" not in PRIVATE):
                    found.append(obj)
    return found


def test_the_walk_finds_the_project_errors():
    names = {e.__name__ for e in project_exceptions()}
    assert {"PreflightRefused", "RemoteError", "DatabaseUnavailable", "InventoryError", "ClusterBusy",
            "BackupTooOld", "LabError"} <= names


@pytest.mark.parametrize("error", project_exceptions(), ids=lambda e: f"{e.__module__}.{e.__name__}")
def test_every_project_error_derives_from_the_root(error):
    assert issubclass(error, BouwsteenError)


@pytest.mark.parametrize("reasons, nothing, text", [
    (("pg4 is the primary",), "changed", "refused, nothing changed: pg4 is the primary"),
    (("a", "b"), "changed", "refused, nothing changed:\na\nb"),
    (("job file: parallel: 0 runs nothing",), "ran", "refused, nothing ran: job file: parallel: 0 runs nothing"),
    (("line one\nline two",), "saved", "refused, nothing saved: line one\nline two"),
])
def test_refusal_wording(reasons, nothing, text):
    error = PreflightRefused(*reasons, nothing=nothing)
    assert str(error) == text
    assert error.reasons == reasons


def test_a_refusal_survives_pickling_unchanged():
    # Prefect persists a failed run's exception; the DBA must read it once, not prefixed twice.
    error = PreflightRefused("x", "y", nothing="ran")
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is PreflightRefused and str(back) == str(error) and back.reasons == ("x", "y")
