"""Releasing what a cluster holds in EC2, found by its tags and by the ids the master knows, and finding
what a lost state dir left behind (``cluster stop``, ``stop --all``, the clean-up after a failed start).

Instances are found by tag *and* by the ids from the launch replies or the store (describe-by-tag is
eventually consistent, and the owner tag changes with the user or host name); the security group and key
pair go only once every instance is gone, so instances left billing stay reachable.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

from controller.config import Config
from controller.errors import ProviderError
from controller.providers.aws import ec2 as ec2_calls
from controller.providers.aws import network
from controller.providers.aws.ec2 import TAG_CLUSTER, TAG_OWNER, TOOL, Release
from controller.providers.aws.errors import call
from controller.providers.base import Hooks, Resource, SshTarget
from controller.providers.remote.engines import RemoteEngines
from controller.store import Store

log = logging.getLogger(__name__)


def find_orphans(ec2: Any, name: str, everything: bool = False, any_owner: bool = False) -> list[Resource]:
    """What ``release_orphans`` with the same arguments would end (for ``stop --all`` to show first)."""
    found = []
    for instance in ec2_calls.instances(ec2, name, everything, any_owner):
        tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
        found.append(
            Resource(
                "instance",
                instance["InstanceId"],
                tags.get(TAG_CLUSTER, ""),
                tags.get(TAG_OWNER, ""),
                f"{instance.get('InstanceType', '')} {instance.get('State', {}).get('Name', '')}",
            )
        )
    filters = ec2_calls.tag_filter(name, everything, any_owner)
    for group in call("finding security groups", ec2.describe_security_groups, Filters=filters)["SecurityGroups"]:
        tags = {t["Key"]: t["Value"] for t in group.get("Tags", [])}
        found.append(Resource("security-group", group["GroupId"], tags.get(TAG_CLUSTER, ""), tags.get(TAG_OWNER, "")))
    for pair in call("finding key pairs", ec2.describe_key_pairs, Filters=filters)["KeyPairs"]:
        tags = {t["Key"]: t["Value"] for t in pair.get("Tags", [])}
        found.append(Resource("key-pair", pair["KeyName"], tags.get(TAG_CLUSTER, ""), tags.get(TAG_OWNER, "")))
    return found


class Releaser:
    """Ends a cluster's instances (its engines first, politely), then its security group and key pair."""

    def __init__(self, config: Config, store: Store, engines: RemoteEngines, hooks: Hooks):
        self.config, self.store, self.engines, self.hooks = config, store, engines, hooks

    def release(
        self,
        ec2: Any,
        name: str,
        everything: bool = False,
        cluster_id: Optional[int] = None,
        *,
        any_owner: bool = False,
        instance_ids: Iterable[str] = (),
        only: Optional[set[str]] = None,
        own_files: bool = True,
    ) -> Release:
        """Stop engines, terminate instances, delete the group and key pair. Safe twice.

        Found by tag, plus ``instance_ids`` (from the launch replies or the store) and, for one
        cluster, the group and key pair this master created (recorded under state_dir; ``own_files``:
        this is the region they were created in).  What could not be terminated is in ``left``; the
        group and keys stay then, so the instances stay reachable.
        """
        keep = (lambda item: item in only) if only is not None else (lambda item: True)
        instances = [i for i in ec2_calls.instances(ec2, name, everything, any_owner) if keep(i["InstanceId"])]
        known = {i["InstanceId"] for i in instances}
        extra = [i for i in dict.fromkeys(instance_ids) if i not in known]
        instances += [
            i for i in ec2_calls.describe_ids(ec2, extra) if i.get("State", {}).get("Name") in ec2_calls.LIVE_STATES
        ]
        if not everything:
            hosts = []
            reached = {n.instance_id: n for n in self.store.nodes.of(cluster_id) if n.ssh_host} if cluster_id else {}
            key_file = network.key_file_of(self.config, name)
            for instance in instances:
                if instance.get("State", {}).get("Name") != "running":
                    continue
                node = reached.get(instance["InstanceId"])
                if node is not None:  # where bootstrap reached it (and recorded its host key)
                    hosts.append(SshTarget(node.ssh_host, node.ssh_port or 22, self.config.aws.ssh_user, key_file))
                    continue
                try:
                    hosts.append(
                        network.host_of(
                            instance, self.config.aws, key_file, self.config.aws.tunnel != "never", self.hooks.address
                        )
                    )
                except ProviderError:
                    pass
            # engines first, politely (best effort: termination ends them anyway), then the tunnels
            self.engines.stop(cluster_id, hosts, quiet=True)
        else:
            self.engines.stop_tunnels()
        result = ec2_calls.terminate_and_check(ec2, [i["InstanceId"] for i in instances], self.hooks.waiter_delay)
        if result.left:  # their group and key must stay: deleting them fails, or locks the owner out
            return result
        filters = ec2_calls.tag_filter(name, everything, any_owner)
        groups = [
            g["GroupId"]
            for g in call("finding security groups", ec2.describe_security_groups, Filters=filters)["SecurityGroups"]
            if keep(g["GroupId"])
        ]
        pairs = [
            k["KeyName"]
            for k in call("finding key pairs", ec2.describe_key_pairs, Filters=filters)["KeyPairs"]
            if keep(k["KeyName"])
        ]
        folder = self.config.state_dir / "aws" / name
        if own_files and not everything and folder.is_dir():
            # what this master created, whoever the tags now say it belongs to (user or hostname changed)
            group_file = folder / "security_group"
            if group_file.exists() and group_file.read_text().strip() not in groups:
                groups.append(group_file.read_text().strip())
            pairs += [p.stem for p in folder.glob(f"{TOOL}-*.pem") if p.stem not in pairs]
        for group_id in groups:
            network.delete_group(ec2, group_id)
            result.released.append(group_id)
        for pair in pairs:
            call("deleting a key pair", ec2.delete_key_pair, KeyName=pair)
            result.released.append(pair)
        folders = (
            [p for p in (self.config.state_dir / "aws").glob("*")] if everything else [folder] if own_files else []
        )
        for path in (p for f in folders if f.is_dir() for p in f.glob("*")):  # private and host keys of the released
            if path.is_file() and (path.suffix == ".pem" or path.name in ("known_hosts", "security_group")):
                path.unlink()
        return result
