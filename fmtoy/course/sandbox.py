"""The trusted side of the autograder's trust boundary: start the student's process (inside bubblewrap where it is
installed), talk to it, and turn the names its solution cell defined into proxies for the instructor's tests.

Nothing the student's process sends is unpickled or executed here: replies are JSON, decoded by :func:`decode` into
numbers, strings, lists, tuples, dicts, tensors and arrays (raw bytes checked against shape and dtype). What the
grader sends the other way is pickled: test data, fmtoy objects and modules (a network's parameters become leaves
there, so that a test can differentiate through the student's function); functions that cannot be pickled (a lambda
or a ``def`` in a test cell) stay here and are called back, with their gradients, when the student's code calls them.
"""

from __future__ import annotations

import base64
import builtins
import io
import json
import os
import pickle
import select
import shutil
import signal
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

from . import _student

RUNNER = Path(_student.__file__).resolve()
NOBODY = 65534
PRELOADABLE = ("numpy", "torch")  # what the student's process may import before the student's code (grade._preload)
_BWRAP_OK: dict[str, bool] = {}


class StudentError(Exception):
    """The student's code raised (or sent something the grader cannot accept); `kind` is its exception's name."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


_ERRORS: dict[str, type] = {}


def student_error(kind: str, message: str) -> StudentError:
    """A StudentError that is also the builtin exception it names (so that a test's `except ValueError` holds)."""
    base = getattr(builtins, kind, None)
    if not (isinstance(base, type) and issubclass(base, Exception)) or kind in ("StopIteration", "GeneratorExit"):
        return StudentError(kind, message)
    if kind not in _ERRORS:
        _ERRORS[kind] = type(f"Student{kind}", (StudentError, base), {"__init__": StudentError.__init__})
    return _ERRORS[kind](kind, message)


class StudentGone(StudentError):
    """The student's process is dead: killed at its deadline, or it exited or crashed."""


@dataclass
class Limits:
    """Resource limits of one student process (set in it before any student code runs)."""

    memory_mb: int = 4096  # RLIMIT_AS: address space (torch alone maps ~0.6 GB)
    cpu_s: int = 600  # RLIMIT_CPU
    nproc: int = 64  # RLIMIT_NPROC (threads count): only under bubblewrap, where it counts the sandbox's processes
    fsize_mb: int = 256  # RLIMIT_FSIZE: largest file it may write

    @classmethod
    def for_timeout(cls, timeout: float, **limits) -> Limits:
        """The limits for a grading run of `timeout` seconds per cell: CPU time 8 cells' worth plus a minute."""
        return cls(cpu_s=int(timeout * 8) + 60, **limits)


def find_bwrap() -> str | None:
    """The bubblewrap executable, if installed and able to create a sandbox here (user namespaces may be off)."""
    path = shutil.which("bwrap")
    if path is None or (os.geteuid() == 0 and shutil.which("setpriv") is None):  # root drops to nobody by setpriv
        return None
    if path not in _BWRAP_OK:
        try:
            probe = subprocess.run(
                [path, *_namespace_flags(), "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "true"],
                capture_output=True,
                timeout=30,
            )
            _BWRAP_OK[path] = probe.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            _BWRAP_OK[path] = False
    return path if _BWRAP_OK[path] else None


def protections(bwrap: str | None) -> str:
    """One line saying how student code is isolated (and, without bubblewrap, which protections are off)."""
    if bwrap:
        return (
            "bubblewrap sandbox: private read-only filesystem view, no network, own pid namespace, "
            "memory/CPU/process limits, killed at its deadline"
        )
    return (
        "NO SANDBOX (bubblewrap not available): student code runs in a separate process with memory/CPU limits and a "
        "deadline, but it can read and write your files (answer key included), use the network and leave detached "
        "processes behind; grade on Linux with bubblewrap installed"
    )


def _namespace_flags() -> list[str]:
    if os.geteuid() == 0:  # root: no user namespace, so that setpriv can drop to nobody (RLIMIT_NPROC then holds)
        return ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    return ["--unshare-all", "--cap-drop", "ALL"]


def _under(path: Path, roots) -> bool:
    return any(path == r or r in path.parents for r in roots)


def bwrap_command(bwrap: str, scratch: Path, hide: list[Path]) -> tuple[list[str], str]:
    """The bubblewrap prefix of the student's command line and the working folder inside the sandbox: the system
    (/usr) and the Python installation read-only, the fmtoy package read-only, `scratch` as the only writable folder
    (at /home/student), a private /tmp, /proc and /dev; `hide` masked wherever it lies under what is visible."""
    import fmtoy

    roots: list[Path] = [Path("/usr")]
    wanted = [sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix, Path(fmtoy.__file__).parent]
    binds: list[tuple[Path, Path]] = []
    for p in wanted:
        for dest in dict.fromkeys([Path(os.path.abspath(p)), Path(os.path.realpath(p))]):
            src = Path(os.path.realpath(p))
            if src.is_dir() and not _under(dest, roots):
                roots.append(dest)
                binds.append((src, dest))
    cmd = [bwrap, *_namespace_flags(), "--die-with-parent", "--new-session", "--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib64", "lib32", "libx32"):
        top = Path("/") / name
        if top.is_symlink():
            cmd += ["--symlink", os.readlink(top), str(top)]
        elif top.is_dir():
            cmd += ["--ro-bind", str(top), str(top)]
            roots.append(top)
    cmd += ["--tmpfs", "/tmp"]  # first: a checkout or a venv under /tmp is bound on top of the private /tmp
    parents = sorted({a for _, d in binds for a in d.parents if a != Path("/") and not _under(a, roots)}, key=str)
    for a in parents:
        cmd += ["--perms", "0755", "--dir", str(a)]
    for src, dest in binds:
        cmd += ["--ro-bind", str(src), str(dest)]
    for h in hide:
        h = Path(os.path.realpath(h))
        if h.exists() and _under(h, roots):
            cmd += ["--tmpfs", str(h)] if h.is_dir() else ["--ro-bind", "/dev/null", str(h)]
    home = "/home/student"
    cmd += ["--dev", "/dev", "--proc", "/proc", "--perms", "0755", "--dir", "/home"]
    cmd += ["--bind", str(scratch), home, "--chdir", home, "--clearenv"]
    for k, v in _child_env(home).items():
        cmd += ["--setenv", k, v]
    return cmd, home


def _child_env(home: str) -> dict[str, str]:
    return {
        "HOME": home,
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
    }


# --------------------------------------------------------------------------------------------------- plain data in
class _Bad(Exception):
    pass


_TORCH = {name: name for name in _student.TORCH_DTYPES}


def decode(value, grads: list | None = None, session=None, depth: int = 0):
    """Plain data from the student's process as Python values; tensors it marked as carrying gradient are appended
    to `grads` (and made to require grad); references become StudentObject proxies of `session`."""
    import torch

    if depth > 70:
        raise _Bad("nested too deeply")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [decode(v, grads, session, depth + 1) for v in value]
    if not (isinstance(value, dict) and len(value) == 1):
        raise _Bad(f"unexpected {type(value).__name__}")
    ((tag, body),) = value.items()
    if tag == "$tuple" and isinstance(body, list):
        return tuple(decode(v, grads, session, depth + 1) for v in body)
    if tag == "$dict" and isinstance(body, list):
        out = {}
        for pair in body:
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
                raise _Bad("bad dict entry")
            out[pair[0]] = decode(pair[1], grads, session, depth + 1)
        return out
    if tag == "$tensor" and isinstance(body, list) and len(body) == 4:
        name, shape, data, grad = body
        if name not in _TORCH:
            raise _Bad(f"dtype {name!r}")
        dtype = getattr(torch, name)
        raw, shape = _raw(data), _shape(shape)
        numel = 1
        for s in shape:
            numel *= s
        if numel * torch.empty((), dtype=dtype).element_size() != len(raw):
            raise _Bad("tensor data does not match its shape")
        t = (
            torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
            if raw
            else torch.empty(shape, dtype=dtype)
        )
        if grad is not None and grads is not None and (t.is_floating_point() or t.is_complex()):
            t.requires_grad_(True)
            grads.append(t)
        return t
    if tag == "$ndarray" and isinstance(body, list) and len(body) == 3:
        import numpy as np

        name, shape, data = body
        if name not in _student.NUMPY_DTYPES:
            raise _Bad(f"dtype {name!r}")
        raw, shape, dt = _raw(data), _shape(shape), np.dtype(name)
        if int(np.prod(shape, dtype=np.int64)) * dt.itemsize != len(raw):
            raise _Bad("array data does not match its shape")
        return np.frombuffer(raw, dtype=dt).reshape(shape).copy()
    if tag == "$bytes" and isinstance(body, str):
        return _raw(body)
    if tag == "$complex" and isinstance(body, list) and len(body) == 2 and all(isinstance(v, float) for v in body):
        return complex(*body)
    if tag == "$dtype" and body in _TORCH:
        return getattr(torch, body)
    if tag == "$ref" and isinstance(body, int) and session is not None:
        return StudentObject(session, body, "object")
    raise _Bad(f"unexpected {tag!r}")


def _raw(data) -> bytes:
    if not isinstance(data, str):
        raise _Bad("data is not base64 text")
    try:
        return base64.b64decode(data, validate=True)
    except ValueError as e:
        raise _Bad(str(e)) from None


def _shape(shape) -> list[int]:
    if not (isinstance(shape, list) and len(shape) <= 32 and all(type(s) is int and 0 <= s < 2**40 for s in shape)):
        raise _Bad("bad shape")
    return shape


# ------------------------------------------------------------------------------------------------ the test side
class StudentObject:
    """A name the student's solution defined (a function, a class, an object), seen from the instructor's tests:
    calling it calls the student's object in the student's process, with copies of the arguments."""

    __slots__ = ("_session", "_ref", "_name")

    def __init__(self, session, ref: int, name: str):
        self._session, self._ref, self._name = session, ref, name

    def __call__(self, *args, **kwargs):
        return self._session.call(self._ref, args, kwargs)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return self._session.getattr(self._ref, name)

    def __repr__(self) -> str:
        return f"<student's {self._name}>"


def _importable(fn) -> bool:
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    if module is None or "<" in getattr(fn, "__qualname__", "<"):
        return False
    obj = module
    for part in fn.__qualname__.split("."):
        obj = getattr(obj, part, None)
    return obj is fn


class _ArgPickler(pickle.Pickler):
    def __init__(self, file, session, *, all_callables: bool):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.session, self.all_callables = session, all_callables
        self.leaves: list = []
        self.seen: dict[int, int] = {}

    def persistent_id(self, obj):
        import torch

        if isinstance(obj, torch.Tensor):
            if not obj.requires_grad:
                return None
            k = self.seen.get(id(obj))
            if k is None:
                k = self.seen[id(obj)] = len(self.leaves)
                self.leaves.append(obj)
            return ("leaf", k, obj.detach(), isinstance(obj, torch.nn.Parameter))
        if isinstance(obj, StudentObject):
            raise pickle.PicklingError("the student's own objects cannot be passed back to it")
        if isinstance(obj, (types.FunctionType, types.LambdaType)) and not _importable(obj):
            return ("cb", self.session.callback(obj), getattr(obj, "__name__", "callback"))
        if (
            self.all_callables
            and callable(obj)
            and not isinstance(obj, (type, torch.nn.Module, types.BuiltinFunctionType, types.ModuleType))
        ):
            return ("cb", self.session.callback(obj), type(obj).__name__)
        return None


class _OutPickler(pickle.Pickler):
    """A callback's result for the student's process: tensors that carry gradient are marked so that the student's
    autograd graph joins them (their vector-Jacobian products are computed here on request)."""

    def __init__(self, file):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.outs: list = []

    def persistent_id(self, obj):
        import torch

        if isinstance(obj, torch.Tensor) and obj.requires_grad:
            self.outs.append(obj)
            return ("out", len(self.outs) - 1, obj.detach())
        return None


def _remote_grad():
    import torch

    class RemoteGrad(torch.autograd.Function):
        """Outputs of a student call joined to the test's autograd graph: backward asks the student's process for
        the gradients of its inputs (the test's tensors and a network's parameters)."""

        @staticmethod
        def forward(ctx, session, call_id, outs, *leaves):
            ctx.session, ctx.call_id = session, call_id
            ctx.meta = [(leaf.shape, leaf.dtype) for leaf in leaves]
            return tuple(o.detach().clone() for o in outs)

        @staticmethod
        def backward(ctx, *grads):
            return (None, None, None, *ctx.session.backward(ctx.call_id, grads, ctx.meta))

    return RemoteGrad


class StudentProcess:
    """One student process: started fresh for an exercise, killed (with everything it started) by close()."""

    def __init__(self, scratch: Path, *, limits: Limits, bwrap: str | None, hide: list[Path], startup_s: float = 60,
                 preload: tuple[str, ...] = ("torch",)):  # fmt: skip
        self.scratch, self.limits, self.bwrap = scratch, limits, bwrap
        self.callbacks: dict[int, object] = {}
        self.cb_graphs: dict[int, tuple] = {}
        self.next_id = 1
        self.deadline = time.monotonic() + startup_s
        self.timeout_s = startup_s
        self.dead: str | None = None
        self.timed_out = False
        self._grad_fn = None
        self._inner_pid: int | None = None
        t2s_r, self._t2s = os.pipe()
        self._s2t, s2t_w = os.pipe()
        info_r, info_w = os.pipe()
        os.set_blocking(self._t2s, False)
        os.set_blocking(self._s2t, False)
        debug = os.environ.get("FMTOY_GRADE_DEBUG") == "1"
        nproc = limits.nproc if bwrap else 0  # without a pid namespace the count is the whole user's
        runner = [
            sys.executable, "-I", str(RUNNER), str(t2s_r), str(s2t_w),
            str(limits.memory_mb), str(limits.cpu_s), str(nproc), str(limits.fsize_mb),
            ",".join(m for m in preload if m in PRELOADABLE),
        ]  # fmt: skip
        if bwrap:
            prefix, home = bwrap_command(bwrap, scratch, hide)
            prefix[1:1] = ["--info-fd", str(info_w)]
            if os.geteuid() == 0:
                os.chown(scratch, NOBODY, NOBODY)
                runner = [
                    "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                    "--inh-caps=-all", "--bounding-set=-all", "--", *runner,
                ]  # fmt: skip
            cmd, cwd, env = [*prefix, "--", *runner], None, None
        else:
            cmd, cwd, env = runner, str(scratch), {**_child_env(str(scratch)), "PATH": os.environ.get("PATH", "")}
        try:
            self.proc = subprocess.Popen(
                cmd,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=None if debug else subprocess.DEVNULL,
                stderr=None if debug else subprocess.DEVNULL,
                pass_fds=(t2s_r, s2t_w, info_w),
                start_new_session=True,
            )
        finally:
            for fd in (t2s_r, s2t_w, info_w):
                os.close(fd)
        self._info = info_r
        try:
            ready = self._read_reply()
            if ready.get("op") != "ready":
                raise StudentGone("ProtocolError", "the student's process did not start")
        except StudentError:
            self.close()
            raise
        if bwrap:
            self._read_info()

    # ---------------------------------------------------------------------------------------------- lifetime
    def _read_info(self) -> None:
        try:
            r, _, _ = select.select([self._info], [], [], 2.0)
            if r:
                info = json.loads(os.read(self._info, 65536).decode() or "{}")
                pid = info.get("child-pid")
                self._inner_pid = pid if isinstance(pid, int) and pid > 1 else None
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        """Kill the student's process and everything it started (the sandbox's pid namespace, or its process group
        without one); return once they are gone."""
        if self._inner_pid:  # pid 1 of the sandbox: its death takes every process in the namespace with it
            try:
                os.kill(self._inner_pid, signal.SIGKILL)
                # bwrap reaps it and exits; killed first, bwrap would orphan it to the machine's init, which may
                # take a second or more to reap it (seen: 1.5 s), and close() waits for it to be gone
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (OSError, AttributeError):
            self.proc.kill()
        self.proc.wait()
        if self._inner_pid:
            end = time.monotonic() + 10
            while Path(f"/proc/{self._inner_pid}").exists() and time.monotonic() < end:
                time.sleep(0.01)
        for fd in (self._t2s, self._s2t, self._info):
            try:
                os.close(fd)
            except OSError:
                pass
        self._t2s = self._s2t = self._info = -1
        if self.dead is None:
            self.dead = "closed"

    def _die(self, why: str, *, timed_out: bool = False):
        if self.dead is None or self.dead == "closed":
            self.dead = why
        self.timed_out = self.timed_out or timed_out
        self.close()
        raise StudentGone("Timeout" if timed_out else "ProcessDied", why)

    def _exit_status(self) -> str:
        try:
            rc = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return "it stopped answering"
        if rc < 0:
            return f"killed by {signal.Signals(-rc).name}: a memory or CPU limit?"
        return f"exit status {rc}"

    # ---------------------------------------------------------------------------------------------- messages
    def _remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            self._die(f"timed out after {self.timeout_s:g} s", timed_out=True)
        return left

    def _send(self, message: dict) -> None:
        if self.dead:
            raise StudentGone("ProcessDied", f"the student's process is gone ({self.dead})")
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        data = memoryview(_student.HEADER.pack(len(payload)) + payload)
        while data:
            _, w, _ = select.select([], [self._t2s], [], self._remaining())
            if not w:
                continue
            try:
                n = os.write(self._t2s, data)
            except BlockingIOError:
                continue
            except BrokenPipeError:
                self._die(f"the student's process died ({self._exit_status()})")
            data = data[n:]

    def _read_exact(self, n: int) -> bytes:
        chunks, left = [], n
        while left:
            r, _, _ = select.select([self._s2t], [], [], self._remaining())
            if not r:
                continue
            try:
                chunk = os.read(self._s2t, min(left, 1 << 20))
            except BlockingIOError:
                continue
            if not chunk:
                self._die(f"the student's process died ({self._exit_status()})")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _read_reply(self) -> dict:
        (n,) = _student.HEADER.unpack(self._read_exact(_student.HEADER.size))
        if n > _student.MAX_MESSAGE:
            self._die(f"the student's process sent {n} bytes (at most {_student.MAX_MESSAGE})")
        try:
            reply = json.loads(self._read_exact(n).decode("utf-8"))
        except (ValueError, RecursionError):
            self._die("the student's process sent something that is not JSON")
        if not isinstance(reply, dict):
            self._die("the student's process sent something that is not a reply")
        return reply

    def _roundtrip(self, message: dict) -> dict:
        """Send a request; serve the callbacks the student's code makes meanwhile; return the final reply."""
        self._send(message)
        while True:
            reply = self._read_reply()
            op = reply.get("op")
            if op == "callback":
                self._serve_callback(reply)
            elif op == "cb_backward":
                self._serve_cb_backward(reply)
            elif op == "error":
                raise student_error(_kind(reply.get("type")), str(reply.get("message", ""))[:2000])
            else:
                return reply

    def _decode(self, value, grads=None):
        try:
            return decode(value, grads, self)
        except (_Bad, RecursionError, ValueError, TypeError) as e:
            raise StudentError(
                "ProtocolError", f"the student's process sent data the grader cannot read ({e})"
            ) from None

    # ---------------------------------------------------------------------------------------------- requests
    def run_solution(self, source: str, filename: str) -> tuple[dict, str]:
        """Run the solution cell; return (name -> value or proxy, the error it raised as 'Name: message' or '')."""
        reply = self._roundtrip({"op": "solution", "source": source, "filename": filename})
        names = {}
        got = reply.get("names")
        for name, info in (got if isinstance(got, dict) else {}).items():
            if not (isinstance(name, str) and name.isidentifier() and isinstance(info, dict)):
                continue
            if info.get("kind") in ("callable", "object") and isinstance(info.get("ref"), int):
                names[name] = StudentObject(self, info["ref"], name)
            elif info.get("kind") == "value":
                try:
                    names[name] = decode(info.get("value"), None, self)
                except (_Bad, RecursionError, ValueError, TypeError):
                    continue
        error = reply.get("error")
        message = ""
        if isinstance(error, dict):
            message = f"{_kind(error.get('type'))}: {str(error.get('message', ''))}"[:500]
        return names, message

    def call(self, ref: int, args, kwargs):
        import torch

        pickler_leaves, data = None, None
        for all_callables in (False, True):
            buf = io.BytesIO()
            pickler = _ArgPickler(buf, self, all_callables=all_callables)
            try:
                pickler.dump((list(args), kwargs))
            except (pickle.PicklingError, TypeError, AttributeError) as e:
                error = e
                continue
            pickler_leaves, data = pickler.leaves, buf.getvalue()
            break
        if data is None:
            raise TypeError(f"an argument cannot be sent to the student's process: {error}")
        grad_on = torch.is_grad_enabled()
        reply = self._roundtrip({"op": "call", "target": ref, "args": data, "grad": grad_on})
        grads: list = []
        value = self._decode(reply.get("value"), grads if grad_on else None)
        call = reply.get("call")
        if grads and pickler_leaves and isinstance(call, int):
            if self._grad_fn is None:
                self._grad_fn = _remote_grad()
            wrapped = self._grad_fn.apply(self, call, grads, *pickler_leaves)
            value = _student._substitute(value, {id(g): w for g, w in zip(grads, wrapped)})
        return value

    def getattr(self, ref: int, name: str):
        reply = self._roundtrip({"op": "getattr", "target": ref, "name": name})
        return self._decode(reply.get("value"))

    def backward(self, call: int, grads, meta) -> list:
        payload = pickle.dumps([None if g is None else g.detach() for g in grads])
        reply = self._roundtrip({"op": "backward", "call": call, "grads": payload})
        got = self._decode(reply.get("value"))
        if not (isinstance(got, list) and len(got) == len(meta)):
            raise StudentError("ProtocolError", "the student's process sent gradients of the wrong length")
        out = []
        for g, (shape, dtype) in zip(got, meta):
            if g is None:
                out.append(None)
            elif _is_tensor(g) and g.shape == shape:
                out.append(g.to(dtype))
            else:
                raise StudentError("ProtocolError", "the student's process sent a gradient of the wrong shape")
        return out

    # --------------------------------------------------------------------------------------------- callbacks
    def callback(self, fn) -> int:
        cid = self.next_id
        self.next_id += 1
        self.callbacks[cid] = fn
        return cid

    def _reply(self, message: dict) -> None:
        self._send(message)

    def _serve_callback(self, request: dict) -> None:
        import torch

        fn = self.callbacks.get(request.get("cb"))
        grads: list = []
        try:
            if fn is None:
                raise StudentError("ProtocolError", "no such callback")
            args = self._decode(request.get("args"), grads if request.get("grad") else None)
            if not (isinstance(args, list) and len(args) == 2 and isinstance(args[0], list)):
                raise StudentError("ProtocolError", "bad callback arguments")
            with torch.set_grad_enabled(bool(request.get("grad"))):
                value = fn(*args[0], **(args[1] if isinstance(args[1], dict) else {}))
            buf = io.BytesIO()
            pickler = _OutPickler(buf)
            pickler.dump(value)
        except Exception as e:  # noqa: BLE001  the test's function failed on the student's arguments
            self._reply({"op": "reply_error", "type": type(e).__name__, "message": str(e)[:500]})
            return
        call = None
        if pickler.outs and grads:
            call = self.callback(None)
            self.cb_graphs[call] = (pickler.outs, grads)
        self._reply({"op": "reply", "value": buf.getvalue(), "call": call})

    def _serve_cb_backward(self, request: dict) -> None:
        import torch

        try:
            outs, leaves = self.cb_graphs[request.get("call")]
            grads = self._decode(request.get("grads"))
            if not (isinstance(grads, list) and len(grads) == len(outs)):
                raise StudentError("ProtocolError", "bad gradients")
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
            if not all(_is_tensor(g) and g.shape == o.shape for o, g in pairs):
                raise StudentError("ProtocolError", "bad gradient shape")
            got = (
                torch.autograd.grad(
                    [o for o, _ in pairs],
                    leaves,
                    [g.to(o.dtype) for o, g in pairs],
                    allow_unused=True,
                    retain_graph=True,
                )
                if pairs
                else [None] * len(leaves)
            )
        except Exception as e:  # noqa: BLE001
            self._reply({"op": "reply_error", "type": type(e).__name__, "message": str(e)[:500]})
            return
        self._reply({"op": "reply", "value": pickle.dumps([None if g is None else g.detach() for g in got])})


def _is_tensor(value) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _kind(name) -> str:
    """An exception name from the student's process, made safe to print."""
    name = name if isinstance(name, str) else "Error"
    return "".join(c for c in name if c.isalnum() or c == "_")[:60] or "Error"
