"""The lab network's address plan (tests/lab/labctl.py): fixed host addresses never fall in the range
Docker hands out to other containers (molecule's instances), so a stopped lab host can always start again."""

from __future__ import annotations

import ipaddress

import labctl


def test_lab_hosts_have_fixed_addresses_outside_the_dynamic_range():
    subnet = ipaddress.ip_network(labctl.SUBNET)
    dynamic = ipaddress.ip_network(labctl.dynamic_range())
    assert dynamic.subnet_of(subnet)
    gateway = ipaddress.ip_address(labctl.gateway())
    assert gateway in subnet and gateway not in dynamic
    addresses = [ipaddress.ip_address(host.address) for host in labctl.lab_hosts()]
    assert len(set(addresses)) == len(addresses)
    for address in addresses:
        assert address in subnet and address not in dynamic and address != gateway, address
