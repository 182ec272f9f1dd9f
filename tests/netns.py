"""Two network hosts on one machine: network namespaces joined by a veth pair.

Each namespace has its own loopback, its own address and nothing else. The
addresses exist only inside the namespaces, so nothing outside can see them.
"""
import contextlib
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from typing import Iterator, List

import pytest

SUBNET = "10.213.7"


@dataclass
class Host:
    namespace: str
    address: str
    interface: str
    name: str  # its host name where it gets one of its own (see ``command_as``)

    def command(self, *argv) -> List[str]:
        """``argv`` run inside this host's network namespace (the machine's host name and /etc/hosts stay)."""
        return ["ip", "netns", "exec", self.namespace, *map(str, argv)]

    def command_as(self, hosts_file, *argv) -> List[str]:
        """``argv`` run as this host: its network, its host name, and ``hosts_file`` as /etc/hosts.

        The host name and the mount live in namespaces of their own, so the machine's stay as they are.
        """
        script = 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{self.namespace}", "unshare", "--mount", "--uts", "sh", "-c", script,
                str(hosts_file), self.name, *map(str, argv)]


def ip(*argv):
    return subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def two_hosts(tag: str) -> Iterator[List[Host]]:
    """Hosts ``node0`` (10.213.7.1) and ``node1`` (10.213.7.2); the test is skipped where namespaces cannot be made."""
    if shutil.which("ip") is None:
        pytest.skip("network namespaces need iproute2's `ip`, which is not installed")
    prefix = f"eca{tag}{os.getpid() % 100000}"  # namespace and interface names are machine-wide
    pair = [Host(f"{prefix}n{rank}", f"{SUBNET}.{rank + 1}", f"{prefix}v{rank}", f"node{rank}") for rank in range(2)]
    made = []
    try:
        for host in pair:
            result = ip("netns", "add", host.namespace)
            if result.returncode != 0:
                pytest.skip(f"cannot create network namespaces here: {result.stderr.strip() or 'ip netns add failed'}")
            made.append(host.namespace)
        steps = [("link", "add", pair[0].interface, "type", "veth", "peer", "name", pair[1].interface)]
        for host in pair:
            steps += [("link", "set", host.interface, "netns", host.namespace),
                      ("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.interface),
                      ("-n", host.namespace, "link", "set", "lo", "up"),
                      ("-n", host.namespace, "link", "set", host.interface, "up")]
        for step in steps:
            result = ip(*step)
            if result.returncode != 0:
                pytest.skip(f"cannot join network namespaces with a veth pair here: {result.stderr.strip()}")
        yield pair
    finally:
        for namespace in made:
            for pid in ip("netns", "pids", namespace).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)  # only processes the tests started live in there
            ip("netns", "del", namespace)  # takes the veth pair with it


def hosts_file(path, hosts: List[Host]):
    """An /etc/hosts that names every host by its address, as a cluster's DNS would."""
    path.write_text("127.0.0.1 localhost\n" + "".join(f"{host.address} {host.name}\n" for host in hosts))
    return path
