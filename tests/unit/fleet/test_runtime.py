"""The agent's runtime for instances (cloudtaskd/fleet/runtime.py): what an instance's probe is turned
into, and runtimes built for a Python and a CPU other than the control host's own."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from cloudtaskd.fleet.runtime import RuntimeUnavailable, Target
from tests.conftest import test_runtime

ELF_MACHINE = {"x86_64": 62, "aarch64": 183}  # e_machine: EM_X86_64, EM_AARCH64


def test_the_probe_names_what_is_refused() -> None:
    assert Target.parse("aarch64\n", "3.10\n") == Target((3, 10), "aarch64")
    assert Target.parse("x86_64", "3.13") == Target((3, 13), "x86_64")
    assert Target.parse("arm64", "3.9").arch == "aarch64"
    with pytest.raises(RuntimeUnavailable, match=r"python3 is 3\.8; the agent needs 3\.9 or newer"):
        Target.parse("x86_64", "3.8")
    with pytest.raises(RuntimeUnavailable, match="has no python3"):
        Target.parse("x86_64", "none")
    with pytest.raises(RuntimeUnavailable, match="'riscv64' is not supported"):
        Target.parse("riscv64", "3.11")


@pytest.mark.parametrize(("python", "arch"), [((3, 9), "aarch64"), ((3, 12), "aarch64"), ((3, 10), "x86_64")])
async def test_a_runtime_is_built_for_the_instances_python_and_cpu(python: tuple[int, int], arch: str) -> None:
    """Its compiled modules are for the instance's CPU and Python, not the control host's; 3.9 and
    3.10 get async-timeout (aiohttp needs it below 3.11: markers evaluated for the target)."""
    runtime = await test_runtime().get(Target(python, arch))
    with tarfile.open(runtime.path) as tar:
        names = tar.getnames()
        assert any(n.startswith("aiohttp/") for n in names) and any(n.startswith("pip/") for n in names)
        assert not any(n.startswith("bin/") for n in names), "console scripts name the control host's python"
        assert any(n.startswith("async_timeout/") for n in names) == (python < (3, 11))
        tag = f"cpython-{python[0]}{python[1]}-{arch}-linux-gnu.so"
        compiled = [m for m in tar.getmembers() if m.name.endswith(".so")]
        assert compiled and all(m.name.endswith(tag) or ".abi3." in m.name for m in compiled), \
            [m.name for m in compiled][:5]
        for member in compiled[:5]:
            f = tar.extractfile(member)
            assert f is not None
            head = f.read(20)
            assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == ELF_MACHINE[arch]
    assert Path(runtime.path).stat().st_size < 16 << 20


async def test_a_build_that_cannot_reach_an_index_says_what_to_set(tmp_path: Path) -> None:
    from cloudtaskd.fleet.runtime import RuntimeBuilder

    builder = RuntimeBuilder(tmp_path / "cache", ("--no-index", "--find-links", str(tmp_path / "no-wheels-here")))
    with pytest.raises(RuntimeUnavailable, match=r"cp39-x86_64 failed \(uv exit \d+\).*set pip_args"):
        await builder.get(Target((3, 9), "x86_64"))
    assert not list((tmp_path / "cache").glob("*.tar.gz")), "a failed build must leave no runtime behind"
    assert not list((tmp_path / "cache").glob(".build-*")), "nor its staging directory"
