"""The ways a pull fails, each with its own message and hint, for every backend (our registry client's
HTTP answers and podman/docker's error text are both classified here)."""

from __future__ import annotations

from ..errors import AgentKernelError

KINDS = ("short-name", "unknown-image", "unknown-tag", "auth-refused", "unreachable", "digest-mismatch", "disk-full",
         "insecure", "unsafe-layer", "unsupported", "failed")

_HINTS = {
    "short-name": "use a fully qualified name (HOST/REPOSITORY:TAG), or configure unqualified-search-registries "
    "in /etc/containers/registries.conf (or AGENTKERNEL_REGISTRY); agentkernel's own images: agentkernel images "
    "build",
    "failed": "the engine's message is above; agentkernel images pull IMAGE shows it again",
    "unknown-image": "check the repository name (and the registry it is looked up in)",
    "unknown-tag": "check the tag; list them with: skopeo list-tags docker://REGISTRY/REPOSITORY",
    "auth-refused": "log in first (podman login / docker login write the credentials agentkernel reads), or "
    "set REGISTRY_AUTH_FILE / DOCKER_CONFIG",
    "unreachable": "check the registry address and your network; --pull never uses only local images",
    "digest-mismatch": "the registry served content that does not match the pinned digest: do not use it",
    "disk-full": "free space (agentkernel images prune) and pull again",
    "unsafe-layer": "the image is malformed or hostile; nothing of it was kept",
    "insecure": "trust its CA (/etc/containers/certs.d/HOST:PORT/ca.crt), or list the registry in [images] "
    "insecure_registries",
}


class PullError(AgentKernelError):
    """A pull failed; ``kind`` is one of ``KINDS``."""

    def __init__(self, kind: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint if hint is not None else _HINTS.get(kind))
        self.kind = kind
        self.http_status = {"short-name": 404, "unknown-image": 404, "unknown-tag": 404, "auth-refused": 502,
                            "unreachable": 502, "digest-mismatch": 502, "insecure": 502, "unsafe-layer": 502,
                            "disk-full": 507}.get(kind, 502)


def classify(text: str) -> str:
    """The kind of failure an engine's error text describes."""
    low = text.lower()
    if "no space left" in low or "disk quota" in low:
        return "disk-full"
    if "digest" in low and ("mismatch" in low or "did not match" in low or "does not match" in low
                            or "invalid checksum" in low):
        return "digest-mismatch"
    if ("unauthorized" in low or "authentication required" in low or "401" in low or "denied" in low
            or "incorrect username or password" in low or "no basic auth credentials" in low):
        return "auth-refused"
    if "did not resolve to an alias" in low or "unqualified-search registries" in low:
        return "short-name"
    if "manifest unknown" in low or "manifest_unknown" in low or ("not found" in low and "manifest" in low):
        return "unknown-tag"
    if ("name unknown" in low or "name_unknown" in low or "repository does not exist" in low
            or "pull access denied" in low or "not found" in low):
        return "unknown-image"
    if "certificate" in low or "x509" in low or "tls" in low:
        return "insecure"
    if ("connection refused" in low or "no such host" in low or "i/o timeout" in low or "unreachable" in low
            or "connection reset" in low or "eof" in low or "timeout" in low or "dial tcp" in low):
        return "unreachable"
    return "failed"


def from_engine(engine: str, image: str, text: str) -> PullError:
    kind = classify(text)
    what = {
        "short-name": f"{image!r} is a short name that no registry is configured for",
        "unknown-image": f"image {image!r} does not exist in its registry",
        "unknown-tag": f"image {image!r}: no such tag or digest in the registry",
        "auth-refused": f"the registry refused access to {image!r} (credentials missing or wrong)",
        "unreachable": f"the registry of {image!r} is unreachable",
        "digest-mismatch": f"image {image!r}: content does not match its digest",
        "disk-full": f"no space left while pulling {image!r}",
        "insecure": f"the registry of {image!r} presented a certificate that is not trusted",
    }.get(kind, f"pulling {image!r} failed")
    last = text.strip().splitlines()[-1] if text.strip() else ""
    return PullError(kind, f"{engine}: {what}: {last[-400:]}" if last else f"{engine}: {what}")
