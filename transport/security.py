"""CurveZMQ security for tcp:// links: key files, the server's authenticator, and the rule for when it is needed.

* The **server** holds its key pair (``NAME.key_secret``, made by ``run_pipeline.py keys``) and a directory of
  allowed client public keys (``*.key``, one per edge or worker). A ZAP handler
  (:class:`zmq.auth.thread.ThreadAuthenticator`) refuses every CURVE client whose public key is not in that
  directory: the handshake fails and not one message of that client reaches the application.
* An **edge** (or worker) holds its own key pair and the server's public key (``server.key``).
* ``tcp://`` links need keys unless ``insecure`` is set explicitly (a warning then goes to stderr);
  ``ipc://`` and ``inproc://`` links stay on the machine and may run without.
"""
from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq

from core.errors import UsageError

_AUTH: dict[int, object] = {}
_AUTH_LOCK = threading.Lock()
_WARNED: set[str] = set()


def needs_security(endpoint: str) -> bool:
    return str(endpoint).startswith("tcp://")


def _load(path, what: str, secret: bool):
    """Read a key file made by ``run_pipeline.py keys``: ``secret=True`` wants NAME.key_secret (the pair),
    ``secret=False`` the other side's public NAME.key. A secret file where a public key belongs is refused:
    it works, but it means a secret key is being handed around (copied to edges or allowed folders)."""
    import zmq.auth
    if path in (None, ""):
        raise UsageError(f"{what}: no key file given")
    p = Path(str(path))
    want = "a secret key file (NAME.key_secret)" if secret else "a public key file (NAME.key)"
    if p.is_dir():
        raise UsageError(f"{what} {str(p)!r} is a folder; give {want} made by `run_pipeline.py keys`")
    if not p.is_file():
        raise UsageError(f"{what} {str(p)!r} does not exist; make key pairs with "
                         f"`run_pipeline.py keys --out DIR --name NAME`")
    try:
        public, sec = zmq.auth.load_certificate(str(p))
    except (ValueError, OSError) as exc:
        raise UsageError(f"{what} {str(p)!r} is not a CurveZMQ certificate ({' '.join(str(exc).split())}); "
                         f"give {want} made by `run_pipeline.py keys`") from exc
    if not all(_is_z85_key(k) for k in (public, sec) if k is not None):
        raise UsageError(f"{what} {str(p)!r} holds a malformed key (a CurveZMQ key is 40 Z85 characters); "
                         f"give {want} made by `run_pipeline.py keys`")
    if secret and not sec:
        raise UsageError(f"{what} {str(p)!r} is a public key file and holds no secret key; give the "
                         f"NAME.key_secret file of the same pair")
    if not secret and sec:
        raise UsageError(f"{what} {str(p)!r} is a SECRET key file (it has a secret-key entry); a public key is "
                         f"expected here: give {p.name.removesuffix('_secret')} (NAME.key) and keep the secret file "
                         f"on its own machine")
    return public, sec


def _is_z85_key(key: bytes) -> bool:
    """A 32-byte CurveZMQ key in its 40-character Z85 text form."""
    from zmq.utils import z85
    if len(key) != 40:
        return False
    try:
        return len(z85.decode(key)) == 32
    except Exception:  # noqa: BLE001 - any failure to decode (bad character, overflow) means a malformed key
        return False


@dataclass
class ServerSecurity:
    """Server side: own key pair + directory of allowed client public keys. ``None`` fields: insecure."""
    public: bytes | None = None
    secret: bytes | None = None
    allowed_dir: str | None = None

    @property
    def on(self) -> bool:
        return self.secret is not None

    def apply(self, sock: zmq.Socket) -> None:
        if not self.on:
            return
        start_authenticator(sock.context, self.allowed_dir)
        sock.curve_server = True
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


@dataclass
class ClientSecurity:
    """Client side (edge, worker): own key pair + the server's public key."""
    public: bytes | None = None
    secret: bytes | None = None
    server_public: bytes | None = None

    @property
    def on(self) -> bool:
        return self.server_public is not None

    def apply(self, sock: zmq.Socket) -> None:
        if not self.on:
            return
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server_public


def warn_insecure(endpoint: str, who: str) -> None:
    if endpoint in _WARNED:
        return
    _WARNED.add(endpoint)
    print(f"warning: {who} {endpoint} runs WITHOUT encryption or authentication (--insecure): anyone who can reach "
          f"it can read the frames and send messages", file=sys.stderr, flush=True)


def server_security(endpoint: str, secret_key=None, allowed_keys=None, insecure: bool = False,
                    who: str = "server") -> ServerSecurity:
    """Check the options and load the keys (UsageError naming the fix when something is missing)."""
    if secret_key in (None, "") and allowed_keys in (None, ""):
        if needs_security(endpoint) and not insecure:
            raise UsageError(f"{who} {endpoint}: a tcp link needs keys: pass --key SERVER.key_secret and "
                             f"--allowed-keys DIR (make them with `run_pipeline.py keys --out DIR --name NAME`), "
                             f"or --insecure to run without encryption")
        if needs_security(endpoint):
            warn_insecure(endpoint, who)
        return ServerSecurity()
    if secret_key in (None, "") or allowed_keys in (None, ""):
        raise UsageError(f"{who} {endpoint}: give both the server key (--key NAME.key_secret) and the directory "
                         f"of allowed client public keys (--allowed-keys DIR)")
    allowed = Path(str(allowed_keys))
    if allowed.is_file():
        raise UsageError(f"{who}: allowed keys {str(allowed_keys)!r} is a file; a folder of public keys is expected "
                         f"(--allowed-keys DIR holding each allowed edge's or worker's NAME.key, e.g. made with "
                         f"`run_pipeline.py keys --out keys --name cam1 --allow keys/allowed`)")
    if not allowed.is_dir():
        raise UsageError(f"{who}: allowed-keys folder {str(allowed_keys)!r} does not exist (put each allowed edge's "
                         f"and worker's NAME.key there, e.g. with `run_pipeline.py keys ... --allow DIR`)")
    if not zmq.has("curve"):
        raise UsageError("this libzmq has no CURVE support; install pyzmq with libsodium or use --insecure")
    public, secret = _load(secret_key, f"{who} key", secret=True)
    return ServerSecurity(public, secret, str(allowed_keys))


def client_security(endpoint: str, secret_key=None, server_key=None, insecure: bool = False,
                    who: str = "edge") -> ClientSecurity:
    if secret_key in (None, "") and server_key in (None, ""):
        if needs_security(endpoint) and not insecure:
            raise UsageError(f"{who} {endpoint}: a tcp link needs keys: pass --key EDGE.key_secret and "
                             f"--server-key SERVER.key (make them with `run_pipeline.py keys --out DIR --name NAME`), "
                             f"or --insecure to run without encryption")
        if needs_security(endpoint):
            warn_insecure(endpoint, who)
        return ClientSecurity()
    if secret_key in (None, "") or server_key in (None, ""):
        raise UsageError(f"{who} {endpoint}: give both this client's key (--key NAME.key_secret) and the "
                         f"server's public key (--server-key SERVER.key)")
    if not zmq.has("curve"):
        raise UsageError("this libzmq has no CURVE support; install pyzmq with libsodium or use --insecure")
    public, secret = _load(secret_key, f"{who} key", secret=True)
    server_public, _ = _load(server_key, f"{who} server key", secret=False)
    return ClientSecurity(public, secret, server_public)


def start_authenticator(ctx: zmq.Context, allowed_dir: str) -> None:
    """One ZAP authenticator per context, allowing the public keys found in ``allowed_dir`` (any domain)."""
    from zmq.auth.thread import ThreadAuthenticator
    with _AUTH_LOCK:
        auth = _AUTH.get(id(ctx))
        if auth is None:
            auth = ThreadAuthenticator(ctx)
            auth.start()
            _AUTH[id(ctx)] = auth
        auth.configure_curve(domain="*", location=str(allowed_dir))


def make_keypair(out_dir: str | Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """Write NAME.key (public, 0644) and NAME.key_secret (secret, 0600) into out_dir."""
    import zmq.auth
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"key folder {str(out)!r} is a file; --out wants a folder (made when missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot make the key folder {str(out)!r}: {exc.strerror or exc}") from None
    pub, sec = out / f"{name}.key", out / f"{name}.key_secret"
    if not force and (pub.exists() or sec.exists()):
        raise UsageError(f"{pub} or {sec} already exists; pass --force to replace the key pair")
    old = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
    try:
        p, s = zmq.auth.create_certificates(str(out), name)
    finally:
        os.umask(old)
    os.chmod(s, 0o600)
    os.chmod(p, 0o644)
    return Path(p), Path(s)


def demo_keys(out_dir: str | Path) -> dict[str, str]:
    """Throwaway keys for the one-machine demo: server and edge pairs, the edge allowed. Reused when present."""
    d = Path(out_dir)
    allowed = d / "allowed"
    for name in ("server", "edge"):
        if not (d / f"{name}.key_secret").is_file():
            make_keypair(d, name, force=True)
    allowed.mkdir(parents=True, exist_ok=True)
    (allowed / "edge.key").write_bytes((d / "edge.key").read_bytes())
    return {"server_secret": str(d / "server.key_secret"), "server_public": str(d / "server.key"),
            "edge_secret": str(d / "edge.key_secret"), "allowed_keys": str(allowed)}
