"""Simulated hosts for ``zoctl up --hosts N``: one Linux network namespace per host, wired to a bridge.

Host ``i`` of run ``rid`` (six hex digits, fresh per run, so parallel runs never collide) is the
namespace ``dz<rid>h<i>`` with one interface, ``eth0``, the peer of the veth ``dz<rid>v<i>`` that
is enslaved to the bridge ``dz<rid>br`` in the root namespace. Addresses: ``10.213.X.1/24`` on the
bridge (the supervisor, in the root namespace, reaches every host through it) and ``10.213.X.(10+i)``
on host ``i``, with ``X`` a /24 no other interface of this machine uses. Each host has its own
shared-memory directory (``/dev/shm/distzo-<rid>-h<i>``): a worker maps only its own host's server.

Every byte between two hosts, or between a host and the supervisor, crosses that host's veth, so
the veth's counters (``/sys/class/net/dz<rid>v<i>/statistics/{rx,tx}_bytes``, read in the root
namespace: its ``rx`` is what the host sent) are the host's bytes on the wire. Links can be limited
with ``tc``'s token bucket (``tbf``) in both directions.

A run records itself in ``/run/distzo-hosts/<rid>.json`` (supervisor pid and start time) *before*
creating anything; ``cleanup_stale()`` (called by every new run) tears down the namespaces, links and
shared-memory directories of records whose supervisor is gone (a crash, ``kill -9``), killing the
processes still inside those namespaces, and any ``dz??????h*`` namespace or link with no record.
Needs root (HostsUnavailable otherwise, a BadInput: one line, exit 2).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from distzo.common.errors import BadInput
from distzo.infra.logs import kv

log = logging.getLogger("distzo.hosts")
STATE_DIR = Path("/run/distzo-hosts")
SUBNET_PREFIX = "10.213"  # 10.213.X.0/24, X picked free per run
SHM_ROOT = Path("/dev/shm")
_NAME = re.compile(r"^dz([0-9a-f]{6})(?:h\d+|v\d+|br)$")


class HostsUnavailable(BadInput):
    """Simulated hosts cannot be made here (not root, no ``ip``)."""


def check_can_make_hosts() -> None:
    """Raise HostsUnavailable unless this process can create network namespaces."""
    if os.geteuid() != 0:
        raise HostsUnavailable("--hosts needs root: each simulated host is a network namespace (run as root, "
                               "or omit --hosts / cluster.hosts for the loopback cluster)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise HostsUnavailable(f"--hosts needs the {tool!r} command (iproute2), which is not installed")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {r.stderr.strip()}")
    return r


def _run(argv: list[str]) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {r.stderr.strip()}")


@dataclass
class HostNetwork:
    """The namespaces, links and addresses of one run's ``hosts`` simulated hosts.

    ``link_rate``: a ``tc`` rate (``1gbit``, ``100mbit``) applied to both directions of every link, or None.
    """

    hosts: int
    link_rate: str | None = None
    rid: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: int = -1
    created: bool = False

    def ns(self, host: int) -> str:
        return f"dz{self.rid}h{host}"

    def veth(self, host: int) -> str:
        return f"dz{self.rid}v{host}"

    @property
    def bridge(self) -> str:
        return f"dz{self.rid}br"

    @property
    def gateway(self) -> str:
        return f"{SUBNET_PREFIX}.{self.subnet}.1"

    def address(self, host: int) -> str:
        return f"{SUBNET_PREFIX}.{self.subnet}.{10 + host}"

    def shm_dir(self, host: int) -> Path:
        return SHM_ROOT / f"distzo-{self.rid}-h{host}"

    def exec_argv(self, host: int, argv: list[str]) -> list[str]:
        """``argv`` run inside host ``host``'s namespace (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.ns(host), *argv]

    # ------------------------------------------------------------------ life cycle
    def create(self) -> "HostNetwork":
        check_can_make_hosts()
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        cleanup_stale()
        with open(STATE_DIR / "lock", "w") as lock:  # subnet choice and record are atomic across runs
            fcntl.flock(lock, fcntl.LOCK_EX)
            used = set(re.findall(rf"{re.escape(SUBNET_PREFIX)}\.(\d+)\.", _ip("-o", "-4", "addr", "show").stdout))
            used |= {str(rec.get("subnet")) for rec in _records()}
            free = [x for x in range(256) if str(x) not in used]
            if not free:
                raise RuntimeError(f"no free /24 left in {SUBNET_PREFIX}.0.0/16 for simulated hosts")
            self.subnet = free[0]
            self._record()
        self.created = True
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for h in range(self.hosts):
                ns, veth = self.ns(h), self.veth(h)
                _ip("netns", "add", ns)
                _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("link", "set", veth, "master", self.bridge)
                _ip("link", "set", veth, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "addr", "add", f"{self.address(h)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                if self.link_rate:  # both directions: the root side shapes what the host receives
                    tbf = ["root", "tbf", "rate", self.link_rate, "burst", "256kb", "latency", "50ms"]
                    _run(["tc", "qdisc", "add", "dev", veth, *tbf])
                    _run(["tc", "-n", ns, "qdisc", "add", "dev", "eth0", *tbf])
                d = self.shm_dir(h)
                d.mkdir(mode=0o700, exist_ok=True)
        except BaseException:
            self.teardown()
            raise
        log.info("simulated hosts up", extra=kv(run=self.rid, hosts=self.hosts, subnet=f"{SUBNET_PREFIX}.{self.subnet}.0/24"))
        return self

    def _record(self) -> None:
        me = psutil.Process()
        rec = {"rid": self.rid, "hosts": self.hosts, "subnet": self.subnet, "pid": me.pid, "started": me.create_time()}
        tmp = STATE_DIR / f"{self.rid}.json.tmp"
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, STATE_DIR / f"{self.rid}.json")

    def teardown(self) -> None:
        """Kill what still runs in the namespaces, delete them, the links, the bridge and the shm directories."""
        _teardown(self.rid)
        self.created = False

    # ------------------------------------------------------------------ counters
    def link_counters(self, host: int) -> tuple[int, int]:
        """(bytes host ``host`` sent, bytes it received) on its link so far (the root-side veth's rx, tx)."""
        stats = Path("/sys/class/net") / self.veth(host) / "statistics"
        return int((stats / "rx_bytes").read_text()), int((stats / "tx_bytes").read_text())

    def set_link(self, host: int, up: bool) -> None:
        """Take host ``host``'s link down (or up again): a cut cable, seen from both ends."""
        _ip("link", "set", self.veth(host), "up" if up else "down")


def _records() -> list[dict]:
    out = []
    for p in STATE_DIR.glob("*.json"):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return out


def _owner_alive(rec: dict) -> bool:
    try:
        return abs(psutil.Process(int(rec["pid"])).create_time() - float(rec["started"])) < 1.0
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def _teardown(rid: str) -> None:
    names = _ip("netns", "list", check=False).stdout.split()
    for ns in (n for n in names if n.startswith(f"dz{rid}h")):
        for pid in _ip("netns", "pids", ns, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)  # a process left in a dead run's namespace
            except (ProcessLookupError, ValueError):
                pass
        _ip("netns", "del", ns, check=False)
    links = re.findall(r"^\d+: ([^:@]+)", _ip("-o", "link", "show", check=False).stdout, flags=re.M)
    for link in links:
        if link.startswith(f"dz{rid}v") or link == f"dz{rid}br":
            _ip("link", "del", link, check=False)
    for d in SHM_ROOT.glob(f"distzo-{rid}-h*"):
        shutil.rmtree(d, ignore_errors=True)
    (STATE_DIR / f"{rid}.json").unlink(missing_ok=True)


def cleanup_stale() -> list[str]:
    """Tear down what runs whose supervisor is gone left behind; returns their run ids."""
    if os.geteuid() != 0:
        return []
    records = {rec.get("rid"): rec for rec in _records()}
    stale = {rid for rid, rec in records.items() if rid and not _owner_alive(rec)}
    names = _ip("netns", "list", check=False).stdout.split()
    names += re.findall(r"^\d+: ([^:@]+)", _ip("-o", "link", "show", check=False).stdout, flags=re.M)
    for name in names:
        m = _NAME.match(name)
        if m and m.group(1) not in records:  # made by a run whose record is gone
            stale.add(m.group(1))
    for rid in sorted(stale):
        log.warning("removing a crashed run's simulated hosts", extra=kv(run=rid))
        _teardown(rid)
    return sorted(stale)


def leftovers(rid: str) -> list[str]:
    """Namespaces, links and shm directories of run ``rid`` that still exist (tests check it is empty)."""
    names = _ip("netns", "list", check=False).stdout.split()
    names += re.findall(r"^\d+: ([^:@]+)", _ip("-o", "link", "show", check=False).stdout, flags=re.M)
    out = [n for n in names if n.startswith(f"dz{rid}")]
    return out + [str(d) for d in SHM_ROOT.glob(f"distzo-{rid}-h*")]
