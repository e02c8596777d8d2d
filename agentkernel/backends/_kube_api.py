"""The Kubernetes API as the kubernetes backend uses it: connection settings, REST calls, watches and
the exec websocket (``v5.channel.k8s.io``, falling back to ``v4.channel.k8s.io``).

Connection settings come from the official client's kubeconfig / in-cluster loader (exec plugins, client
certificates, tokens, contexts all handled there); the calls themselves are asyncio (httpx + websockets)
so one process can drive many sandboxes at once. Imported only by the kubernetes backend.

Exec wire protocol: binary websocket frames whose first byte is the channel (0 stdin, 1 stdout,
2 stderr, 3 status, 4 resize); v5 adds 255 = "close channel N" (how the client signals stdin EOF). The
status channel carries a ``metav1.Status``: ``Success``, or ``Failure`` with reason ``NonZeroExitCode``
and the exit code in ``details.causes[reason=ExitCode].message``.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import websockets
from websockets.asyncio.client import connect as ws_connect

from ..errors import BackendUnavailable, ConfigError, NotFound, SandboxError

V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
STDIN, STDOUT, STDERR, STATUS, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
STDIN_CHUNK = 64 * 1024


class ApiError(SandboxError):
    """A non-2xx answer from the API server (``status`` is the HTTP code, ``reason`` the Status reason)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"Kubernetes API: {status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.api_message = message


def _load_chain_from_data(ctx: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """ssl loads client certificates only from files: a private temporary file, removed at once."""
    import os
    import tempfile

    fd, path = tempfile.mkstemp(prefix="ak-kube-", suffix=".pem")
    try:
        os.write(fd, cert + b"\n" + key)
        os.close(fd)
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)


class ApiNotFound(ApiError, NotFound):
    """404 from the API server."""


class Connection:
    """Where the API server is and how to authenticate (resolved once per backend object)."""

    def __init__(self, host: str, *, token: str | None = None, ca_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None, verify: bool = True,
                 namespace: str | None = None) -> None:
        self.host = host.rstrip("/")
        self.token = token
        self.ca_file = ca_file
        self.cert_file = cert_file
        self.key_file = key_file
        self.verify = verify
        self.namespace = namespace  # the kubeconfig context's namespace, if it sets one
        self.ca_data: bytes | None = None  # PEM from *-data kubeconfig fields
        self.cert_data: bytes | None = None
        self.key_data: bytes | None = None
        self._ssl: ssl.SSLContext | None = None

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.host.startswith("https"):
            return None
        if self._ssl is not None:
            return self._ssl
        if not self.verify:
            ctx = ssl._create_unverified_context()
        else:
            ctx = ssl.create_default_context(cafile=self.ca_file,
                                             cadata=self.ca_data.decode() if self.ca_data else None)
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        elif self.cert_data:
            _load_chain_from_data(ctx, self.cert_data, self.key_data or b"")
        self._ssl = ctx
        return ctx

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


IN_CLUSTER_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def load_connection(kubeconfig: str | None = None, context: str | None = None) -> Connection:
    """In-cluster service account when running in a pod (and no kubeconfig is named), else kubeconfig
    ($KUBECONFIG or ~/.kube/config, or the path given) with the given or current context.

    Tokens, token files, client certificates, CA files/data and insecure-skip-tls-verify are read here
    directly (importing the official client costs ~1 s, on every CLI run); users authenticated by an exec
    plugin or an auth provider go through the official client's loader."""
    import os

    if not kubeconfig and not os.environ.get("KUBECONFIG") and os.environ.get("KUBERNETES_SERVICE_HOST"):
        return _in_cluster()
    paths = [os.path.expanduser(p) for p in (kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config")
             .split(os.pathsep) if p]
    cfg = _merged_kubeconfig(paths)
    ctx_name = context or cfg.get("current-context")
    ctxs = {c.get("name"): c.get("context") or {} for c in cfg.get("contexts") or []}
    if ctx_name not in ctxs:
        raise BackendUnavailable(f"kubeconfig {os.pathsep.join(paths)} has no context {ctx_name!r} "
                                 f"(contexts: {', '.join(sorted(filter(None, ctxs))) or 'none'})",
                                 hint="set [orchestrator] context, or `kubectl config use-context NAME`")
    ctx = ctxs[ctx_name]
    cluster = next((c.get("cluster") or {} for c in cfg.get("clusters") or [] if c.get("name") == ctx.get("cluster")),
                   None)
    user = next((u.get("user") or {} for u in cfg.get("users") or [] if u.get("name") == ctx.get("user")), {})
    if cluster is None or not cluster.get("server"):
        raise BackendUnavailable(f"kubeconfig context {ctx_name!r} names no usable cluster")
    if user.get("exec") or user.get("auth-provider"):
        return _via_official_client(paths[0], ctx_name, ctx.get("namespace"))
    base = os.path.dirname(paths[0])

    def path_of(key: str) -> str | None:
        v = cluster.get(key) if key.startswith("certificate-authority") else user.get(key)
        return os.path.join(base, v) if v and not os.path.isabs(v) else v

    token = user.get("token")
    if not token and user.get("tokenFile"):
        with open(path_of("tokenFile")) as f:
            token = f.read().strip()
    conn = Connection(cluster["server"], token=token, ca_file=path_of("certificate-authority"),
                      cert_file=path_of("client-certificate"), key_file=path_of("client-key"),
                      verify=not cluster.get("insecure-skip-tls-verify"), namespace=ctx.get("namespace"))
    conn.ca_data = _b64(cluster.get("certificate-authority-data"))
    conn.cert_data = _b64(user.get("client-certificate-data"))
    conn.key_data = _b64(user.get("client-key-data"))
    return conn


def _b64(v: str | None) -> bytes | None:
    import base64

    return base64.b64decode(v) if v else None


def _merged_kubeconfig(paths: list[str]) -> dict[str, Any]:
    """KUBECONFIG files merged as kubectl does: the first file to set a value (or a named entry) wins."""
    import yaml

    out: dict[str, Any] = {"clusters": [], "users": [], "contexts": []}
    seen: dict[str, set] = {"clusters": set(), "users": set(), "contexts": set()}
    found = False
    for p in paths:
        try:
            with open(p) as f:
                doc = yaml.safe_load(f) or {}
        except FileNotFoundError:
            continue
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read the kubeconfig {p}: {exc}") from None
        found = True
        if not out.get("current-context"):
            out["current-context"] = doc.get("current-context")
        for key in ("clusters", "users", "contexts"):
            for item in doc.get(key) or []:
                if item.get("name") not in seen[key]:
                    seen[key].add(item.get("name"))
                    out[key].append(item)
    if not found:
        raise BackendUnavailable(f"no kubeconfig at {', '.join(paths)}",
                                 hint="set KUBECONFIG (or [orchestrator] kubeconfig/context), or run in a pod")
    return out


def _in_cluster() -> Connection:
    import os

    host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if ":" in host:
        host = f"[{host}]"
    try:
        with open(f"{IN_CLUSTER_DIR}/token") as f:
            token = f.read().strip()
    except OSError as exc:
        raise BackendUnavailable(f"in a pod, but no service-account token: {exc}",
                                 hint="the deployment must mount its service account token") from None
    namespace = None
    try:
        with open(f"{IN_CLUSTER_DIR}/namespace") as f:
            namespace = f.read().strip() or None
    except OSError:
        pass
    return Connection(f"https://{host}:{port}", token=token, ca_file=f"{IN_CLUSTER_DIR}/ca.crt", namespace=namespace)


def _via_official_client(path: str, context: str, namespace: str | None) -> Connection:
    try:
        from kubernetes import client as kclient
        from kubernetes import config as kconfig
    except ModuleNotFoundError as exc:
        from ..errors import MissingExtra

        raise MissingExtra("this kubeconfig user authenticates through a plugin, which needs the Python "
                           "package 'kubernetes'", hint="pip install 'agentkernel[k8s]'") from exc
    cfg = kclient.Configuration()
    try:
        kconfig.load_kube_config(config_file=path, context=context, client_configuration=cfg)
    except kconfig.ConfigException as exc:
        raise BackendUnavailable(f"no usable Kubernetes configuration: {exc}") from None
    auth = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken") or ""
    token = auth.split(" ", 1)[1] if auth.lower().startswith("bearer ") else (auth or None)
    return Connection(cfg.host, token=token, ca_file=cfg.ssl_ca_cert, cert_file=cfg.cert_file,
                      key_file=cfg.key_file, verify=bool(cfg.verify_ssl), namespace=namespace)


class KubeClient:
    """REST + watch + exec against one API server."""

    def __init__(self, conn: Connection, *, request_timeout: float = 30.0,
                 on_request: Callable[[str, str], None] | None = None) -> None:
        self.conn = conn
        self.on_request = on_request  # (method, path): tests record the order of calls with it
        ctx = conn.ssl_context()
        self.http = httpx.AsyncClient(base_url=conn.host, headers=conn.headers(), verify=ctx if ctx else True,
                                      timeout=httpx.Timeout(request_timeout, connect=10.0),
                                      limits=httpx.Limits(max_connections=64, max_keepalive_connections=32))

    async def aclose(self) -> None:
        await self.http.aclose()

    async def request(self, method: str, path: str, *, body: Any = None, params: dict[str, Any] | None = None,
                      content_type: str = "application/json", allow: tuple[int, ...] = ()) -> dict[str, Any] | None:
        """One call; returns the decoded JSON (None for an allowed error status, e.g. 404 on delete)."""
        if self.on_request:
            self.on_request(method, path)
        headers = {"Accept": "application/json"}
        content = None
        if body is not None:
            headers["Content-Type"] = content_type
            content = json.dumps(body).encode()
        try:
            r = await self.http.request(method, path, params=params, content=content, headers=headers)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"Kubernetes API at {self.conn.host} is unreachable: {exc}") from None
        if r.status_code in allow:
            return None
        if r.status_code >= 300:
            raise _api_error(r.status_code, r.content)
        return r.json() if r.content else {}

    async def text(self, path: str, *, params: dict[str, Any] | None = None,
                   allow: tuple[int, ...] = ()) -> str | None:
        """A GET whose answer is plain text (pods/log); None for an allowed error status."""
        if self.on_request:
            self.on_request("GET", path)
        try:
            r = await self.http.request("GET", path, params=params, headers={"Accept": "*/*"})
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"Kubernetes API at {self.conn.host} is unreachable: {exc}") from None
        if r.status_code in allow:
            return None
        if r.status_code >= 300:
            raise _api_error(r.status_code, r.content)
        return r.text

    async def watch(self, path: str, params: dict[str, Any]) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Yield (type, object) events of one watch request (ends when the server ends it)."""
        if self.on_request:
            self.on_request("WATCH", path)
        p = dict(params, watch="true", allowWatchBookmarks="false")
        try:
            async with self.http.stream("GET", path, params=p, timeout=httpx.Timeout(None, connect=10.0)) as r:
                if r.status_code >= 300:
                    raise _api_error(r.status_code, await r.aread())
                async for line in r.aiter_lines():
                    if not line.strip():
                        continue
                    ev = json.loads(line)
                    if ev.get("type") == "ERROR":
                        obj = ev.get("object") or {}
                        raise ApiError(int(obj.get("code") or 500), obj.get("reason", ""), obj.get("message", ""))
                    yield ev["type"], ev["object"]
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"Kubernetes watch on {path} failed: {exc}") from None

    # -- exec --------------------------------------------------------------------------------------------
    def exec_url(self, namespace: str, pod: str, container: str, argv: list[str], *, stdin: bool,
                 tty: bool) -> str:
        q = [("container", container)] + [("command", a) for a in argv]
        q += [("stdin", "true" if stdin else "false"), ("stdout", "true"), ("stderr", "false" if tty else "true"),
              ("tty", "true" if tty else "false")]
        base = self.conn.host.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        return (f"{base}/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(pod, safe='')}/exec?"
                + urlencode(q))

    async def exec(self, namespace: str, pod: str, container: str, argv: list[str] | Callable[[str], list[str]], *,
                   stdin: bytes | AsyncIterator[bytes] | None, on_output: Callable[[int, bytes], Any],
                   tty: bool = False, tty_size: tuple[int, int] | None = None,
                   protocols: tuple[str, ...] = (V5, V4)) -> int:
        """Run argv in the container; stream output to on_output(fd, bytes); return the exact exit code.

        ``argv`` may be a function of the negotiated protocol (the caller then makes the command see EOF
        after a known stdin length on v4, which cannot close stdin)."""
        if self.on_request:
            self.on_request("EXEC", f"/api/v1/namespaces/{namespace}/pods/{pod}/exec")
        want_stdin = stdin is not None
        # the argv must be in the URL before the protocol is known: ask for v5 first, and when the server
        # only speaks v4 and the argv depends on it, reconnect with the v4 form
        first = argv(V5) if callable(argv) else argv
        # on v5 stdin is always opened so that it can be closed (the command sees EOF at once)
        url = self.exec_url(namespace, pod, container, first, stdin=True, tty=tty)
        ws = await self._ws_open(url, protocols)
        if ws.subprotocol != V5 and (callable(argv) or not want_stdin):
            await ws.close()
            v4_argv = argv(ws.subprotocol or V4) if callable(argv) else argv
            url = self.exec_url(namespace, pod, container, v4_argv, stdin=want_stdin, tty=tty)
            ws = await self._ws_open(url, (V4,))
        proto = ws.subprotocol
        status = bytearray()

        async def pump_stdin() -> None:
            if tty_size:
                await ws.send(bytes([RESIZE]) + json.dumps({"Width": tty_size[1], "Height": tty_size[0]}).encode())
            if isinstance(stdin, bytes | bytearray):
                for i in range(0, len(stdin), STDIN_CHUNK):
                    await ws.send(bytes([STDIN]) + bytes(stdin[i:i + STDIN_CHUNK]))
            elif stdin is not None:
                async for chunk in stdin:
                    for i in range(0, len(chunk), STDIN_CHUNK):
                        await ws.send(bytes([STDIN]) + bytes(chunk[i:i + STDIN_CHUNK]))
            if proto == V5:
                await ws.send(bytes([CLOSE, STDIN]))

        sender = asyncio.create_task(pump_stdin())
        try:
            async for msg in ws:
                if isinstance(msg, str):
                    msg = msg.encode()
                if not msg:
                    continue
                ch, data = msg[0], msg[1:]
                if not data:
                    continue  # the server's "channel ready" frames
                if ch in (STDOUT, STDERR):
                    r = on_output(ch, data)
                    if asyncio.iscoroutine(r):
                        await r
                elif ch == STATUS:
                    status += data
        except websockets.ConnectionClosedError as exc:
            if not status:
                raise SandboxError(f"exec connection to pod {pod} broke: {exc}") from None
        finally:
            sender.cancel()
            try:
                await sender
            except (asyncio.CancelledError, websockets.ConnectionClosed):
                pass
            except Exception:
                pass
            await ws.close()
        return parse_exec_status(bytes(status), pod)

    async def _ws_open(self, url: str, protocols: tuple[str, ...]):
        try:
            return await ws_connect(url, subprotocols=list(protocols), additional_headers=self.conn.headers(),
                                    ssl=self.conn.ssl_context(), max_size=None, compression=None,
                                    open_timeout=30, ping_interval=None)
        except websockets.InvalidStatus as exc:
            resp = exc.response
            raise _api_error(resp.status_code, resp.body or b"") from None
        except (OSError, websockets.InvalidHandshake) as exc:
            raise BackendUnavailable(f"exec websocket to {url.split('?')[0]} failed: {exc}") from None


def parse_exec_status(raw: bytes, pod: str) -> int:
    if not raw:
        raise SandboxError(f"exec in pod {pod} ended without an exit status")
    try:
        st = json.loads(raw)
    except ValueError:
        raise SandboxError(f"exec in pod {pod}: unreadable status {raw[:200]!r}") from None
    if st.get("status") == "Success":
        return 0
    for cause in (st.get("details") or {}).get("causes") or []:
        if cause.get("reason") == "ExitCode":
            return int(cause["message"])
    raise SandboxError(f"exec in pod {pod} failed: {st.get('message') or st}")


def _api_error(status: int, body: bytes) -> ApiError:
    reason, message = "", body.decode(errors="replace")[:500]
    try:
        st = json.loads(body)
        reason, message = st.get("reason", ""), st.get("message", message)
    except ValueError:
        pass
    if status == 404:
        return ApiNotFound(status, reason or "NotFound", message)
    return ApiError(status, reason, message)
