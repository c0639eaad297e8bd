"""A slave that fails its provider's health check (on AWS: EC2's system or instance status check) is drained
while its engines still answer, released, and replaced, like a slave under a spot notice.

The policy is a pure function (no process). The AWS side runs against moto's real HTTP server; moto reports
every running instance's checks as passing and has no call that fails one, so the test makes one instance's
system check report "impaired" inside the (in-process) fake cloud: the one thing here that stands in for
EC2 itself.
"""

from __future__ import annotations

import time

import pytest

from controller.api import Cluster
from controller.cluster.keeper_loop import Keeper
from controller.cluster.policy import NodeView, Policy, Snapshot
from controller.providers.aws.ec2 import tags
from controller.store import NodeRecord
from tests.aws import aws_config, image


def view(node_id: str, alive: int = 1, failing: str = "") -> NodeView:
    return NodeView(node_id=node_id, engines=1, alive=alive, busy=alive > 0, failing=failing)


class TestPolicy:
    def test_a_failing_slave_whose_engines_answer_is_drained_and_replaced_at_once(self):
        decision = Policy().decide(
            Snapshot(now=100.0, target=2, nodes=[view("a"), view("b", failing="EC2 system status impaired")])
        )
        assert [(r.node_id, r.drain) for r in decision.release] == [("b", True)]
        assert "failed its health check (EC2 system status impaired)" in decision.release[0].why
        assert decision.add == 1 and decision.replaces == "b"
        assert "failed its health check (EC2 system status impaired) on b" in decision.add_why

    def test_a_failing_slave_with_no_engine_left_is_released_without_a_drain(self):
        decision = Policy().decide(Snapshot(now=100.0, target=1, nodes=[view("b", alive=0, failing="EC2 x")]))
        assert [(r.node_id, r.drain) for r in decision.release] == [("b", False)]
        assert decision.add == 1

    def test_nothing_is_released_with_replace_lost_off(self):
        decision = Policy().decide(
            Snapshot(now=100.0, target=1, replace_lost=False, nodes=[view("b", failing="EC2 x")])
        )
        assert not decision.acts


@pytest.fixture
def impaired(monkeypatch):
    """Test-only: make moto report the system status check of the given instances as impaired."""
    from moto.ec2.models.instances import Instance

    ids: set[str] = set()
    passing = Instance.system_status.fget

    def system_status(instance):
        if instance.id in ids:
            return {"Status": "impaired", "Details": [{"Name": "reachability", "Status": "failed"}]}
        return passing(instance)

    monkeypatch.setattr(Instance, "system_status", property(system_status))
    return ids


def test_the_keeper_sees_which_aws_slave_fails_ec2s_status_checks(tmp_path, tiny_data_dir, ec2, moto_url, impaired):
    ami = image(ec2)
    cluster = Cluster(aws_config(tmp_path, tiny_data_dir, moto_url, ami))
    try:
        launched = ec2.run_instances(
            ImageId=ami,
            MinCount=3,
            MaxCount=3,
            InstanceType="g4dn.xlarge",
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags("test", "slave")}],
        )["Instances"]
        healthy, failing, stopped = (i["InstanceId"] for i in launched)
        ec2.stop_instances(InstanceIds=[stopped])  # EC2 checks only running instances
        impaired.update({failing, stopped})
        record = cluster.store.clusters.create(
            name="test",
            provider="aws",
            slaves=3,
            threads_per_engine=1,
            profile_dir=str(tmp_path / "profile"),
            ipp_cluster_id="test-1",
        )
        for instance in launched:
            cluster.store.nodes.put(
                record.id,
                NodeRecord(
                    node_id=instance["InstanceId"],
                    provider="aws",
                    state="running",
                    instance_id=instance["InstanceId"],
                    zone=instance["Placement"]["AvailabilityZone"],
                    engines=1,
                    launched_at=time.time(),
                ),
            )

        assert cluster.provider("aws").failing_health_checks(record) == {failing: "EC2 system status impaired"}
        states, failing_checks = Keeper(cluster, record.id)._states(record)
        assert failing_checks == {failing: "EC2 system status impaired"}
        assert states[healthy] == "running" and states[stopped] in ("stopping", "stopped")
    finally:
        cluster.close()
