#!/bin/bash
# Builds the lab's Debian image: systemd, Docker and the kernels under test, plus the lab's own
# units (a dummy interface holding the IMDS addresses, a mock IMDS, the scenario runner).
# Run by `cargo xtask lab` in a mount namespace of its own (unshare -m): the chroot's mounts
# vanish with it. Arguments: ROOT (an empty directory), KERNEL_DEBS_DIR, MIRROR.
set -euo pipefail
root=$1 debs=$2 mirror=$3

debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,udev,kmod,iproute2,initramfs-tools,python3,procps,ca-certificates,busybox-static,curl,e2fsprogs,dbus,apt,util-linux \
    bookworm "$root" "$mirror" >/dev/null

mount --make-rprivate /
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --rbind /dev "$root/dev"
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive "$@"; }

# Nothing starts in the chroot.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
echo "deb $mirror bookworm main" >"$root/etc/apt/sources.list"
in_root apt-get -qq update
# The cloud kernels enable AppArmor: Docker needs its parser to load the default profile.
in_root apt-get -qq install -y --no-install-recommends docker.io containerd runc iptables apparmor >/dev/null
cp "$debs"/*.deb "$root/tmp/"
in_root sh -c 'dpkg -i /tmp/*.deb >/dev/null'
rm -f "$root"/tmp/*.deb "$root/usr/sbin/policy-rc.d"
in_root apt-get -qq clean

echo lab >"$root/etc/hostname"
echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' >"$root/etc/fstab"
in_root passwd -d root >/dev/null
# A user and a service account for the scenario's workloads.
in_root useradd --create-home --uid 1000 alice
in_root useradd --system --no-create-home cwagent

# Docker's image: busybox and its applets, imported at run time (no registry is reachable).
mkdir -p "$root/opt/lab/busybox/bin"
cp "$root/bin/busybox" "$root/opt/lab/busybox/bin/"
for applet in $(chroot "$root" /bin/busybox --list); do
    # The list names busybox itself: a link there would replace the binary.
    [ "$applet" = busybox ] || ln -sf busybox "$root/opt/lab/busybox/bin/$applet"
done
tar -C "$root/opt/lab/busybox" -cf "$root/opt/lab/busybox.tar" .
rm -rf "$root/opt/lab/busybox"

install -m 755 "$(dirname "$0")/mock-imds.py" "$root/opt/lab/mock-imds.py"
cp "$(dirname "$0")"/units/*.service "$root/etc/systemd/system/"
in_root systemctl enable lab-net.service lab-imds.service lab-scenario.service >/dev/null 2>&1
# `--shell`: root logs in on the console without a password.
mkdir -p "$root/etc/systemd/system/serial-getty@ttyS0.service.d"
printf '[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200 %%I $TERM\n' \
    >"$root/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf"
