"""The cloud stand-ins the Azure and GCP driver tests share, each running for one test. A module that
needs one seeded before it starts (test_azure_catalog's SKUs, test_check's) defines its own, with
tests.fakes.serving."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.fakes.azure_standin import ArmStandin
from tests.fakes.gcp_standin import ComputeStandin
from tests.fakes.serving import serving


@pytest.fixture
async def gce() -> AsyncIterator[ComputeStandin]:
    async with serving(ComputeStandin()) as server:
        yield server


@pytest.fixture
async def arm() -> AsyncIterator[ArmStandin]:
    async with serving(ArmStandin()) as server:
        yield server
