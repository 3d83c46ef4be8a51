#!/bin/busybox sh
# /init of Ferry's Linux test guest. `linux_guest.rs` packs it with a static
# busybox (Debian busybox-static) and, if available, the kernel package's
# lib/modules/*/kernel/fs tree into an initramfs; the kernel is Debian's.
#
# It builds a memory mix in tmpfs (see LinuxGuestConfig for the knobs, passed
# as ferry_*=N on the kernel command line), then prints `tick N` on the
# console (ttyS0) every ferry_tick_ms while a background loop dirties
# ferry_dirty_kib KiB of a file per tick. Serial input `v` re-checks the md5
# sums of the files it generated (`verify ok tick=0 sum=...` / `verify FAIL ...`).

/bin/busybox mkdir -p /proc /sys /dev /tmp /run
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
export PATH=/bin
mount -t tmpfs -o size=90% tmpfs /tmp
mount -t tmpfs tmpfs /run
stty -echo < /dev/console 2>/dev/null

copies=2
text_mib=32
rand_mib=16
hot_mib=4
dirty_kib=256
tick_ms=100
seed=42
for kv in $(cat /proc/cmdline); do
	case "$kv" in
	ferry_copies=*) copies=${kv#*=} ;;
	ferry_text_mib=*) text_mib=${kv#*=} ;;
	ferry_rand_mib=*) rand_mib=${kv#*=} ;;
	ferry_hot_mib=*) hot_mib=${kv#*=} ;;
	ferry_dirty_kib=*) dirty_kib=${kv#*=} ;;
	ferry_tick_ms=*) tick_ms=${kv#*=} ;;
	ferry_seed=*) seed=${kv#*=} ;;
	esac
done
echo "ferry-linux-guest v1 kernel=$(uname -r) copies=$copies text_mib=$text_mib rand_mib=$rand_mib hot_mib=$hot_mib dirty_kib=$dirty_kib tick_ms=$tick_ms"
t0=$(cut -d' ' -f1 /proc/uptime)

# 1. Duplicate pages: "container layers" with copies of the same binaries
#    (busybox and a few large module directories of the image).
i=1
while [ "$i" -le "$copies" ]; do
	mkdir -p /tmp/layer$i/bin /tmp/layer$i/modules
	cp /bin/busybox /tmp/layer$i/bin/busybox
	for d in btrfs xfs ext4 nfs; do
		for src in /lib/modules/*/kernel/fs/$d; do
			[ -d "$src" ] && cp -a "$src" /tmp/layer$i/modules/
		done
	done
	i=$((i + 1))
done

t_layers=$(cut -d' ' -f1 /proc/uptime)

# 2. Compressible text: half numbers (seq), half application logs (awk,
#    fixed seed, so every guest of the image generates the same text).
mkdir -p /tmp/data
seq 1 $((text_mib * 65536)) > /tmp/data/numbers.txt
t_seq=$(cut -d' ' -f1 /proc/uptime)
awk -v n=$((text_mib * 4500)) -v seed="$seed" 'BEGIN {
	srand(seed)
	split("GET POST PUT DELETE", verb, " ")
	split("/api/v1/orders /api/v1/users /api/v1/cart /static/app.js /healthz /api/v2/search", path, " ")
	split("200 200 200 200 201 204 304 404 500", status, " ")
	for (i = 0; i < n; i++) {
		s = int(i / 10)
		printf "2026-11-22T%02d:%02d:%02d.%03dZ web-%02d nginx[%d]: %d.%d.%d.%d - - \"%s %s?id=%d HTTP/1.1\" %s %d %.3f\n",
			int(s / 3600) % 24, int(s / 60) % 60, s % 60, int(rand() * 1000), int(rand() * 8),
			1000 + int(rand() * 50), 10, int(rand() * 4), int(rand() * 256), int(rand() * 256),
			verb[1 + int(rand() * 4)], path[1 + int(rand() * 6)], int(rand() * 100000),
			status[1 + int(rand() * 9)], int(rand() * 60000), rand() * 2
	}
}' > /tmp/data/access.log

t_awk=$(cut -d' ' -f1 /proc/uptime)

# 3. Incompressible data, different in every boot.
dd if=/dev/urandom of=/tmp/data/random.bin bs=1M count="$rand_mib" 2>/dev/null

# 4. The file the workload keeps rewriting, starting as log text.
head -c $((hot_mib * 1048576)) /tmp/data/access.log > /tmp/hot.bin

find /tmp/layer* /tmp/data -type f 2>/dev/null | xargs md5sum > /run/sums
sum=$(md5sum < /run/sums | cut -c1-8)
t1=$(cut -d' ' -f1 /proc/uptime)
for f in /tmp/layer* /tmp/data/* /tmp/hot.bin /lib/modules; do
	echo "mix $(du -sk "$f" | tr '\t' ' ')"
done
free -k | awk 'NR == 2 { print "mem total_kib=" $2 " used_kib=" $3 " free_kib=" $4 " shared_kib=" $5 " cache_kib=" $6 }'
echo "built in ${t0}s..${t1}s of uptime (layers until ${t_layers}, seq ${t_seq}, awk ${t_awk}), sum=$sum"

# Serial commands: `v` verifies the generated files (not the hot file).
(
	while read -r cmd; do
		case "$cmd" in
		v)
			if md5sum -c -s /run/sums; then
				echo "verify ok tick=0 sum=$sum"
			else
				echo "verify FAIL files $(md5sum -c /run/sums 2>&1 | grep -v ': OK$' | head -n 3 | tr '\n' ' ')"
			fi
			;;
		esac
	done < /dev/console
) &

# The workload: each tick, rewrite dirty_kib KiB of the hot file at a
# rotating offset, half from /dev/urandom, half copied from the log.
if [ "$dirty_kib" -ge 8 ] && [ "$hot_mib" -gt 0 ]; then
	(
		half=$((dirty_kib / 8))
		slots=$((hot_mib * 256 / (half * 2)))
		[ "$slots" -ge 1 ] || slots=1
		n=0
		while :; do
			off=$(((n % slots) * half * 2))
			dd if=/dev/urandom of=/tmp/hot.bin bs=4k count=$half seek=$off conv=notrunc 2>/dev/null
			dd if=/tmp/data/access.log of=/tmp/hot.bin bs=4k count=$half skip=$(((n * half) % 1024)) seek=$((off + half)) conv=notrunc 2>/dev/null
			n=$((n + 1))
			usleep $((tick_ms * 1000))
		done
	) &
fi

echo ready
n=0
while :; do
	n=$((n + 1))
	echo "tick $n"
	usleep $((tick_ms * 1000))
done
