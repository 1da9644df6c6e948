#!/bin/sh
# Debian's haproxy (the session-affine router of `make cluster`), redis-server (the shared KV tier's
# first backend) and openssl (the test set-up's TLS certificates for it), for the scale-out tests.
set -eu
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends haproxy redis-server openssl >/dev/null
# The packages may start system instances (haproxy's, redis on 6379); the tests run their own, so stop those.
if command -v service >/dev/null 2>&1; then
    $SUDO service haproxy stop >/dev/null 2>&1 || true
    $SUDO service redis-server stop >/dev/null 2>&1 || true
fi
