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
  iproute2            # VM pods: tap and bridge in the pod namespace
  libvirt-dev         # build: the VM backend links libvirt
  libvirt-daemon-system  # VM pods: libvirtd and virtlogd
  qemu-system-x86     # VM pods: QEMU
  qemu-guest-agent    # VM tests: the guest agent copied into the test initramfs
  linux-image-cloud-amd64  # VM tests: the test VMs' kernel
  syslinux syslinux-common mtools dosfstools  # VM tests: the bootable containerDisk
  xorriso             # VM pods: the cloud-init seed ISO
  protobuf-compiler   # build: etcd-client compiles etcd's protos with protoc
  etcd-server         # tests: real etcd members for the etcd store backend
  bind9-dnsutils      # tests: dig asks the cluster DNS over UDP and TCP
)

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
# qemu-img comes with qemu-utils, which must match qemu-system-common: a newer
# qemu-utils (e.g. from backports) "Breaks" Debian 12's qemu-system-x86, and
# installing that alone would remove qemu-img. So qemu-utils is always named
# in the same install, pinned to the version apt would install for
# qemu-system-common (a downgrade when a newer one is installed).
qemu_utils_wanted() {
  local candidate installed
  candidate=$(apt-cache policy qemu-system-common 2>/dev/null | awk '/Candidate:/ {print $2}')
  installed=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
  if [ -n "$candidate" ] && [ "$candidate" != "(none)" ] && [ "$installed" != "$candidate" ]; then
    echo "qemu-utils=$candidate"
  fi
}
install_missing() {
  local extra
  extra=$(qemu_utils_wanted)
  [ -n "$extra" ] && missing+=("$extra")
  echo "installing: ${missing[*]}"
  apt-get install -y -qq --no-install-recommends --allow-downgrades "${missing[@]}" >/dev/null
}
if ((${#missing[@]})) || [ -n "$(qemu_utils_wanted)" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  install_missing
fi
command -v cargo >/dev/null || { echo "cargo (Rust 1.90+) is required" >&2; exit 1; }
