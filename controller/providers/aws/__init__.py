"""provider = aws: GPU spot instances on EC2, bootstrapped over SSH like the ssh provider.

``ec2`` (the client, tags, launch with its fallback over types, zones and markets, waits, terminate),
``network`` (subnets, key pair, security group, SSH addresses), ``prices`` (spot and on-demand; needs no
store), ``errors`` (EC2's errors sorted into capacity, credentials and the rest), ``provider`` (the verbs).
"""
from __future__ import annotations

from .ec2 import owner
from .errors import classify
from .prices import ON_DEMAND_USD, PriceRow, prices
from .provider import AwsProvider

__all__ = ["AwsProvider", "ON_DEMAND_USD", "PriceRow", "classify", "owner", "prices"]
