"""Every method under DDP and FSDP2 (2 gloo processes on loopback) matches single-process training."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

import specpeft

HERE = os.path.dirname(__file__)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("dist") / "results.json")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "distributed_worker.py"), out, str(_free_port())],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as fh:
        return json.load(fh)


@pytest.mark.parametrize("method", specpeft.list_methods())
def test_ddp_and_fsdp2_match_single_process(results: dict, method: str) -> None:
    entry = results[method]
    assert "error" not in entry, entry.get("error")
    assert entry["ddp"] < 1e-5, entry
    assert entry["fsdp2"] < 1e-5, entry
    assert entry["reload_params_vs_sharded"] == 0.0, entry
    assert entry["reload_vs_single"] < 1e-4, entry
