"""The aws provider's network: subnets, the cluster's key pair and security group, and how the master
and the slaves reach each other (SSH address of an instance, tunnels or direct connections)."""

from __future__ import annotations

import ipaddress
import logging
import os
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from controller.config import AwsConfig, Config
from controller.errors import ConfigError, ProviderError
from controller.providers.aws.ec2 import TOOL, tags
from controller.providers.aws.errors import call, classify, error_code
from controller.providers.base import SshTarget
from controller.providers.remote.connection import local_addresses

log = logging.getLogger(__name__)

# test-only: ``(instance, key_file) -> (address, port)`` (providers.base.Hooks.address)
AddressHook = Optional[Callable[[dict, str], tuple[str, int]]]


def folder(config: Config, name: str) -> Path:
    """state_dir/aws/<cluster>: the private key, the security group id, known_hosts (0700)."""
    path = config.state_dir / "aws" / name
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def key_file_of(config: Config, name: str) -> str:
    """The private key of the cluster's key pair: the one this master created, else [aws] key_file."""
    return str(next(iter(folder(config, name).glob("*.pem")), "")) or config.aws.key_file


def subnets(ec2: Any, cfg: AwsConfig) -> list[dict]:
    if cfg.subnet:
        found = call(f"[aws] subnet = {cfg.subnet}", ec2.describe_subnets, SubnetIds=[cfg.subnet])["Subnets"]
    else:
        found = call(
            "finding the default VPC's subnets",
            ec2.describe_subnets,
            Filters=[{"Name": "default-for-az", "Values": ["true"]}],
        )["Subnets"]
    if not found:
        raise ConfigError(f"no default VPC subnets in {cfg.region}; set [aws] subnet")
    return sorted(found, key=lambda s: s["AvailabilityZone"])


def ssh_cidr(cfg: AwsConfig) -> str:
    """Where SSH to the slaves is allowed from: [aws] ssh_from, or this master's public address."""
    if cfg.ssh_from != "auto":
        return str(ipaddress.ip_network(cfg.ssh_from, strict=False))
    try:  # the master's address as AWS sees it
        with urllib.request.urlopen("https://checkip.amazonaws.com", timeout=10) as response:
            address = response.read().decode().strip()
        return f"{ipaddress.ip_address(address)}/32"
    except (OSError, ValueError) as error:
        raise ConfigError(f"could not find this master's public address ({error}); set [aws] ssh_from") from None


def key_pair(ec2: Any, config: Config, name: str) -> tuple[str, str]:
    """[aws] key_name and key_file, or a new ed25519 key pair whose private key lands 0600 in ``folder``."""
    cfg = config.aws
    if cfg.key_name:
        if not cfg.key_file:
            raise ConfigError("[aws] key_name is set but key_file is not: the private key is needed for SSH")
        return cfg.key_name, str(Path(cfg.key_file).expanduser())
    key_name = f"{TOOL}-{name}-{uuid.uuid4().hex[:8]}"
    reply = call(
        "creating a key pair",
        ec2.create_key_pair,
        KeyName=key_name,
        KeyType="ed25519",
        TagSpecifications=[{"ResourceType": "key-pair", "Tags": tags(name, "key-pair")}],
    )
    path = folder(config, name) / f"{key_name}.pem"
    # 0600 from creation: O_EXCL + mode, never world-readable for an instant
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(reply["KeyMaterial"])
    log.info("created key pair %s (private key %s)", key_name, path)
    return key_name, str(path)


def security_group(ec2: Any, config: Config, name: str, vpc_id: str) -> str:
    """[aws] security_group, or a new group: SSH from the master only, every port among its members."""
    cfg = config.aws
    if cfg.security_group:
        return cfg.security_group
    cidr = ssh_cidr(cfg)
    group = call(
        "creating a security group",
        ec2.create_security_group,
        GroupName=f"{TOOL}-{name}-{uuid.uuid4().hex[:8]}",
        VpcId=vpc_id,
        Description=f"{TOOL} cluster {name}: SSH from the master, engines within",
        TagSpecifications=[{"ResourceType": "security-group", "Tags": tags(name, "security-group")}],
    )
    group_id = group["GroupId"]
    (folder(config, name) / "security_group").write_text(
        group_id
    )  # stop finds it even if the owner tag no longer matches
    # SSH from the master only; every other port only from members of this group (never 0.0.0.0/0)
    call(
        "opening SSH and intra-cluster ports",
        ec2.authorize_security_group_ingress,
        GroupId=group_id,
        IpPermissions=[
            {
                "IpProtocol": "tcp",
                "FromPort": 22,
                "ToPort": 22,
                "IpRanges": [{"CidrIp": cidr, "Description": "SSH from the master"}],
            },
            {
                "IpProtocol": "tcp",
                "FromPort": 0,
                "ToPort": 65535,
                "UserIdGroupPairs": [{"GroupId": group_id, "Description": "engines and controller"}],
            },
        ],
    )
    return group_id


def delete_group(ec2: Any, group_id: str, timeout: float = 120) -> None:
    """Delete a security group, waiting while terminating instances still hold it."""
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
            if code != "DependencyViolation" or time.monotonic() > deadline:
                raise classify(error, f"deleting security group {group_id}") from None
        time.sleep(delay)
        delay = min(delay * 2, 10)


def address_inside(found_subnets: list[dict]) -> str:
    """This master's address inside the slaves' subnets ('' when it has none)."""
    networks = [ipaddress.ip_network(s["CidrBlock"]) for s in found_subnets if s.get("CidrBlock")]
    return next((str(a.ip) for a in local_addresses() for n in networks if a.ip in n), "")


def use_tunnel(cfg: AwsConfig, found_subnets: list[dict]) -> bool:
    """auto: tunnels unless this master has an address inside the slaves' VPC subnets."""
    if cfg.tunnel != "auto":
        return cfg.tunnel == "always"
    inside = bool(address_inside(found_subnets))
    log.info(
        "master %s the slaves' VPC: %s",
        "inside" if inside else "outside",
        "direct connections" if inside else "SSH reverse tunnels",
    )
    return not inside


def host_of(instance: dict, cfg: AwsConfig, key_file: str, tunnel: bool, address_hook: AddressHook = None) -> SshTarget:
    """Where SSH reaches ``instance``: its public address through tunnels, else its private one."""
    if address_hook is not None:
        address, port = address_hook(instance, key_file)
        return SshTarget(address, port, cfg.ssh_user, key_file)
    address = instance.get("PublicIpAddress" if tunnel else "PrivateIpAddress") or ""
    if not address:
        raise ProviderError(
            f"{instance['InstanceId']} has no {'public' if tunnel else 'private'} address; "
            f"use a subnet that assigns public IPs, or run the master inside the VPC"
        )
    return SshTarget(address, 22, cfg.ssh_user, key_file)
