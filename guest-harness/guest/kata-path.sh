#!/bin/sh
# Resolves a guest PCI path the way Kata's agent does and prints the function it names:
#
#   /xt/kata-path 05/00        ->  0000:02:00.0 0x1af4 0x1110 /sys/devices/pci0000:00/0000:00:05.0/0000:02:00.0
#   /xt/kata-path 20/00/00     ->  0000:21:00.0 ...              (below pxb-pcie root bus 0x20)
#
# The agent's rules: a path of three or more elements whose first is 0x20 or more names a
# root complex (/sys/devices/pci0000:<first>) and the rest is the path below it; any other
# path starts at root complex 00. Each element is a slot with an optional function
# (`02`, `02.1`) on the current bus; every element but the last is a bridge, and the bus
# behind it is the single entry of its `pci_bus` directory (else the bus its children
# share). The walk starts on the root complex's own bus (Kata's agent starts at bus 00
# whatever the root complex, which finds nothing below an expander).
# Exit status 1 and a message on stdout when the path names nothing.
set -f
path=$1
old_ifs=$IFS
IFS=/
set -- $path
IFS=$old_ifs
set +f
rc=00
case $1 in
    [0-9a-fA-F][0-9a-fA-F])
        if [ $# -ge 3 ] && [ $((0x$1)) -ge 32 ]; then
            rc=$1
            shift
        fi
        ;;
esac
dir=/sys/devices/pci0000:$rc
bus=0000:$rc
[ -d "$dir" ] || { echo "no root complex $dir"; exit 1; }
while [ $# -gt 0 ]; do
    hop=$1
    shift
    case $hop in
        *.*) slot=${hop%.*} fn=${hop#*.} ;;
        *) slot=$hop fn=0 ;;
    esac
    bdf=$bus:$slot.$fn
    dir=$dir/$bdf
    [ -d "$dir" ] || { echo "nothing at $dir"; exit 1; }
    [ $# -gt 0 ] || break
    next=
    if [ -d "$dir/pci_bus" ]; then
        for b in "$dir"/pci_bus/*; do
            [ -n "$next" ] && { echo "$bdf has more than one bus"; exit 1; }
            next=${b##*/}
        done
    fi
    if [ -z "$next" ]; then
        for c in "$dir"/????:??:??.?; do
            [ -e "$c" ] || continue
            c=${c##*/}
            next=${c%:*}
            break
        done
    fi
    [ -n "$next" ] || { echo "$bdf has no bus behind it"; exit 1; }
    bus=$next
done
read -r vendor < "$dir/vendor"
read -r device < "$dir/device"
echo "$bdf $vendor $device $dir"
