"""The SSH key a cloud provider logs in to its VMs with: found or made, and fingerprinted.

The daemon installs the key's public half on each VM it launches, so the key is the daemon's
choice: `ssh_key_file`, or, left empty, `<state_dir>/ssh/id_ed25519`, made at the first start.
Replicas must share it (core/pg/shared_identity.py), compared by its fingerprint in OpenSSH's form.
asyncssh is imported only when a key is read or made.
"""

from __future__ import annotations

import os
from pathlib import Path

from cloudtaskd.errors import ConfigError

DEFAULT_KEY = Path("ssh") / "id_ed25519"  # under state_dir


def ensure(provider: str, ssh_key_file: str, state_dir: Path, source: str) -> Path:
    """The private key's path: the configured one, which must exist, or the daemon's own, made if missing."""
    if ssh_key_file:
        key = Path(ssh_key_file)
        if not key.exists():
            raise ConfigError(source, f"providers.{provider}.ssh_key_file", f"{key} does not exist: give the private"
                              " key the daemon logs in to the VMs with (its .pub beside it), or leave it empty for"
                              " a key of the daemon's own")
        return key
    key = state_dir / DEFAULT_KEY
    if not key.exists():
        _make(key)
    return key


def fingerprint(provider: str, key: Path, source: str) -> str:
    """The key's SHA256:… fingerprint, as `ssh-keygen -lf` prints it, from the private key (what logs
    in), after checking that the .pub beside it, which goes on the VMs, is its public half."""
    import asyncssh

    setting = f"providers.{provider}.ssh_key_file"
    try:
        private = asyncssh.read_private_key(str(key))
    except (OSError, asyncssh.KeyImportError) as exc:
        raise ConfigError(source, setting, f"cannot read the private key {key} ({exc}): the daemon logs in with it,"
                          " so it must be readable and have no passphrase") from exc
    own = private.get_fingerprint("sha256")
    pub = Path(f"{key}.pub")
    try:
        installed = asyncssh.read_public_key(str(pub)).get_fingerprint("sha256")
    except (OSError, asyncssh.KeyImportError) as exc:
        raise ConfigError(source, setting, f"cannot read {pub} ({exc}): the public half of {key} goes on each VM;"
                          f" write it with `ssh-keygen -y -f {key} > {pub}`") from exc
    if installed != own:
        raise ConfigError(source, setting, f"{pub} ({installed}) is not the public half of {key} ({own}): VMs would"
                          f" refuse the daemon's login; write it again with `ssh-keygen -y -f {key} > {pub}`")
    return own


def _make(path: Path) -> None:
    """The daemon's own SSH key for the VMs it launches (ed25519, private part mode 600)."""
    import asyncssh

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = asyncssh.generate_private_key("ssh-ed25519", comment="cloudtaskd")
    key.write_private_key(str(path))
    os.chmod(path, 0o600)
    key.write_public_key(f"{path}.pub")
