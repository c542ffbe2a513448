#!/bin/sh
# /init of the benchmark guest (tests/bench/disk.sh), appended to the tiny
# guest's initramfs as a second cpio with Debian's fio and its libraries
# (tests/guest/build-guest.sh --bench OUTDIR writes OUTDIR/initramfs-bench.gz;
# the kernel unpacks both archives, later files win, so this replaces /init).
#
# novacron.bench=PHASE[,PHASE...] on the kernel command line runs, in order:
#   perf     prefill vda's first 256 MiB (untimed), then novacron.reps=N
#            (default 3) rounds of: 1 MiB sequential writes, 128 MiB, QD1;
#            4 KiB random writes, 4096 of them, QD1; 4 KiB random writes,
#            16384 of them, QD32 (all O_DIRECT, libaio, random data, and a
#            final fsync that fio counts in the job's time)
#   lag      1 MiB sequential writes at novacron.rate=MB/s (default 50) for
#            novacron.secs=S (default 20), O_DIRECT
#   outage   prints NOVACRON-BENCH-OUTAGE-READY, sleeps 10 s (the host cuts
#            the link), writes 64 MiB once (1 MiB blocks from 512 MiB on,
#            O_DIRECT, 20 MB/s), prints NOVACRON-BENCH-OUTAGE-WRITTEN and idles
#            60 s (the host restores the link and waits for the resync)
# Each fio job prints one line:
#   NOVACRON-BENCH <job> <round> bytes=<B> ms=<fio's job time> iops=<N> bw_kib=<KiB/s> lat_us=<mean>
# fio's own time includes the final fsync (end_fsync). Then
# NOVACRON-BENCH-DONE and the guest powers off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
while read -r m; do insmod "/lib/modules/$m.ko" 2>/dev/null; done < /lib/modules/load-order
echo NOVACRON-GUEST-UP
for _ in $(seq 1 50); do [ -b /dev/vda ] && break; sleep 0.2; done
[ -b /dev/vda ] && echo NOVACRON-DISK=vda

phases=; reps=3; rate=50; secs=20
for a in $(cat /proc/cmdline); do
    case "$a" in
        novacron.bench=*) phases=${a#novacron.bench=} ;;
        novacron.reps=*) reps=${a#novacron.reps=} ;;
        novacron.rate=*) rate=${a#novacron.rate=} ;;
        novacron.secs=*) secs=${a#novacron.secs=} ;;
    esac
done
# Same durability on every path: a write cache that the guest flushes at
# each fsync. qemu-storage-daemon's vhost-user-blk export starts with
# wce=0 ("write through": it flushes after every write); virtio-blk's
# cache_type switches the device's cache on (VIRTIO_BLK_F_CONFIG_WCE).
wc=$(cat /sys/block/vda/queue/write_cache)
[ "$wc" = "write back" ] || echo "write back" > /sys/block/vda/cache_type
echo "NOVACRON-BENCH-INFO wc=$wc now=$(cat /sys/block/vda/queue/write_cache) mq=$(ls /sys/block/vda/mq | wc -l) fio=$(fio --version)"

# job NAME ROUND FIO-ARGS...: one fio job on vda, one result line (terse v3:
# field 47 write KiB, 48 write KiB/s, 49 write IOPS, 50 write ms, 81 total latency
# mean us).
job() {
    name=$1 round=$2; shift 2
    if fio --name="$name" --filename=/dev/vda --direct=1 --ioengine=libaio \
        --output-format=terse --terse-version=3 "$@" > /tmp/fio.out 2> /tmp/fio.err; then
        awk -F';' -v n="$name" -v r="$round" \
            '{ printf "NOVACRON-BENCH %s %s bytes=%d ms=%d iops=%s bw_kib=%s lat_us=%s\n", n, r, $47 * 1024, $50, $49, $48, $81 }' \
            /tmp/fio.out
    else
        echo "NOVACRON-BENCH-FAILED $name $round $(tr '\n' ' ' < /tmp/fio.err)"
    fi
}

for phase in $(echo "$phases" | tr , ' '); do
    case "$phase" in
        perf)
            job prefill 0 --rw=write --bs=1m --size=256m --end_fsync=1
            sleep 3
            r=1
            while [ "$r" -le "$reps" ]; do
                job seq1m "$r" --rw=write --bs=1m --size=128m --iodepth=1 --end_fsync=1
                sleep 2
                job rand4k-qd1 "$r" --rw=randwrite --bs=4k --size=256m --io_size=16m --iodepth=1 --end_fsync=1
                sleep 2
                job rand4k-qd32 "$r" --rw=randwrite --bs=4k --size=256m --io_size=64m --iodepth=32 \
                    --iodepth_batch_submit=8 --end_fsync=1
                sleep 2
                r=$((r + 1))
            done
            ;;
        lag)
            echo NOVACRON-BENCH-LAG-START
            job lag 1 --rw=write --bs=1m --size=512m --rate="${rate}m" --time_based --runtime="$secs"
            echo NOVACRON-BENCH-LAG-END
            ;;
        outage)
            echo NOVACRON-BENCH-OUTAGE-READY
            sleep 10
            job outage 1 --rw=write --bs=1m --offset=512m --size=64m --rate=20m --end_fsync=1
            echo NOVACRON-BENCH-OUTAGE-WRITTEN
            sleep 60
            ;;
    esac
done
echo NOVACRON-BENCH-DONE
sync
poweroff -f
