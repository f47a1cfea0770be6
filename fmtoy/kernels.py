"""The Jupyter kernels fmtoy's processes start (the book build, the autograder) talk over Unix sockets (ipc)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid


def kernels_over_ipc() -> None:
    """Start the Jupyter kernels of this process on the ipc transport (Unix domain sockets in a private, short-named
    temporary folder) instead of TCP on localhost: no "Kernel is running over TCP without encryption" warning per
    kernel, and no race for free localhost ports with other builds and test runs on a busy machine. nbclient's kernel
    managers read no Jupyter config files (jupyter-book, myst-nb and jupyter-cache pass them none), so the process
    that starts them patches every manager nbclient creates (myst-nb's cache, force and inline modes and
    fmtoy.course.grade all call NotebookClient.create_kernel_manager). Idempotent. FMTOY_KERNEL_TRANSPORT=tcp keeps
    TCP; so do non-POSIX systems and kernels other than ipykernel."""
    if os.environ.get("FMTOY_KERNEL_TRANSPORT", "ipc").lower() != "ipc" or os.name != "posix":
        return
    from nbclient import NotebookClient

    if getattr(NotebookClient.create_kernel_manager, "_fmtoy_ipc", False):
        return
    create = NotebookClient.create_kernel_manager
    folder: list[str] = []

    def socket_folder() -> str:
        if not folder:
            base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
            if len(base) > 60 or not (os.path.isdir(base) and os.access(base, os.W_OK)):
                base = "/tmp"  # a Unix socket path has at most 107 bytes (103 on macOS)
            folder.append(tempfile.mkdtemp(prefix="fmk-", dir=base))  # mode 0700: only this user can connect
            atexit.register(shutil.rmtree, folder[0], True)
        return folder[0]

    def create_kernel_manager(self):
        km = create(self)
        if km.transport == "tcp" and km.ipykernel and not km.has_kernel:
            name = os.path.join(socket_folder(), uuid.uuid4().hex[:12])  # one name per kernel: NAME-1 ... NAME-5
            km.transport, km.ip, km.cache_ports, km.connection_file = "ipc", name, False, name + ".json"
        return km

    create_kernel_manager._fmtoy_ipc = True
    NotebookClient.create_kernel_manager = create_kernel_manager
