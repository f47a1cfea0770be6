"""The student side of the autograder: this file runs (as a script, ``python -I _student.py``) in the student's own
process, usually inside bubblewrap, and never in the grader's.

It reads requests from fd 3 and writes replies to fd 4. Requests come from the trusted grader and are pickled (the
student's process gains nothing by receiving pickle); replies are JSON only, with tensors and arrays as raw bytes
plus shape and dtype, so that nothing the student's code returns can run code in the grader (``wire`` below).

Requests: ``solution`` (run the solution cell; reply with the names it defined), ``call`` (call one of them),
``getattr``, ``backward`` (gradients of an earlier call's outputs with respect to its inputs, for tests that
differentiate through the student's function). While a request is in flight the student's code may call back into
the grader (``callback``: a function of the test that could not be sent, e.g. a lambda; ``cb_backward``: its
gradients), so that autograd works across the process boundary in both directions.

This file must not import fmtoy (the grader decides what the sandbox can see) and imports torch only when needed.
"""

from __future__ import annotations

import base64
import builtins
import json
import os
import pickle
import struct
import sys
import types

REQUESTS, REPLIES = 3, 4  # replaced by the fds named on the command line
HEADER = struct.Struct(">Q")
MAX_MESSAGE = 256 * 2**20  # bytes; the grader refuses longer replies

TORCH_DTYPES = (
    "float64", "float32", "float16", "bfloat16", "complex64", "complex128",
    "int64", "int32", "int16", "int8", "uint8", "bool",
)  # fmt: skip
NUMPY_DTYPES = (
    "float64", "float32", "float16", "complex64", "complex128",
    "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool",
)  # fmt: skip


# ------------------------------------------------------------------------------------------------------------ framing
def write_message(fd: int, payload: bytes) -> None:
    data = HEADER.pack(len(payload)) + payload
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def read_exact(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the grader closed the channel")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_message(fd: int) -> bytes:
    (n,) = HEADER.unpack(read_exact(fd, HEADER.size))
    return read_exact(fd, n)


# --------------------------------------------------------------------------------------------- plain data (the wire)
class NotPlainData(TypeError):
    pass


def encode(value, *, grads: list | None = None, refs=None, depth: int = 0):
    """`value` as JSON-able plain data. Tensors that require grad are appended to `grads` (their index is sent);
    objects that are not plain data become references via refs(obj) -> id, or raise NotPlainData."""
    if depth > 64:
        raise NotPlainData("nested too deeply")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value if abs(value) < 2**63 else float(value)
    if isinstance(value, float):
        return value
    if isinstance(value, complex):
        return {"$complex": [value.real, value.imag]}
    if isinstance(value, list):
        return [encode(v, grads=grads, refs=refs, depth=depth + 1) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    torch = sys.modules.get("torch")
    if torch is not None:
        if isinstance(value, torch.Size):
            return {"$tuple": [int(v) for v in value]}
        if isinstance(value, torch.dtype):
            name = str(value).removeprefix("torch.")
            if name in TORCH_DTYPES:
                return {"$dtype": name}
        if isinstance(value, torch.Tensor):
            return _encode_tensor(torch, value, grads)
    if isinstance(value, tuple):
        return {"$tuple": [encode(v, grads=grads, refs=refs, depth=depth + 1) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"$dict": [[k, encode(v, grads=grads, refs=refs, depth=depth + 1)] for k, v in value.items()]}
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(value, np.generic) and value.dtype.name in NUMPY_DTYPES:
            return encode(value.item(), depth=depth + 1)
        if isinstance(value, np.ndarray) and value.dtype.name in NUMPY_DTYPES:
            data = np.ascontiguousarray(value).tobytes()
            return {"$ndarray": [value.dtype.name, list(value.shape), base64.b64encode(data).decode("ascii")]}
    if refs is not None:
        return {"$ref": refs(value)}
    raise NotPlainData(f"a {type(value).__name__} is not plain data (numbers, strings, lists, tensors, arrays)")


def _encode_tensor(torch, value, grads):
    name = str(value.dtype).removeprefix("torch.")
    if name not in TORCH_DTYPES or value.layout != torch.strided:
        raise NotPlainData(f"a tensor of dtype {value.dtype} / layout {value.layout} cannot be sent")
    t = value.detach().cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""  # any dtype, bfloat16 too
    grad = None
    if grads is not None and value.requires_grad:
        grad = len(grads)
        grads.append(value)
    return {"$tensor": [name, list(t.shape), base64.b64encode(raw).decode("ascii"), grad]}


def error_reply(exc: BaseException) -> dict:
    return {"op": "error", "type": type(exc).__name__[:100], "message": str(exc)[:2000]}


# --------------------------------------------------------------------------------------------------- the main loop
class Channel:
    def __init__(self):
        self.objects: dict[int, object] = {}  # references handed to the grader
        self.graphs: dict[int, tuple] = {}  # call id -> (outputs that require grad, leaves)
        self.next_id = 1
        self.namespace = {"__name__": "__main__", "__builtins__": builtins}  # the solution cells' globals

    def ref(self, obj) -> int:
        i = self.next_id
        self.next_id += 1
        self.objects[i] = obj
        return i

    def send(self, reply: dict) -> None:
        write_message(REPLIES, json.dumps(reply, allow_nan=True).encode("utf-8"))

    def receive(self):
        return pickle.loads(read_message(REQUESTS))  # from the trusted grader

    def request(self, message: dict):
        """A call back into the grader while one of its requests is in flight; returns its 'reply' message."""
        self.send(message)
        reply = self.receive()
        if reply.get("op") == "reply_error":
            raise RuntimeError(f"the test's function raised {reply['type']}: {reply['message']}")
        return reply


class _Unpickler(pickle.Unpickler):
    """Loads the grader's arguments: tensors that require grad there become leaves here (their gradients are sent
    back on request); functions that could not be sent become callbacks."""

    def __init__(self, data, channel: Channel, leaves: list):
        import io

        super().__init__(io.BytesIO(data))
        self.channel, self.leaves = channel, leaves

    def persistent_load(self, pid):
        kind = pid[0]
        if kind == "leaf":
            import torch

            _, k, tensor, is_param = pid  # k counts up from 0 in the order the grader met them (repeats: same k)
            if k < len(self.leaves):
                return self.leaves[k]
            leaf = torch.nn.Parameter(tensor) if is_param else tensor.requires_grad_(True)
            self.leaves.append(leaf)
            return leaf
        if kind == "cb":
            return _callback(self.channel, pid[1], pid[2])
        if kind == "out":  # an output of a callback that carries gradient (see _callback)
            self.leaves.append(pid[2])
            return pid[2]
        raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")


def _callback(channel: Channel, cid: int, name: str):
    def call(*args, **kwargs):
        import torch

        grads: list = []
        grad_on = torch.is_grad_enabled()
        payload = encode([list(args), kwargs], grads=grads if grad_on else None)
        reply = channel.request({"op": "callback", "cb": cid, "args": payload, "grad": grad_on})
        outs: list = []
        value = _Unpickler(reply["value"], channel, outs).load()
        if not (outs and grads and reply.get("call")):
            return value
        wrapped = _CallbackGrad.apply(channel, reply["call"], outs, *grads)
        mapping = {id(o): w for o, w in zip(outs, wrapped)}
        return _substitute(value, mapping)

    call.__name__ = call.__qualname__ = name
    return call


def _substitute(value, mapping):
    if id(value) in mapping:
        return mapping[id(value)]
    if isinstance(value, list):
        return [_substitute(v, mapping) for v in value]
    if isinstance(value, tuple):
        return tuple(_substitute(v, mapping) for v in value)
    if isinstance(value, dict):
        return {k: _substitute(v, mapping) for k, v in value.items()}
    return value


def _grad_function():
    import torch

    class CallbackGrad(torch.autograd.Function):
        """Outputs of a callback (computed in the grader) joined to the student's autograd graph: their backward asks
        the grader for the vector-Jacobian product."""

        @staticmethod
        def forward(ctx, channel, call_id, outs, *inputs):
            ctx.channel, ctx.call_id = channel, call_id
            ctx.shapes = [(i.shape, i.dtype) for i in inputs]
            return tuple(o.detach().clone() for o in outs)

        @staticmethod
        def backward(ctx, *grads):
            payload = encode([g if g is not None else None for g in grads])
            reply = ctx.channel.request({"op": "cb_backward", "call": ctx.call_id, "grads": payload})
            got = pickle.loads(reply["value"])
            return (None, None, None, *got)

    return CallbackGrad


class _Lazy:
    def __init__(self):
        self.fn = None

    def apply(self, *args):
        if self.fn is None:
            self.fn = _grad_function()
        return self.fn.apply(*args)


_CallbackGrad = _Lazy()


def _describe(channel: Channel, namespace: dict) -> dict:
    names = {}
    for name, value in namespace.items():
        if name.startswith("__") or isinstance(value, types.ModuleType):
            continue
        if callable(value):
            names[name] = {"kind": "callable", "ref": channel.ref(value)}
            continue
        try:
            names[name] = {"kind": "value", "value": encode(value)}
        except NotPlainData:
            names[name] = {"kind": "object", "ref": channel.ref(value)}
    return names


def _encode_result(channel: Channel, result, leaves: list) -> dict:
    outs: list = []
    payload = encode(result, grads=outs, refs=channel.ref)
    call = None
    if outs and leaves:
        call = channel.ref(None)
        channel.graphs[call] = (outs, leaves)
    return {"op": "result", "value": payload, "call": call}


def handle(channel: Channel, request: dict) -> dict:
    op = request.get("op")
    if op == "solution":
        namespace = channel.namespace
        error = None
        try:
            exec(compile(request["source"], request["filename"], "exec"), namespace)
        except BaseException as e:  # noqa: BLE001  the student's error, reported as such
            error = {"type": type(e).__name__[:100], "message": str(e)[:2000]}
        return {"op": "names", "names": _describe(channel, namespace), "error": error}
    if op == "call":
        leaves: list = []
        target = channel.objects[request["target"]]
        args, kwargs = _Unpickler(request["args"], channel, leaves).load()
        torch = sys.modules.get("torch")  # loaded by the preload, the arguments or the student: else not needed
        if torch is None:
            result = target(*args, **kwargs)
        else:
            with torch.set_grad_enabled(request.get("grad", True)):
                result = target(*args, **kwargs)
        return _encode_result(channel, result, leaves)
    if op == "getattr":
        return {"op": "result", "value": encode(getattr(channel.objects[request["target"]], request["name"]),
                                                refs=channel.ref), "call": None}  # fmt: skip
    if op == "backward":
        import torch

        outs, leaves = channel.graphs[request["call"]]
        grads = pickle.loads(request["grads"])
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
        if not pairs:
            return {"op": "result", "value": encode([None] * len(leaves)), "call": None}
        got = torch.autograd.grad(
            [o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True, retain_graph=True
        )
        return {"op": "result", "value": encode(list(got)), "call": None}
    raise ValueError(f"unknown request {op!r}")


def set_limits(memory_mb: int, cpu_s: int, nproc: int, fsize_mb: int) -> None:
    try:
        import resource
    except ImportError:  # Windows
        return
    for name, value in (
        ("RLIMIT_AS", memory_mb * 2**20),
        ("RLIMIT_CPU", cpu_s),
        ("RLIMIT_NPROC", nproc),
        ("RLIMIT_FSIZE", fsize_mb * 2**20),
        ("RLIMIT_CORE", 0),
    ):
        if value <= 0 and name != "RLIMIT_CORE" or not hasattr(resource, name):
            continue
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (ValueError, OSError):
            pass


def main() -> None:
    global REQUESTS, REPLIES
    REQUESTS, REPLIES, memory_mb, cpu_s, nproc, fsize_mb = (int(v) for v in sys.argv[1:7])
    set_limits(memory_mb, cpu_s, nproc, fsize_mb)
    for name in filter(None, sys.argv[7].split(",")):  # what the answer key imports (numpy, torch): imported before
        if name in ("numpy", "torch"):  # the student's code runs, so that its import time is not billed to it
            __import__(name)

    channel = Channel()
    channel.send({"op": "ready"})
    while True:
        try:
            request = channel.receive()
        except EOFError:
            return
        try:
            reply = handle(channel, request)
        except BaseException as e:  # noqa: BLE001  raised by the student's code: sent as an error
            reply = error_reply(e)
        try:
            channel.send(reply)
        except NotPlainData as e:
            channel.send(error_reply(e))
        except (TypeError, ValueError) as e:  # e.g. a value json cannot write
            channel.send(error_reply(e))


if __name__ == "__main__":
    main()
