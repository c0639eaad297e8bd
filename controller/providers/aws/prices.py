"""Spot prices per availability zone beside on-demand list prices: needs the config's [aws] section
and credentials only, no store and no provider (``cluster prices`` works before any start)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional

from controller.config import Config
from controller.errors import ConfigError
from controller.providers.aws import ec2 as ec2_calls
from controller.providers.aws.errors import AWS_ERRORS, classify

INSTANCE_TYPE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9-]+$")
# us-east-1 Linux on-demand list prices, $/h (the Pricing API is not in every partition or test endpoint)
ON_DEMAND_USD = {
    "g4dn.xlarge": 0.526,
    "g4dn.2xlarge": 0.752,
    "g4dn.4xlarge": 1.204,
    "g4dn.8xlarge": 2.176,
    "g4dn.12xlarge": 3.912,
    "g4dn.16xlarge": 4.352,
    "g5.xlarge": 1.006,
    "g5.2xlarge": 1.212,
    "g5.4xlarge": 1.624,
    "g5.12xlarge": 5.672,
    "g6.xlarge": 0.8048,
    "g6.2xlarge": 0.9776,
    "p3.2xlarge": 3.06,
    "p3.8xlarge": 12.24,
    "p4d.24xlarge": 32.7726,
}


@dataclass
class PriceRow:
    instance_type: str
    zone: str
    spot: Optional[float]  # latest spot price in this AZ, $/h
    on_demand: Optional[float]  # list price, $/h
    timestamp: str = ""


def spot_prices(ec2: Any, kinds: list[str]) -> list[PriceRow]:
    """Latest spot price per AZ (describe_spot_price_history) beside the on-demand list price."""
    for kind in kinds:
        if not INSTANCE_TYPE.match(kind):
            raise ConfigError(f"--instance-types: {kind!r} is not an instance type like g4dn.xlarge")
    latest: dict[tuple[str, str], dict] = {}
    paginator = ec2.get_paginator("describe_spot_price_history")
    try:
        pages = paginator.paginate(
            InstanceTypes=kinds, ProductDescriptions=["Linux/UNIX"], StartTime=datetime.now(timezone.utc)
        )
        for page in pages:
            for item in page["SpotPriceHistory"]:
                key = (item["InstanceType"], item["AvailabilityZone"])
                if key not in latest or item.get("Timestamp", 0) > latest[key].get("Timestamp", 0):
                    latest[key] = item
    except AWS_ERRORS as error:
        raise classify(error, "reading spot prices") from None
    rows = [
        PriceRow(kind, zone, float(item["SpotPrice"]), ON_DEMAND_USD.get(kind), str(item.get("Timestamp", "")))
        for (kind, zone), item in sorted(latest.items())
    ]
    for kind in kinds:
        if not any(r.instance_type == kind for r in rows):
            rows.append(PriceRow(kind, "-", None, ON_DEMAND_USD.get(kind)))
    return rows


def prices(config: Config, instance_types: Optional[list[str]] = None) -> list[PriceRow]:
    """``cluster prices``: for these types (default: [aws] instance_types) in [aws] region."""
    return spot_prices(ec2_calls.client(config), list(instance_types or config.aws.instance_types))


def price_of(ec2: Any, kind: str, zone: str, market: str) -> float:
    """The price an instance runs at, recorded so reports can compute cost per run."""
    if market == "spot":
        for row in spot_prices(ec2, [kind]):
            if row.zone == zone and row.spot is not None:
                return row.spot
    return ON_DEMAND_USD.get(kind, 0.0)
