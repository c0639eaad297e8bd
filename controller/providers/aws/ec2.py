"""The EC2 calls of the aws provider: the client, tags, launch with its fallback, waits, describe, terminate.

The cloud's tags are the truth: every instance, security group and key pair this tool creates carries
``gpu-cluster:cluster = <name>`` and ``gpu-cluster:owner = user@host``, and everything is found again
by those tags, so nothing leaks when the local store is lost. Functions here take the boto3 client
(one region's) and plain values; none keeps state.
"""

from __future__ import annotations

import functools
import getpass
import logging
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from controller.config import AwsConfig, Config
from controller.errors import CapacityError, ConfigError, ProviderError
from controller.providers.aws.errors import AWS_ERRORS, call, classify, error_code
from controller.store import NodeRecord

log = logging.getLogger(__name__)

TAG_TOOL = "gpu-cluster:tool"  # on everything this tool creates, in any cluster
TAG_CLUSTER = "gpu-cluster:cluster"  # the cluster's name
TAG_ROLE = "gpu-cluster:role"  # slave, security-group, key-pair
# user@host of the master: cluster names (default "default") repeat across users of one account, and
# stop-by-tag after the local state is lost must not release somebody else's cluster of the same name
TAG_OWNER = "gpu-cluster:owner"
TOOL = "gpu-cluster"
LIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]
# billing ends once an instance is shutting down
ENDED_STATES = {"shutting-down", "terminated"}
METADATA_OPTIONS = {"HttpTokens": "required", "HttpPutResponseHopLimit": 1, "HttpEndpoint": "enabled"}
REGION_OF_ZONE = re.compile(r"^([a-z]{2}(?:-gov)?-[a-z]+-\d+)")


def owner() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def region_of(zone: str) -> str:
    """us-east-1a -> us-east-1 (local zones too: us-west-2-lax-1a -> us-west-2); '' when unknown."""
    match = REGION_OF_ZONE.match(zone or "")
    return match.group(1) if match else ""


def nodes_by_region(nodes: Iterable[NodeRecord], default: str) -> dict[str, list[NodeRecord]]:
    """Nodes grouped by the region of their zone (``default`` for a node with no zone recorded): every EC2
    call on them goes to its own region's endpoint."""
    grouped: dict[str, list[NodeRecord]] = {}
    for node in nodes:
        grouped.setdefault(region_of(node.zone) or default, []).append(node)
    return grouped


@functools.cache
def _shared_loader() -> Any:
    """One botocore data loader for every client of this process: a new session's loader parses EC2's
    service model and the endpoint tables again (0.2 s of CPU per client, on every `cluster status`)."""
    from botocore.loaders import create_loader

    return create_loader()


def client(config: Config, region: str = "") -> Any:
    """An EC2 client for ``region`` (default: [aws] region), credentials checked first. Each client has
    a session of its own, so credentials are read afresh; only the parsed service data is shared."""
    import botocore.session
    from botocore.config import Config as BotoConfig
    from botocore.exceptions import NoCredentialsError

    cfg = config.aws
    if not cfg.region:
        raise ConfigError(f"{config.source}: [aws] region is empty; set it, e.g. region = us-east-1")
    # botocore's session, not boto3's: boto3 adds its own data folder to the loader's search path at
    # every session, which a shared loader would collect; an EC2 client is botocore's either way
    session = botocore.session.get_session()
    session.register_component("data_loader", _shared_loader())
    if session.get_credentials() is None:
        raise classify(NoCredentialsError(), "aws")
    return session.create_client(
        "ec2",
        region_name=region or cfg.region,
        endpoint_url=cfg.endpoint_url or None,
        config=BotoConfig(retries={"mode": "adaptive", "max_attempts": 8}, connect_timeout=10, read_timeout=60),
    )


def tags(name: str, role: str) -> list[dict]:
    return [
        {"Key": TAG_TOOL, "Value": TOOL},
        {"Key": TAG_CLUSTER, "Value": name},
        {"Key": TAG_OWNER, "Value": owner()},
        {"Key": TAG_ROLE, "Value": role},
        {"Key": "Name", "Value": f"{TOOL}-{name}-{role}"},
    ]


def tag_filter(name: str, everything: bool = False, any_owner: bool = False) -> list[dict]:
    """This master's cluster of that name; ``everything``: every cluster of this tool in the region;
    ``any_owner``: other masters' too (never implied: names repeat across users of one account)."""
    filters = [{"Name": f"tag:{TAG_TOOL}", "Values": [TOOL]}]
    if not everything:
        filters.append({"Name": f"tag:{TAG_CLUSTER}", "Values": [name]})
    if not any_owner:
        filters.append({"Name": f"tag:{TAG_OWNER}", "Values": [owner()]})
    return filters


@dataclass
class Release:
    """What a release ended, and what it could not (instance id -> state and reason: still billed)."""

    released: list[str] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)

    def add(self, other: "Release") -> None:
        self.released += other.released
        self.left.update(other.left)


def left_message(left: dict[str, str]) -> str:
    return (
        f"{len(left)} instance(s) NOT terminated and still billed: "
        + "; ".join(f"{i} ({why})" for i, why in sorted(left.items()))
        + ". Terminate them in the EC2 console, or fix the cause and run `cluster stop` again"
    )


# finding ----------------------------------------------------------------------------------
def describe(ec2: Any, ids: list[str]) -> list[dict]:
    reply = call("describing instances", ec2.describe_instances, InstanceIds=ids)
    return [i for r in reply["Reservations"] for i in r["Instances"]]


def describe_ids(ec2: Any, ids: list[str]) -> list[dict]:
    """Instances by id; ids EC2 no longer knows are left out (one unknown id fails a whole call)."""
    if not ids:
        return []
    try:
        return describe(ec2, ids)
    except ProviderError:
        if len(ids) == 1:
            return []
    found = []
    for instance_id in ids:
        try:
            found += describe(ec2, [instance_id])
        except ProviderError as error:
            if "NotFound" not in str(error) and "Malformed" not in str(error):
                raise
    return found


def failing_checks(ec2: Any, ids: list[str]) -> dict[str, str]:
    """Instance id -> the EC2 status checks it fails ("system status impaired"); running instances only
    (EC2 checks no other), the checks that pass or are still initializing are not failures."""
    if not ids:
        return {}
    reply = call("describing instance status checks", ec2.describe_instance_status, InstanceIds=ids)
    failing = {}
    for status in reply.get("InstanceStatuses", []):
        failed = [
            f"{scope} status {status[key]['Status']}"
            for scope, key in (("system", "SystemStatus"), ("instance", "InstanceStatus"))
            if status.get(key, {}).get("Status") == "impaired"
        ]
        if failed:
            failing[status["InstanceId"]] = ", ".join(failed)
    return failing


def instances(ec2: Any, name: str, everything: bool = False, any_owner: bool = False) -> list[dict]:
    """Live instances carrying the cluster's tag (or any cluster's, with ``everything``)."""
    filters = tag_filter(name, everything, any_owner) + [{"Name": "instance-state-name", "Values": LIVE_STATES}]
    found = []
    try:  # a paginator calls AWS while iterating, outside call()
        for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
            found += [i for r in page["Reservations"] for i in r["Instances"]]
    except AWS_ERRORS as error:
        raise classify(error, "describing the cluster's instances") from None
    return found


def ami(ec2: Any, cfg: AwsConfig) -> str:
    """[aws] ami checked, or the newest AWS Deep Learning Base AMI with the NVIDIA driver."""
    name = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *"
    if cfg.ami != "auto":
        call(f"[aws] ami = {cfg.ami}", ec2.describe_images, ImageIds=[cfg.ami])
        return cfg.ami
    images = call(
        "looking up the deep-learning AMI",
        ec2.describe_images,
        Owners=["amazon"],
        Filters=[
            {"Name": "name", "Values": [name]},
            {"Name": "state", "Values": ["available"]},
            {"Name": "architecture", "Values": ["x86_64"]},
        ],
    )["Images"]
    if not images:
        raise ConfigError(
            f"no '{name}' image in {cfg.region}; set [aws] ami to an AMI id with the NVIDIA driver and Python 3"
        )
    return max(images, key=lambda i: i.get("CreationDate", ""))["ImageId"]


# launching --------------------------------------------------------------------------------
def launch(
    ec2: Any,
    cfg: AwsConfig,
    name: str,
    image: str,
    subnets: list[dict],
    key_name: str,
    group: str,
    slaves: int,
    required: int,
    launched_ids: Optional[list[str]] = None,
) -> list[dict]:
    """Spot first, in the order of instance_types and zones; on-demand only if allowed. Partial down to ``required``.

    Every launched id is appended to ``launched_ids`` as soon as EC2 answers, so a caller can
    release them even when this raises.
    """
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
                    ImageId=image,
                    InstanceType=kind,
                    MinCount=1,
                    MaxCount=missing,
                    KeyName=key_name,
                    SecurityGroupIds=[group],
                    SubnetId=subnet["SubnetId"],
                    ClientToken=uuid.uuid4().hex,
                    # IMDSv2 only, one hop: code on the slave (or a container it runs) cannot read the
                    # instance's credentials through a forged or forwarded plain GET
                    MetadataOptions=METADATA_OPTIONS,
                    TagSpecifications=[
                        {"ResourceType": "instance", "Tags": tags(name, "slave")},
                        {"ResourceType": "volume", "Tags": tags(name, "slave")},
                    ],
                )
                if market == "spot":
                    spot = {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}
                    if cfg.max_spot_price:
                        spot["MaxPrice"] = f"{cfg.max_spot_price:.4f}"
                    kwargs["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": spot}
                try:
                    reply = call(
                        f"launching {missing} {market} {kind} in {subnet['AvailabilityZone']}",
                        ec2.run_instances,
                        **kwargs,
                    )
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
    raise CapacityError(
        f"only {len(launched)} of the {required} slaves needed could be launched "
        f"({', '.join(cfg.instance_types)}; {detail}). Try other instance types, "
        f"[aws] on_demand_fallback = true, or a lower [aws] min_slaves"
    )


def wait(
    ec2: Any,
    state: str,
    ids: list[str],
    delay: float,
    timeout: float = 600,
    cancelled: Optional[threading.Event] = None,
) -> None:
    """Poll every ``delay`` s until every instance is ``running`` or ``terminated``, checking ``cancelled``.

    Not a boto waiter: that sleeps its whole delay and cannot be cancelled from another thread.
    An id EC2 no longer knows counts as terminated; an instance that ends while we wait for
    ``running`` fails at once (spot capacity taken back), as the boto waiter did.
    """
    if not ids:  # a wait on nothing would wait forever
        raise ProviderError(f"waiting for {state}: no instances to wait for")
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while True:
        states = {i["InstanceId"]: i.get("State", {}).get("Name", "") for i in describe_ids(ec2, ids)}
        if state == "terminated":
            pending = [i for i in ids if states.get(i, "terminated") != "terminated"]
        else:
            ended = [i for i in ids if states.get(i, "terminated") in ENDED_STATES]
            if ended:
                raise ProviderError(
                    f"instances {', '.join(ended)} ended ({', '.join(states.get(i, 'gone') for i in ended)}) "
                    f"while waiting for them to run"
                )
            pending = [i for i in ids if states.get(i) != state]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise ProviderError(
                f"instances {', '.join(pending)} did not reach {state} within {timeout:.0f} s "
                f"({', '.join(states.get(i, 'gone') for i in pending)})"
            )
        if cancelled is not None:
            if cancelled.wait(delay):
                raise ProviderError(f"waiting for {state} cancelled")
        else:
            time.sleep(delay)


# releasing --------------------------------------------------------------------------------
def terminate(ec2: Any, ids: list[str]) -> dict[str, str]:
    """Terminate ``ids``; returns those EC2 refused, with its reason (one refusal must not save the rest)."""
    if not ids:
        return {}
    log.info("terminating %s", ", ".join(ids))
    try:
        ec2.terminate_instances(InstanceIds=ids)
        return {}
    except AWS_ERRORS as error:
        if len(ids) == 1:
            return {ids[0]: f"{error_code(error) or type(error).__name__}: {classify(error, 'terminating')}"}
    refused: dict[str, str] = {}
    for instance_id in ids:  # one by one: which ones, and end all the others
        refused.update(terminate(ec2, [instance_id]))
    return refused


def terminate_and_check(ec2: Any, ids: list[str], delay: float) -> Release:
    """Terminate ``ids``, wait for it, then check each: what ended, and what is still billed and why."""
    result = Release()
    refused = terminate(ec2, ids)
    accepted = [i for i in ids if i not in refused]
    if accepted:
        try:
            wait(ec2, "terminated", accepted, delay)
        except ProviderError as error:  # checked below, instance by instance
            log.warning("%s", error)
    states = {i["InstanceId"]: i.get("State", {}).get("Name", "") for i in describe_ids(ec2, ids)}
    for instance_id in ids:
        state = states.get(instance_id, "terminated")  # not found any more: gone
        if state in ENDED_STATES:
            result.released.append(instance_id)
        else:
            result.left[instance_id] = f"{state}: {refused[instance_id]}" if instance_id in refused else state
    return result
