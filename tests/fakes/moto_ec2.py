"""moto's EC2 as a real HTTP server on 127.0.0.1, behind a small WSGI middleware that can answer
the next call of an action with a real EC2 error (the status code AWS uses) and counts actions.

Where moto is more lenient than EC2 the middleware answers as EC2 does: RunInstances with an AMI
whose architecture the instance type does not support is refused (400 InvalidParameterValue, EC2's
message). `add_image` registers an AMI owned by someone else (Canonical's images, which moto lacks)."""

from __future__ import annotations

import base64
import io
import json
import threading
import urllib.request
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs

from werkzeug.serving import make_server

ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>{code}</Code>'
    "<Message>{message}</Message></Error></Errors><RequestID>test</RequestID></Response>"
)


CONSOLE_XML = (
    '<?xml version="1.0" encoding="UTF-8"?><GetConsoleOutputResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
    "<requestId>test</requestId><instanceId>{instance}</instanceId><timestamp>2026-01-01T00:00:00.000Z</timestamp>"
    "<output>{output}</output></GetConsoleOutputResponse>"
)


SPOT_ITEM = (
    "<item><instanceType>{type}</instanceType><productDescription>Linux/UNIX</productDescription>"
    "<spotPrice>{price}</spotPrice><timestamp>{ts}</timestamp><availabilityZone>{zone}</availabilityZone></item>"
)
SPOT_XML = (
    '<?xml version="1.0" encoding="UTF-8"?><DescribeSpotPriceHistoryResponse '
    'xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>test</requestId>'
    "<spotPriceHistorySet>{items}</spotPriceHistorySet><nextToken></nextToken></DescribeSpotPriceHistoryResponse>"
)
ARCH_MISMATCH = ("The architecture '{type_arch}' of the specified instance type does not match the architecture "
                 "'{image_arch}' of the specified AMI. Specify an instance type and an AMI that have matching "
                 "architectures, and try again. You can use 'describe-instance-types' or 'describe-images' to "
                 "discover the architecture of the instance type or AMI.")


ACCOUNT = "123456789012"  # moto's default account


class MotoEc2:
    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

        self.app = DomainDispatcherApplication(create_backend_app)
        self.fail_next: dict[str, tuple[str, int, str]] = {}
        self.calls: Counter[str] = Counter()
        # Answers a call with an error when it returns (code, status, message): by its parameters.
        self.fail_if: Callable[[str, dict[str, list[str]]], tuple[str, int, str] | None] | None = None
        self.params: list[tuple[str, dict[str, list[str]]]] = []  # every call's action and parameters
        # What GetConsoleOutput answers (decoded text), when set; moto's own has no host keys.
        self.console: str | None = None
        # What DescribeSpotPriceHistory answers, when set: (type, zone, price, ISO timestamp) rows.
        # moto's own is one fixed fake price.
        self.spot_prices: list[tuple[str, str, float, str]] | None = None
        self.server = make_server("127.0.0.1", 0, self._wsgi, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _wsgi(self, environ: dict[str, Any], start_response: Any) -> Any:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        action = (parse_qs(body.decode(errors="replace")).get("Action") or [""])[0]
        if action:
            self.calls[action] += 1
            self.params.append((action, parse_qs(body.decode(errors="replace"))))
        failure = self.fail_next.pop(action, None)
        if failure is None and self.fail_if is not None and action:
            failure = self.fail_if(action, parse_qs(body.decode(errors="replace")))
        if failure is None and action == "RunInstances":
            failure = self._arch_mismatch(parse_qs(body.decode(errors="replace")))
        if failure is not None:
            code, status, message = failure
            data = ERROR_XML.format(code=code, message=message).encode()
            start_response(f"{status} Error", [("Content-Type", "text/xml"), ("Content-Length", str(len(data)))])
            return [data]
        if action == "DescribeSpotPriceHistory" and self.spot_prices is not None:
            items = "".join(SPOT_ITEM.format(type=t, zone=z, price=p, ts=ts) for t, z, p, ts in self.spot_prices)
            data = SPOT_XML.format(items=items).encode()
            start_response("200 OK", [("Content-Type", "text/xml"), ("Content-Length", str(len(data)))])
            return [data]
        if action == "GetConsoleOutput" and self.console is not None:
            instance = (parse_qs(body.decode()).get("InstanceId") or [""])[0]
            output = base64.b64encode(self.console.encode()).decode()
            data = CONSOLE_XML.format(instance=instance, output=output).encode()
            start_response("200 OK", [("Content-Type", "text/xml"), ("Content-Length", str(len(data)))])
            return [data]
        return self.app(environ, start_response)

    def _arch_mismatch(self, params: dict[str, list[str]]) -> tuple[str, int, str] | None:
        """EC2's refusal of an AMI the instance type cannot boot (moto would launch it)."""
        from moto.ec2.models import ec2_backends
        from moto.ec2.models.instance_types import INSTANCE_TYPES

        image_id, machine_type = (params.get("ImageId") or [""])[0], (params.get("InstanceType") or [""])[0]
        ami = next((b.amis[image_id] for b in ec2_backends[ACCOUNT].values() if image_id in b.amis), None)
        supported = INSTANCE_TYPES.get(machine_type, {}).get("ProcessorInfo", {}).get("SupportedArchitectures", [])
        if ami is None or not ami.architecture or not supported or ami.architecture in supported:
            return None
        message = ARCH_MISMATCH.format(type_arch=",".join(supported), image_arch=ami.architecture)
        return ("InvalidParameterValue", 400, message)

    def add_image(self, region: str, name: str, arch: str, created: str, owner: str) -> str:
        """Register a public AMI of another account (moto's own images are all "amazon"'s); its id."""
        from moto.ec2.models import ec2_backends
        from moto.ec2.models.amis import Ami
        from moto.ec2.utils import random_ami_id

        backend = ec2_backends[ACCOUNT][region]
        ami = Ami(backend, random_ami_id(), name=name, owner_id=owner, public=True, virtualization_type="hvm",
                  architecture=arch, creation_date=datetime.fromisoformat(created), root_device_type="ebs",
                  hypervisor="xen", region_name=region)
        backend.amis[ami.id] = ami
        return str(ami.id)

    def start(self) -> None:
        self.thread.start()

    def reset(self) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")).read()
        self.fail_next.clear()
        self.calls.clear()
        self.console = None
        self.spot_prices = None
        self.fail_if = None
        self.params.clear()

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=10)


class PricingStandin:
    """The AWS Pricing API's GetProducts, enough for on-demand prices: one product per
    (instance type, region code) the test sets, answered only when the filters match it."""

    def __init__(self) -> None:
        self.prices: dict[tuple[str, str], float] = {}
        self.requests: list[dict[str, Any]] = []
        self.url = ""
        self._runner: Any = None

    async def start(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_post("/", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        if request.headers.get("X-Amz-Target") != "AWSPriceListService.GetProducts":
            return web.json_response({"__type": "InvalidParameterException", "message": "unknown target"}, status=400)
        body = json.loads(await request.read())
        self.requests.append(body)
        filters = {f["Field"]: f["Value"] for f in body.get("Filters", [])}
        key = (filters.get("instanceType", ""), filters.get("regionCode", ""))
        products = []
        if key in self.prices and filters.get("operatingSystem") == "Linux" and filters.get("tenancy") == "Shared":
            products.append(json.dumps({
                "product": {"attributes": {"instanceType": key[0], "regionCode": key[1]}},
                "terms": {"OnDemand": {"SKU.TERM": {"priceDimensions": {"SKU.TERM.DIM": {
                    "unit": "Hrs", "pricePerUnit": {"USD": f"{self.prices[key]:.10f}"}}}}}}}))
        return web.Response(body=json.dumps({"FormatVersion": "aws_v1", "PriceList": products}).encode(),
                            content_type="application/x-amz-json-1.1")
