"""Helpers for parameter-server tests: in-process servers, a fault-injecting TCP proxy, TLS material."""

from __future__ import annotations

import datetime
import socket
import threading
from pathlib import Path

import numpy as np

from distzo.common.config import JobConfig
from paramserver.dataplane.client import ParamServerClient
from paramserver.server import ParamServer


def server_config(cache_dir: str, **sections) -> JobConfig:
    raw = {"runtime": {"cache_dir": cache_dir}, "server": {"snapshot_every": 4}}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return JobConfig.from_dict(raw)


class Servers:
    """Starts in-process parameter servers and always stops them."""

    def __init__(self) -> None:
        self.running: list[ParamServer] = []
        self.clients: list[ParamServerClient] = []

    def start(self, cfg: JobConfig, data_dir: Path, **kw) -> ParamServer:
        s = ParamServer(cfg, data_dir, **kw).start()
        self.running.append(s)
        return s

    def client(self, address, **kw) -> ParamServerClient:
        c = ParamServerClient(address, **kw).connect()
        self.clients.append(c)
        return c

    def close(self) -> None:
        for c in self.clients:
            c.close()
        for s in self.running:
            s.stop(grace=0.5)


def all_blocks(client: ParamServerClient, version: int, dtype: str = "") -> list[np.ndarray]:
    return [client.fetch_block(b, version, dtype=dtype)[0] for b in range(len(client.manifest.blocks))]


class CuttingProxy:
    """TCP proxy that forwards both ways and cuts, once, the first connection to carry N server->client bytes.

    (Not simply the first connection: on a busy host gRPC may drop a slow first connection during
    its handshake and carry the call on a second one; the cut must still hit the call's stream.)
    """

    def __init__(self, target_port: int, cut_after: int):
        self.target = ("127.0.0.1", target_port)
        self.cut_after = cut_after
        self.cuts = 0
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self._stop = False
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, self.cut_after), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, cut: int | None) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if cut is not None and sent + len(data) >= cut:
                    with self._lock:
                        mine = self.cuts == 0
                        self.cuts += mine
                    if mine:
                        dst.sendall(data[: max(0, cut - sent)])
                        break
                    cut = None  # another connection was cut already: this one just forwards
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._stop = True
        self.listener.close()


def make_tls(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "distzo-test-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, serial: int):
        k = key()
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(ca_name).public_key(k.public_key()).serial_number(serial)
             .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False))
        return k, b.sign(ca_key, hashes.SHA256())

    out = {}
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    out["ca"] = directory / "ca.pem"
    for name, serial in (("server", 2), ("client", 3)):
        k, c = leaf(f"distzo-{name}", serial)
        (directory / f"{name}.pem").write_bytes(c.public_bytes(pem))
        (directory / f"{name}.key").write_bytes(k.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        out[name] = directory / f"{name}.pem"
        out[name + "_key"] = directory / f"{name}.key"
    return out
