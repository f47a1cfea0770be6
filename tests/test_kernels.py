"""fmtoy.kernels: the kernels fmtoy starts (book build, autograder) use the ipc transport, TCP on request."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

from fmtoy.kernels import kernels_over_ipc

pytestmark = pytest.mark.skipif(os.name != "posix", reason="ipc needs Unix domain sockets")


def _transport(monkeypatch, value):
    monkeypatch.setenv("FMTOY_KERNEL_TRANSPORT", value)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import json; from ipykernel import get_connection_info\n"
        "info = json.loads(get_connection_info()); print(info['transport'], info['ip'])")])
    NotebookClient(nb, timeout=60, kernel_name="python3").execute()
    return nb.cells[0].outputs[0]["text"].split()


def test_kernels_use_ipc_unless_tcp_is_asked_for(monkeypatch):
    monkeypatch.setattr(NotebookClient, "create_kernel_manager", NotebookClient.create_kernel_manager)  # undo after
    monkeypatch.setenv("FMTOY_KERNEL_TRANSPORT", "tcp")
    kernels_over_ipc()                                        # tcp asked for: nothing patched
    assert not getattr(NotebookClient.create_kernel_manager, "_fmtoy_ipc", False)
    assert _transport(monkeypatch, "tcp")[0] == "tcp"
    monkeypatch.setenv("FMTOY_KERNEL_TRANSPORT", "ipc")
    kernels_over_ipc()
    kernels_over_ipc()                                        # idempotent
    transport, ip = _transport(monkeypatch, "ipc")
    assert transport == "ipc" and os.path.isabs(ip)           # an absolute socket path (a relative one can hang)
    assert len(ip) < 100                                      # a Unix socket path has at most 107 bytes
