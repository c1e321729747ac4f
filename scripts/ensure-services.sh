#!/usr/bin/env bash
# Make sure the Redis and PostgreSQL servers the store tests need are answering on their
# standard ports; start them from the local binaries if not. Never skips silently: exits
# non-zero if a server cannot be started.
set -euo pipefail

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }

if ! redis_up; then
  echo "ensure-services: starting redis-server on 127.0.0.1:6379"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 50); do redis_up && break; sleep 0.1; done
  redis_up || { echo "ensure-services: redis did not start" >&2; exit 1; }
fi

if ! pg_up; then
  echo "ensure-services: starting PostgreSQL on 127.0.0.1:5432"
  if ls /etc/postgresql >/dev/null 2>&1; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  fi
  for _ in $(seq 100); do pg_up && break; sleep 0.1; done
  pg_up || { echo "ensure-services: PostgreSQL did not start" >&2; exit 1; }
fi

# The PgBouncer tests start their own throwaway pgbouncer; they only need the binary.
pgbouncer_found() { command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]; }
if ! pgbouncer_found; then
  echo "ensure-services: installing pgbouncer (apt-get)"
  # Keep the package from starting a system pgbouncer on 6432 (a policy-rc.d that denies
  # every service start, only for this install, unless the machine already has one).
  no_starts=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && no_starts=1
  fi
  installed=0
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null; } \
    || installed=$?
  if [ -n "$no_starts" ]; then rm -f /usr/sbin/policy-rc.d; fi
  if [ "$installed" -ne 0 ] || ! pgbouncer_found; then
    echo "ensure-services: could not install pgbouncer (apt-get exit $installed)" >&2
    exit 1
  fi
fi
echo "ensure-services: redis and postgres are up, pgbouncer is installed"
