#!/usr/bin/env bash
# Installs the Debian packages podvisor's build and tests need; quiet and idempotent.
set -euo pipefail

packages=(
  pkg-config          # build: links system libraries
  libseccomp-dev      # build: seccomp filters
  docker-registry     # tests: a real OCI registry
  busybox-static      # tests: the binary test images are built from
  apache2-utils       # tests: htpasswd for the basic-auth registry
  nftables            # built-in network: NAT and hostPorts
  iptables            # built-in network: fallback NAT backend (tested too)
  containernetworking-plugins  # CNI: the reference plugins (bridge, host-local, portmap, ...)
  openssl             # tests: a certificate for the HTTPS streaming server
  kubectl             # tests: the real client against podvisor up
)

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "cargo (Rust 1.90+) is required" >&2; exit 1; }
