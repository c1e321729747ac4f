#!/usr/bin/env bash
# Make sure what the store tests need is here and answering: Redis on 127.0.0.1:6379,
# PostgreSQL on 127.0.0.1:5432 (trust auth, database `test`), and the redis-server,
# redis-cli, initdb/pg_ctl and pgbouncer binaries the throwaway-server tests start.
# Installs missing packages with apt-get and starts stopped servers. Never skips
# silently: exits non-zero if something cannot be had.
set -euo pipefail

say() { echo "ensure-services: $*"; }
found() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || compgen -G "/usr/lib/postgresql/*/bin/$1" >/dev/null; }

# apt_install PACKAGE...: install without letting the packages start system services
# (a policy-rc.d that denies every start, only for this install, unless one exists).
apt_install() {
  say "installing $* (apt-get)"
  local no_starts="" status=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && no_starts=1
  fi
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; } || status=$?
  if [ -n "$no_starts" ]; then rm -f /usr/sbin/policy-rc.d; fi
  [ "$status" -eq 0 ] || { say "could not install $* (apt-get exit $status)" >&2; exit 1; }
}

found redis-server && found redis-cli || apt_install redis-server redis-tools
found pg_ctl && found initdb && found pg_isready || apt_install postgresql
found pgbouncer || apt_install pgbouncer

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }

if ! redis_up; then
  say "starting redis-server on 127.0.0.1:6379"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 50); do redis_up && break; sleep 0.1; done
  redis_up || { say "redis did not start" >&2; exit 1; }
fi

if ! pg_up; then
  say "starting PostgreSQL on 127.0.0.1:5432"
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1 || true)
  [ -n "$version" ] || { say "no PostgreSQL cluster under /etc/postgresql" >&2; exit 1; }
  hba="/etc/postgresql/$version/main/pg_hba.conf"
  if ! grep -q "^host all all 127.0.0.1/32 trust" "$hba"; then
    # The tests connect as postgres without a password, as on the machines they run on.
    sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
  fi
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 100); do pg_up && break; sleep 0.1; done
  pg_up || { say "PostgreSQL did not start" >&2; exit 1; }
fi
psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE test"

say "redis and postgres are up; redis-server, initdb and pgbouncer are installed"
