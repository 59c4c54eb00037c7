#!/bin/sh
# NOT Grafana. The entrypoint of the stand-in image roles/grafana's molecule scenario runs in place of
# grafana/grafana-oss (no registry here, and no Grafana package in Debian). It reports what a process
# in the container sees, as the container's user (the role sets 472, the upstream image's), and serves
# that report on the address and port the role gives Grafana (GF_SERVER_HTTP_ADDR, GF_SERVER_HTTP_PORT),
# so verify.yml checks the role's container wiring from inside the container. Nothing here checks that
# Grafana accepts these settings.
set -u
www=/tmp/standin-www
mkdir -p "$www"
can() { if "$@" 2>/dev/null; then echo yes; else echo no; fi; }
sha() { if [ -r "$1" ]; then sha256sum <"$1" | cut -d' ' -f1; else echo unreadable; fi; }
{
    echo "uid $(id -u)"
    echo "gid $(id -g)"
    env | grep '^GF_' | sort | sed 's/^/env /'
    echo "password_file $(sha "${GF_SECURITY_ADMIN_PASSWORD__FILE:-/nonexistent}")"
    find "${GF_PATHS_PROVISIONING:-/nonexistent}" -type f | sort | while read -r f; do
        echo "provisioning $f $(sha "$f")"
    done
    find /var/lib/grafana/dashboards/labkit -type f | sort | while read -r f; do
        echo "dashboard $f $(sha "$f")"
    done
    echo "data_writable $(can sh -c 'touch /var/lib/grafana/.standin && rm /var/lib/grafana/.standin')"
    echo "config_writable $(can touch /etc/labkit-grafana/.standin)"
    echo "dashboards_writable $(can touch /var/lib/grafana/dashboards/labkit/.standin)"
} >"$www/standin.txt"
exec httpd -f -p "${GF_SERVER_HTTP_ADDR}:${GF_SERVER_HTTP_PORT}" -h "$www"
