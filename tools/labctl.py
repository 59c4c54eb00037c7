#!/usr/bin/env python3
"""labctl: the local lab of real systemd hosts that labkit is tested in.

Sub-commands (``make lab`` and friends call these; the work is done in labkit_lab.lab):

``image``     build the node image once: debootstrap Debian 12 with systemd and python3, ``docker import``.
              The tag carries a hash of the recipe, so the image is rebuilt only when the recipe changes.
``infra``     the lab's private Docker network and a caching apt proxy (apt-cacher-ng) listening only on
              loopback and the lab network's gateway.
``images``    infra + the lab's service images (Prometheus, Alertmanager, cAdvisor) and their archives.
``up``        image + infra + the lab's hosts (containers booting systemd) + ``inventory/lab/hosts.yml``.
``status``    what runs where and how to reach it.
``down``      remove the hosts and the network (the image and the apt cache stay for the next run).
``job-image`` load the lab's job image into the GPU nodes' Docker.
``proxy-url`` print the apt proxy URL lab hosts use.
"""

from __future__ import annotations

import sys

from labkit_lab import lab
from labkit_lab.common import command_parser


def main(argv: list[str] | None = None) -> int:
    parser, sub = command_parser("labctl", __doc__, "build or reuse the node image")
    sub.add_parser("infra", help="lab network and apt proxy")
    sub.add_parser(
        "images", help="build the lab's service images (Prometheus, Alertmanager, cAdvisor) and archives"
    )
    sub.add_parser("up", help="start the lab's hosts and write inventory/lab/hosts.yml")
    st = sub.add_parser("status", help="what runs where")
    st.add_argument("--json", action="store_true")
    sub.add_parser("down", help="remove the lab (keeps the image and the apt cache)")
    sub.add_parser("job-image", help=f"load the lab's job image ({lab.JOB_IMAGE}) into the GPU nodes' Docker")
    sub.add_parser("proxy-url", help="print the apt proxy URL lab hosts use")
    args = parser.parse_args(argv)
    if args.command == "image":
        print(lab.build_image(force=args.force))
    elif args.command == "infra":
        lab.infra()
    elif args.command == "images":
        lab.infra()
        lab.build_service_images()
    elif args.command == "up":
        lab.up()
    elif args.command == "status":
        lab.status(as_json=args.json)
    elif args.command == "down":
        lab.down()
    elif args.command == "job-image":
        lab.job_image()
    elif args.command == "proxy-url":
        print(lab.apt_proxy_url())
    return 0


if __name__ == "__main__":
    sys.exit(main())
