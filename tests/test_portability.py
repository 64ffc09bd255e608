"""The package must import and run on native Windows, where CI does not run: a scan of its
source for modules, functions and signals that exist only on Unix.

A name with a Windows fallback is reached through ``getattr(module, "NAME", fallback)``, which
this scan does not flag (for example ``getattr(signal, "SIGKILL", signal.SIGTERM)``).
"""

import ast
from pathlib import Path

import pytest

import angiotune

PACKAGE = Path(angiotune.__file__).parent
UNIX_MODULES = {"fcntl", "resource", "pwd", "grp", "termios", "tty", "pty", "posix", "crypt",
                "spwd", "syslog", "nis", "readline", "curses"}
UNIX_ONLY = {
    "os": {"statvfs", "fstatvfs", "fork", "forkpty", "getuid", "geteuid", "getgid", "getegid",
           "getgroups", "setuid", "setgid", "setsid", "setpgrp", "getpgid", "killpg",
           "getloadavg", "nice", "chown", "lchown", "fchown", "uname", "sync", "mkfifo",
           "mknod", "wait3", "wait4", "sched_getaffinity", "sched_setaffinity", "pipe2",
           "O_NONBLOCK", "WNOHANG"},
    "signal": {"SIGKILL", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGCHLD", "SIGPIPE",
               "SIGQUIT", "SIGSTOP", "SIGCONT", "SIGTSTP", "alarm", "setitimer", "pause",
               "pthread_kill", "siginterrupt"},
}
UNIX_PATHS = ("/tmp", "/dev/", "/proc/")


def unix_only_uses(source: str) -> list[str]:
    """``line: what`` for every Unix-only import, attribute or path literal in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in UNIX_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in UNIX_MODULES:
                found.append(f"{node.lineno}: from {node.module} import")
            found += [f"{node.lineno}: from {node.module} import {a.name}" for a in node.names
                      if a.name in UNIX_ONLY.get(node.module, ())]
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.attr in UNIX_ONLY.get(node.value.id, ())):
            found.append(f"{node.lineno}: {node.value.id}.{node.attr}")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and node.value.startswith(UNIX_PATHS)):
            found.append(f"{node.lineno}: path {node.value!r}")
    return found


def test_the_scan_finds_what_it_looks_for():
    source = ("import fcntl\nfrom os import statvfs\nimport os, signal\nos.getuid()\n"
              "os.kill(1, signal.SIGKILL)\nopen('/tmp/x')\n"
              "os.kill(1, getattr(signal, 'SIGKILL', signal.SIGTERM))\n")
    assert unix_only_uses(source) == ["1: import fcntl", "2: from os import statvfs",
                                      "4: os.getuid", "5: signal.SIGKILL", "6: path '/tmp/x'"]


@pytest.mark.parametrize("module", sorted(PACKAGE.rglob("*.py")),
                         ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_no_unix_only_calls_in_the_package(module: Path):
    assert unix_only_uses(module.read_text(encoding="utf-8")) == []
