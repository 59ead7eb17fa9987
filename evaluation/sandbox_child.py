"""Runs one untrusted Python program inside the limits set up here (standard library only).

Started by :func:`evaluation.sandbox.run_program` as ``python -I -S sandbox_child.py SPEC.json``. Before the
program's first line runs, this process:

1. sets resource limits (CPU seconds, address space, file size, open files, no core dumps);
2. restricts itself with Linux Landlock (kernel >= 5.13, no root needed): files may be written, created or
   removed only inside the temporary directory, and read only there and in the interpreter's system
   directories; TCP bind/connect is refused (Landlock ABI >= 4) and signals/abstract sockets to processes
   outside the sandbox are refused (ABI >= 6). The restriction cannot be lifted and is inherited by children;
3. installs an audit hook (cannot be removed from Python) that refuses sockets, subprocesses, fork/exec,
   ctypes and writes outside the temporary directory: the same policy again, enforced by the interpreter,
   and the only file policy where Landlock is missing.

It writes which layers are active to ``SPEC["report"]`` (before the program runs), then runs the program.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys
import sysconfig

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_PR_SET_NO_NEW_PRIVS = 38
_O_PATH = getattr(os, "O_PATH", 0o10000000)
# Landlock filesystem rights by ABI version (bit masks).
_FS_V1 = (1 << 13) - 1  # execute .. make_sym
_FS_BY_ABI = {1: _FS_V1, 2: _FS_V1 | 1 << 13, 3: _FS_V1 | 3 << 13, 4: _FS_V1 | 3 << 13}
_READ = (1 << 0) | (1 << 2) | (1 << 3)  # execute, read_file, read_dir
_BLOCKED_EVENTS = (
    "socket.__new__",
    "socket.connect",
    "socket.bind",
    "subprocess.Popen",
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "os.kill",
    "os.killpg",
    "pty.spawn",
    "ctypes.dlopen",
    "ctypes.dlsym",
    "ctypes.cdata",
    "ctypes.call_function",
)
_PATH_EVENTS = {
    "os.remove": 0,
    "os.rename": 0,
    "os.rmdir": 0,
    "os.mkdir": 0,
    "os.chmod": 0,
    "os.chown": 0,
    "os.symlink": 1,
    "os.link": 1,
    "os.truncate": 0,
    "os.utime": 0,
    "shutil.rmtree": 0,
    "shutil.copyfile": 1,
    "shutil.move": 1,
}


def set_limits(cpu_seconds: int, memory_bytes: int, file_bytes: int) -> None:
    for res, value in (
        (resource.RLIMIT_CPU, cpu_seconds),
        (resource.RLIMIT_AS, memory_bytes),
        (resource.RLIMIT_FSIZE, file_bytes),
        (resource.RLIMIT_NOFILE, 64),
        (resource.RLIMIT_CORE, 0),
    ):
        _, hard = resource.getrlimit(res)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(res, (value, value))


def landlock(workdir: str, read_dirs: list[str]) -> int:
    """Restrict this process with Landlock; return the ABI version used (0 if unavailable)."""
    if not sys.platform.startswith("linux"):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return 0
    fs = _FS_BY_ABI.get(abi, _FS_V1 | 7 << 13)  # ABI 5+: + ioctl_dev
    net = 3 if abi >= 4 else 0  # bind_tcp | connect_tcp
    scoped = 3 if abi >= 6 else 0  # abstract unix sockets | signals
    attr = (ctypes.c_uint64 * 3)(fs, net, scoped)
    size = 8 * (1 + (abi >= 4) + (abi >= 6))
    ruleset = libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return 0

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))

    for path, access in [(workdir, fs)] + [(d, _READ) for d in read_dirs]:
        try:
            fd = os.open(path, _O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        rule = PathBeneath(access, fd)
        libc.syscall(_SYS_ADD_RULE, ruleset, ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0))
        os.close(fd)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return 0
    if libc.syscall(_SYS_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)) != 0:
        return 0
    os.close(ruleset)
    return abi


def _inside(path: object, workdir: str) -> bool:
    if isinstance(path, int):
        return True  # an already-open descriptor
    try:
        real = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return real == workdir or real.startswith(workdir + os.sep)


def audit_guard(workdir: str) -> None:
    """Refuse network, processes, ctypes and writes outside ``workdir`` from inside the interpreter."""
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def hook(event: str, args: tuple) -> None:
        if event in _BLOCKED_EVENTS:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and len(args) >= 3:
            path, mode, flags = args[0], args[1] or "", args[2] or 0
            writing = any(c in str(mode) for c in "wax+") or bool(flags & write_flags)
            if writing and not _inside(path, workdir):
                raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory is not allowed")
        elif event in _PATH_EVENTS:
            paths = args[: _PATH_EVENTS[event] + 1] if event != "os.rename" else args[:2]
            if not all(_inside(p, workdir) for p in paths):
                raise PermissionError(f"sandbox: {event} outside the sandbox directory is not allowed")

    sys.addaudithook(hook)


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    workdir = os.path.realpath(spec["workdir"])
    with open(os.path.join(workdir, spec["program"])) as f:
        source = f.read()
    set_limits(spec["cpu_seconds"], spec["memory_bytes"], spec["file_bytes"])
    paths = sysconfig.get_paths()
    read_dirs = sorted({paths["stdlib"], paths["platstdlib"], sys.base_prefix, "/usr/lib", "/usr/lib64", "/lib"})
    abi = landlock(workdir, read_dirs) if spec.get("landlock", True) else 0
    code = compile(source, os.path.join(workdir, spec["program"]), "exec")
    if spec.get("audit_hook", True):
        audit_guard(workdir)
    with open(os.path.join(workdir, spec["report"]), "w") as f:
        json.dump({"landlock_abi": abi, "audit_hook": spec.get("audit_hook", True)}, f)
    sys.argv = [spec["program"]]
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})


if __name__ == "__main__":
    main()
