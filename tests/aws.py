"""EC2 for the tests: moto's server (real HTTP, real boto3), its AMIs, a cluster.ini for provider = aws,
what carries a cluster's tags, and the test-only provider hooks that map moto's instances (which never
boot) to network-namespace hosts with a real sshd. The fixtures over these are in conftest.py."""

from __future__ import annotations

import dataclasses
import socket
import sys

from controller.api import Cluster
from controller.errors import ProviderError
from controller.providers import Hooks
from tests.helpers import make_config
from tests.netns import SLAVE_USER, NetnsHost

REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_provider_hooks(monkeypatch, **changes) -> Hooks:
    """Test-only: every Cluster built during the test (the in-process CLI's too) hands its providers
    these hooks (``Cluster(provider_hooks=...)``), changed from those already set by ``changes``."""
    defaults = Cluster.__init__.__kwdefaults__
    assert defaults is not None  # Cluster.__init__ has keyword-only parameters, provider_hooks among them
    hooks = dataclasses.replace(defaults["provider_hooks"], **changes)
    monkeypatch.setitem(defaults, "provider_hooks", hooks)
    return hooks


def fresh_ec2(moto_url: str, monkeypatch):
    """An empty moto EC2, test credentials only, waiters polling fast; ``monkeypatch`` undoes the settings."""
    import urllib.request

    import boto3

    urllib.request.urlopen(urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST")).read()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    set_provider_hooks(monkeypatch, waiter_delay=0.2)
    return boto3.client("ec2", region_name=REGION, endpoint_url=moto_url)


def map_instances(hosts, monkeypatch) -> dict:
    """Test-only: instance -> namespace host, in launch order; the key pair authorised there (cloud-init)."""
    assigned: dict[str, NetnsHost] = {}
    for host in hosts.hosts:
        host.authorized_keys.write_text("")

    def hook(instance: dict, key_file: str) -> tuple[str, int]:
        if instance["InstanceId"] not in assigned:
            free = [h for h in hosts.hosts if h not in assigned.values()]
            if not free:  # e.g. an instance started behind the tool's back: it has no machine here
                raise ProviderError(f"{instance['InstanceId']}: no namespace host left (test mapping)")
            free[0].authorize(key_file)
            assigned[instance["InstanceId"]] = free[0]
        return assigned[instance["InstanceId"]].address, 22

    set_provider_hooks(monkeypatch, address=hook)
    return assigned


_IMAGE: list[str] = []


def image(ec2) -> str:
    """One of the AMIs moto ships (describing them all is slow: once per module)."""
    if not _IMAGE:
        _IMAGE.append(ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"])
    return _IMAGE[0]


def aws_config(tmp_path, data_dir, moto_url, ami, *, slaves=2, extra=""):
    keys = {
        "region": REGION,
        "endpoint_url": moto_url,
        "instance_types": "g4dn.xlarge, g5.xlarge",
        "ami": ami,
        "ssh_user": SLAVE_USER,
        "ssh_from": "10.213.0.0/16",
        "python": sys.executable,
    }
    for line in extra.splitlines():  # a test's keys replace the defaults above
        if "=" in line:
            key, value = line.split("=", 1)
            keys[key.strip()] = value.strip()
    aws_section = "\n".join(f"{k} = {v}" for k, v in keys.items())
    return make_config(tmp_path, data_dir, slaves=slaves, extra=f"provider = aws\n\n[aws]\n{aws_section}\n")


def tagged(ec2, name="test") -> dict:
    """Everything in EC2 that carries the cluster's tag and is not gone."""
    filters = [{"Name": "tag:gpu-cluster:cluster", "Values": [name]}]
    instances = [
        i
        for r in ec2.describe_instances(Filters=filters)["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] != "terminated"
    ]
    return {
        "instances": [i["InstanceId"] for i in instances],
        "groups": [g["GroupId"] for g in ec2.describe_security_groups(Filters=filters)["SecurityGroups"]],
        "key_pairs": [k["KeyName"] for k in ec2.describe_key_pairs(Filters=filters)["KeyPairs"]],
    }


NOTHING: dict[str, list[str]] = {"instances": [], "groups": [], "key_pairs": []}
