"""A sandbox of hosts for tests: one network namespace per host, each with
one veth "cable" into a bridge that lives in a hub namespace of its own.

Nothing is added to the namespace the tests run in: no address, no route,
no interface. The subnet (10.213.0.0/24) exists only inside the sandbox's
namespaces, whose names carry the test process's pid, so two sandboxes on
one machine never meet. The test itself talks to the hosts from a thread
that has joined the `ctl` host's namespace (`Sandbox.inns`); processes run
on a host through `ip netns exec`.

Faults: `unplug(host)` / `plug(host)` take the hub's end of a host's cable
down and up (the host keeps its address and its listening sockets; packets
to and from it are dropped, as when a switch port dies).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

SUBNET = "10.213.0"
CLONE_NEWNET = 0x40000000


def why_not() -> Optional[str]:
    """Why a sandbox cannot be made here (None: it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
    if not shutil.which("ip"):
        return "no `ip` command (iproute2)"
    name = f"efprobe{os.getpid()}"
    p = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if p.returncode != 0:
        return f"`ip netns add` failed: {p.stderr.strip()}"
    try:
        p = subprocess.run(["ip", "-n", name, "link", "add", "br0", "type", "bridge"], capture_output=True, text=True)
        if p.returncode != 0:
            return f"no bridge inside a network namespace: {p.stderr.strip()}"
        p = subprocess.run(["ip", "-n", name, "link", "add", "a0", "type", "veth", "peer", "name", "b0"],
                           capture_output=True, text=True)
        if p.returncode != 0:
            return f"no veth pairs: {p.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _ip(*args: str) -> None:
    p = subprocess.run(["ip", *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {p.stderr.strip()}")


def _setns(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


class Sandbox:
    def __init__(self, hosts: list[str]):
        self.tag = f"ef{os.getpid()}"
        self.hub = f"{self.tag}-hub"
        self.ns: dict[str, str] = {}
        self.addr: dict[str, str] = {}
        self._ctl: Optional[ThreadPoolExecutor] = None
        try:
            _ip("netns", "add", self.hub)
            _ip("-n", self.hub, "link", "set", "lo", "up")
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            for i, h in enumerate(hosts, start=2):
                self.add(h, f"{SUBNET}.{i}")
        except BaseException:
            self.close()
            raise

    def add(self, host: str, addr: str) -> None:
        ns = f"{self.tag}-{host}"
        _ip("netns", "add", ns)
        self.ns[host] = ns
        # both ends made inside the sandbox: the cable never shows in the caller's namespace
        _ip("-n", self.hub, "link", "add", f"v-{host}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", self.hub, "link", "set", f"v-{host}", "master", "br0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        self.addr[host] = addr

    def argv(self, host: str, argv: list[str]) -> list[str]:
        """argv, run on host."""
        return ["ip", "netns", "exec", self.ns[host], *argv]

    def unplug(self, host: str) -> None:
        _ip("-n", self.hub, "link", "set", f"v-{host}", "down")

    def plug(self, host: str) -> None:
        _ip("-n", self.hub, "link", "set", f"v-{host}", "up")

    def inns(self, fn: Callable, *args, **kwargs):
        """fn(*args, **kwargs) on the `ctl` host: in a thread that joined its
        network namespace (every socket it opens is the ctl host's)."""
        if self._ctl is None:
            self._ctl = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctl",
                                           initializer=_setns, initargs=(self.ns["ctl"],))
        return self._ctl.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        if self._ctl is not None:
            self._ctl.shutdown(wait=False)
        for ns in [*self.ns.values(), self.hub]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.ns.clear()


class NsHttp:
    """An httpx.Client whose every request is made from the ctl host."""

    def __init__(self, box: Sandbox, base_url: str, timeout: float = 60):
        import httpx

        self.box = box
        self.client = box.inns(httpx.Client, base_url=base_url, timeout=timeout)

    def request(self, method: str, url: str, **kw):
        return self.box.inns(self.client.request, method, url, **kw)

    def get(self, url: str, **kw):
        return self.request("GET", url, **kw)

    def post(self, url: str, **kw):
        return self.request("POST", url, **kw)

    def close(self) -> None:
        self.client.close()
