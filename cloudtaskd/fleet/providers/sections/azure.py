"""The `providers.azure` section (or the top-level `azure:` one)."""

from __future__ import annotations

from dataclasses import dataclass

from cloudtaskd.configtypes import NO_SECRET, Secret
from cloudtaskd.fleet.providers.sections import CloudProviderConfig


@dataclass(frozen=True)
class AzureProviderConfig(CloudProviderConfig):
    subscription_id: str = ""
    resource_group: str = "cloudtask"
    location: str = "eastus"
    # A service principal (ClientSecretCredential) when all three are set, else DefaultAzureCredential.
    tenant_id: str = ""
    client_id: str = ""
    client_secret: Secret = NO_SECRET
    base_url: str = ""  # an emulator instead of https://management.azure.com
    # The public Retail Prices API (no credentials); an emulator's address in tests.
    retail_prices_url: str = "https://prices.azure.com/api/retail/prices"
    machine_type: str = "Standard_D2s_v5"

    @property
    def placement(self) -> str:
        return self.location
