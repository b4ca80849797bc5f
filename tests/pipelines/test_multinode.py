"""Multi-node: the pretrain stage on a two-node Ray cluster simulated on one machine.

``ray.cluster_utils.Cluster`` starts a head node and a second node (each its own raylet
and object store) in this process's machine. Each node has one CPU and each Ray Train
worker asks for one, so the two workers cannot share a node: one lands on each. Rank 0
records where every worker ran in the pretrain run's ``clpipe.train.nodes`` tag.
"""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from infra.procs import alive, free_port, wait_until
from pipelines import tracking
from pipelines.cli import main

pytestmark = pytest.mark.slow

CPUS_PER_NODE = 1  # = pretrain.cpus_per_worker: two workers never fit on one node


def _process_tree(roots: set[int]) -> set[int]:
    """``roots`` and all their descendants alive now (from /proc)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # "pid (comm) state ppid ...": comm may hold spaces
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
    tree, grew = set(roots), True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


def _node_pids(cluster) -> set[int]:
    """The processes the cluster's nodes started (GCS, raylets, dashboard, agents) and
    their children (Ray workers, Train workers)."""
    nodes = [cluster.head_node, *cluster.worker_nodes]
    return _process_tree(
        {
            info.process.pid
            for node in nodes
            for infos in node.all_processes.values()
            for info in infos
            if info.process is not None
        }
    )


@pytest.fixture
def two_node_cluster(monkeypatch):
    """A head node (with the dashboard: Train V2's placement-group cleanup uses the State
    API) and one more node; both shut down afterwards, leaving no Ray initialized."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the local Ray other tests of this process share (they start it again when needed)
    # a local test cluster: no token auth; worker prints once (the nodes inherit this environment)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # Cluster's head asks for the fixed ports 8265 (dashboard) and 52365 (dashboard agent)
    # without retries: pick free ones, so a Ray already running here does not make it fail
    dashboard_port = free_port()
    # Train's placement-group cleaner (an actor) finds the State API by auto-detection,
    # which picks the Ray started last on this machine; another one (a parallel test) would
    # not know the controller, which the cleaner then takes for dead and removes the live
    # placement group (ray.train.v2 placement_group_cleaner + state.util.is_actor_alive). The
    # nodes' processes inherit this variable, which names this cluster's dashboard.
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{dashboard_port}")
    cluster = Cluster(shutdown_at_exit=True)
    try:
        cluster.add_node(
            num_cpus=CPUS_PER_NODE,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=dashboard_port,
            dashboard_agent_listen_port=None,
        )
        cluster.add_node(num_cpus=CPUS_PER_NODE)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        pids = _node_pids(cluster) if cluster.head_node is not None else set()
        ray.shutdown()
        cluster.shutdown()
    assert not ray.is_initialized()
    wait_until(lambda: not any(alive(p) for p in pids), 30, "the simulated cluster's processes to exit")


def test_pretrain_runs_one_worker_on_each_of_two_nodes(two_node_cluster, tmp_path, capsys, monkeypatch):
    import os

    import ray

    # set after the nodes started, so only the job's runtime_env can bring it to the workers; a secret set
    # here stays here (no --forward-secrets)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "clpipe-forwarded-region")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "clpipe-not-forwarded")
    work = tmp_path / "work"
    args = [
        "run",
        "--work-dir",
        str(work),
        "--until",
        "pretrain",
        "--set",
        "sweep.enabled=false",
        "--set",
        "pretrain.epochs=1",
        "--set",
        "pretrain.num_workers=2",
        "--set",
        f"pretrain.cpus_per_worker={CPUS_PER_NODE}",
        "--set",
        "pretrain.batch_size_per_worker=32",
        "--set",
        f"ray.address={two_node_cluster.address}",
    ]
    assert main(args) == 0, capsys.readouterr().err

    # the pipeline joined the simulated cluster (not a local Ray of its own)
    assert ray.is_initialized()
    alive_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    cluster_nodes = {two_node_cluster.head_node.node_id, *(n.node_id for n in two_node_cluster.worker_nodes)}
    assert len(cluster_nodes) == 2 and alive_nodes == cluster_nodes

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("clpipe").experiment_id
    parent = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{tracking.TAG_KIND}` = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )[0]
    children = {
        r.data.tags[tracking.TAG_STAGE]: r
        for r in client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    }
    pre = children["pretrain"]
    assert pre.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(pre.info.run_id, "epoch")] == [1]

    # the shard tasks were spread over both nodes, and the stage logged its write rate
    shard_nodes = json.loads(children["shard"].data.tags["clpipe.shard.nodes"])
    assert set(shard_nodes) == cluster_nodes and all(n >= 1 for n in shard_nodes.values()), shard_nodes
    assert children["shard"].data.metrics["images_per_sec"] > 0 and children["shard"].data.metrics["mb_per_sec"] > 0
    out = capsys.readouterr().out
    assert "shard: 1797 images, " in out and " images/s, " in out and "on 2 node(s)" in out

    # both nodes did work: one training worker on each of the cluster's two nodes
    nodes = json.loads(pre.data.tags["clpipe.train.nodes"])
    assert nodes == {node_id: 1 for node_id in cluster_nodes}
    assert json.loads(pre.data.tags["clpipe.train.node_ips"]) == {two_node_cluster.head_node.node_ip_address: 2}
    # two Ray nodes of one machine share its /dev/shm: the per-step collectives go through it
    assert pre.data.tags["clpipe.train.small_collectives"] == "shared_memory"

    # joined from outside a job, the run gave its workers the locations set here, and no credential
    @ray.remote(num_cpus=0)
    def seen() -> tuple:
        return os.environ.get("AWS_DEFAULT_REGION"), os.environ.get("AWS_SESSION_TOKEN")

    assert (
        ray.get(
            [
                seen.options(
                    scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(n, soft=False)
                ).remote()
                for n in cluster_nodes
            ]
        )
        == [("clpipe-forwarded-region", None)] * 2
    )
