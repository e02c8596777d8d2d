"""Image references: ``[registry[:port]/]repository[:tag][@sha256:hex]``, parsed the way engines do.

The first path component is a registry when it has a ``.`` or ``:`` or is ``localhost``; otherwise the
reference is *short* and its registry comes from configuration (see ``settings.default_registry``).
A one-component repository on a configured default registry gets the conventional ``library/`` prefix.
"""

from __future__ import annotations

import re

from ..errors import ValidationError

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_REPO = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class Reference:
    __slots__ = ("digest", "registry", "repository", "tag")

    def __init__(self, registry: str | None, repository: str, tag: str | None, digest: str | None) -> None:
        self.registry = registry
        self.repository = repository
        self.tag = tag
        self.digest = digest

    @property
    def short(self) -> bool:
        return self.registry is None

    def with_registry(self, registry: str) -> Reference:
        repo = self.repository if "/" in self.repository else f"library/{self.repository}"
        return Reference(registry, repo, self.tag, self.digest)

    @property
    def ref(self) -> str:
        """What to ask the registry's manifests endpoint for: the digest when given, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        s = f"{self.registry}/{self.repository}" if self.registry else self.repository
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s

    def __repr__(self) -> str:
        return f"Reference({str(self)!r})"


def parse(text: str) -> Reference:
    if not text or text != text.strip():
        raise ValidationError(f"image reference {text!r} is empty or has surrounding spaces")
    name, _, digest = text.partition("@")
    if digest and not _DIGEST.match(digest):
        raise ValidationError(f"image reference {text!r}: digest must be sha256: and 64 lowercase hex digits")
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
        if not _TAG.match(tag):
            raise ValidationError(f"image reference {text!r}: invalid tag {tag!r}")
    registry = None
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, name = first, rest
    if not _REPO.match(name):
        raise ValidationError(f"image reference {text!r}: invalid repository name {name!r} (lowercase letters, "
                              "digits and . _ - separators)")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, name, tag, digest or None)
