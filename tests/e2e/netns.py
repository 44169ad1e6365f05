"""Hosts for multi-host tests: Linux network namespaces on one machine, joined by a
bridge of their own, each with one address on a private /24, and the test process
(the root namespace) on the same segment as a client.

Everything the network makes is named with one random tag and removed by `close()`:
deleting a namespace deletes its end of each veth pair, and the bridge lives in a
namespace of its own. Traffic never leaves the machine. Needs root and `ip`
(iproute2); `available()` says why not where they are missing."""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


def available() -> str | None:
    """Why namespaces cannot be made here, or None where they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"sy-probe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, namespace: str | None = None) -> None:
    command = ["ip", *args] if namespace is None else ["ip", "-n", namespace, *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip()}")


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.213.0.0/16 that no route of the root namespace touches."""
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    taken = []
    for line in routes.splitlines():
        word = line.split()[0]
        if word != "default":
            taken.append(ipaddress.ip_network(word, strict=False))
    for _ in range(64):
        subnet = ipaddress.IPv4Network(f"10.213.{secrets.randbelow(256)}.0/24")
        if not any(subnet.overlaps(other) for other in taken):
            return subnet
    raise RuntimeError("no free 10.213.x.0/24 for the test network")


@dataclass
class Host:
    """One namespace with one address."""

    name: str
    namespace: str
    address: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this host (`ip netns exec` execs it: the process that
        Popen starts is the program itself)."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def run(self, argv: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            self.command(argv), capture_output=True, text=True, timeout=60, **kwargs
        )

    def cut_off_from(self, other: Host) -> None:
        """Packets from here to `other` are dropped (a blackhole route): connections
        already open hang, new ones fail."""
        _ip("route", "add", "blackhole", f"{other.address}/32", namespace=self.namespace)

    def reconnect_to(self, other: Host) -> None:
        _ip("route", "del", "blackhole", f"{other.address}/32", namespace=self.namespace)


@dataclass
class Network:
    """A bridge and the hosts on it; the root namespace is `client` (address .1)."""

    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    subnet: ipaddress.IPv4Network = field(default_factory=_free_subnet)
    hosts: dict[str, Host] = field(default_factory=dict)
    client_address: str = ""
    _next: int = 10

    @property
    def switch(self) -> str:
        return f"sy{self.tag}-sw"

    def open(self) -> Network:
        _ip("netns", "add", self.switch)
        _ip("link", "add", "br0", "type", "bridge", namespace=self.switch)
        _ip("link", "set", "br0", "up", namespace=self.switch)
        _ip("link", "set", "lo", "up", namespace=self.switch)
        # The client's leg: one end stays in the root namespace.
        root_end, switch_end = f"sy{self.tag}c0", f"sy{self.tag}c1"
        _ip("link", "add", root_end, "type", "veth", "peer", "name", switch_end)
        _ip("link", "set", switch_end, "netns", self.switch)
        _ip("link", "set", switch_end, "master", "br0", "up", namespace=self.switch)
        self.client_address = str(self.subnet.network_address + 1)
        _ip("addr", "add", f"{self.client_address}/24", "dev", root_end)
        _ip("link", "set", root_end, "up")
        return self

    def add(self, name: str) -> Host:
        """A new host on the bridge, with the next free address."""
        index = len(self.hosts)
        namespace = f"sy{self.tag}-{name}"
        address = str(self.subnet.network_address + self._next + index)
        host_end, switch_end = f"sy{self.tag}h{index}", f"sy{self.tag}s{index}"
        _ip("netns", "add", namespace)
        _ip("link", "set", "lo", "up", namespace=namespace)
        _ip("link", "add", host_end, "type", "veth", "peer", "name", switch_end)
        _ip("link", "set", host_end, "netns", namespace)
        _ip("link", "set", switch_end, "netns", self.switch)
        _ip("link", "set", switch_end, "master", "br0", "up", namespace=self.switch)
        _ip("link", "set", host_end, "name", "eth0", namespace=namespace)
        _ip("addr", "add", f"{address}/24", "dev", "eth0", namespace=namespace)
        _ip("link", "set", "eth0", "up", namespace=namespace)
        host = Host(name, namespace, address)
        self.hosts[name] = host
        return host

    def close(self) -> None:
        """Removes every namespace (their veth ends and the bridge with them) and the
        client's leg."""
        for host in self.hosts.values():
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", f"sy{self.tag}c0"], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True)


def leftovers(tag: str) -> list[str]:
    """Namespaces of this tag still present (none after close())."""
    names = Path("/run/netns")
    if not names.exists():
        return []
    return sorted(p.name for p in names.iterdir() if p.name.startswith(f"sy{tag}-"))
