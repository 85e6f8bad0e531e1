"""The instance's Python environment for the agent and the worker, made with the image's python3.

    python3 -m agent.environment VENV RUNTIME_LIB

makes VENV with `venv` but without pip (so no ensurepip, which cloud images leave out with
python3-venv), puts RUNTIME_LIB (the agent's packages, and pip, built on the control host for
this Python and CPU) on its path with a .pth file, writes a `pip` launcher, and checks that the
agent's imports work. Run again, it keeps the venv and points it at the runtime given.

Ships with the agent: Python 3.9 and the standard library only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv

PTH_NAME = "cloudtask-runtime.pth"
PIP_LAUNCHER = '#!/bin/sh\nexec "$(dirname "$0")/python" -m pip "$@"\n'
# pip below Python 3.10 finds install paths with distutils, which Debian's and Ubuntu's python3 ship
# only in python3-distutils. `sysconfig._PIP_USE_SYSCONFIG` is pip's switch for distributors (pip
# issue 10647); sysconfig is always there. A .pth line that starts with "import" runs at start-up.
PTH_SWITCH = "import sysconfig; sysconfig._PIP_USE_SYSCONFIG = True\n"


def make(venv_dir: str, runtime_lib: str) -> str:
    """Returns the venv's python."""
    python = os.path.join(venv_dir, "bin", "python")
    if not os.path.exists(python):
        venv.EnvBuilder(with_pip=False, symlinks=True).create(venv_dir)
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    os.makedirs(purelib, exist_ok=True)
    _write(os.path.join(purelib, PTH_NAME), os.path.abspath(runtime_lib) + "\n" + PTH_SWITCH, 0o644)
    _write(os.path.join(venv_dir, "bin", "pip"), PIP_LAUNCHER, 0o755)
    check = subprocess.run([python, "-c", "import aiohttp; from pip._internal.locations import get_scheme"],
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise SystemExit(f"the runtime at {runtime_lib} does not import with {python}: {check.stderr.strip()[-800:]}")
    return python


def _write(path: str, text: str, mode: int) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python3 -m agent.environment VENV RUNTIME_LIB", file=sys.stderr)
        return 2
    print(make(args[0], args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
