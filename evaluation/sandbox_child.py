"""The code that runs inside the sandbox (standard library only; started as ``python -I -S -c <this file> MODE``).

Two modes:

``run``
    Read the job (answer, tests, sentinel, limits) as JSON from standard input, leave standard input empty,
    set resource limits, optionally restrict itself further (Landlock, audit hook: the weak backend's only
    file and network rules), then run the answer as a module that is *not* ``__main__`` and the tests after
    it in the same namespace. Only if both finish does it write the sentinel (which never appears in any
    file, argument or environment variable) to standard output and exit 0; any exception, ``SystemExit``
    included, exits 1.
``isolate CONFIG``
    The Python-only isolation used when bubblewrap is missing: new mount, PID, network, IPC and UTS
    namespaces (plus a user namespace when not started by root); a PID 1 that dies with its parent and so
    takes every process of the namespace with it; a fresh read-only root holding only ``/usr`` (and the
    ``/lib``-style links), the Python installation and the program's directory ``/sandbox`` (a small tmpfs,
    the only writable place), with no ``/proc``, ``/dev`` or ``/sys``; then, as root, an unprivileged
    uid/gid with no supplementary groups and no new privileges; then ``run`` in a fresh interpreter
    (``execve`` also clears any capability left in a user namespace).
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import resource
import signal
import sys
import traceback

# Namespaces, mount flags and syscalls (Linux UAPI values).
_CLONE = {"mnt": 0x20000, "uts": 0x4000000, "ipc": 0x8000000, "user": 0x10000000, "pid": 0x20000000}
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
_MNT_DETACH = 2
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_O_PATH = getattr(os, "O_PATH", 0o10000000)
# Landlock filesystem rights by ABI version (bit masks).
_FS_V1 = (1 << 13) - 1  # execute .. make_sym
_FS_BY_ABI = {1: _FS_V1, 2: _FS_V1 | 1 << 13, 3: _FS_V1 | 3 << 13, 4: _FS_V1 | 3 << 13}
_READ = (1 << 0) | (1 << 2) | (1 << 3)  # execute, read_file, read_dir


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
    return libc


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"sandbox: {what}: {os.strerror(err)}")


# ---------------------------------------------------------------- run: the program itself


def set_limits(cpu_seconds: int, memory_bytes: int, file_bytes: int, processes: int) -> None:
    """CPU seconds, address space, file size, open files, processes per user, no core dumps."""
    for res, value in (
        (resource.RLIMIT_CPU, cpu_seconds),
        (resource.RLIMIT_AS, memory_bytes),
        (resource.RLIMIT_FSIZE, file_bytes),
        (resource.RLIMIT_NOFILE, 64),
        (resource.RLIMIT_NPROC, processes),
        (resource.RLIMIT_CORE, 0),
    ):
        _, hard = resource.getrlimit(res)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(res, (value, value))


def landlock(workdir: str, read_dirs: list[str]) -> int:
    """Restrict this process with Landlock; return the ABI version used (0 if unavailable)."""
    libc = _libc()
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
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or libc.syscall(_SYS_RESTRICT_SELF, ruleset, 0) != 0:
        return 0
    os.close(ruleset)
    return abi


def audit_guard(workdir: str) -> None:
    """Refuse sockets, processes, ctypes and changes outside ``workdir`` from inside the interpreter.

    A convenience layer (clear error messages) and the weak backend's only network rule; Python code can get
    around an audit hook (``_posixsubprocess``, ``gc``), so the namespaces are the boundary.
    """
    blocked = frozenset(
        "socket.__new__ socket.connect socket.bind subprocess.Popen os.system os.exec os.posix_spawn os.spawn "
        "os.fork os.forkpty os.kill os.killpg pty.spawn ctypes.dlopen ctypes.dlsym ctypes.cdata "
        "ctypes.call_function os.setxattr os.removexattr".split()
    )
    paths = {"os.remove": 1, "os.rename": 2, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1}
    paths |= {"os.symlink": 2, "os.link": 2, "os.truncate": 1, "os.utime": 1, "shutil.rmtree": 1}
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(path: object) -> bool:
        if isinstance(path, int):
            return True  # an already-open descriptor
        try:
            real = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return real == workdir or real.startswith(workdir + os.sep)

    def hook(event: str, args: tuple) -> None:
        if event in blocked:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and len(args) >= 3:
            writing = any(c in str(args[1] or "") for c in "wax+") or bool((args[2] or 0) & writes)
            if writing and not inside(args[0]):
                raise PermissionError(f"sandbox: writing {args[0]!r} outside the sandbox directory is not allowed")
        elif event in paths:
            named = args[: paths[event]]
            dir_fd = args[-1] if event != "shutil.rmtree" else None
            if isinstance(dir_fd, int) or not all(inside(p) for p in named):
                raise PermissionError(f"sandbox: {event} outside the sandbox directory is not allowed")

    sys.addaudithook(hook)


def _empty_stdin() -> None:
    read, write = os.pipe()
    os.close(write)
    os.dup2(read, 0)
    os.close(read)


def run(raw: bytes | None = None) -> None:
    """Run the job (``raw``, else read from standard input); exit 0 after writing the sentinel only if the
    tests finished.
    """
    job = json.loads(sys.stdin.buffer.read() if raw is None else raw)
    _empty_stdin()
    sentinel = job.pop("sentinel").encode()
    workdir = os.getcwd()
    set_limits(job["cpu_seconds"], job["memory_bytes"], job["file_bytes"], job["processes"])
    if job["landlock"]:
        landlock(workdir, sorted({sys.base_prefix, "/usr", "/lib", "/lib64"}))
    if job.get("steps"):
        run_steps(job["files"], job["steps"], sentinel)
    if job["audit_hook"]:
        audit_guard(workdir)
    # Bound now: the answer may replace builtins.exec, os._exit or os.write before the tests run.
    run_code, exit_now, write, report, fails = exec, os._exit, os.write, traceback.print_exc, BaseException
    namespace = {"__name__": "answer", "__builtins__": __builtins__}
    try:
        tests = compile(job["tests"], "tests.py", "exec")
        run_code(compile(job["answer"], "answer.py", "exec"), namespace)
        run_code(tests, namespace)
    except fails:  # SystemExit and KeyboardInterrupt too: a program that exits has not passed
        try:
            report()
        finally:
            exit_now(1)
    try:
        sys.stdout.flush()
    finally:
        write(1, b"\n" + sentinel + b"\n")
        exit_now(0)


def run_steps(files: dict[str, str], steps: list[list[str]], sentinel: bytes) -> None:
    """A native program (MultiPL-E's JavaScript and C++): write ``files`` here, run each argv of ``steps`` in
    turn (compile, then run) under the limits already set; the sentinel only if every step exits 0.

    No audit hook: it cannot see inside node or a compiled binary, so the namespaces (or, in the weak backend,
    Landlock and the resource limits, which the steps inherit) are what holds.
    """
    import subprocess

    for name, text in files.items():
        with open(os.path.basename(name), "w") as f:
            f.write(text)
    for argv in steps:
        if subprocess.run(argv, check=False).returncode != 0:  # standard input: the empty pipe
            os._exit(1)
    sys.stdout.flush()
    os.write(1, b"\n" + sentinel + b"\n")
    os._exit(0)


# ---------------------------------------------------------------- isolate: namespaces without bubblewrap


def _unshare(libc: ctypes.CDLL, as_root: bool) -> None:
    flags = _CLONE["mnt"] | _CLONE["pid"] | _CLONE["ipc"] | _CLONE["uts"] | _CLONE_NEWNET
    uid, gid = os.getuid(), os.getgid()
    _check(libc.unshare(flags | (0 if as_root else _CLONE["user"])), "unshare")
    if not as_root:  # the same uid inside as outside: nobody is root in the namespace
        for name, text in (("uid_map", f"{uid} {uid} 1"), ("setgroups", "deny"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)


def _mount(libc: ctypes.CDLL, src: str | None, dst: str, fstype: str | None, flags: int, data: str = "") -> None:
    enc = [s.encode() if s is not None else None for s in (src, dst, fstype, data)]
    _check(libc.mount(enc[0], enc[1], enc[2], flags, enc[3]), f"mount {dst}")


def _bind_read_only(libc: ctypes.CDLL, src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    _mount(libc, src, dst, None, _MS_BIND | _MS_REC)
    _mount(libc, None, dst, None, _MS_REMOUNT | _MS_BIND | _MS_NOSUID | _MS_NODEV | _MS_RDONLY)


def build_root(libc: ctypes.CDLL, cfg: dict) -> None:
    """A fresh root: ``cfg['ro']`` read-only at the same paths, a ``cfg['size']``-byte tmpfs owned by the
    program's uid at ``/sandbox``, nothing else (no ``/proc``, ``/dev``, ``/sys``, ``/tmp``).
    """
    new = cfg["newroot"]
    # The mount points below must be traversable by the program's uid, whatever umask the caller had (the
    # ServerApp and ClientApp set 077, which would make every directory made here root-only: no stdlib).
    os.umask(0o022)
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)
    _mount(libc, "tmpfs", new, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=755,size=1m")
    for path in cfg["ro"]:
        if os.path.islink(path):
            os.symlink(os.readlink(path), new + path)
        elif os.path.isdir(path):
            _bind_read_only(libc, path, new + path)
    os.mkdir(new + "/sandbox")
    data = f"mode=700,size={cfg['size']},uid={cfg['uid']},gid={cfg['gid']}"
    _mount(libc, "tmpfs", new + "/sandbox", "tmpfs", _MS_NOSUID | _MS_NODEV, data)
    os.chdir(new)
    _check(libc.syscall(_SYS_PIVOT_ROOT[platform.machine()], b".", b"."), "pivot_root")
    _check(libc.umount2(b".", _MNT_DETACH), "umount the old root")
    os.chdir("/")
    _mount(libc, None, "/", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)


def _drop(libc: ctypes.CDLL, cfg: dict) -> None:
    if os.getuid() == 0:
        os.setgroups([])
        os.setgid(cfg["gid"])
        os.setuid(cfg["uid"])  # all three uids: root's capabilities go with them
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def _program(libc: ctypes.CDLL, cfg: dict, job: bytes, read: int, write: int) -> None:
    """The program's process: drop privileges and run the job. Root's ``setuid`` already cleared every
    capability, so this interpreter goes on; in a user namespace ``execve`` of a fresh one clears them.
    """
    os.close(write)
    os.dup2(read, 0)
    os.close(read)
    root = os.getuid() == 0
    _drop(libc, cfg)
    os.chdir("/sandbox")
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/sandbox", "TMPDIR": "/sandbox"}
    if root:
        os.environ.clear()
        os.environ.update(env)
        run(job)
    os.execve(cfg["python"], [cfg["python"], "-I", "-S", "-c", cfg["source"], "run"], env)


def _init(libc: ctypes.CDLL, cfg: dict, job: bytes) -> int:
    """PID 1 of the new namespace: build the root, start the program, reap until it ends, return its status."""
    _check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "parent-death signal")
    build_root(libc, cfg)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _program(libc, cfg, job, read, write)
        finally:
            os._exit(126)
    os.close(read)
    if os.getuid() != 0:  # the program is a fresh interpreter reading the job from this pipe
        with os.fdopen(write, "wb") as pipe:
            try:
                pipe.write(job)
            except BrokenPipeError:
                pass
    else:
        os.close(write)
    while True:  # reap orphans too; leaving PID 1 kills whatever remains in the namespace
        child, status = os.wait()
        if child == pid:
            return os.waitstatus_to_exitcode(status)


def isolate(cfg: dict) -> None:
    """Enter the namespaces, run :func:`_init` as their PID 1 and exit with the program's status."""
    libc = _libc()
    job = sys.stdin.buffer.read()
    _unshare(libc, as_root=os.getuid() == 0)
    pid = os.fork()
    if pid == 0:
        try:
            code = _init(libc, cfg, job)
        except BaseException:
            traceback.print_exc()
            code = 125
        os._exit(code if code >= 0 else 128 - code)
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run()
    else:
        isolate(json.loads(sys.argv[2]))
