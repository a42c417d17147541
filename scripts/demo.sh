#!/usr/bin/env bash
# Start a counting process, checkpoint it (which stops it), restore it from
# the image, and show that it carries on counting with the same pid.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p cryo -p cryo-tests --bins
bin=target/release
work=$(mktemp -d /tmp/cryo-demo.XXXXXX)
img=$work/image
log=$work/counter.log

# The counter gets stdin /dev/null, output to a file and no other
# descriptors (a pipe or socket shared with this shell would be refused:
# its other end is outside the dumped tree).
(
	for fd in $(ls /proc/$BASHPID/fd); do
		if [ "$fd" -gt 2 ]; then eval "exec $fd>&-"; fi
	done
	exec setsid "$bin/counter"
) </dev/null >"$log" 2>&1 &
pid=$!
disown "$pid"
cleanup() { kill -KILL "$pid" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
sleep 1.5
echo "== counter (pid $pid) is running:"
tail -n 3 "$log"

echo "== cryo dump -t $pid -D $img   (checkpoints and kills it)"
"$bin/cryo" dump -t "$pid" -D "$img"
sleep 0.3
echo "   process $pid exists after dump: $([ -e /proc/$pid ] && echo yes || echo no)"
echo "   image: $(du -sh "$img" | cut -f1) in $(ls "$img" | wc -l) files"
last=$(tail -n 1 "$log")
echo "   last line before the dump: $last"

echo "== cryo restore -D $img -d"
"$bin/cryo" restore -D "$img" -d
sleep 1.2
echo "== restored process $pid ($(cat /proc/$pid/comm)) continues:"
grep -A 4 -F "$last" "$log" | tail -n 5
