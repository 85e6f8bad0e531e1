"""The `providers.gcp` section (or the top-level `gcp:` one)."""

from __future__ import annotations

from dataclasses import dataclass

from cloudtaskd.fleet.providers.sections import CloudProviderConfig


@dataclass(frozen=True)
class GcpProviderConfig(CloudProviderConfig):
    project_id: str = ""
    zone: str = "us-central1-a"
    # Service-account JSON. Empty: Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS,
    # the gcloud user file, the metadata server).
    credentials_file: str = ""
    api_endpoint: str = ""  # an emulator, scheme included (http://127.0.0.1:PORT)
    # The Cloud Billing Catalog API (list prices; needs the Cloud Billing API enabled); an emulator in tests.
    billing_endpoint: str = "https://cloudbilling.googleapis.com"
    machine_type: str = "e2-standard-2"
    # The VPC network for the VMs (a name in project_id, or `projects/HOST/global/networks/NAME`), and
    # its subnetwork (a name in the zone's region, or a path); custom-mode networks need one.
    network: str = "default"
    subnetwork: str = ""
    disk_type: str = ""  # the boot disk's type; empty: chosen per machine series (pd-/hyperdisk-balanced)

    @property
    def placement(self) -> str:
        return self.zone
