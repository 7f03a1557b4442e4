#!/usr/bin/env bash
# Install the Debian packages that some tests use as real services. Best effort: without root or
# apt the tests that need them skip with a reason naming the missing package.
set -u
PKGS="slurm-wlm munge chromium chromium-driver openssh-server openssh-client pdsh"
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "system-deps: not root or no apt-get; tests needing:$missing will be skipped"; exit 0
fi
echo "system-deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null 2>&1 || true
apt-get install -y -qq --no-install-recommends $missing >/dev/null 2>&1 \
  || echo "system-deps: could not install$missing; tests needing them will be skipped"
exit 0
