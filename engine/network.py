"""Which network interface gloo talks on, chosen from the route to the master.

Without ``GLOO_SOCKET_IFNAME`` gloo binds to the address the host name resolves to,
and on many machines (Debian's ``127.0.1.1`` line in ``/etc/hosts``, containers) that
is a loopback address: the other machines then dial their own loopback, and the job
fails on one side and hangs on the other. The kernel knows better: the interface
whose address it would send from to reach the master is the one the others reach.
"""
import ipaddress
import os
import socket
import struct
import sys
from typing import Optional

from .errors import UsageError

SIOCGIFADDR = 0x8915  # Linux: an interface's (first) IPv4 address
IFNAMSIZ = 16


def choose_gloo_interface(master_host: str, master_port: int, machines_in_job: int) -> Optional[str]:
    """Set ``GLOO_SOCKET_IFNAME`` to the interface that reaches the master, unless it is set; return its name.

    A multi-machine job whose master address is a loopback address, or has no route,
    cannot work: that is one UsageError naming the variable to set, before anything waits.
    """
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return os.environ["GLOO_SOCKET_IFNAME"]
    family, address = resolve(master_host, master_port)
    if ipaddress.ip_address(address.split("%")[0]).is_loopback:
        if machines_in_job > 1:
            raise UsageError(
                f"the master address {master_host!r} is this machine's loopback ({address}), but the job spans "
                f"{machines_in_job} machines: give an address of the first node that the others reach (torchrun "
                "--master-addr, or --local-addr on the first node; MASTER_ADDR; or --dist-url tcp://HOST:PORT), "
                "or set GLOO_SOCKET_IFNAME=lo if every process runs on this machine"
            )
        return None  # everything on this machine: loopback is right
    source = route_source(family, address, master_port, master_host)
    if not sys.platform.startswith("linux"):
        return None  # no SIOCGIFADDR to name the interface with; gloo's own choice stands
    name = interface_with_address(source)
    if name is None:
        raise UsageError(
            f"could not tell which network interface holds {source}, the address this machine reaches the master "
            f"{master_host} from: set GLOO_SOCKET_IFNAME to that interface's name (see `ip -o addr`)"
        )
    os.environ["GLOO_SOCKET_IFNAME"] = name
    return name


def resolve(host: str, port: int):
    """(family, address) that ``host`` resolves to here, as the store's client will dial it."""
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise UsageError(
            f"the master address {host!r} does not resolve on this machine ({error.strerror}): set MASTER_ADDR "
            "(or --dist-url tcp://HOST:PORT) to an address or name it knows"
        ) from None
    return family, sockaddr[0]


def route_source(family: int, address: str, port: int, host: str) -> str:
    """The local address the kernel would send from to reach ``address`` (a UDP connect sends nothing)."""
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((address, port))
        except OSError as error:
            raise UsageError(
                f"no network route from this machine to the master {host} ({address}: {error.strerror}): "
                "check MASTER_ADDR or --dist-url, or set GLOO_SOCKET_IFNAME to the interface that reaches it"
            ) from None
        return probe.getsockname()[0]


def interface_with_address(address: str) -> Optional[str]:
    """The name of the interface that holds ``address``, or None."""
    wanted = ipaddress.ip_address(address.split("%")[0])
    for _, name in socket.if_nameindex():
        if wanted in interface_addresses(name, wanted.version):
            return name
    return None


def interface_addresses(name: str, version: int):
    if version == 4:
        import fcntl  # POSIX only; the caller asks on Linux alone

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as query:
            try:
                reply = fcntl.ioctl(query.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:IFNAMSIZ - 1]))
            except OSError:  # no IPv4 address on this interface
                return []
        return [ipaddress.IPv4Address(reply[20:24])]
    # IPv6: one line per address, "<32 hex digits> <index> <prefix> <scope> <flags> <name>".
    try:
        with open("/proc/net/if_inet6") as table:
            rows = [line.split() for line in table]
    except OSError:
        return []
    return [ipaddress.IPv6Address(bytes.fromhex(row[0])) for row in rows if len(row) == 6 and row[5] == name]
