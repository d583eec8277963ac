#!/bin/sh
# Guest side of the reporter protocol (guest-harness/src/reporter.rs parses it). Every line the
# host reads starts with "@@XT "; everything else on the console is ignored there.
#
#   SNAP seq uptime            a full snapshot follows, up to END seq
#   PCI bdf vendor device class
#   INO bdf inode              inode of the device's sysfs directory: a new number each
#                              time a function appears, so a device re-plugged at the same
#                              address with the same ids and BARs still reads as new
#   RES bdf index start end flags      each `resource` line with non-zero flags
#   LINK path                  sysfs device path, e.g. ../../../devices/pci0000:00/0000:00:01.0/0000:01:00.0
#   DRV bdf driver
#   ZPCI bdf uid function_id   s390x zPCI functions
#   NUMA bdf node              the function's NUMA node, when the kernel knows one
#   CCW busid cutype devtype online
#   CDRV busid driver
#   END seq
#   READY uptime release       once, after the first snapshot
#   KMSG text                  kernel messages about BARs, windows and pciehp
#   OUT id line / RC id status output and exit status of a host command
#   ERROR text
#
# Host commands arrive on the console as lines "<id> <shell command>".
P='@@XT'

kmsg() {
    # awk filters in one process; a shell loop per record lags seconds behind at boot.
    while :; do
        cat /dev/kmsg | awk -v p="$P" '
            /BAR|no space|can.t assign|failed to assign|pciehp|bridge window/ {
                sub(/^[^;]*;/, ""); print p " KMSG " $0; fflush()
            }'
        sleep 1
    done
}

commands() {
    while read -r id cmd; do
        case "$id" in '' | *[!0-9]*) continue ;; esac
        sh -c "$cmd" > /tmp/xt-out 2>&1 < /dev/null
        rc=$?
        while IFS= read -r l || [ -n "$l" ]; do
            echo "$P OUT $id $l"
        done < /tmp/xt-out
        echo "$P RC $id $rc"
    done
}

signature() {
    cat /sys/bus/pci/devices/*/resource /sys/bus/ccw/devices/*/online 2>/dev/null
    ls -iLd /sys/bus/pci/devices/* 2>/dev/null
    echo /sys/bus/pci/devices/* /sys/bus/pci/drivers/*/*:* /sys/bus/ccw/devices/* /sys/bus/ccw/drivers/*/*.*.*
}

snapshot() {
    seq=$((seq + 1))
    read -r up _ < /proc/uptime
    echo "$P SNAP $seq $up"
    for d in /sys/bus/pci/devices/*; do
        b=${d##*/}
        read -r v < "$d/vendor" && read -r id < "$d/device" && read -r c < "$d/class" || continue
        echo "$P PCI $b $v $id $c"
        i=0
        while read -r s e f; do
            [ "$f" = 0x0000000000000000 ] || echo "$P RES $b $i $s $e $f"
            i=$((i + 1))
        done < "$d/resource"
        if [ -r "$d/uid" ] && read -r u < "$d/uid" && read -r fid < "$d/function_id"; then
            echo "$P ZPCI $b $u $fid"
        fi
        if [ -r "$d/numa_node" ] && read -r nn < "$d/numa_node" && [ "$nn" != -1 ]; then
            echo "$P NUMA $b $nn"
        fi
    done
    ls -iLd /sys/bus/pci/devices/* 2>/dev/null | while read -r ino path; do
        echo "$P INO ${path##*/} $ino"
    done
    ls -l /sys/bus/pci/devices/ | while read -r line; do
        case "$line" in *" -> "*) echo "$P LINK ${line##* }" ;; esac
    done
    for l in /sys/bus/pci/drivers/*/????:??:??.?; do
        [ -e "$l" ] || continue
        x=${l%/*}
        echo "$P DRV ${l##*/} ${x##*/}"
    done
    for d in /sys/bus/ccw/devices/*; do
        read -r cu < "$d/cutype" && read -r dt < "$d/devtype" && read -r on < "$d/online" || continue
        echo "$P CCW ${d##*/} $cu $dt $on"
    done
    for l in /sys/bus/ccw/drivers/*/*.*.*; do
        [ -e "$l" ] || continue
        x=${l%/*}
        echo "$P CDRV ${l##*/} ${x##*/}"
    done
    echo "$P END $seq"
}

stty -echo 2>/dev/null
exec 3<&0
kmsg &
commands <&3 &
seq=0
old=
ready=
while :; do
    new=$(signature 2>/dev/null)
    if [ "$new" != "$old" ]; then
        old=$new
        snapshot 2>/dev/null
    fi
    if [ -z "$ready" ]; then
        ready=1
        read -r up _ < /proc/uptime
        echo "$P READY $up $(uname -r)"
    fi
    sleep 0.2
done
