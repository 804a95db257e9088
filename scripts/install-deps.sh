#!/usr/bin/env bash
# Debian packages Tessera builds and tests with. Installs only what is missing.
set -euo pipefail
PKGS=(
  libc6-dev gcc g++ git            # the linker rustc calls, libFuzzer's C++ (fuzz.sh), git for --version
  etcd-server etcd-client          # the datastore, and etcdctl for the test bed's health checks
  protobuf-compiler libprotobuf-dev  # etcd-client's build script compiles etcd's protos
  iproute2 iputils-ping procps util-linux  # the test bed: namespaces, veth, bridges, ping, sysctl, nsenter
  containernetworking-plugins iptables     # reference CNI plugins (chaining tests, ptp+host-local benchmark)
  podman runc busybox-static               # a real container runtime as CNI client, and its rootfs
  bird2 tcpdump                            # the BGP interop peer, and captures of its messages
  frr                                      # bfdd, the BFD interop peer
  qemu-system-x86 cpio xz-utils            # IPIP and netkit end to end in VMs (this kernel has neither); xz unpacks the 6.12 kernel's modules
  iperf3                                   # throughput in tests, benchmarks and the IPIP VMs
  nftables                                 # the node agent's natOutgoing rules (nft -j)
  libssl3 openssl                          # test certificate authorities for etcd over TLS
  debian-archive-keyring mmdebstrap        # the image's base, made from Debian's packages (no registry)
  python3-venv python3-minimal             # a venv for kubernetes-validate (PyPI), which checks the manifests
  binutils binutils-x86-64-linux-gnu ruby ruby3.1  # strip for the image; `ruby -c` checks deploy/vagrant/Vagrantfile (Vagrant itself cannot run here)
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Debian's cloud kernel (with its ipip module) for the IPIP test VMs, unpacked, not installed.
VMDIR=/var/cache/tessera/vm
if ! ls "$VMDIR"/root/boot/vmlinuz-* >/dev/null 2>&1; then
  pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
  mkdir -p "$VMDIR"
  (cd "$VMDIR" && apt-get download -qq "$pkg" && dpkg-deb -x "${pkg}"_*.deb root && rm -f "${pkg}"_*.deb)
fi

# netkit pods in VMs: a kernel built with netkit (Linux 6.7+, CONFIG_NETKIT) and a QEMU whose
# TCG boots it reliably. Bookworm's 6.1 has no netkit and its QEMU 7.2 corrupted a 6.12
# guest's memory while booting beside other guests, so on bookworm both come from
# bookworm-backports (QEMU 10, kernel 6.12); a newer release has them already.
. /etc/os-release
target=()
if [ "${VERSION_CODENAME:-}" = bookworm ]; then
  if [ ! -f /etc/apt/sources.list.d/tessera-backports.sources ]; then
    printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\n' \
      > /etc/apt/sources.list.d/tessera-backports.sources
    apt-get update -qq
  fi
  target=(-t bookworm-backports)
fi
qemu_major=$(qemu-system-x86_64 --version | awk 'NR == 1 {split($4, v, "."); print v[1]}')
if [ "${qemu_major:-0}" -lt 8 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${target[@]}" qemu-system-x86
fi
NETKIT_VMDIR=/var/cache/tessera/vm-netkit
if ! ls "$NETKIT_VMDIR"/root/boot/vmlinuz-* >/dev/null 2>&1; then
  pkg=$(apt-cache depends "${target[@]}" linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
  mkdir -p "$NETKIT_VMDIR"
  (cd "$NETKIT_VMDIR" && apt-get download -qq "${target[@]}" "$pkg" && dpkg-deb -x "${pkg}"_*.deb root && rm -f "${pkg}"_*.deb)
  grep -q '^CONFIG_NETKIT=[ym]' "$NETKIT_VMDIR"/root/boot/config-* || { echo "install-deps: $pkg has no netkit" >&2; exit 1; }
fi

# kubernetes-validate (PyPI) checks deploy/kubernetes against the Kubernetes OpenAPI schemas.
VENV=/var/cache/tessera/venv
if ! "$VENV"/bin/kubernetes-validate --version >/dev/null 2>&1; then
  mkdir -p /var/cache/tessera
  /usr/bin/python3 -m venv "$VENV"
  "$VENV"/bin/pip install -q kubernetes-validate==1.37.0
fi
