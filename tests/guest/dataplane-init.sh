#!/bin/sh
# /init of the tests/dataplane.rs guest, appended to the tiny guest's
# initramfs as a second cpio (the kernel unpacks both; later files win).
# Writes dp.n= numbered 4 KiB records to /dev/vda, record i at block i, each
# with dd oflag=direct conv=fsync on CPU i mod nproc (with one virtqueue per
# CPU the records alternate between queues), and prints "DP-REC i <guest µs>"
# only after that dd returned; "DP-IOERR i" if it failed. Then powers off.
# Record i is the line "%08d\n" of i, repeated and cut at 4096 bytes.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
while read -r m; do insmod "/lib/modules/$m.ko" 2>/dev/null; done < /lib/modules/load-order
echo NOVACRON-GUEST-UP
for _ in $(seq 1 50); do [ -b /dev/vda ] && break; sleep 0.2; done
n=0; for a in $(cat /proc/cmdline); do case "$a" in dp.n=*) n=${a#dp.n=};; esac; done
# busybox date has no %N; awk %d would overflow at 2^31.
t() { adjtimex | awk '/tv_sec/{s=$2}/tv_usec/{u=$2}END{printf "%.0f\n", s*1000000+u}'; }
echo "DP-INFO size=$(cat /sys/block/vda/size) lbs=$(cat /sys/block/vda/queue/logical_block_size) serial=$(cat /sys/block/vda/serial 2>/dev/null) wc=$(cat /sys/block/vda/queue/write_cache) mq=$(ls /sys/block/vda/mq | wc -l)"
cpus=$(nproc)
i=1
while [ "$i" -le "$n" ]; do
    yes "$(printf %08d "$i")" | head -c 4096 > /tmp/rec
    if taskset -c $((i % cpus)) dd if=/tmp/rec of=/dev/vda bs=4096 seek="$i" count=1 oflag=direct conv=fsync 2>/tmp/err; then
        echo "DP-REC $i $(t)"
    else
        echo "DP-IOERR $i $(tr '\n' ' ' < /tmp/err)"
    fi
    i=$((i + 1))
done
echo DP-DONE
sync
poweroff -f
