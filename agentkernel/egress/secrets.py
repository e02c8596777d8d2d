"""Where secret values live at rest: the OS keyring when one is usable, else one 0600 file per secret.

- keyring: the Python ``keyring`` package with a real backend (Secret Service, macOS Keychain, Windows
  Credential Locker), service name ``agentkernel``. A list of names is kept next to it (keyrings
  cannot list), in ``<data dir>/secrets/index`` (names only, never values).
- file: ``<data dir>/secrets/<NAME>`` (directory 0700, files 0600, written with O_EXCL temp + rename,
  never following links). The value is stored **in plain text**: it is protected by file permissions
  (root and the owner can read it), not by encryption.

``AGENTKERNEL_SECRETS_BACKEND=file|keyring`` or ``[secrets] backend`` chooses; ``auto`` (default) uses
the keyring when one with a real backend is importable, else files. ``AGENTKERNEL_SECRETS_DIR``
overrides the directory. Values are never logged or shown except by ``secret get``.
"""

from __future__ import annotations

import os

from ..errors import NotFound, ValidationError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

SERVICE = "agentkernel"
MAX_BYTES = 64 * 1024


def secrets_dir() -> str:
    from .. import paths

    d = os.environ.get("AGENTKERNEL_SECRETS_DIR") or os.path.join(paths.data_dir(), "secrets")
    os.makedirs(d, mode=0o700, exist_ok=True)
    os.chmod(d, 0o700)
    return d


def _check_name(name: str) -> str:
    from .._model import is_env_name

    if not is_env_name(name) or len(name) > 128:
        raise ValidationError(f"invalid secret name {name!r}: letters, digits and '_', not starting with a digit")
    return name


def _keyring() -> Any:
    choice = os.environ.get("AGENTKERNEL_SECRETS_BACKEND", "auto")
    if choice == "file":
        return None
    try:
        import keyring
        from keyring.backends import fail
    except ImportError:
        if choice == "keyring":
            raise ValidationError("secrets backend keyring requested but the keyring package is not installed",
                                  hint="pip install keyring, or AGENTKERNEL_SECRETS_BACKEND=file") from None
        return None
    kr = keyring.get_keyring()
    if isinstance(kr, fail.Keyring) or "fail" in type(kr).__module__ or "null" in type(kr).__module__:
        if choice == "keyring":
            raise ValidationError("no usable OS keyring here", hint="AGENTKERNEL_SECRETS_BACKEND=file")
        return None
    return keyring


def backend_name() -> str:
    return "keyring" if _keyring() is not None else "file (0600, plain text)"


def _index_path() -> str:
    return os.path.join(secrets_dir(), "index")


def _write_file(path: str, data: bytes) -> None:
    d = os.path.dirname(path)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _names_in_index() -> list[str]:
    try:
        with open(_index_path()) as f:
            return [n for n in f.read().split() if n]
    except OSError:
        return []


def put(name: str, value: str) -> str:
    _check_name(name)
    if not value:
        raise ValidationError(f"secret {name}: empty value (pipe it on stdin)")
    if len(value.encode()) > MAX_BYTES or "\r" in value or "\n" in value or "\0" in value:
        raise ValidationError(f"secret {name}: the value must be one line of at most {MAX_BYTES} bytes "
                              "(it is placed into HTTP headers)")
    kr = _keyring()
    if kr is not None:
        kr.set_password(SERVICE, name, value)
        names = _names_in_index()
        if name not in names:
            _write_file(_index_path(), ("\n".join([*names, name]) + "\n").encode())
        return "keyring"
    _write_file(os.path.join(secrets_dir(), name), value.encode())
    return "file"


def get(name: str) -> str:
    _check_name(name)
    kr = _keyring()
    if kr is not None:
        v = kr.get_password(SERVICE, name)
        if v is not None:
            return v
    path = os.path.join(secrets_dir(), name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        raise NotFound(f"no secret named {name!r}", hint=f"agentkernel secret set {name} < value-file") from None
    try:
        return os.read(fd, MAX_BYTES + 1).decode()
    finally:
        os.close(fd)


def names() -> list[str]:
    found = {n for n in os.listdir(secrets_dir()) if not n.startswith(".") and n != "index"}
    if _keyring() is not None:
        found.update(_names_in_index())
    return sorted(found)


def remove(name: str) -> None:
    _check_name(name)
    found = False
    kr = _keyring()
    if kr is not None:
        try:
            kr.delete_password(SERVICE, name)
            found = True
        except Exception:
            pass
        names_ = [n for n in _names_in_index() if n != name]
        _write_file(_index_path(), ("\n".join(names_) + "\n").encode() if names_ else b"")
    try:
        os.unlink(os.path.join(secrets_dir(), name))
        found = True
    except FileNotFoundError:
        pass
    if not found:
        raise NotFound(f"no secret named {name!r}")
