#!/usr/bin/env bash
# Prepare this machine (the controller / CI runner, Debian 12, as root) for labkit's lab and tests:
# the apt packages in requirements/apt-host.txt and a running Docker engine. Quick when all is there.
set -euo pipefail
cd "$(dirname "$0")/../.."
export DEBIAN_FRONTEND=noninteractive

mapfile -t wanted < <(grep -vE '^[[:space:]]*(#|$)' requirements/apt-host.txt | awk '{print $1}')
missing=()
for pkg in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then echo "host-setup: need root to install: ${missing[*]}" >&2; exit 1; fi
  echo "host-setup: installing ${missing[*]}"
  # Packages must not start their own services here: the lab starts what it needs, configured its way.
  policy_added=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && policy_added=1
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if ((policy_added)); then rm -f /usr/sbin/policy-rc.d; fi
fi

if ! docker info >/dev/null 2>&1; then
  echo "host-setup: starting dockerd"
  setsid dockerd >/var/log/labkit-dockerd.log 2>&1 </dev/null &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  if ! docker info >/dev/null 2>&1; then
    tail -20 /var/log/labkit-dockerd.log >&2
    echo "host-setup: dockerd did not start (log: /var/log/labkit-dockerd.log)" >&2
    exit 1
  fi
fi
