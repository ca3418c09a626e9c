"""A two-node Ray cluster on this machine with token authentication on: `screen run --address`
and `ray job submit` both finish every input exactly once using both nodes, clients without the
token are refused, and a run survives losing the second node."""
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, complete_ids, kill_group, screen_cmd

from screener.results.manifest import MANIFEST, Manifest
from screener.results.query import read_failures

pytestmark = pytest.mark.slow


def free_ports(n: int) -> list[int]:
    """n distinct unused ports. The sockets are held until all are bound: a port released by
    one probe can come back from the next (CI once gave one node's agent and metrics ports the
    same number)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Cluster:
    address: str
    dashboard: str
    env: dict[str, str]
    node2: subprocess.Popen
    node2_id: str


def start_node(args: list[str], env: dict[str, str], log: Path, agent_port: int,
               metrics_port: int) -> subprocess.Popen:
    """`ray start --block` in its own process group, so that the test stops exactly this node.
    Every port is given: the defaults would collide with other clusters on the machine."""
    ports = [f"--dashboard-agent-listen-port={agent_port}", f"--metrics-export-port={metrics_port}"]
    with log.open("w") as out:
        proc = subprocess.Popen(["ray", "start", "--block", "--disable-usage-stats", *ports, *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.time() + 180
    while "Ray runtime started" not in log.read_text():
        if proc.poll() is not None or time.time() > deadline:
            kill_group(proc)
            pytest.fail(f"ray start failed:\n{log.read_text()}")
        time.sleep(0.5)
    return proc


def ray_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", *args], env=env, capture_output=True, text=True, timeout=300,
                          check=False)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head with the dashboard (for job submission) and a second node with resource "node2",
    each with its own temp dir (nodes on one machine need not share one). The head has 2 CPUs so
    that, with node 2 lost, it holds the restarted prediction actor and a graph task at once.
    Ray 2.60 turns token authentication on when a token exists; RAY_AUTH_MODE=token makes that
    explicit, and RAY_AUTH_TOKEN carries one fresh token to both nodes and to every client."""
    logs = tmp_path_factory.mktemp("cluster")
    tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # Ray's socket paths: < 108 bytes
    gcs, dashboard, client, dashboard_metrics, *node_ports = free_ports(8)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               DASHBOARD_METRIC_PORT=str(dashboard_metrics))
    head = start_node(["--head", f"--port={gcs}", "--num-cpus=2", f"--temp-dir={tmp / 'head'}",
                       "--include-dashboard=true", f"--dashboard-port={dashboard}",
                       f"--ray-client-server-port={client}"], env, logs / "head.log",
                      *node_ports[:2])
    node2 = None
    try:
        node2 = start_node([f"--address=127.0.0.1:{gcs}", "--num-cpus=1",
                            '--resources={"node2": 1}', f"--temp-dir={tmp / 'node2'}"],
                           env, logs / "node2.log", *node_ports[2:])
        url = f"http://127.0.0.1:{dashboard}"
        nodes = json.loads(ray_cli("list", "nodes", "--address", url, "--format", "json",
                                   env=env).stdout)
        (node2_id,) = [n["node_id"] for n in nodes if "node2" in n["resources_total"]]
        yield Cluster(f"127.0.0.1:{gcs}", url, env, node2, node2_id)
    finally:
        if node2 is not None:
            kill_group(node2)
        kill_group(head)
        shutil.rmtree(tmp, ignore_errors=True)


def nodes_used(results: Path) -> set[str]:
    """The Ray nodes that made the results' shards, as their manifest records say."""
    if not (results / MANIFEST).exists():
        return set()
    return {info["node"] for info in Manifest.load(results).shards.values() if "node" in info}


def test_clients_without_the_token_are_refused(cluster, tmp_path):
    no_token = {key: value for key, value in cluster.env.items() if not key.startswith("RAY_AUTH")}
    for env in ({**cluster.env, "RAY_AUTH_TOKEN": secrets.token_hex(32)},
                {**no_token, "HOME": str(tmp_path)}):  # no ~/.ray/auth_token either
        result = ray_cli("status", "--address", cluster.address, env=env)
        assert result.returncode != 0 and "InvalidAuthToken" in result.stdout + result.stderr


def test_screen_run_and_job_submit_use_both_nodes(cluster, shared_data, tiny_model, tmp_path):
    direct, job = tmp_path / "direct", tmp_path / "job"
    subprocess.run(screen_cmd("--structures", str(shared_data / "poscar"), "--model",
                              str(tiny_model), "-o", str(direct), "--shard-size", "16",
                              "--address", cluster.address),
                   env=cluster.env, check=True, timeout=300)
    campaign = tmp_path / "campaign.toml"
    campaign.write_text(f'structures = "{shared_data / "poscar"}"\nout = "{job}"\n'
                        f'model = "{tiny_model}"\nshard_size = 32\nquiet = true\n')
    submitted = ray_cli("job", "submit", "--address", cluster.dashboard, "--working-dir",
                        str(REPO), "--", "python", "jobs/campaign.py", str(campaign),
                        env=cluster.env)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    for results in (direct, job):
        ids = complete_ids(results)
        assert len(ids) == len(set(ids)) == 201
    assert len(nodes_used(direct) | nodes_used(job)) == 2


def test_a_run_survives_losing_the_second_node(cluster, shared_data, tiny_model, tmp_path):
    """Last in the module: it stops node 2 for good."""
    out = tmp_path / "lost"
    proc = subprocess.Popen(screen_cmd("--structures", str(shared_data / "poscar"), "--model",
                                       str(tiny_model), "-o", str(out), "--shard-size", "8",
                                       "--address", cluster.address),
                            env=cluster.env, start_new_session=True)
    try:
        while cluster.node2_id not in nodes_used(out):
            assert proc.poll() is None, "the run ended before the second node did any work"
            time.sleep(0.1)
        kill_group(cluster.node2)
        shards_before = len(Manifest.load(out).shards)
        assert proc.wait(timeout=300) == 0
    finally:
        kill_group(proc)
    ids = complete_ids(out)
    assert len(ids) == len(set(ids)) == 201
    assert len(Manifest.load(out).shards) > shards_before
    assert read_failures(out) == [], "work lost with the node was given up, not redone"
