"""EC2's errors sorted the SkyPilot way: capacity (try the next type/zone, then on-demand if allowed),
credentials/permissions (stop at once), the rest (botocore retries transient ones itself, in adaptive
mode). Every message says what to do."""

from __future__ import annotations

from typing import Any, Callable

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError

from controller.errors import CapacityError, ConfigError, CredentialsError, ProviderError

CAPACITY_CODES = {
    "InsufficientInstanceCapacity",
    "InsufficientCapacity",
    "InsufficientHostCapacity",
    "Unsupported",
    "SpotMaxPriceTooLow",
    "InsufficientFreeAddressesInSubnet",
}
QUOTA_CODES = {"MaxSpotInstanceCountExceeded", "VcpuLimitExceeded", "InstanceLimitExceeded"}
CREDENTIAL_CODES = {
    "AuthFailure",
    "UnauthorizedOperation",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "OptInRequired",
    "AccessDenied",
    "AccessDeniedException",
    "ExpiredToken",
}
CONFIG_CODES = {
    "InvalidInstanceType",
    "InvalidAMIID.Malformed",
    "InvalidAMIID.NotFound",
    "InvalidSubnetID.NotFound",
    "InvalidGroup.NotFound",
    "InvalidKeyPair.NotFound",
    "InvalidParameterValue",
}
# what a call to EC2 raises: botocore's own errors (a ClientError carries EC2's code)
AWS_ERRORS = (ClientError, BotoCoreError)


def error_code(error: Exception) -> str:
    return error.response.get("Error", {}).get("Code", "") if isinstance(error, ClientError) else ""


def classify(error: Exception, doing: str) -> Exception:
    """A botocore error as one of ours, with a message that says what to do."""
    if isinstance(error, NoCredentialsError):
        return CredentialsError(
            f"{doing}: no AWS credentials (set AWS_PROFILE or AWS_ACCESS_KEY_ID/"
            f"AWS_SECRET_ACCESS_KEY, or run `aws configure`)"
        )
    if isinstance(error, NoRegionError):
        return ConfigError(f"{doing}: no AWS region; set [aws] region")
    code = error_code(error)
    message = (
        error.response.get("Error", {}).get("Message", str(error)) if isinstance(error, ClientError) else str(error)
    )
    if code in CREDENTIAL_CODES:
        return CredentialsError(f"{doing}: AWS refused ({code}): {message}; docs/aws.md lists the IAM policy needed")
    if code in QUOTA_CODES:
        return CapacityError(
            f"{doing}: quota exceeded ({code}): {message}; ask for a higher "
            f"'All G and VT Spot Instance Requests' quota (docs/aws.md)"
        )
    if code == "SpotMaxPriceTooLow":
        return CapacityError(
            f"{doing}: [aws] max_spot_price is below the current spot price ({message}); see `cluster prices`"
        )
    if code in CAPACITY_CODES:
        return CapacityError(f"{doing}: no capacity ({code}): {message}")
    if code in CONFIG_CODES:
        return ConfigError(f"{doing}: {code}: {message}")
    return ProviderError(f"{doing}: {code or type(error).__name__}: {message}")


def call(doing: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """``fn(**kwargs)``, an EC2 error raised as one of ours naming what was being done."""
    try:
        return fn(**kwargs)
    except AWS_ERRORS as error:
        raise classify(error, doing) from None
