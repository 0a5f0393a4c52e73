"""OPC UA server (`sink.opcua`): the line's counts, last item, state and health as tags for SCADA and PLC gateways.

Why OPC UA: it is what SCADA systems and PLC gateways read natively (no MQTT bridge or HTTP polling to write). The
server is asyncua's, run in its own thread and event loop inside the stage; ``process`` only folds the frame into
a :class:`~stages.factory.linestate.LineState` under a lock, and the server thread copies what changed into the
address space every ``update_ms`` (clients that subscribe get data-change notifications), so a slow or stuck
client never holds the pipeline up. Clients may read, browse and subscribe; every tag is read-only.

Address space (namespace ``namespace``, default ``urn:ladon-stream:factory``; NodeIds are strings, the dotted
browse path below the ``Ladon`` object, so a gateway can be configured with fixed addresses such as
``nsu=urn:ladon-stream:factory;s=line1.Total``)::

    Objects/Ladon/<line>/
        State            String    waiting | running | idle | stopped  (running while any stream runs)
        Running          Boolean   State == running
        Total            UInt32    items counted on the line (all streams)
        ItemsPerMinute   Double    sliding window of count.items' rate_window_s
        Counts/<class>   UInt32    per class (every class the model knows appears with 0)
        LastItem/        Class (String), ClassId (Int32), TrackId (Int64), Stream (Int32), Frame (Int64),
                         Score (Double), Time (DateTime, capture time of the frame it was counted on)
        Health/          Frames (UInt64), LastFrameTime (DateTime), Receiving (Boolean: a frame within stale_s),
                         ConnectedEdges (Int32, -1 when this process receives no edges), Streams (Int32),
                         Counting (Boolean: counts arrive, i.e. count.items is upstream)
        Streams/Stream<N>/  the same State, Running, Total, ItemsPerMinute, Counts/, LastItem/ per edge stream,
                         and Health/ Frames, LastFrameTime, LastFrameIndex (Int64), Receiving, Fps (Double),
                         LatencyMs (Double, capture to done), EdgeConnected (Boolean), Counting

Streams and classes seen for the first time get their nodes then (a client browsing again finds them). Class
names are made tag-safe (letters, digits, ``_`` and ``-``; anything else becomes ``_``).

Security: without ``certificate``/``private_key`` the endpoint is unencrypted (SecurityPolicy None, anonymous,
read-only tags); bind it to a plant network, not the internet. With both files (PEM or DER; the certificate's
subjectAltName holds ``application_uri``, default ``NAMESPACE:server``; e.g. made with asyncua's
``cert_gen.setup_self_signed_certificate``), the endpoint offers Basic256Sha256 Sign and SignAndEncrypt only
(``allow_unencrypted: true`` keeps the None endpoint beside them). Client certificates are not checked against a
trust list: any client that completes the handshake may read.
"""
from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from core.errors import UsageError
from pipeline.stage import FrameResult, Stage, register_stage
from stages.factory.linestate import LineState

DEFAULT_ENDPOINT = "opc.tcp://0.0.0.0:4840/ladon/"
DEFAULT_NAMESPACE = "urn:ladon-stream:factory"
_TAG_BAD = re.compile(r"[^A-Za-z0-9_-]")
_NULL_TIME = datetime(1601, 1, 1, tzinfo=timezone.utc)  # OPC UA's "no time" (DateTime 0)


def tag_name(name: str) -> str:
    """A class or line name as a browse name / NodeId part: letters, digits, ``_`` and ``-``."""
    return _TAG_BAD.sub("_", str(name)) or "_"


def check_endpoint(endpoint: Any) -> tuple[str, int, str]:
    """``opc.tcp://HOST:PORT/PATH`` -> (host, port, the URL). Port 0 picks a free port at open."""
    bad = (f"sink.opcua: endpoint {endpoint!r} must look like opc.tcp://HOST:PORT/PATH, e.g. {DEFAULT_ENDPOINT} "
           f"(0.0.0.0: every interface) or opc.tcp://127.0.0.1:4840/ladon/ (this machine only)")
    if not isinstance(endpoint, str):
        raise UsageError(bad)
    u = urlparse(endpoint)
    try:
        port = u.port
    except ValueError:
        raise UsageError(bad) from None
    if u.scheme != "opc.tcp" or not u.hostname or port is None:
        raise UsageError(bad)
    return u.hostname, port, endpoint


def _utc(ns: int | None) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, timezone.utc) if ns else _NULL_TIME


def _scope_tags(prefix: str, s: dict[str, Any], classes: dict[str, str], per_stream: bool) -> dict[str, tuple]:
    """Tag path -> (value, type name) for the line (``per_stream`` False) or one stream's snapshot ``s``."""
    li = s.get("last_item") or {}
    h = s["health"]
    t: dict[str, tuple] = {
        f"{prefix}State": (s["state"], "String"), f"{prefix}Running": (bool(s["running"]), "Boolean"),
        f"{prefix}Total": (int(s["total"]), "UInt32"),
        f"{prefix}ItemsPerMinute": (float(s["items_per_min"]), "Double"),
        f"{prefix}LastItem.Class": (str(li.get("class", "")), "String"),
        f"{prefix}LastItem.ClassId": (int(li.get("class_id", -1)), "Int32"),
        f"{prefix}LastItem.TrackId": (int(li.get("track_id", -1)), "Int64"),
        f"{prefix}LastItem.Stream": (int(li.get("stream", -1)), "Int32"),
        f"{prefix}LastItem.Frame": (int(li.get("frame", -1)), "Int64"),
        f"{prefix}LastItem.Score": (float(li.get("score", 0.0)), "Double"),
        f"{prefix}LastItem.Time": (_utc(li.get("time_ns")), "DateTime"),
        f"{prefix}Health.Frames": (int(h["frames"]), "UInt64"),
        f"{prefix}Health.LastFrameTime": (_utc(h["last_frame_ns"]), "DateTime"),
        f"{prefix}Health.Receiving": (bool(h["receiving"]), "Boolean"),
        f"{prefix}Health.Counting": (bool(h["counting"]), "Boolean"),
    }
    for name, n in s["by_class"].items():
        t[f"{prefix}Counts.{classes[name]}"] = (int(n), "UInt32")
    if per_stream:
        edge = h.get("edge") or {}
        t.update({f"{prefix}Health.LastFrameIndex": (int(h["last_frame"]), "Int64"),
                  f"{prefix}Health.Fps": (float(h["fps"]), "Double"),
                  f"{prefix}Health.LatencyMs": (float(h["latency_ms"] or 0.0), "Double"),
                  f"{prefix}Health.EdgeConnected": (bool(edge.get("connected", False)), "Boolean")})
    else:
        ce = h["connected_edges"]
        t.update({f"{prefix}Health.ConnectedEdges": (-1 if ce is None else int(ce), "Int32"),
                  f"{prefix}Health.Streams": (int(h["streams"]), "Int32")})
    return t


def snapshot_tags(snap: dict[str, Any]) -> dict[str, tuple]:
    """Every tag of a :meth:`LineState.snapshot` as {dotted path below the line object: (value, type name)}."""
    classes: dict[str, str] = {}
    used: set[str] = set()
    for name in snap["by_class"]:
        base = cand = tag_name(name)
        k = 2
        while cand in used:  # two class names that only differ in characters a tag cannot hold
            cand, k = f"{base}_{k}", k + 1
        used.add(cand)
        classes[name] = cand
    tags = _scope_tags("", snap, classes, per_stream=False)
    for sid, s in snap["streams"].items():
        tags.update(_scope_tags(f"Streams.Stream{sid}.", s, classes, per_stream=True))
    return tags


class _UaServer:
    """asyncua's server on its own thread and event loop; copies changed tags in every ``update_s``."""

    def __init__(self, stage: "OpcUaSink"):
        self.stage = stage
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.nodes: dict[str, Any] = {}  # dotted path -> Node (objects, folders, variables)
        self.written: dict[str, Any] = {}  # dotted path -> last value written
        self.syncs = 0
        self.thread = threading.Thread(target=self._main, name=f"opcua-{stage.ctx.name}", daemon=True)

    def start(self, timeout_s: float = 30.0) -> None:
        self.thread.start()
        if not self.ready.wait(timeout_s):
            raise RuntimeError(f"sink.opcua: the OPC UA server did not start within {timeout_s:.0f} s")
        if self.error is not None:
            raise self.error

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to open() or logged
            if not self.ready.is_set():
                self.error = exc
                self.ready.set()
            else:
                self.stage.ctx.log(f"[{self.stage.ctx.name}] OPC UA server stopped: {type(exc).__name__}: {exc}")

    async def _serve(self) -> None:
        from asyncua import Server, ua
        self.ua = ua
        st = self.stage
        self.loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        server = Server()
        await server.init()
        server.set_endpoint(st.url)
        server.set_server_name(st.server_name)
        await server.set_application_uri(st.application_uri)
        server.set_identity_tokens([ua.AnonymousIdentityToken])
        if st.certificate is not None:
            for what, path, load in (("certificate", st.certificate, server.load_certificate),
                                     ("private_key", st.private_key, server.load_private_key)):
                try:
                    await load(str(path))
                except Exception as exc:  # noqa: BLE001 - cryptography raises several kinds
                    raise UsageError(f"sink.opcua: {what} {str(path)!r} could not be read ({type(exc).__name__}: "
                                     f"{exc}); give a PEM or DER file") from exc
            policies = [ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt, ua.SecurityPolicyType.Basic256Sha256_Sign]
            if st.allow_unencrypted:
                policies.append(ua.SecurityPolicyType.NoSecurity)
        else:
            policies = [ua.SecurityPolicyType.NoSecurity]
        server.set_security_policy(policies)
        self.idx = await server.register_namespace(st.namespace)
        self.root = await server.nodes.objects.add_object(ua.NodeId("Ladon", self.idx),
                                                          ua.QualifiedName("Ladon", self.idx))
        self.line_node = await self.root.add_object(ua.NodeId(st.line_tag, self.idx),
                                                    ua.QualifiedName(st.line_tag, self.idx))
        self.server = server
        await self._sync()  # the full tag set exists before the first client connects
        try:
            await server.start()
        except OSError as exc:
            raise UsageError(f"sink.opcua cannot listen on {st.host}:{st.port}: {exc.strerror or exc}; choose "
                             f"another port in endpoint (port 0 picks a free one)") from exc
        self.ready.set()
        try:
            while not self.stop_event.is_set():
                try:
                    await asyncio.wait_for(self.stop_event.wait(), st.update_s)
                except asyncio.TimeoutError:
                    pass
                await self._sync()
        finally:
            await server.stop()

    async def _node(self, path: str, kind: str, value: Any = None, vtype: str | None = None):
        """The node at ``path`` (dotted, below the line object), created with its parents on first use."""
        node = self.nodes.get(path)
        if node is not None:
            return node
        ua = self.ua
        parent_path, _, name = path.rpartition(".")
        parent = await self._node(parent_path, "folder" if parent_path.endswith(("Counts", "Streams"))
                                  else "object") if parent_path else self.line_node
        nid, bname = ua.NodeId(f"{self.stage.line_tag}.{path}", self.idx), ua.QualifiedName(name, self.idx)
        if kind == "variable":
            node = await parent.add_variable(nid, bname, ua.Variant(value, getattr(ua.VariantType, vtype)))
        elif kind == "folder":
            node = await parent.add_folder(nid, bname)
        else:
            node = await parent.add_object(nid, bname)
        self.nodes[path] = node
        return node

    async def _sync(self) -> None:
        """Write every tag whose value changed since the last sync (and create tags seen for the first time)."""
        ua = self.ua
        snap = self.stage.state.snapshot(self.stage.ctx.runtime)
        now = datetime.now(timezone.utc)
        for path, (value, vtype) in snapshot_tags(snap).items():
            if path in self.written and self.written[path] == value:
                continue
            node = await self._node(path, "variable", value, vtype)
            dv = ua.DataValue(ua.Variant(value, getattr(ua.VariantType, vtype)), SourceTimestamp=now,
                              ServerTimestamp=now)
            await self.server.write_attribute_value(node.nodeid, dv)
            self.written[path] = value
        self.syncs += 1

    def flush(self, timeout_s: float = 10.0) -> None:
        """Copy the current state into the address space now (from any thread but the server's)."""
        if self.loop is not None and self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._sync(), self.loop).result(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.loop is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(timeout_s)


@register_stage
class OpcUaSink(Stage):
    """OPC UA server (asyncua): per-line and per-class counts, last item, line state and health as read-only tags."""
    key = "sink.opcua"
    accepts = (FrameResult,)
    #: the endpoint check, for callers that reach this class through the stage registry (the CLI)
    check_endpoint = staticmethod(check_endpoint)

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, namespace: str = DEFAULT_NAMESPACE, line: str = "line1",
                 server_name: str = "Ladon line server", update_ms: float = 200, stale_s: float = 5.0,
                 classes: list[str] | None = None, certificate: str | None = None, private_key: str | None = None,
                 allow_unencrypted: bool = False, application_uri: str | None = None):
        self.host, self.port, self.url = check_endpoint(endpoint)
        if not isinstance(namespace, str) or not namespace or " " in namespace:
            raise UsageError(f"sink.opcua: namespace {namespace!r} must be a URI without spaces that names this "
                             f"address space, e.g. {DEFAULT_NAMESPACE}")
        if not isinstance(line, str) or not line:
            raise UsageError(f"sink.opcua: line {line!r} must be the line's name (as in events.items), e.g. line1")
        for name, v, lo in (("update_ms", update_ms, 10), ("stale_s", stale_s, 0.1)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < lo:
                raise UsageError(f"sink.opcua: {name} {v!r} must be a number >= {lo}")
        if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise UsageError(f"sink.opcua: classes {classes!r} must be a list of class names, e.g. [tshirt, bag]")
        if (certificate is None) != (private_key is None):
            raise UsageError("sink.opcua: certificate and private_key go together (the server's certificate and its "
                             "key, PEM or DER); give both for an encrypted endpoint, or neither")
        for name, v in (("certificate", certificate), ("private_key", private_key)):
            if v is not None and not Path(str(v)).is_file():
                raise UsageError(f"sink.opcua: {name} {v!r} is not a file; give the path of a PEM or DER file")
        if application_uri is not None and (not isinstance(application_uri, str) or not application_uri
                                            or " " in application_uri):
            raise UsageError(f"sink.opcua: application_uri {application_uri!r} must be a URI without spaces, the one "
                             f"in the certificate's subjectAltName, e.g. urn:plant:ladon:server")
        self.namespace, self.line, self.line_tag = namespace, line, tag_name(line)
        self.application_uri = application_uri or f"{namespace}:server"
        self.server_name = str(server_name)
        self.update_s, self.stale_s = float(update_ms) / 1000.0, float(stale_s)
        self.classes = classes
        self.certificate = Path(str(certificate)) if certificate is not None else None
        self.private_key = Path(str(private_key)) if private_key is not None else None
        self.allow_unencrypted = bool(allow_unencrypted)
        self.ua: _UaServer | None = None

    def open(self, ctx) -> None:
        super().open(ctx)
        try:
            import asyncua  # noqa: F401
        except ImportError as exc:
            raise UsageError(f"sink.opcua needs asyncua: {exc}; install it with "
                             f"`.venv/bin/pip install -r requirements.txt`") from exc
        for name in ("asyncua", "asyncua.server", "asyncua.uaprotocol"):  # per-session chatter at INFO/WARNING
            logging.getLogger(name).setLevel(logging.ERROR)
        if self.port == 0:  # like sink.metrics' port 0: a free port, so tests and side-by-side runs never clash
            with socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET) as s:
                s.bind((self.host, 0))
                self.port = s.getsockname()[1]
            u = urlparse(self.url)
            netloc = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
            self.url = u._replace(netloc=netloc).geturl()
        names = self.classes or list(getattr(ctx.codec(), "class_names", {}).get("detection", []))
        self.state = LineState(self.line, names, stale_s=self.stale_s)
        self.ua = _UaServer(self)
        self.ua.start()
        ctx.stats.extra["endpoint"] = self.url
        sec = (f"Basic256Sha256 Sign/SignAndEncrypt{' + None' if self.allow_unencrypted else ''}, application URI "
               f"{self.application_uri}" if self.certificate is not None else "unencrypted, anonymous, read-only")
        ctx.log(f"[{ctx.name}] OPC UA server on {self.url} ({sec}); namespace {self.namespace}, tags under "
                f"Objects/Ladon/{self.line_tag}")

    def process(self, fr: FrameResult) -> None:
        if not self.state.classes:  # the decode stage loads the codec (and its class names) after sinks open
            names = list(getattr(self.ctx.codec(), "class_names", {}).get("detection", []))
            if names:
                self.state.set_classes(names)
        if not self.state.update(fr) and not self.state.missing_counts_noted:
            self.state.missing_counts_noted = True
            self.ctx.log(f"[{self.ctx.name}] frames carry no `counts`: count tags stay 0; put sink.opcua after "
                         f"count.items / events.items (inputs: [events])")
        self.ctx.stats.extra["opcua_syncs"] = self.ua.syncs if self.ua is not None else 0

    def close(self) -> None:
        ua = self.ua
        if ua is None:
            return None
        self.state.stop()
        try:
            ua.flush()  # final values (and State = stopped) for a client still connected
        except Exception:  # noqa: BLE001 - the server is going away anyway
            pass
        ua.stop()
        self.ua = None
        return None

