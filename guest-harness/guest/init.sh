#!/bin/sh
# First process of the test guest: mount the kernel file systems, load the modules the
# run asked for, run the optional local setup, then hand over to the reporter.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /run
if [ -f /xt/modules ]; then
    while read -r m; do
        insmod "$m" || echo "@@XT ERROR insmod $m failed"
    done < /xt/modules
fi
if [ -x /xt/setup ]; then
    /xt/setup || echo "@@XT ERROR /xt/setup failed"
fi
exec /bin/sh /xt/reporter.sh
