"""Shared fixtures and checks: the real data beside the checkout, one local Ray per session,
a tiny model, and the exactly-once check every screening test makes."""
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]
GPAW_LABELS = REPO / "data" / "labels" / "gpaw-pbe-lcao-dzp"
TINY = {"hidden": 16, "embedding": 8, "edge_rbf": 16, "angle_rbf": 8, "alignn_layers": 1,
        "gcn_layers": 1}


def repo_env() -> dict:
    """The environment for a Python subprocess that imports this checkout's screener."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real data not found at {SHARED_DATA}: clone the project beside ../shared")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray for the whole session; tests that need Ray take this fixture."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """An untrained D-ALIGNN small enough that prediction costs next to nothing."""
    import torch

    from screener.model import build_model, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(path, build_model("d-alignn", TINY), {"model_id": "tiny-test"})
    return path


def screen_cmd(*args: str) -> list[str]:
    """`screen run` in a fresh interpreter, for runs that are killed or run beside the test."""
    return [sys.executable, "-m", "screener.cli", "run", "--quiet", *args]


def ray_workers(pgid: int, title: str) -> list[int]:
    """Ray workers whose title starts with `title` (Ray titles a worker `ray::<task>` while it
    runs one) and whose parent, a raylet, is in process group `pgid`. Workers lead their own
    process group, so the raylet is what ties them to this test's run and no one else's."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:  # exited meanwhile
                continue
            procs[int(entry.name)] = (int(stat[1]), int(stat[2]), cmdline)
    return [pid for pid, (ppid, _, cmdline) in procs.items()
            if cmdline.startswith(title.encode()) and procs.get(ppid, (0, 0))[1] == pgid]


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with start_new_session=True and its group, which holds any
    Ray it started (Ray workers lead their own groups but exit with their raylet); reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def all_ids(results: Path) -> list[str]:
    """Ids of every prediction and failure, repeats kept."""
    from screener.results.query import read_failures, read_predictions

    predicted = list(read_predictions(results, columns=["ids"])["ids"])
    failed = [f.id for f in read_failures(results)]
    return [str(i) for i in predicted + failed]


def complete_ids(results: Path) -> list[str]:
    """all_ids, after checking that the results dir holds exactly its manifest: every shard
    file listed with its size and sha256, none listed missing, no half-written file left."""
    from screener.io.files import file_sha256
    from screener.results.manifest import Manifest
    from screener.results.shards import KINDS

    manifest = Manifest.load(results)
    files = {p.relative_to(results).as_posix() for kind in KINDS
             for p in (results / kind).iterdir()}
    assert files == set(manifest.shards), f"files not as listed: {files ^ set(manifest.shards)}"
    for name, info in manifest.shards.items():
        assert (results / name).stat().st_size == info["size"], name
        assert file_sha256(results / name) == info["sha256"], name
    return all_ids(results)
