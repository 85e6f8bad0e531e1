"""The `providers.aws` section (or the top-level `aws:` one)."""

from __future__ import annotations

from dataclasses import dataclass

from cloudtaskd.configtypes import NO_SECRET, Secret
from cloudtaskd.fleet.providers.sections import CloudProviderConfig


@dataclass(frozen=True)
class AwsProviderConfig(CloudProviderConfig):
    region: str = "us-east-1"
    zone: str = ""  # availability zone; empty: any in the region
    access_key: Secret = NO_SECRET  # empty: the standard AWS credential chain
    secret_key: Secret = NO_SECRET
    endpoint_url: str = ""  # an emulator (e.g. moto) instead of AWS
    pricing_endpoint_url: str = ""  # an emulator of the Pricing API (on-demand prices) instead of AWS's
    machine_type: str = "t3.small"
    # Where VMs go when the region has no default VPC (or not there): a subnet (subnet-...), in
    # which each VM gets a public address; empty: the default VPC.
    subnet_id: str = ""
    # A security group of one's own (sg-..., in the subnet's VPC) allowing SSH from this host;
    # empty: one made per daemon (SSH from anywhere) in the VMs' VPC.
    security_group_id: str = ""

    @property
    def placement(self) -> str:
        return self.zone or self.region
