"""GPU spot instances on EC2 (boto3), bootstrapped over SSH like the ssh provider.

The verbs of ``Provider`` over the calls in ``ec2``, ``network`` and ``prices``. Nothing is kept
between verbs: whether engines come through tunnels is read from the controller's engine connection
file (``preflight`` decided where the controller listens), a refused start is an event in the store.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from controller.errors import ClusterStateError, ConfigError, ProviderError
from controller.providers.aws import ec2 as ec2_calls
from controller.providers.aws import network
from controller.providers.aws.ec2 import TOOL, Release, left_message, nodes_by_region
from controller.providers.aws.errors import classify, error_code
from controller.providers.aws.prices import INSTANCE_TYPE, price_of
from controller.providers.aws.release import Releaser, find_orphans
from controller.providers.base import Provider, Resource, SshTarget
from controller.providers.remote.connection import engine_connection, tunnelled
from controller.providers.remote.engines import RemoteEngines, Target
from controller.store import ClusterRecord, NodeRecord, NodeState

log = logging.getLogger(__name__)

# the store's event kind that marks a start refused because instances of the cluster already ran:
# they belong to another start, so the clean-up after that refusal must leave them alone
REFUSED = "refused"


class AwsProvider(Provider):
    name = "aws"
    STEPS = ("key_pair", "security_group", "fleet", "running", "ssh", "tunnels", "bootstrap")

    @property
    def cluster_name(self) -> str:
        return self.config.cluster.name

    def ec2(self, region: str = "") -> Any:
        return ec2_calls.client(self.config, region)

    def folder(self, name: Optional[str] = None) -> Path:
        return network.folder(self.config, name or self.cluster_name)

    # validation ------------------------------------------------------------------------
    def check_config(self, ec2: Any) -> None:
        from botocore.exceptions import ClientError

        cfg = self.config.aws
        where = f"{self.config.source}: [aws]"
        if not cfg.instance_types:
            raise ConfigError(f"{where} instance_types is empty; e.g. instance_types = g4dn.xlarge, g5.xlarge")
        for kind in cfg.instance_types:
            if not INSTANCE_TYPE.match(kind):
                raise ConfigError(f"{where} instance_types: {kind!r} is not an instance type like g4dn.xlarge")
        try:
            ec2.describe_instance_types(InstanceTypes=list(cfg.instance_types))
        except ClientError as error:
            if error_code(error) == "InvalidInstanceType":
                raise ConfigError(f"{where} instance_types: {error.response['Error']['Message']}") from None
            raise classify(error, "checking instance types") from None
        if cfg.ssh_from != "auto":
            try:
                allowed = ipaddress.ip_network(cfg.ssh_from, strict=False)
            except ValueError:
                raise ConfigError(
                    f"{where} ssh_from = {cfg.ssh_from!r}: expected a CIDR like 203.0.113.7/32 or auto"
                ) from None
            if allowed.prefixlen == 0:
                raise ConfigError(f"{where} ssh_from = {cfg.ssh_from}: refusing to open SSH to the whole internet")

    def refuse_existing(self, ec2: Any) -> None:
        existing = ec2_calls.instances(ec2, self.cluster_name)
        if existing:  # safe to re-run: never a second set of instances for one cluster
            raise ClusterStateError(
                f"cluster {self.cluster_name!r} already has instances in {self.config.aws.region}: "
                f"{', '.join(i['InstanceId'] for i in existing)}; run `cluster stop` first"
            )

    # start ------------------------------------------------------------------------------
    def preflight(self, slaves: int, adopting: bool = False) -> str:
        """Config, credentials, the AMI and no instances of this cluster yet (unless ``adopting`` them); the
        controller listens on loopback for tunnels, else on the master's address inside the slaves' subnets
        (every interface when it has none there: tunnel = never from outside)."""
        ec2 = self.ec2()
        self.check_config(ec2)
        if self.config.aws.min_slaves > slaves:
            raise ConfigError(f"[aws] min_slaves = {self.config.aws.min_slaves} is more than --slaves {slaves}")
        ec2_calls.ami(ec2, self.config.aws)
        if not adopting:
            self.refuse_existing(ec2)
        subnets = network.subnets(ec2, self.config.aws)
        if network.use_tunnel(self.config.aws, subnets):
            return "127.0.0.1"
        return network.address_inside(subnets) or "0.0.0.0"

    def start(self, cluster: ClusterRecord, ipp_cluster, slaves: int) -> list[NodeRecord]:
        cfg = self.config.aws
        ec2 = self.ec2()
        self.check_config(ec2)
        required = cfg.min_slaves or slaves
        try:  # again: the check and the launch should be as close as they can
            self.refuse_existing(ec2)
        except ClusterStateError as error:
            self.store.events.add(cluster.id, REFUSED, str(error))  # read by stop: not ours to release
            raise
        # the ids from the launch replies: describe-by-tag is eventually consistent and may not list
        # an instance launched a moment ago, so the release after a failure terminates these by id
        launched_ids: list[str] = []
        try:
            ami = ec2_calls.ami(ec2, cfg)
            subnets = network.subnets(ec2, cfg)
            key_name, key_file = network.key_pair(ec2, self.config, self.cluster_name)
            self.hooks.on_step("key_pair")
            group = network.security_group(ec2, self.config, self.cluster_name, subnets[0]["VpcId"])
            self.hooks.on_step("security_group")
            return self._bring_up(
                cluster, ec2, ami, subnets, key_name, key_file, group, slaves, required, launched_ids, batch=""
            )
        except BaseException as error:
            log.warning("aws start failed (%s); releasing everything of cluster %s", error, self.cluster_name)
            left = self.releaser().release(ec2, self.cluster_name, instance_ids=launched_ids).left
            if left:
                log.error("%s", left_message(left))
            raise

    def _bring_up(
        self,
        cluster: ClusterRecord,
        ec2: Any,
        ami: str,
        subnets: list[dict],
        key_name: str,
        key_file: str,
        group: str,
        count: int,
        required: int,
        launched_ids: list[str],
        batch: str,
    ) -> list[NodeRecord]:
        """Launch ``count`` instances (the fallback over types, zones and markets), wait for them, bootstrap
        their engines: the one path of ``start`` and ``add``. Launched ids go to ``launched_ids`` at once."""
        launched = ec2_calls.launch(
            ec2, self.config.aws, self.cluster_name, ami, subnets, key_name, group, count, required, launched_ids
        )
        nodes = [self.node_of(ec2, i, ami) for i in launched]
        for node in nodes:  # recorded at once: a crash from here on still finds them
            self.store.nodes.put(cluster.id, node)
        self.hooks.on_step("fleet")
        ids = [i["InstanceId"] for i in launched]
        ec2_calls.wait(ec2, "running", ids, self.hooks.waiter_delay)
        instances = ec2_calls.describe(ec2, ids)
        self.hooks.on_step("running")
        timeout = max(300, self.config.cluster.engine_timeout)  # a fresh GPU instance takes a minute or three
        # as preflight decided, before the controller started: it listens on loopback for tunnels
        tunnel = tunnelled(engine_connection(cluster, timeout))
        targets = []
        for instance in instances:
            node = self.node_of(ec2, instance, ami, market_of={n.instance_id: n for n in nodes})
            host = network.host_of(instance, self.config.aws, key_file, tunnel, self.hooks.address)
            # the address its host key gets recorded for: `cluster ssh` and stop must use the same one
            node.ssh_host, node.ssh_port = host.address, host.port
            self.store.nodes.put(cluster.id, node)
            targets.append(Target(node, host))
        return self.engines().start(cluster, targets, tunnel=tunnel, timeout=timeout, batch=batch)

    def add(self, cluster: ClusterRecord, ipp_cluster, count: int) -> list[NodeRecord]:
        """``count`` more instances with the cluster's key pair and security group, the same fallback over
        instance types, zones and markets as ``start``; on failure only the new instances are terminated."""
        cfg = self.config.aws
        ec2 = self.ec2()
        folder = self.folder()
        if cfg.key_name:
            key_name, key_file = cfg.key_name, str(Path(cfg.key_file).expanduser())
        else:
            pem = next(iter(sorted(folder.glob(f"{TOOL}-*.pem"))), None)
            if pem is None:
                raise ClusterStateError(
                    f"cluster {self.cluster_name!r} has no key pair under {folder}: it was not "
                    f"started from this state_dir; `cluster stop`, then `cluster start`"
                )
            key_name, key_file = pem.stem, str(pem)
        group_file = folder / "security_group"
        group = cfg.security_group or (group_file.read_text().strip() if group_file.exists() else "")
        if not group:
            raise ClusterStateError(f"cluster {self.cluster_name!r} has no security group recorded in {group_file}")
        images = [n.image for n in self.store.nodes.of(cluster.id) if n.image]
        ami = images[0] if images and cfg.ami == "auto" else ec2_calls.ami(ec2, cfg)
        subnets = network.subnets(ec2, cfg)
        launched_ids: list[str] = []
        try:
            return self._bring_up(
                cluster,
                ec2,
                ami,
                subnets,
                key_name,
                key_file,
                group,
                count,
                count,
                launched_ids,
                batch=f"add-{int(time.time() * 1000)}",
            )
        except BaseException as error:
            log.warning(
                "adding %d instance(s) failed (%s); terminating the new ones: %s",
                count,
                error,
                ", ".join(launched_ids) or "none",
            )
            self._terminate_nodes(cluster, ec2, launched_ids)
            raise

    def adopt(self, cluster: ClusterRecord, ipp_cluster, nodes: list[NodeRecord]) -> list[NodeRecord]:
        """The instances of ``nodes`` still running, reached where their bootstrap reached them (the cluster's
        key pair under state_dir, their recorded host keys): old engines stopped, new ones started. An
        instance gone meanwhile (a spot instance taken back) is recorded lost; one running but unreachable
        is terminated and recorded lost, since it would only bill. Nothing is launched."""
        cfg = self.config.aws
        timeout = max(300, self.config.cluster.engine_timeout)
        tunnel = tunnelled(engine_connection(cluster, timeout))
        key_file = network.key_file_of(self.config, self.cluster_name)
        targets, gone = [], []
        for region, members in nodes_by_region(nodes, cfg.region).items():
            live = {
                i["InstanceId"]: i for i in ec2_calls.describe_ids(self.ec2(region), [n.instance_id for n in members])
            }
            for node in members:
                instance = live.get(node.instance_id)
                if instance is None or instance.get("State", {}).get("Name") != "running":
                    gone.append(node)
                    continue
                host = (
                    SshTarget(node.ssh_host, node.ssh_port or 22, cfg.ssh_user, key_file)
                    if node.ssh_host
                    else network.host_of(instance, cfg, key_file, tunnel, self.hooks.address)
                )
                node.ssh_host, node.ssh_port = host.address, host.port
                targets.append(Target(node, host))
        now = time.time()
        for node in gone:
            log.warning(
                "instance %s of cluster %s is gone (not running in EC2); recorded lost", node.instance_id, cluster.id
            )
            self.store.nodes.update(cluster.id, node.node_id, state=NodeState.LOST, terminated_at=now)
        if not targets:
            return []
        adopted, lost = self.engines().adopt(cluster, targets, tunnel=tunnel, timeout=timeout)
        unreachable = [t.node.instance_id for t in targets if t.node.node_id in lost]
        if unreachable:
            log.warning("terminating instance(s) %s: running but not adoptable", ", ".join(unreachable))
            self._terminate_nodes(cluster, self.ec2(), unreachable)
            for instance_id in unreachable:
                self.store.nodes.update(cluster.id, instance_id, state=NodeState.LOST)
        return adopted

    def remove(self, cluster: ClusterRecord, ipp_cluster, nodes: list[NodeRecord]) -> None:
        """Stop these nodes' engines (politely, best effort) and terminate their instances."""
        key_file = network.key_file_of(self.config, self.cluster_name)
        hosts = {
            n.node_id: SshTarget(n.ssh_host, n.ssh_port or 22, self.config.aws.ssh_user, key_file)
            for n in nodes
            if n.ssh_host and n.state == NodeState.RUNNING
        }
        self.engines().stop_hosts(cluster.id, hosts, quiet=True)
        self._terminate_nodes(cluster, self.ec2(), [n.instance_id for n in nodes if n.instance_id])

    def _terminate_nodes(self, cluster: ClusterRecord, ec2: Any, ids: list[str]) -> None:
        """Terminate ``ids``, wait, record them; raise naming any instance still billed."""
        if not ids:
            return
        result = ec2_calls.terminate_and_check(ec2, ids, self.hooks.waiter_delay)
        now = time.time()
        for instance_id in result.released:
            self.store.nodes.update(cluster.id, instance_id, state=NodeState.TERMINATED, terminated_at=now)
        if result.left:
            raise ProviderError(left_message(result.left))

    def node_of(self, ec2: Any, instance: dict, ami: str, market_of: Optional[dict] = None) -> NodeRecord:
        known = (market_of or {}).get(instance["InstanceId"])
        market = (
            instance.get("_market")
            or (known.market if known else None)
            or ("spot" if instance.get("InstanceLifecycle") == "spot" else "on-demand")
        )
        kind = instance["InstanceType"]
        zone = instance.get("Placement", {}).get("AvailabilityZone", "")
        price = known.price_per_hour if known else price_of(ec2, kind, zone, market)
        launched = instance.get("LaunchTime")
        return NodeRecord(
            node_id=instance["InstanceId"],
            provider=self.name,
            host=instance.get("PrivateDnsName", ""),
            state=instance.get("State", {}).get("Name", "pending"),
            instance_id=instance["InstanceId"],
            instance_type=kind,
            zone=zone,
            market=market,
            price_per_hour=price,
            public_ip=instance.get("PublicIpAddress", ""),
            private_ip=instance.get("PrivateIpAddress", ""),
            image=ami,
            launched_at=launched.timestamp() if isinstance(launched, datetime) else time.time(),
        )

    def engines(self) -> RemoteEngines:
        cfg = self.config.aws
        return RemoteEngines(
            self.store,
            self.config.state_dir,
            self.cluster_name,
            self.folder() / "known_hosts",
            python=cfg.python,
            remote_dir=cfg.remote_dir,
            data_dir=cfg.data_dir,
            master_data_dir=self.config.data_dir,
            engines_per_gpu=cfg.engines_per_gpu,
            threads=self.config.cluster.threads_per_engine,
            master_grace_minutes=self.config.cluster.master_grace_minutes,
            on_step=self.hooks.on_step,
        )

    def engine_data_dir(self) -> str:
        return self.config.aws.data_dir

    # stop -------------------------------------------------------------------------------
    def stop(self, cluster: ClusterRecord, ipp_cluster) -> None:
        """Terminate by tag *and* by the instance ids the store holds, then check what is really gone.

        The tag filter alone misses instances after a change of user, hostname or region (the owner tag
        and the region are part of it); the stored ids come from the launch replies and miss nothing.
        """
        if any(e.kind == REFUSED for e in self.store.events.latest(cluster.id)):
            return  # they belong to another start of this cluster; `cluster stop` releases them
        nodes = self.store.nodes.of(cluster.id)
        billed = [n for n in nodes if n.instance_id and n.state != NodeState.TERMINATED]
        by_region = {
            region: [n.instance_id for n in members]
            for region, members in nodes_by_region(billed, self.config.aws.region).items()
        }
        configured = self.config.aws.region
        # where the key pair and group were created: the launch region (it differs once [aws] region is edited)
        home = configured if not by_region or configured in by_region else next(iter(by_region))
        result = Release()
        for region in [r for r in {*by_region, configured} if r != home] + [home]:
            if by_region.get(region) and region != configured:
                log.warning(
                    "instances %s were launched in %s, not in [aws] region %s; terminating them there",
                    ", ".join(by_region[region]),
                    region,
                    configured,
                )
            result.add(
                self.releaser().release(
                    self.ec2(region),
                    self.cluster_name,
                    cluster_id=cluster.id,
                    instance_ids=by_region.get(region, []),
                    own_files=region == home and not result.left,
                )
            )  # keys stay while any is left
        now = time.time()
        for node in nodes:
            if node.instance_id in result.left:
                node.state = result.left[node.instance_id].split(":")[0]
            elif node.state != NodeState.TERMINATED:
                node.state, node.terminated_at = NodeState.TERMINATED, node.terminated_at or now
            self.store.nodes.put(cluster.id, node)
        if result.left:
            raise ProviderError(left_message(result.left))

    def find_orphans(self, name: str, everything: bool = False, any_owner: bool = False) -> list[Resource]:
        """What ``release_orphans`` with the same arguments would end (for ``stop --all`` to show first)."""
        return find_orphans(self.ec2(), name, everything, any_owner)

    def releaser(self) -> Releaser:
        return Releaser(self.config, self.store, self.engines(), self.hooks)

    def release_orphans(
        self, name: str, everything: bool = False, any_owner: bool = False, only: Optional[set[str]] = None
    ) -> list[str]:
        """Everything tagged for this cluster (``everything``: every cluster) of this owner (``any_owner``: of
        anyone) in the region, local state or not; ``only``: just these ids (what the user agreed to)."""
        result = self.releaser().release(self.ec2(), name, everything=everything, any_owner=any_owner, only=only)
        if result.left:
            raise ProviderError(left_message(result.left))
        return result.released

    # listing ------------------------------------------------------------------------------
    def list(self, cluster: ClusterRecord) -> list[NodeRecord]:
        """The store's nodes with their state from AWS, plus tagged instances the store does not know."""
        nodes = {n.node_id: n for n in self.store.nodes.of(cluster.id)}
        try:
            ec2 = self.ec2()
            live = {i["InstanceId"]: i for i in ec2_calls.instances(ec2, self.cluster_name)}
        except Exception as error:  # noqa: BLE001 - status must still show the store when AWS is unreachable
            log.warning("could not list instances in AWS: %s", error)
            return list(nodes.values())
        for node in nodes.values():
            if (
                node.instance_id
                and node.instance_id not in live
                and node.state not in (NodeState.TERMINATED, NodeState.STOPPED)
            ):
                node.state = NodeState.GONE
            elif node.instance_id in live:
                node.state = live[node.instance_id]["State"]["Name"]
        for instance_id, instance in live.items():
            if instance_id not in nodes:
                node = self.node_of(ec2, instance, instance.get("ImageId", ""))
                node.state = f"untracked ({node.state})"  # in AWS, not in the store: `cluster stop` ends it
                nodes[instance_id] = node
        return list(nodes.values())

    def failing_health_checks(self, cluster: ClusterRecord) -> dict[str, str]:
        """EC2's status checks: a slave whose hardware (system) or OS (instance) check is impaired."""
        running = [n for n in self.store.nodes.of(cluster.id) if n.instance_id and n.state == NodeState.RUNNING]
        failing = {}
        for region, members in nodes_by_region(running, self.config.aws.region).items():
            nodes = {n.instance_id: n.node_id for n in members}
            for instance_id, why in ec2_calls.failing_checks(self.ec2(region), list(nodes)).items():
                failing[nodes[instance_id]] = f"EC2 {why}"
        return failing

    def ssh_target(self, node: NodeRecord) -> SshTarget:
        key_file = network.key_file_of(self.config, self.cluster_name)
        if node.ssh_host:  # the address bootstrap used: known_hosts holds the key under that name
            address, port = node.ssh_host, node.ssh_port or 22
        else:  # a node recorded before the address was stored
            address, port = (node.public_ip if self.config.aws.tunnel != "never" else node.private_ip), 22
        return SshTarget(
            address=address or node.private_ip,
            port=port,
            user=self.config.aws.ssh_user,
            key_file=key_file,
            known_hosts=str(self.folder() / "known_hosts"),
        )
