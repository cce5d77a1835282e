#!/usr/bin/env bash
# Installs the Debian packages Sekisho's tests talk to as real peers:
# DCMTK, Orthanc (+DICOMweb plugin), nginx, SoftHSM2, ClamAV, poppler, rsyslog,
# ISO tools.  Safe to run repeatedly: it only installs what is missing.
set -euo pipefail

PACKAGES=(
  python3-venv openssl curl ca-certificates
  dcmtk
  orthanc orthanc-dicomweb
  nginx-light
  softhsm2 opensc
  clamav clamav-daemon
  poppler-utils
  rsyslog rsyslog-gnutls
  genisoimage xorriso
  procps util-linux
)

if [ "${1:-}" = "--minimal" ]; then
  # What `make run` needs: a venv-capable Python, openssl and curl.
  PACKAGES=(python3-venv openssl curl ca-certificates)
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "installing system packages: ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
# Services must not start during installation (tests start their own copies).
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod 755 /usr/sbin/policy-rc.d
  trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
