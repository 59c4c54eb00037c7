"""The lab network's address plan (tools/labkit_lab/lab.py): fixed host addresses never fall in the range
Docker hands out to other containers (molecule's instances), so a stopped lab host can always start again."""

from __future__ import annotations

import ipaddress

from labkit_lab import lab


def test_lab_hosts_have_fixed_addresses_outside_the_dynamic_range():
    subnet = ipaddress.ip_network(lab.SUBNET)
    dynamic = ipaddress.ip_network(lab.dynamic_range())
    assert dynamic.subnet_of(subnet)
    gateway = ipaddress.ip_address(lab.gateway())
    assert gateway in subnet and gateway not in dynamic
    addresses = [ipaddress.ip_address(host.address) for host in lab.lab_hosts()]
    assert len(set(addresses)) == len(addresses)
    for address in addresses:
        assert address in subnet and address not in dynamic and address != gateway, address
