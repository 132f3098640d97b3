"""The malloc settings the torch services run with (shared/allocator.py)."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest

from prefloop.stack import SERVICES, Stack
from shared import allocator
from shared.allocator import MALLOC_TUNABLES, TORCH_SERVICES, reexec_with_malloc_tunables, with_malloc_tunables


def test_a_child_gets_the_tunables_unless_the_operator_set_their_own():
    assert with_malloc_tunables({"PATH": "/bin"}) == {"PATH": "/bin", "GLIBC_TUNABLES": MALLOC_TUNABLES}
    assert with_malloc_tunables({"GLIBC_TUNABLES": ""})["GLIBC_TUNABLES"] == ""  # empty: the operator's opt-out
    assert "mmap_max=0" in MALLOC_TUNABLES and "judge" not in TORCH_SERVICES


class Exec(Exception):
    """what os.execve would have done, raised instead so the test process stays"""


def record_execve(path, argv, env):
    raise Exec(path, argv, env)


def test_serve_restarts_itself_with_the_tunables_and_its_own_argv(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("PREFLOOP_MALLOC_RESTARTED", raising=False)
    monkeypatch.setenv("PREFLOOP_GATEWAY_HTTP_PORT", "8123")
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(allocator.sys, "orig_argv", [sys.executable, "/venv/bin/prefloop", "serve", "gateway"])
    monkeypatch.setattr(allocator.os, "execve", record_execve)
    with pytest.raises(Exec) as exec_:
        reexec_with_malloc_tunables()
    path, argv, env = exec_.value.args
    assert path == sys.executable and argv == [sys.executable, "/venv/bin/prefloop", "serve", "gateway"]
    assert env["GLIBC_TUNABLES"] == MALLOC_TUNABLES and env["PREFLOOP_GATEWAY_HTTP_PORT"] == "8123"
    assert env["PREFLOOP_MALLOC_RESTARTED"] == "1"

    # the restarted process, if the C library dropped GLIBC_TUNABLES (a privileged binary), runs on
    monkeypatch.setenv("PREFLOOP_MALLOC_RESTARTED", "1")
    reexec_with_malloc_tunables()


def test_a_failed_restart_runs_on_without_the_settings(monkeypatch, caplog):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("PREFLOOP_MALLOC_RESTARTED", raising=False)
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("glibc", "2.36"))

    def refuse(*_):
        raise PermissionError("exec refused")

    monkeypatch.setattr(allocator.os, "execve", refuse)
    reexec_with_malloc_tunables()
    assert "running without the malloc settings" in caplog.text and "exec refused" in caplog.text
    assert allocator.describe() == "GLIBC_TUNABLES=(unset: glibc defaults)"


def test_the_local_stack_gives_the_torch_services_the_settings_and_keeps_an_operators_value(monkeypatch, tmp_path):
    stack = Stack(tmp_path, broker=SimpleNamespace(bootstrap="127.0.0.1:9"), ports=dict.fromkeys(SERVICES, 9))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert {name: stack._env(name).get("GLIBC_TUNABLES") for name in SERVICES} == {
        "generator": MALLOC_TUNABLES, "gateway": MALLOC_TUNABLES, "trainer": MALLOC_TUNABLES, "judge": None}
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert {stack._env(name)["GLIBC_TUNABLES"] for name in SERVICES} == {"glibc.malloc.arena_max=2"}


@pytest.mark.parametrize("tunables, libc", [("glibc.malloc.arena_max=2", "glibc"), ("", "glibc"), (None, "musl")])
def test_serve_runs_on_when_tunables_are_set_or_the_libc_is_not_glibc(monkeypatch, tunables, libc):
    if tunables is None:
        monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    else:
        monkeypatch.setenv("GLIBC_TUNABLES", tunables)
    monkeypatch.delenv("PREFLOOP_MALLOC_RESTARTED", raising=False)
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: (libc if libc == "glibc" else "", ""))
    monkeypatch.setattr(allocator.os, "execve", record_execve)
    reexec_with_malloc_tunables()  # returns: no restart
    assert os.environ.get("GLIBC_TUNABLES") == tunables
