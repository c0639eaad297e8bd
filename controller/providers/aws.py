"""GPU spot instances on EC2 (boto3), bootstrapped over SSH like the ssh provider.

The cloud's tags are the truth: every instance, security group and key pair
this tool creates carries ``gpu-cluster:cluster = <name>``, and ``stop`` finds
and releases them by that tag, so nothing leaks when the local store is lost.
Errors are sorted the SkyPilot way: capacity (try the next type/zone, then
on-demand if allowed), credentials/permissions (stop at once), the rest
(botocore retries transient ones itself, in adaptive mode).
"""
from __future__ import annotations

import getpass
import ipaddress
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Optional

from .. import remote as rm
from ..errors import CapacityError, ClusterStateError, ConfigError, CredentialsError, ProviderError
from ..store import ClusterRecord, NodeRecord
from .base import Provider, Resource, SshTarget
from .ssh import RemoteEngines, Target, local_addresses

log = logging.getLogger(__name__)

TAG_TOOL = "gpu-cluster:tool"  # on everything this tool creates, in any cluster
TAG_CLUSTER = "gpu-cluster:cluster"  # the cluster's name
TAG_ROLE = "gpu-cluster:role"  # slave, security-group, key-pair
# user@host of the master: cluster names (default "default") repeat across users of one account, and
# stop-by-tag after the local state is lost must not release somebody else's cluster of the same name
TAG_OWNER = "gpu-cluster:owner"
TOOL = "gpu-cluster"


def owner() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"
LIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]
# billing ends once an instance is shutting down
ENDED_STATES = {"shutting-down", "terminated"}
METADATA_OPTIONS = {"HttpTokens": "required", "HttpPutResponseHopLimit": 1, "HttpEndpoint": "enabled"}
REGION_OF_ZONE = re.compile(r"^([a-z]{2}(?:-gov)?-[a-z]+-\d+)")
INSTANCE_TYPE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9-]+$")
# the newest AWS Deep Learning Base AMI with the NVIDIA driver (owner: amazon)
DL_AMI_NAME = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *"
# us-east-1 Linux on-demand list prices, $/h (the Pricing API is not in every partition or test endpoint)
ON_DEMAND_USD = {
    "g4dn.xlarge": 0.526, "g4dn.2xlarge": 0.752, "g4dn.4xlarge": 1.204, "g4dn.8xlarge": 2.176,
    "g4dn.12xlarge": 3.912, "g4dn.16xlarge": 4.352, "g5.xlarge": 1.006, "g5.2xlarge": 1.212,
    "g5.4xlarge": 1.624, "g5.12xlarge": 5.672, "g6.xlarge": 0.8048, "g6.2xlarge": 0.9776,
    "p3.2xlarge": 3.06, "p3.8xlarge": 12.24, "p4d.24xlarge": 32.7726,
}
CAPACITY_CODES = {"InsufficientInstanceCapacity", "InsufficientCapacity", "InsufficientHostCapacity",
                  "Unsupported", "SpotMaxPriceTooLow", "InsufficientFreeAddressesInSubnet"}
QUOTA_CODES = {"MaxSpotInstanceCountExceeded", "VcpuLimitExceeded", "InstanceLimitExceeded"}
CREDENTIAL_CODES = {"AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId", "SignatureDoesNotMatch",
                    "OptInRequired", "AccessDenied", "AccessDeniedException", "ExpiredToken"}

# test-only: where to SSH to for an instance, ``(instance, key_file) -> (address, port)``.  moto's
# instances never boot, so the tests map each to a network-namespace host running a real sshd
# (and install the key pair there, as cloud-init would).  None in real use.
ADDRESS_HOOK: Optional[Callable[[dict, str], tuple[str, int]]] = None


def region_of(zone: str) -> str:
    """us-east-1a -> us-east-1 (local zones too: us-west-2-lax-1a -> us-west-2); '' when unknown."""
    match = REGION_OF_ZONE.match(zone or "")
    return match.group(1) if match else ""


@dataclass
class Release:
    """What a release ended, and what it could not (instance id -> state and reason: still billed)."""

    released: list[str] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)

    def add(self, other: "Release") -> None:
        self.released += other.released
        self.left.update(other.left)


@dataclass
class PriceRow:
    instance_type: str
    zone: str
    spot: Optional[float]  # latest spot price in this AZ, $/h
    on_demand: Optional[float]  # list price, $/h
    timestamp: str = ""


def error_code(error: Exception) -> str:
    return getattr(error, "response", {}).get("Error", {}).get("Code", "") if hasattr(error, "response") else ""


def classify(error: Exception, doing: str) -> Exception:
    """A botocore error as one of ours, with a message that says what to do."""
    from botocore.exceptions import NoCredentialsError, NoRegionError

    if isinstance(error, NoCredentialsError):
        return CredentialsError(f"{doing}: no AWS credentials (set AWS_PROFILE or AWS_ACCESS_KEY_ID/"
                                f"AWS_SECRET_ACCESS_KEY, or run `aws configure`)")
    if isinstance(error, NoRegionError):
        return ConfigError(f"{doing}: no AWS region; set [aws] region")
    code = error_code(error)
    message = getattr(error, "response", {}).get("Error", {}).get("Message", str(error))
    if code in CREDENTIAL_CODES:
        return CredentialsError(f"{doing}: AWS refused ({code}): {message}; docs/aws.md lists the IAM policy needed")
    if code in QUOTA_CODES:
        return CapacityError(f"{doing}: quota exceeded ({code}): {message}; ask for a higher "
                             f"'All G and VT Spot Instance Requests' quota (docs/aws.md)")
    if code == "SpotMaxPriceTooLow":
        return CapacityError(f"{doing}: [aws] max_spot_price is below the current spot price ({message}); "
                             f"see `cluster prices`")
    if code in CAPACITY_CODES:
        return CapacityError(f"{doing}: no capacity ({code}): {message}")
    if code in ("InvalidInstanceType", "InvalidAMIID.Malformed", "InvalidAMIID.NotFound", "InvalidSubnetID.NotFound",
                "InvalidGroup.NotFound", "InvalidKeyPair.NotFound", "InvalidParameterValue"):
        return ConfigError(f"{doing}: {code}: {message}")
    return ProviderError(f"{doing}: {code or type(error).__name__}: {message}")


class AwsProvider(Provider):
    name = "aws"

    # test hook: called after each step of start ("key_pair", "security_group", "fleet", "running",
    # "ssh", "tunnels", "bootstrap"); a no-op otherwise
    on_step: Callable[[str], None] = staticmethod(lambda step: None)
    waiter_delay: float = 5  # seconds between waiter polls (tests on moto shorten it)

    # decided by preflight (tunnel = auto looks at the slaves' subnets), before the controller starts
    _tunnel: Optional[bool] = None

    _engine_ip: str = ""  # the master's address inside the slaves' subnets, found by preflight

    @property
    def controller_ip(self) -> str:  # type: ignore[override]
        # tunnels: loopback only; otherwise engines in the VPC connect to the master's address there
        # (every interface only when no local address is in the VPC: tunnel = never from outside)
        tunnel = self._tunnel if self._tunnel is not None else self.config.aws.tunnel == "always"
        return "127.0.0.1" if tunnel else (self._engine_ip or "0.0.0.0")

    # clients ------------------------------------------------------------------------
    def ec2(self, region: str = ""):
        import boto3
        from botocore.config import Config as BotoConfig
        from botocore.exceptions import NoCredentialsError

        cfg = self.config.aws
        if not cfg.region:
            raise ConfigError(f"{self.config.source}: [aws] region is empty; set it, e.g. region = us-east-1")
        session = boto3.session.Session(region_name=region or cfg.region)
        if session.get_credentials() is None:
            raise classify(NoCredentialsError(), "aws")
        return session.client(
            "ec2", endpoint_url=cfg.endpoint_url or None,
            config=BotoConfig(retries={"mode": "adaptive", "max_attempts": 8}, connect_timeout=10, read_timeout=60))

    def _call(self, doing: str, fn, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except (ClientError, BotoCoreError) as error:
            raise classify(error, doing) from None

    @property
    def cluster_name(self) -> str:
        return self.config.cluster.name

    def tags(self, role: str, name: Optional[str] = None) -> list[dict]:
        name = name or self.cluster_name
        return [{"Key": TAG_TOOL, "Value": TOOL}, {"Key": TAG_CLUSTER, "Value": name},
                {"Key": TAG_OWNER, "Value": owner()},
                {"Key": TAG_ROLE, "Value": role}, {"Key": "Name", "Value": f"{TOOL}-{name}-{role}"}]

    def tag_filter(self, name: Optional[str], everything: bool = False, any_owner: bool = False) -> list[dict]:
        """This master's cluster of that name; ``everything``: every cluster of this tool in the region;
        ``any_owner``: other masters' too (never implied: names repeat across users of one account)."""
        filters = [{"Name": f"tag:{TAG_TOOL}", "Values": [TOOL]}]
        if not everything:
            filters.append({"Name": f"tag:{TAG_CLUSTER}", "Values": [name or self.cluster_name]})
        if not any_owner:
            filters.append({"Name": f"tag:{TAG_OWNER}", "Values": [owner()]})
        return filters

    def folder(self, name: Optional[str] = None) -> Path:
        path = self.config.state_dir / "aws" / (name or self.cluster_name)
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)
        return path

    # validation ------------------------------------------------------------------------
    def check_config(self, ec2) -> None:
        cfg = self.config.aws
        where = f"{self.config.source}: [aws]"
        if not cfg.instance_types:
            raise ConfigError(f"{where} instance_types is empty; e.g. instance_types = g4dn.xlarge, g5.xlarge")
        for kind in cfg.instance_types:
            if not INSTANCE_TYPE.match(kind):
                raise ConfigError(f"{where} instance_types: {kind!r} is not an instance type like g4dn.xlarge")
        from botocore.exceptions import ClientError

        try:
            ec2.describe_instance_types(InstanceTypes=list(cfg.instance_types))
        except ClientError as error:
            if error_code(error) == "InvalidInstanceType":
                raise ConfigError(f"{where} instance_types: {error.response['Error']['Message']}") from None
            raise classify(error, "checking instance types") from None
        if cfg.ssh_from != "auto":
            try:
                network = ipaddress.ip_network(cfg.ssh_from, strict=False)
            except ValueError:
                raise ConfigError(f"{where} ssh_from = {cfg.ssh_from!r}: expected a CIDR like 203.0.113.7/32 or auto") from None
            if network.prefixlen == 0:
                raise ConfigError(f"{where} ssh_from = {cfg.ssh_from}: refusing to open SSH to the whole internet")

    def ssh_cidr(self) -> str:
        cfg = self.config.aws
        if cfg.ssh_from != "auto":
            return str(ipaddress.ip_network(cfg.ssh_from, strict=False))
        import urllib.request

        try:  # the master's address as AWS sees it
            with urllib.request.urlopen("https://checkip.amazonaws.com", timeout=10) as response:
                address = response.read().decode().strip()
            return f"{ipaddress.ip_address(address)}/32"
        except (OSError, ValueError) as error:
            raise ConfigError(f"could not find this master's public address ({error}); set [aws] ssh_from") from None

    # start ------------------------------------------------------------------------------
    def preflight(self, slaves: int) -> None:
        ec2 = self.ec2()
        self.check_config(ec2)
        if self.config.aws.min_slaves > slaves:
            raise ConfigError(f"[aws] min_slaves = {self.config.aws.min_slaves} is more than --slaves {slaves}")
        self.ami(ec2)
        self.refuse_existing(ec2)
        subnets = self.subnets(ec2)
        self._tunnel = self.use_tunnel(subnets)
        self._engine_ip = self.address_inside(subnets)

    def refuse_existing(self, ec2) -> None:
        cfg = self.config.aws
        existing = self.instances(ec2, self.cluster_name)
        if existing:  # safe to re-run: never a second set of instances for one cluster
            self._refused = True  # and the clean-up after this error must not touch them either
            raise ClusterStateError(
                f"cluster {self.cluster_name!r} already has instances in {cfg.region}: "
                f"{', '.join(i['InstanceId'] for i in existing)}; run `cluster stop` first")

    def start(self, cluster: ClusterRecord, ipp_cluster, slaves: int) -> list[NodeRecord]:
        cfg = self.config.aws
        ec2 = self.ec2()
        self.check_config(ec2)
        required = cfg.min_slaves or slaves
        self.refuse_existing(ec2)  # again: the check and the launch should be as close as they can
        # the ids from the launch replies: describe-by-tag is eventually consistent and may not list
        # an instance launched a moment ago, so the release after a failure terminates these by id
        launched_ids: list[str] = []
        try:
            ami = self.ami(ec2)
            subnets = self.subnets(ec2)
            key_name, key_file = self.key_pair(ec2)
            type(self).on_step("key_pair")
            group = self.security_group(ec2, subnets[0]["VpcId"])
            type(self).on_step("security_group")
            return self._bring_up(cluster, ec2, ami, subnets, key_name, key_file, group, slaves, required,
                                  launched_ids, batch="")
        except BaseException as error:
            log.warning("aws start failed (%s); releasing everything of cluster %s", error, self.cluster_name)
            left = self.release(ec2, self.cluster_name, instance_ids=launched_ids).left
            if left:
                log.error("%s", self.left_message(left))
            raise

    def _bring_up(self, cluster: ClusterRecord, ec2, ami: str, subnets: list[dict], key_name: str, key_file: str,
                  group: str, count: int, required: int, launched_ids: list[str], batch: str) -> list[NodeRecord]:
        """Launch ``count`` instances (the fallback over types, zones and markets), wait for them, bootstrap
        their engines: the one path of ``start`` and ``add``. Launched ids go to ``launched_ids`` at once."""
        launched = self.launch(ec2, ami, subnets, key_name, group, count, required, launched_ids)
        nodes = [self.node_of(i, ami) for i in launched]
        for node in nodes:  # recorded at once: a crash from here on still finds them
            self.store.nodes.put(cluster.id, node)
        type(self).on_step("fleet")
        ids = [i["InstanceId"] for i in launched]
        self.wait(ec2, "running", ids)
        instances = self.describe(ec2, ids)
        type(self).on_step("running")
        # as preflight decided: the controller already listens accordingly
        tunnel = self._tunnel if self._tunnel is not None else self.use_tunnel(subnets)
        targets = []
        for instance in instances:
            node = self.node_of(instance, ami, market_of={n.instance_id: n for n in nodes})
            host = self.host_of(instance, key_file, tunnel)
            # the address its host key gets recorded for: `cluster ssh` and stop must use the same one
            node.ssh_host, node.ssh_port = host.address, host.port
            self.store.nodes.put(cluster.id, node)
            targets.append(Target(node, host))
        # a fresh GPU instance takes a minute or three before its sshd answers
        return self.engines(key_file).start(cluster, targets, tunnel=tunnel,
                                            timeout=max(300, self.config.cluster.engine_timeout), batch=batch)

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
                raise ClusterStateError(f"cluster {self.cluster_name!r} has no key pair under {folder}: it was not "
                                        f"started from this state_dir; `cluster stop`, then `cluster start`")
            key_name, key_file = pem.stem, str(pem)
        group_file = folder / "security_group"
        group = cfg.security_group or (group_file.read_text().strip() if group_file.exists() else "")
        if not group:
            raise ClusterStateError(f"cluster {self.cluster_name!r} has no security group recorded in {group_file}")
        images = [n.image for n in self.store.nodes.of(cluster.id) if n.image]
        ami = images[0] if images and cfg.ami == "auto" else self.ami(ec2)
        subnets = self.subnets(ec2)
        launched_ids: list[str] = []
        try:
            return self._bring_up(cluster, ec2, ami, subnets, key_name, key_file, group, count, count,
                                  launched_ids, batch=f"add-{int(time.time() * 1000)}")
        except BaseException as error:
            log.warning("adding %d instance(s) failed (%s); terminating the new ones: %s", count, error,
                        ", ".join(launched_ids) or "none")
            self._terminate_nodes(cluster, ec2, launched_ids)
            raise

    def remove(self, cluster: ClusterRecord, ipp_cluster, nodes: list[NodeRecord]) -> None:
        """Stop these nodes' engines (politely, best effort) and terminate their instances."""
        key_file = str(next(iter(self.folder().glob("*.pem")), "")) or self.config.aws.key_file
        hosts = {n.node_id: rm.Host(n.ssh_host, n.ssh_port or 22, self.config.aws.ssh_user, key_file)
                 for n in nodes if n.ssh_host and n.state == "running"}
        self.engines().stop_hosts(cluster.id, hosts, quiet=True)
        self._terminate_nodes(cluster, self.ec2(), [n.instance_id for n in nodes if n.instance_id])

    def _terminate_nodes(self, cluster: ClusterRecord, ec2, ids: list[str]) -> None:
        """Terminate ``ids``, wait, record them; raise naming any instance still billed."""
        if not ids:
            return
        result = self.terminate_and_check(ec2, ids)
        now = time.time()
        for instance_id in result.released:
            self.store.nodes.update(cluster.id, instance_id, state="terminated", terminated_at=now)
        if result.left:
            raise ProviderError(self.left_message(result.left))

    def terminate_and_check(self, ec2, ids: list[str]) -> Release:
        """Terminate ``ids``, wait for it, then check each: what ended, and what is still billed and why."""
        result = Release()
        refused = self.terminate(ec2, ids)
        accepted = [i for i in ids if i not in refused]
        if accepted:
            try:
                self.wait(ec2, "terminated", accepted)
            except ProviderError as error:  # checked below, instance by instance
                log.warning("%s", error)
        states = {i["InstanceId"]: i.get("State", {}).get("Name", "") for i in self.describe_ids(ec2, ids)}
        for instance_id in ids:
            state = states.get(instance_id, "terminated")  # not found any more: gone
            if state in ENDED_STATES:
                result.released.append(instance_id)
            else:
                result.left[instance_id] = f"{state}: {refused[instance_id]}" if instance_id in refused else state
        return result

    def ami(self, ec2) -> str:
        cfg = self.config.aws
        if cfg.ami != "auto":
            self._call(f"[aws] ami = {cfg.ami}", ec2.describe_images, ImageIds=[cfg.ami])
            return cfg.ami
        images = self._call("looking up the deep-learning AMI", ec2.describe_images, Owners=["amazon"], Filters=[
            {"Name": "name", "Values": [DL_AMI_NAME]}, {"Name": "state", "Values": ["available"]},
            {"Name": "architecture", "Values": ["x86_64"]}])["Images"]
        if not images:
            raise ConfigError(f"no '{DL_AMI_NAME}' image in {cfg.region}; set [aws] ami to an AMI id with the "
                              f"NVIDIA driver and Python 3")
        return max(images, key=lambda i: i.get("CreationDate", ""))["ImageId"]

    def subnets(self, ec2) -> list[dict]:
        cfg = self.config.aws
        if cfg.subnet:
            found = self._call(f"[aws] subnet = {cfg.subnet}", ec2.describe_subnets, SubnetIds=[cfg.subnet])["Subnets"]
        else:
            found = self._call("finding the default VPC's subnets", ec2.describe_subnets,
                               Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
        if not found:
            raise ConfigError(f"no default VPC subnets in {cfg.region}; set [aws] subnet")
        return sorted(found, key=lambda s: s["AvailabilityZone"])

    def key_pair(self, ec2) -> tuple[str, str]:
        cfg = self.config.aws
        if cfg.key_name:
            if not cfg.key_file:
                raise ConfigError("[aws] key_name is set but key_file is not: the private key is needed for SSH")
            return cfg.key_name, str(Path(cfg.key_file).expanduser())
        name = f"{TOOL}-{self.cluster_name}-{uuid.uuid4().hex[:8]}"
        reply = self._call("creating a key pair", ec2.create_key_pair, KeyName=name, KeyType="ed25519",
                           TagSpecifications=[{"ResourceType": "key-pair", "Tags": self.tags("key-pair")}])
        path = self.folder() / f"{name}.pem"
        # 0600 from creation: O_EXCL + mode, never world-readable for an instant
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(reply["KeyMaterial"])
        log.info("created key pair %s (private key %s)", name, path)
        return name, str(path)

    def security_group(self, ec2, vpc_id: str) -> str:
        cfg = self.config.aws
        if cfg.security_group:
            return cfg.security_group
        cidr = self.ssh_cidr()
        name = f"{TOOL}-{self.cluster_name}-{uuid.uuid4().hex[:8]}"
        group = self._call("creating a security group", ec2.create_security_group, GroupName=name, VpcId=vpc_id,
                           Description=f"{TOOL} cluster {self.cluster_name}: SSH from the master, engines within",
                           TagSpecifications=[{"ResourceType": "security-group", "Tags": self.tags("security-group")}])
        group_id = group["GroupId"]
        (self.folder() / "security_group").write_text(group_id)  # stop finds it even if the owner tag no longer matches
        # SSH from the master only; every other port only from members of this group (never 0.0.0.0/0)
        self._call("opening SSH and intra-cluster ports", ec2.authorize_security_group_ingress, GroupId=group_id,
                   IpPermissions=[
                       {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                        "IpRanges": [{"CidrIp": cidr, "Description": "SSH from the master"}]},
                       {"IpProtocol": "tcp", "FromPort": 0, "ToPort": 65535,
                        "UserIdGroupPairs": [{"GroupId": group_id, "Description": "engines and controller"}]},
                   ])
        return group_id

    def launch(self, ec2, ami: str, subnets: list[dict], key_name: str, group: str, slaves: int,
               required: int, launched_ids: Optional[list[str]] = None) -> list[dict]:
        """Spot first, in the order of instance_types and zones; on-demand only if allowed. Partial down to ``required``.

        Every launched id is appended to ``launched_ids`` as soon as EC2 answers, so a caller can
        release them even when this raises.
        """
        cfg = self.config.aws
        launched_ids = launched_ids if launched_ids is not None else []
        launched: list[dict] = []
        problems: list[str] = []
        markets = ["spot"] + (["on-demand"] if cfg.on_demand_fallback else [])
        for market in markets:
            for kind in cfg.instance_types:
                for subnet in subnets:
                    missing = slaves - len(launched)
                    if missing <= 0:
                        return launched
                    kwargs = dict(
                        ImageId=ami, InstanceType=kind, MinCount=1, MaxCount=missing, KeyName=key_name,
                        SecurityGroupIds=[group], SubnetId=subnet["SubnetId"], ClientToken=uuid.uuid4().hex,
                        # IMDSv2 only, one hop: code on the slave (or a container it runs) cannot read the
                        # instance's credentials through a forged or forwarded plain GET
                        MetadataOptions=METADATA_OPTIONS,
                        TagSpecifications=[{"ResourceType": "instance", "Tags": self.tags("slave")},
                                           {"ResourceType": "volume", "Tags": self.tags("slave")}])
                    if market == "spot":
                        spot = {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}
                        if cfg.max_spot_price:
                            spot["MaxPrice"] = f"{cfg.max_spot_price:.4f}"
                        kwargs["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": spot}
                    try:
                        reply = self._call(f"launching {missing} {market} {kind} in {subnet['AvailabilityZone']}",
                                           ec2.run_instances, **kwargs)
                    except CapacityError as error:  # the next type or zone may have room
                        problems.append(str(error))
                        log.info("%s", error)
                        continue
                    for instance in reply["Instances"]:
                        instance["_market"] = market
                        launched_ids.append(instance["InstanceId"])
                    launched += reply["Instances"]
        if len(launched) >= required:
            return launched
        detail = "; ".join(problems[-4:]) or "no reason given"
        raise CapacityError(f"only {len(launched)} of the {required} slaves needed could be launched "
                            f"({', '.join(cfg.instance_types)}; {detail}). Try other instance types, "
                            f"[aws] on_demand_fallback = true, or a lower [aws] min_slaves")

    def wait(self, ec2, state: str, ids: list[str], timeout: float = 600,
             cancelled: Optional[threading.Event] = None) -> None:
        """Poll until every instance is ``running`` or ``terminated``, checking ``cancelled`` between polls.

        Not a boto waiter: that sleeps its whole delay and cannot be cancelled from another thread.
        An id EC2 no longer knows counts as terminated; an instance that ends while we wait for
        ``running`` fails at once (spot capacity taken back), as the boto waiter did.
        """
        if not ids:  # a wait on nothing would wait forever
            raise ProviderError(f"waiting for {state}: no instances to wait for")
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while True:
            states = {i["InstanceId"]: i.get("State", {}).get("Name", "") for i in self.describe_ids(ec2, ids)}
            if state == "terminated":
                pending = [i for i in ids if states.get(i, "terminated") != "terminated"]
            else:
                ended = [i for i in ids if states.get(i, "terminated") in ENDED_STATES]
                if ended:
                    raise ProviderError(f"instances {', '.join(ended)} ended ({', '.join(states.get(i, 'gone') for i in ended)}) "
                                        f"while waiting for them to run")
                pending = [i for i in ids if states.get(i) != state]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise ProviderError(f"instances {', '.join(pending)} did not reach {state} within {timeout:.0f} s "
                                    f"({', '.join(states.get(i, 'gone') for i in pending)})")
            if cancelled is not None:
                if cancelled.wait(self.waiter_delay):
                    raise ProviderError(f"waiting for {state} cancelled")
            else:
                time.sleep(self.waiter_delay)

    def describe(self, ec2, ids: list[str]) -> list[dict]:
        reply = self._call("describing instances", ec2.describe_instances, InstanceIds=ids)
        return [i for r in reply["Reservations"] for i in r["Instances"]]

    def instances(self, ec2, name: Optional[str], everything: bool = False, any_owner: bool = False) -> list[dict]:
        """Live instances carrying the cluster's tag (or any cluster's, with ``everything``)."""
        filters = self.tag_filter(name, everything, any_owner) + [{"Name": "instance-state-name", "Values": LIVE_STATES}]
        from botocore.exceptions import BotoCoreError, ClientError

        found = []
        try:  # a paginator calls AWS while iterating, outside _call
            for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
                found += [i for r in page["Reservations"] for i in r["Instances"]]
        except (ClientError, BotoCoreError) as error:
            raise classify(error, "describing the cluster's instances") from None
        return found

    @staticmethod
    def address_inside(subnets: list[dict]) -> str:
        """This master's address inside the slaves' subnets ('' when it has none)."""
        networks = [ipaddress.ip_network(s["CidrBlock"]) for s in subnets if s.get("CidrBlock")]
        return next((str(a.ip) for a in local_addresses() for n in networks if a.ip in n), "")

    def engine_data_dir(self) -> str:
        return self.config.aws.data_dir

    def use_tunnel(self, subnets: list[dict]) -> bool:
        """auto: tunnels unless this master has an address inside the slaves' VPC subnets."""
        mode = self.config.aws.tunnel
        if mode != "auto":
            return mode == "always"
        inside = bool(self.address_inside(subnets))
        log.info("master %s the slaves' VPC: %s", "inside" if inside else "outside",
                 "direct connections" if inside else "SSH reverse tunnels")
        return not inside

    def host_of(self, instance: dict, key_file: str, tunnel: bool) -> rm.Host:
        user = self.config.aws.ssh_user
        if ADDRESS_HOOK is not None:
            address, port = ADDRESS_HOOK(instance, key_file)
            return rm.Host(address, port, user, key_file)
        address = instance.get("PublicIpAddress") if tunnel else instance.get("PrivateIpAddress")
        if not address:
            raise ProviderError(f"{instance['InstanceId']} has no {'public' if tunnel else 'private'} address; "
                                f"use a subnet that assigns public IPs, or run the master inside the VPC")
        return rm.Host(address, 22, user, key_file)

    def node_of(self, instance: dict, ami: str, market_of: Optional[dict] = None) -> NodeRecord:
        known = (market_of or {}).get(instance["InstanceId"])
        market = instance.get("_market") or (known.market if known else None) or (
            "spot" if instance.get("InstanceLifecycle") == "spot" else "on-demand")
        kind = instance["InstanceType"]
        zone = instance.get("Placement", {}).get("AvailabilityZone", "")
        price = known.price_per_hour if known else self.price_of(kind, zone, market)
        launched = instance.get("LaunchTime")
        return NodeRecord(
            node_id=instance["InstanceId"], provider=self.name, host=instance.get("PrivateDnsName", ""),
            state=instance.get("State", {}).get("Name", "pending"), instance_id=instance["InstanceId"],
            instance_type=kind, zone=zone, market=market, price_per_hour=price,
            public_ip=instance.get("PublicIpAddress", ""), private_ip=instance.get("PrivateIpAddress", ""),
            image=ami, launched_at=launched.timestamp() if isinstance(launched, datetime) else time.time())

    def price_of(self, kind: str, zone: str, market: str) -> float:
        """The price the instance runs at, recorded so reports can compute cost per run."""
        if market == "spot":
            for row in self.prices([kind]):
                if row.zone == zone and row.spot is not None:
                    return row.spot
        return ON_DEMAND_USD.get(kind, 0.0)

    def engines(self, key_file: str = "") -> RemoteEngines:
        cfg = self.config.aws
        return RemoteEngines(self.store, self.config.state_dir, self.cluster_name, self.folder() / "known_hosts",
                             python=cfg.python, remote_dir=cfg.remote_dir, data_dir=cfg.data_dir,
                             master_data_dir=self.config.data_dir, engines_per_gpu=cfg.engines_per_gpu,
                             threads=self.config.cluster.threads_per_engine,
                             master_grace_minutes=self.config.cluster.master_grace_minutes, on_step=type(self).on_step)

    # prices -----------------------------------------------------------------------------
    def prices(self, instance_types: Optional[list[str]] = None) -> list[PriceRow]:
        """Latest spot price per AZ (describe_spot_price_history) beside the on-demand list price."""
        ec2 = self.ec2()
        kinds = list(instance_types or self.config.aws.instance_types)
        for kind in kinds:
            if not INSTANCE_TYPE.match(kind):
                raise ConfigError(f"--instance-types: {kind!r} is not an instance type like g4dn.xlarge")
        latest: dict[tuple[str, str], dict] = {}
        paginator = ec2.get_paginator("describe_spot_price_history")
        try:
            pages = paginator.paginate(InstanceTypes=kinds, ProductDescriptions=["Linux/UNIX"],
                                       StartTime=datetime.now(timezone.utc))
            for page in pages:
                for item in page["SpotPriceHistory"]:
                    key = (item["InstanceType"], item["AvailabilityZone"])
                    if key not in latest or item.get("Timestamp", 0) > latest[key].get("Timestamp", 0):
                        latest[key] = item
        except Exception as error:  # botocore errors
            raise classify(error, "reading spot prices") from None
        rows = [PriceRow(kind, zone, float(item["SpotPrice"]), ON_DEMAND_USD.get(kind),
                         str(item.get("Timestamp", ""))) for (kind, zone), item in sorted(latest.items())]
        for kind in kinds:
            if not any(r.instance_type == kind for r in rows):
                rows.append(PriceRow(kind, "-", None, ON_DEMAND_USD.get(kind)))
        return rows

    # stop -------------------------------------------------------------------------------
    _refused = False  # start refused because instances of this cluster already exist

    def stop(self, cluster: ClusterRecord, ipp_cluster) -> None:
        """Terminate by tag *and* by the instance ids the store holds, then check what is really gone.

        The tag filter alone misses instances after a change of user, hostname or region (the owner tag
        and the region are part of it); the stored ids come from the launch replies and miss nothing.
        """
        if self._refused:  # they belong to another start of this cluster; `cluster stop` releases them
            return
        nodes = self.store.nodes.of(cluster.id)
        by_region: dict[str, list[str]] = {}
        for node in nodes:
            if node.instance_id and node.state != "terminated":
                by_region.setdefault(region_of(node.zone) or self.config.aws.region, []).append(node.instance_id)
        configured = self.config.aws.region
        # where the key pair and group were created: the launch region (it differs once [aws] region is edited)
        home = configured if not by_region or configured in by_region else next(iter(by_region))
        result = Release()
        for region in [r for r in {*by_region, configured} if r != home] + [home]:
            if by_region.get(region) and region != configured:
                log.warning("instances %s were launched in %s, not in [aws] region %s; terminating them there",
                            ", ".join(by_region[region]), region, configured)
            result.add(self.release(self.ec2(region), self.cluster_name, cluster_id=cluster.id,
                                    instance_ids=by_region.get(region, []),
                                    own_files=region == home and not result.left))  # keys stay while any is left
        now = time.time()
        for node in nodes:
            if node.instance_id in result.left:
                node.state = result.left[node.instance_id].split(":")[0]
            elif node.state != "terminated":
                node.state, node.terminated_at = "terminated", node.terminated_at or now
            self.store.nodes.put(cluster.id, node)
        if result.left:
            raise ProviderError(self.left_message(result.left))

    @staticmethod
    def left_message(left: dict[str, str]) -> str:
        return (f"{len(left)} instance(s) NOT terminated and still billed: "
                + "; ".join(f"{i} ({why})" for i, why in sorted(left.items()))
                + ". Terminate them in the EC2 console, or fix the cause and run `cluster stop` again")

    def find_orphans(self, name: str, everything: bool = False, any_owner: bool = False) -> list[Resource]:
        """What ``release_orphans`` with the same arguments would end (for ``stop --all`` to show first)."""
        ec2 = self.ec2()
        found = []
        for instance in self.instances(ec2, name, everything, any_owner):
            tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
            found.append(Resource("instance", instance["InstanceId"], tags.get(TAG_CLUSTER, ""), tags.get(TAG_OWNER, ""),
                                  f"{instance.get('InstanceType', '')} {instance.get('State', {}).get('Name', '')}"))
        filters = self.tag_filter(name, everything, any_owner)
        for group in self._call("finding security groups", ec2.describe_security_groups, Filters=filters)["SecurityGroups"]:
            tags = {t["Key"]: t["Value"] for t in group.get("Tags", [])}
            found.append(Resource("security-group", group["GroupId"], tags.get(TAG_CLUSTER, ""), tags.get(TAG_OWNER, "")))
        for pair in self._call("finding key pairs", ec2.describe_key_pairs, Filters=filters)["KeyPairs"]:
            tags = {t["Key"]: t["Value"] for t in pair.get("Tags", [])}
            found.append(Resource("key-pair", pair["KeyName"], tags.get(TAG_CLUSTER, ""), tags.get(TAG_OWNER, "")))
        return found

    def release_orphans(self, name: str, everything: bool = False, any_owner: bool = False,
                        only: Optional[set[str]] = None) -> list[str]:
        """Everything tagged for this cluster (``everything``: every cluster) of this owner (``any_owner``: of
        anyone) in the region, local state or not; ``only``: just these ids (what the user agreed to)."""
        result = self.release(self.ec2(), name, everything=everything, any_owner=any_owner, only=only)
        if result.left:
            raise ProviderError(self.left_message(result.left))
        return result.released

    def release(self, ec2, name: str, everything: bool = False, cluster_id: Optional[int] = None, *,
                any_owner: bool = False, instance_ids: Iterable[str] = (),
                only: Optional[set[str]] = None, own_files: bool = True) -> "Release":
        """Stop engines, terminate instances, delete the group and key pair. Safe twice.

        Found by tag, plus ``instance_ids`` (from the launch replies or the store) and, for one
        cluster, the group and key pair this master created (recorded under state_dir; ``own_files``:
        this is the region they were created in).  What could not be terminated is in ``left``; the
        group and keys stay then, so the instances stay reachable.
        """
        keep = (lambda item: item in only) if only is not None else (lambda item: True)
        instances = [i for i in self.instances(ec2, name, everything, any_owner) if keep(i["InstanceId"])]
        known = {i["InstanceId"] for i in instances}
        extra = [i for i in dict.fromkeys(instance_ids) if i not in known]
        instances += [i for i in self.describe_ids(ec2, extra) if i.get("State", {}).get("Name") in LIVE_STATES]
        if not everything:
            hosts = []
            reached = {n.instance_id: n for n in self.store.nodes.of(cluster_id) if n.ssh_host} if cluster_id else {}
            key_file = str(next(iter(self.folder(name).glob("*.pem")), "")) or self.config.aws.key_file
            for instance in instances:
                if instance.get("State", {}).get("Name") != "running":
                    continue
                node = reached.get(instance["InstanceId"])
                if node is not None:  # where bootstrap reached it (and recorded its host key)
                    hosts.append(rm.Host(node.ssh_host, node.ssh_port or 22, self.config.aws.ssh_user, key_file))
                    continue
                try:
                    hosts.append(self.host_of(instance, key_file, self.config.aws.tunnel != "never"))
                except ProviderError:
                    pass
            # engines first, politely (best effort: termination ends them anyway), then the tunnels
            self.engines().stop(cluster_id, hosts, quiet=True)
        else:
            self.engines().stop_tunnels()
        result = self.terminate_and_check(ec2, [i["InstanceId"] for i in instances])
        if result.left:  # their group and key must stay: deleting them fails, or locks the owner out
            return result
        filters = self.tag_filter(name, everything, any_owner)
        groups = [g["GroupId"] for g in self._call("finding security groups", ec2.describe_security_groups,
                                                  Filters=filters)["SecurityGroups"] if keep(g["GroupId"])]
        pairs = [k["KeyName"] for k in self._call("finding key pairs", ec2.describe_key_pairs,
                                                 Filters=filters)["KeyPairs"] if keep(k["KeyName"])]
        folder = self.config.state_dir / "aws" / name
        if own_files and not everything and folder.is_dir():
            # what this master created, whoever the tags now say it belongs to (user or hostname changed)
            group_file = folder / "security_group"
            if group_file.exists() and group_file.read_text().strip() not in groups:
                groups.append(group_file.read_text().strip())
            pairs += [p.stem for p in folder.glob(f"{TOOL}-*.pem") if p.stem not in pairs]
        for group_id in groups:
            self._delete_group(ec2, group_id)
            result.released.append(group_id)
        for pair in pairs:
            self._call("deleting a key pair", ec2.delete_key_pair, KeyName=pair)
            result.released.append(pair)
        folders = [p for p in (self.config.state_dir / "aws").glob("*")] if everything else [folder] if own_files else []
        for path in (p for f in folders if f.is_dir() for p in f.glob("*")):  # private and host keys of the released
            if path.is_file() and (path.suffix == ".pem" or path.name in ("known_hosts", "security_group")):
                path.unlink()
        return result

    def terminate(self, ec2, ids: list[str]) -> dict[str, str]:
        """Terminate ``ids``; returns those EC2 refused, with its reason (one refusal must not save the rest)."""
        from botocore.exceptions import BotoCoreError, ClientError

        if not ids:
            return {}
        log.info("terminating %s", ", ".join(ids))
        try:
            ec2.terminate_instances(InstanceIds=ids)
            return {}
        except (ClientError, BotoCoreError) as error:
            if len(ids) == 1:
                return {ids[0]: f"{error_code(error) or type(error).__name__}: {classify(error, 'terminating')}"}
        refused: dict[str, str] = {}
        for instance_id in ids:  # one by one: which ones, and end all the others
            refused.update(self.terminate(ec2, [instance_id]))
        return refused

    def describe_ids(self, ec2, ids: list[str]) -> list[dict]:
        """Instances by id; ids EC2 no longer knows are left out (one unknown id fails a whole call)."""
        from botocore.exceptions import ClientError

        if not ids:
            return []
        try:
            return self.describe(ec2, ids)
        except ProviderError:
            if len(ids) == 1:
                return []
        found = []
        for instance_id in ids:
            try:
                found += self.describe(ec2, [instance_id])
            except ProviderError as error:
                if "NotFound" not in str(error) and "Malformed" not in str(error):
                    raise
        return found

    def _delete_group(self, ec2, group_id: str, timeout: float = 120) -> None:
        from botocore.exceptions import ClientError

        deadline = time.monotonic() + timeout
        delay = 1.0
        while True:
            try:
                ec2.delete_security_group(GroupId=group_id)
                return
            except ClientError as error:
                code = error_code(error)
                if code == "InvalidGroup.NotFound":
                    return
                # terminating instances still hold the group for a while
                if code != "DependencyViolation" or time.monotonic() > deadline:
                    raise classify(error, f"deleting security group {group_id}") from None
            time.sleep(delay)
            delay = min(delay * 2, 10)

    # listing ------------------------------------------------------------------------------
    def list(self, cluster: ClusterRecord) -> list[NodeRecord]:
        """The store's nodes with their state from AWS, plus tagged instances the store does not know."""
        nodes = {n.node_id: n for n in self.store.nodes.of(cluster.id)}
        try:
            ec2 = self.ec2()
            live = {i["InstanceId"]: i for i in self.instances(ec2, self.cluster_name)}
        except Exception as error:  # status must still show the store when AWS is unreachable
            log.warning("could not list instances in AWS: %s", error)
            return list(nodes.values())
        for node in nodes.values():
            if node.instance_id and node.instance_id not in live and node.state not in ("terminated", "stopped"):
                node.state = "gone"
            elif node.instance_id in live:
                node.state = live[node.instance_id]["State"]["Name"]
        for instance_id, instance in live.items():
            if instance_id not in nodes:
                node = self.node_of(instance, instance.get("ImageId", ""))
                node.state = f"untracked ({node.state})"  # in AWS, not in the store: `cluster stop` ends it
                nodes[instance_id] = node
        return list(nodes.values())

    def ssh_target(self, node: NodeRecord) -> SshTarget:
        key_file = str(next(iter(self.folder().glob("*.pem")), "")) or self.config.aws.key_file
        if node.ssh_host:  # the address bootstrap used: known_hosts holds the key under that name
            address, port = node.ssh_host, node.ssh_port or 22
        else:  # a node recorded before the address was stored
            address, port = (node.public_ip if self.config.aws.tunnel != "never" else node.private_ip), 22
        return SshTarget(host=address or node.private_ip, port=port, user=self.config.aws.ssh_user, key_file=key_file,
                         known_hosts=str(self.folder() / "known_hosts"))


__all__ = ["AwsProvider", "PriceRow", "ADDRESS_HOOK", "classify"]
