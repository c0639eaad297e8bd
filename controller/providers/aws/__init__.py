"""provider = aws: GPU spot instances on EC2, bootstrapped over SSH like the ssh provider.

``ec2`` (the client, tags, launch with its fallback over types, zones and markets, waits, terminate),
``network`` (subnets, key pair, security group, SSH addresses), ``prices`` (spot and on-demand; needs no
store), ``errors`` (EC2's errors sorted into capacity, credentials and the rest), ``provider`` (the verbs).
"""

from __future__ import annotations

from controller.providers.aws.ec2 import owner
from controller.providers.aws.errors import classify
from controller.providers.aws.prices import ON_DEMAND_USD, PriceRow, prices
from controller.providers.aws.provider import AwsProvider

__all__ = ["AwsProvider", "ON_DEMAND_USD", "PriceRow", "classify", "owner", "prices"]
