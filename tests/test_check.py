"""`cloudtaskctl check` against the stand-ins: moto's EC2 as a real HTTP server for AWS (a good
config; a bad instance type and a missing image), a real TCP port for an ssh host, and the local
provider. Run as a user runs it: the real command, no daemon."""

from __future__ import annotations

from io import StringIO
from pathlib import Path

import boto3
import yaml

from cloudtaskd.ctl.main import main as ctl_main
from tests.moto_ec2 import MotoEc2
from tests.procs import free_port


def check(tmp_path: Path, config: dict[str, object]) -> tuple[int, list[str]]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), **config}))
    out, err = StringIO(), StringIO()
    rc = ctl_main(["check", "--config", str(path)], out=out, err=err)
    return rc, out.getvalue().splitlines() + err.getvalue().splitlines()


def aws(moto: MotoEc2, **over: object) -> dict[str, object]:
    return {"providers": {"local": {"enabled": False}, "aws": {
        "enabled": True, "region": "us-east-1", "endpoint_url": moto.url, "access_key": "testing",
        "secret_key": "testing", "machine_type": "t3.small", **over}},
        "agents": {"public_url": "wss://control.example:8443/v1/agent"}}


def test_a_good_aws_config_passes(tmp_path: Path, moto: MotoEc2, creds: None) -> None:
    moto.reset()
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=moto.url)
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]  # one of moto's own
    rc, lines = check(tmp_path, aws(moto, image=image))
    assert rc == 0, lines
    text = "\n".join(lines)
    for what in ("aws: credentials", "aws: instance type t3.small", f"aws: image {image}", "aws: ssh rule",
                 "agents: address"):
        assert f"ok    {what}" in text, text
    assert "warn  aws: quota" in text  # moto has no Service Quotas: said, not hidden


def test_a_bad_instance_type_and_a_missing_image_fail_with_what_to_fix(tmp_path: Path, moto: MotoEc2,
                                                                       creds: None) -> None:
    moto.reset()
    rc, lines = check(tmp_path, aws(moto, machine_type="t3.nonesuch", image="ami-0123456789abcdef0"))
    assert rc == 1, lines
    bad_type = next(line for line in lines if "instance type t3.nonesuch" in line)
    assert bad_type.startswith("FAIL") and "machine_type" in bad_type
    bad_image = next(line for line in lines if "image ami-0123456789abcdef0" in line)
    assert bad_image.startswith("FAIL") and "providers.aws.image" in bad_image


def test_ssh_hosts_and_the_agents_address(tmp_path: Path) -> None:
    key = tmp_path / "id"
    key.write_text("not really a key, but readable\n")
    rc, lines = check(tmp_path, {"providers": {"ssh": {"hosts": [
        {"address": "127.0.0.1", "port": free_port(), "key_file": str(key)},
        {"address": "127.0.0.1", "port": 22, "key_file": str(tmp_path / "missing")}]}}})
    assert rc == 1, lines
    text = "\n".join(lines)
    assert "ok    local: this host" in text
    assert "FAIL  ssh: host 127.0.0.1:" in text and "no answer on port" in text
    assert "key_file" in text and "is not readable" in text
    # Without agents.public_url, remote agents come through the SSH tunnels: nothing to open here.
    assert "ok    agents: address: ssh instances' agents come through the daemon's SSH connections" in text


def test_local_only_passes(tmp_path: Path) -> None:
    rc, lines = check(tmp_path, {})
    assert rc == 0, lines
    assert any(line.startswith("ok    local") for line in lines)
