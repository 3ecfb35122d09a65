#!/usr/bin/env bash
# Installs what the tests and the benchmark run for real: PostgreSQL (15 where Debian has it), redis-server, and
# the docker-compose validator. Installs only what is missing; needs root (apt-get) for that.
set -euo pipefail

have_postgres() { compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null; }
missing=()
have_postgres || missing+=(postgres)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v curl >/dev/null || missing+=(curl)
[ "${1:-}" = "--with-wrk" ] && { command -v wrk >/dev/null || missing+=(wrk); }
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "Missing: ${missing[*]}. Install them (PostgreSQL server, redis-server, docker-compose) or run as root." >&2
  exit 1
fi

packages=()
for item in "${missing[@]}"; do
  case "$item" in
    postgres) packages+=(postgresql) ;;
    *) packages+=("$item") ;;
  esac
done
# Never let package scripts start system-wide services: the tests start their own servers on free ports.
# A machine's own policy-rc.d is left as it is.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
# A freshly booted machine's own apt run may hold the lock for a while.
apt_options=(-o DPkg::Lock::Timeout=300)
apt-get "${apt_options[@]}" update -qq
if [[ " ${packages[*]} " == *" postgresql "* ]] && apt-cache show postgresql-15 >/dev/null 2>&1; then
  packages=("${packages[@]/postgresql/postgresql-15}")
fi
apt-get "${apt_options[@]}" install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
echo "Installed: ${packages[*]}"
