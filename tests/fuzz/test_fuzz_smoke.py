"""CI hook for ``fuzz/``: every harness runs over its seed corpus plus a bounded number of
mutations, and must finish without a crash (an exception its oracle does not allow, a
differential mismatch, a leak, or an input slower than ``-timeout``).

Each harness runs as CI would run it by hand -- ``python fuzz/NAME.py -runs=N -seed=S`` with
libFuzzer options -- in a subprocess, with the corpus it grows and any crash artifact in the
test's temp dir (never in the tree).  The run counts keep the whole file near a minute on a
loaded two-core machine; the long runs (a million executions each) are in ``fuzz/README.md``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

ROOT = Path(__file__).resolve().parents[2]

#: harness -> (mutation runs, -max_len): the slow harnesses get fewer runs.
HARNESSES = {
    "image_spec": (20000, 256),
    "qmp": (1500, 1024),
    "vhost_messages": (1500, 1024),
    "vhost_inflight": (800, 1024),
    "split_ring": (300, 1024),
    "packed_ring": (300, 1024),
    "qcow2_image": (800, 32768),
}


@pytest.mark.parametrize("name", sorted(HARNESSES))
def test_harness_finds_no_crash(name: str, tmp_path: Path) -> None:
    runs, max_len = HARNESSES[name]
    seeds = ROOT / "fuzz" / "corpus" / name
    assert any(seeds.iterdir()), f"no seed corpus for {name}"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    cmd = [sys.executable, str(ROOT / "fuzz" / f"{name}.py"), f"-runs={runs}", "-seed=1",
           f"-max_len={max_len}", "-timeout=20", "-rss_limit_mb=1024",
           f"-artifact_prefix={tmp_path}/", str(corpus), str(seeds)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=env, check=False)
    out = proc.stdout + proc.stderr
    crashes = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-",
                                                                       "leak-", "oom-"))]
    assert proc.returncode == 0 and not crashes, (
        f"{name} failed (exit {proc.returncode}, artifacts {crashes}):\n{out[-6000:]}")
    assert f"Done {runs} runs" in out, out[-3000:]
