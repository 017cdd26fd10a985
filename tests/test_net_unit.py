"""The subnet model, the MAC scheme, ping parsing and the permission error.

Nothing here touches the host's network: these run anywhere, as any user.
"""

from __future__ import annotations

import ipaddress
import re

import pytest

from helpers.guest import ip_for_mac, mac_for_ip
from helpers.net import (
    CAP_NET_ADMIN,
    CAP_SYS_ADMIN,
    InvalidSubnetError,
    NetPrivileges,
    NetworkError,
    NetworkPermissionError,
    Subnet,
    SubnetExhaustedError,
    TaskNetwork,
    egress_commands,
    parse_ping,
    read_cap_eff,
)

IP = ipaddress.IPv4Address


def fill(subnet: Subnet) -> list[IP]:
    """Allocate every usable address of *subnet* to tasks t0, t1, ..."""
    return [subnet.allocate(f"t{i}") for i in range(subnet.usable)]


# ---------------------------------------------------------------- subnet


def test_a_slash_28_keeps_five_addresses_and_offers_eleven() -> None:
    subnet = Subnet("10.0.1.0/28")
    assert (subnet.size, len(subnet.reserved), subnet.usable) == (16, 5, 11)
    assert sorted(subnet.reserved) == [
        IP("10.0.1.0"), IP("10.0.1.1"), IP("10.0.1.2"), IP("10.0.1.3"),
        IP("10.0.1.15")]
    assert subnet.reserved[IP("10.0.1.1")] == "VPC router"
    assert "DNS" in subnet.reserved[IP("10.0.1.2")]
    assert subnet.router == IP("10.0.1.1")


def test_a_slash_24_offers_251() -> None:
    subnet = Subnet("10.0.0.0/24")
    assert subnet.usable == 251
    assert subnet.available == 251
    assert IP("10.0.0.255") in subnet.reserved


def test_addresses_go_out_lowest_first_skipping_the_reserved() -> None:
    subnet = Subnet("10.0.1.0/28")
    given = fill(subnet)
    assert given == [IP(f"10.0.1.{n}") for n in range(4, 15)]
    assert subnet.available == 0
    assert not set(given) & set(subnet.reserved)


def test_exhaustion_says_how_many_and_what_to_do() -> None:
    subnet = Subnet("10.0.1.0/28")
    fill(subnet)
    with pytest.raises(SubnetExhaustedError) as caught:
        subnet.allocate("one-too-many")
    text = str(caught.value)
    assert "16 addresses" in text
    assert "reserves 5" in text
    assert "all 11 usable" in text
    assert "larger subnet" in text and "more subnets" in text
    assert "one-too-many" in text
    err = caught.value
    assert (err.size, err.reserved_count, err.in_use_count) == (16, 5, 11)
    assert "one-too-many" not in subnet.in_use


def test_a_released_address_is_reused() -> None:
    subnet = Subnet("10.0.1.0/28")
    fill(subnet)
    assert subnet.release("t3") == IP("10.0.1.7")
    assert subnet.available == 1
    assert subnet.allocate("new") == IP("10.0.1.7")
    assert subnet.owner("10.0.1.7") == "new"


def test_release_of_an_unknown_task_is_harmless() -> None:
    subnet = Subnet("10.0.1.0/28")
    assert subnet.release("nobody") is None
    assert subnet.available == 11


def test_allocating_twice_for_one_task_returns_its_address() -> None:
    subnet = Subnet("10.0.1.0/28")
    first = subnet.allocate("web")
    assert subnet.allocate("web") == first
    assert subnet.in_use == {"web": first}
    assert subnet.available == 10


def test_table_lists_every_address_with_its_role() -> None:
    subnet = Subnet("10.0.1.0/28")
    subnet.allocate("web")
    rows = subnet.table()
    assert len(rows) == 16
    assert rows[1].role == "VPC router"
    assert (rows[4].role, rows[4].task) == ("task ENI", "web")
    assert rows[5].role == "free"
    with pytest.raises(InvalidSubnetError):
        Subnet("10.0.0.0/16").table()


@pytest.mark.parametrize("cidr", ["10.0.0.0/16", "10.0.0.0/28"])
def test_the_aws_size_limits_are_accepted(cidr: str) -> None:
    assert Subnet(cidr).network == ipaddress.IPv4Network(cidr)


@pytest.mark.parametrize("cidr, words", [
    ("10.0.0.0/29", "/16 to /28"),
    ("10.0.0.0/15", "/16 to /28"),
    ("10.0.0.1/24", "not a valid"),
    ("fd00::/64", "IPv6"),
    ("ten.zero/24", "not a valid"),
])
def test_bad_blocks_are_refused_with_advice(cidr: str, words: str) -> None:
    with pytest.raises(InvalidSubnetError, match=re.escape(words)):
        Subnet(cidr)


# ------------------------------------------------------------ MAC scheme


@pytest.mark.parametrize("address", ["10.0.0.4", "10.0.1.14",
                                     "172.16.255.254", "0.0.0.0"])
def test_the_mac_carries_the_address(address: str) -> None:
    mac = mac_for_ip(address)
    assert mac.startswith("06:00:")
    assert ip_for_mac(mac) == address
    assert ip_for_mac(mac.upper()) == address


def test_a_foreign_mac_is_refused() -> None:
    with pytest.raises(ValueError, match="06:00"):
        ip_for_mac("52:54:00:12:34:56")


def test_a_task_network_describes_the_guest_side() -> None:
    subnet = Subnet("10.0.0.0/24")
    network = TaskNetwork("web-1", subnet)
    assert network.netns == "fclab-web-1"
    with pytest.raises(NetworkError, match="not open"):
        _ = network.mac
    # Give it an address the way open() does, without touching the host.
    network.address = subnet.allocate("web-1")
    assert network.mac == "06:00:0a:00:00:04"
    assert ip_for_mac(network.mac) == "10.0.0.4"
    assert network.boot_arg == (
        "ip=10.0.0.4::10.0.0.1:255.255.255.0::eth0:off")


@pytest.mark.parametrize("task", ["", "-x", "a b", "a/b", "x" * 33])
def test_task_names_must_fit_a_namespace_name(task: str) -> None:
    with pytest.raises(NetworkError, match="Task name"):
        TaskNetwork(task, Subnet("10.0.0.0/24"))


# ------------------------------------------------------------ permissions


def test_cap_eff_is_read_from_proc_status_text() -> None:
    status = "Name:\tpython\nCapInh:\t0\nCapEff:\t0000000000001000\n"
    assert read_cap_eff(status) == 1 << CAP_NET_ADMIN
    assert read_cap_eff("Name:\tx\n") == 0


def test_without_privileges_the_error_lists_the_commands() -> None:
    subnet = Subnet("10.0.0.0/24")
    user = NetPrivileges(euid=1000, cap_eff=0, user="alice")
    network = TaskNetwork("web-1", subnet, privileges=user)
    with pytest.raises(NetworkPermissionError) as caught:
        network.open()
    text = str(caught.value)
    assert "CAP_NET_ADMIN and CAP_SYS_ADMIN" in text
    assert "uid 1000" in text
    for line in [
        "sudo ip netns add fclab-web-1",
        "sudo ip -n fclab-web-1 tuntap add dev tap0 mode tap user alice",
        "sudo ip -n fclab-web-1 addr add 10.0.0.1/24 dev tap0",
        "sudo ip -n fclab-web-1 link set tap0 up",
        "sudo ip netns del fclab-web-1",
        "--cap-add NET_ADMIN --cap-add SYS_ADMIN",
    ]:
        assert line in text
    assert caught.value.commands[0] == "sudo ip netns add fclab-web-1"
    # Refused before anything happened: no address was taken.
    assert subnet.in_use == {}
    assert network.commands == []


def test_one_missing_capability_is_named_alone() -> None:
    only_net = NetPrivileges(euid=0, cap_eff=1 << CAP_NET_ADMIN, user="root")
    assert only_net.missing == ["CAP_SYS_ADMIN"]
    both = NetPrivileges(
        euid=1000, cap_eff=(1 << CAP_NET_ADMIN) | (1 << CAP_SYS_ADMIN),
        user="bob")
    assert both.missing == []
    with pytest.raises(NetworkPermissionError, match="lacks CAP_SYS_ADMIN,"):
        TaskNetwork("x", Subnet("10.0.0.0/24"), privileges=only_net).open()


# ------------------------------------------------------------------- ping

IPUTILS_OK = """\
PING 10.0.0.4 (10.0.0.4) 56(84) bytes of data.
64 bytes from 10.0.0.4: icmp_seq=1 ttl=64 time=0.912 ms
64 bytes from 10.0.0.4: icmp_seq=2 ttl=64 time=0.514 ms

--- 10.0.0.4 ping statistics ---
2 packets transmitted, 2 received, 0% packet loss, time 201ms
rtt min/avg/max/mdev = 0.514/0.713/0.912/0.199 ms
"""

IPUTILS_LOST = """\
PING 10.0.0.5 (10.0.0.5) 56(84) bytes of data.
From 10.0.0.1 icmp_seq=1 Destination Host Unreachable

--- 10.0.0.5 ping statistics ---
1 packets transmitted, 0 received, +1 errors, 100% packet loss, time 0ms
"""

BUSYBOX_OK = """\
PING 10.0.0.1 (10.0.0.1): 56 data bytes
64 bytes from 10.0.0.1: seq=0 ttl=64 time=1.234 ms

--- 10.0.0.1 ping statistics ---
1 packets transmitted, 1 packets received, 0% packet loss
round-trip min/avg/max = 1.234/1.234/1.234 ms
"""


def test_iputils_output_is_parsed() -> None:
    result = parse_ping(IPUTILS_OK, source="ns", address="10.0.0.4")
    assert (result.transmitted, result.received) == (2, 2)
    assert result.loss_percent == 0.0
    assert result.rtt_avg_ms == pytest.approx(0.713)
    assert result.ok


def test_a_ping_without_reply_is_a_result_not_an_error() -> None:
    result = parse_ping(IPUTILS_LOST, source="ns", address="10.0.0.5")
    assert (result.received, result.loss_percent) == (0, 100.0)
    assert result.rtt_avg_ms is None
    assert not result.ok


def test_busybox_output_is_parsed() -> None:
    result = parse_ping(BUSYBOX_OK, source="guest", address="10.0.0.1")
    assert (result.transmitted, result.received) == (1, 1)
    assert result.rtt_max_ms == pytest.approx(1.234)


def test_output_without_a_summary_is_an_error() -> None:
    with pytest.raises(NetworkError, match="No ping summary"):
        parse_ping("ping: command not found", source="g", address="x")


# ----------------------------------------------------------------- egress


def test_egress_commands_are_planned_and_undone() -> None:
    subnet = Subnet("10.0.0.0/24")
    network = TaskNetwork("web-1", subnet)
    network.address = subnet.allocate("web-1")
    setup, undo = egress_commands(network, uplink="eth0")
    veth = setup[0].split()[3]
    assert veth.startswith("fclab-") and len(veth) <= 15
    assert ("iptables -t nat -A POSTROUTING -s 10.0.0.4/32 -o eth0 "
            "-j MASQUERADE") in setup
    assert "sysctl -w net.ipv4.ip_forward=1" in setup
    assert undo == [
        ("iptables -t nat -D POSTROUTING -s 10.0.0.4/32 -o eth0 "
         "-j MASQUERADE"),
        f"ip link del {veth}",
    ]
    nft_setup, nft_undo = egress_commands(network, uplink="eth0",
                                          firewall="nft")
    assert any("masquerade" in c for c in nft_setup)
    assert nft_undo[0].startswith("nft delete table ip fclab_")
    with pytest.raises(NetworkError, match="/30"):
        egress_commands(network, uplink="eth0", transfer="169.254.0.0/29")
