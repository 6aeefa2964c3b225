"""CURVE security for shards and workers: key files, the server's authenticator, secured sockets.

ZeroMQ's CURVE mechanism encrypts every frame and authenticates both ends. A key pair
is two files written by ``dcasgd keygen DIR --name NAME``: ``NAME.key`` (the public key,
safe to copy) and ``NAME.key_secret`` (both halves, mode 0600, never copied).

- A shard is started with its own ``.key_secret`` file and a directory of the public
  keys (``*.key``) of the workers it accepts; a ZAP authenticator thread refuses every
  other peer during the handshake, before any message reaches the shard.
- A worker uses its own ``.key_secret`` file plus the shard's public key (its ``.key``
  file), from arguments or ``DCASGD_CURVE_KEY`` / ``DCASGD_CURVE_SERVER_KEY``.

A peer that is refused gets no reply at all: ZeroMQ drops the connection during the
handshake, so the client only sees its deadline pass.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

log = logging.getLogger("dcasgd.security")

ENV_KEY = "DCASGD_CURVE_KEY"  # a worker's own .key_secret file
ENV_SERVER_KEY = "DCASGD_CURVE_SERVER_KEY"  # the shards' public key: a .key file or the 40-character Z85 key
DEFAULT_NAME = "dcasgd"


class SecurityError(ValueError):
    """A key file or a combination of security options is wrong; the message says which."""


def generate_keypair(directory: str | os.PathLike[str], name: str = DEFAULT_NAME) -> tuple[Path, Path]:
    """Write a new CURVE key pair as ``DIR/NAME.key`` (public) and ``DIR/NAME.key_secret`` (mode 0600).

    Creates ``DIR`` (mode 0700) if needed and refuses to overwrite an existing pair.
    Returns ``(public_file, secret_file)``.
    """
    if not name or os.sep in name or (os.altsep and os.altsep in name) or name in (".", ".."):
        raise SecurityError(f"key name {name!r} must be a plain file name")
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    public, secret = d / f"{name}.key", d / f"{name}.key_secret"
    for f in (public, secret):
        if f.exists():
            raise SecurityError(f"{f} already exists: remove it or choose another --name")
    # Written in a private temporary directory, so that the secret key is never readable by others.
    with tempfile.TemporaryDirectory(dir=d, prefix=".keygen-") as tmp:
        tmp_public, tmp_secret = zmq.auth.create_certificates(tmp, name)
        os.chmod(tmp_secret, 0o600)
        os.chmod(tmp_public, 0o644)
        os.replace(tmp_secret, secret)
        os.replace(tmp_public, public)
    return public, secret


def load_secret_key(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """``(public, secret)`` Z85 keys from a ``.key_secret`` file."""
    public, secret = _load(path)
    if secret is None:
        raise SecurityError(f"{path} holds only a public key: give the .key_secret file of the pair")
    return public, secret


def load_public_key(key: str | os.PathLike[str]) -> bytes:
    """A Z85 public key from a ``.key`` (or ``.key_secret``) file, or given as its 40 Z85 characters."""
    if isinstance(key, str) and len(key) == 40 and not os.path.exists(key):
        try:
            z85.decode(key)
        except Exception:  # not Z85 either: report it as a missing file below
            pass
        else:
            return key.encode("ascii")
    return _load(key)[0]


def _load(path: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    p = Path(path)
    if not p.is_file():
        raise SecurityError(f"CURVE key file {p} does not exist (make a pair with: dcasgd keygen DIR)")
    try:
        public, secret = zmq.auth.load_certificate(p)
    except (ValueError, OSError) as exc:
        raise SecurityError(f"{p} is not a CURVE key file ({exc})") from None
    if public is None or len(public) != 40:
        raise SecurityError(f"{p} is not a CURVE key file (no public-key line)")
    return public, secret


@dataclass(frozen=True)
class ClientKeys:
    """A worker's key pair and the shard's public key, loaded once; :meth:`apply` before ``connect``."""

    public: bytes
    secret: bytes
    server: bytes

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server


def client_keys(
    key_file: str | os.PathLike[str] | None = None, server_key: str | os.PathLike[str] | None = None
) -> ClientKeys | None:
    """A worker's CURVE keys from the arguments, else ``DCASGD_CURVE_KEY`` / ``DCASGD_CURVE_SERVER_KEY``.

    None when neither is set (plain, unencrypted sockets); an error when only one is.
    """
    if key_file is None:
        key_file = os.environ.get(ENV_KEY) or None
    if server_key is None:
        server_key = os.environ.get(ENV_SERVER_KEY) or None
    if key_file is None and server_key is None:
        return None
    if key_file is None or server_key is None:
        missing = f"this worker's key (curve_key= or {ENV_KEY})" if key_file is None else (
            f"the server's public key (server_key= or {ENV_SERVER_KEY})"
        )  # fmt: skip
        raise SecurityError(f"CURVE needs both keys, {missing} is missing")
    public, secret = load_secret_key(key_file)
    return ClientKeys(public, secret, load_public_key(server_key))


def secure_client_socket(
    sock: zmq.Socket, key_file: str | os.PathLike[str], server_public_key: str | os.PathLike[str]
) -> None:
    """Make ``sock`` (not yet connected) a CURVE client with this key pair, trusting that server key."""
    keys = client_keys(key_file, server_public_key)
    assert keys is not None
    keys.apply(sock)


def check_server_options(
    secret_key_file: str | os.PathLike[str] | None, clients_dir: str | os.PathLike[str] | None
) -> bool:
    """Validate a shard's security options; True when CURVE is on, False when both are absent."""
    if secret_key_file is None and clients_dir is None:
        return False
    if secret_key_file is None or clients_dir is None:
        raise SecurityError(
            "CURVE needs both --curve-secret-key FILE (the shard's .key_secret) and --curve-clients DIR "
            "(the workers' public .key files); only one was given"
        )
    load_secret_key(secret_key_file)
    d = Path(clients_dir)
    if not d.is_dir():
        raise SecurityError(f"clients directory {d} does not exist")
    keys = sorted(d.glob("*.key"))
    if not keys:
        raise SecurityError(f"clients directory {d} holds no public keys (*.key): no worker could connect")
    for k in keys:
        _load(k)  # one unreadable file would otherwise make the authenticator refuse everybody
    return True


def secure_server_socket(
    sock: zmq.Socket,
    ctx: zmq.Context,
    secret_key_file: str | os.PathLike[str],
    clients_dir: str | os.PathLike[str],
) -> ThreadAuthenticator:
    """Make ``sock`` (not yet bound) a CURVE server that accepts only the public keys in ``clients_dir``.

    Starts and returns the context's ZAP authenticator (one per context); ``stop()`` it
    when the socket is closed. Keys added to the directory later need a restart.
    """
    check_server_options(secret_key_file, clients_dir)
    public, secret = load_secret_key(secret_key_file)
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("dcasgd.security.zap"))
    auth.start()
    try:
        auth.configure_curve(domain="*", location=str(clients_dir))
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True
    except BaseException:
        auth.stop()
        raise
    log.info("CURVE on: %d allowed client key(s) from %s", len(auth.certs.get("*", {})), clients_dir)
    return auth


def warn_if_exposed(endpoint: str, secured: bool) -> None:
    """Log a warning when an unsecured shard listens on something other than loopback."""
    if secured or not endpoint.startswith("tcp://"):
        return
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        log.warning(
            "listening on %s without CURVE: anyone who can reach it can read and change the weights "
            "(use --curve-secret-key and --curve-clients, see README 'Running across machines')",
            endpoint,
        )
