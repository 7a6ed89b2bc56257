#!/bin/sh
# /init of the VM tests' initramfs, run by busybox sh as PID 1: prepare the system the tests
# expect, run each test executable, print one result line per executable on the serial console,
# power off. `cargo xtask vm-test` writes the settings below into /etc/edgeplane-vm.conf:
#   MODULES        kernel modules to insmod, dependencies first
#   JOBS           runs to do, in order, each `<test executable in /opt/edgeplane/tests>:<run>`
#   FILTER         libtest name filter, may be empty
#   TEST_TIMEOUT   seconds each run may take; a run over it dumps the kernel's stacks and ends
#                  the VM (its state is suspect), and the harness boots again for what is left
#   EDGEPLANE_TEST_READY_SECS  how long the tests wait for a starting agent
#   EDGEPLANE_TEST_FOREIGN_CPU 1 when qemu translates another architecture (far slower), else 0
#   EDGEPLANE_TEST_TCG         1 when qemu emulates the CPU (TCG), 0 under KVM
# The harness parses the lines starting with EDGEPLANE-VM; everything else is for humans.

export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
export HOME=/root TMPDIR=/tmp RUST_BACKTRACE=1
export EDGEPLANE_BIN=/opt/edgeplane/bin/edgeplane
. /etc/edgeplane-vm.conf
export EDGEPLANE_TEST_READY_SECS EDGEPLANE_TEST_FOREIGN_CPU EDGEPLANE_TEST_TCG

setup_ok=1
must() {
    "$@" || { echo "EDGEPLANE-VM-SETUP: FAIL $*"; setup_ok=0; }
}

must mount -t proc proc /proc
must mount -t sysfs sysfs /sys
must mount -t devtmpfs devtmpfs /dev
# ip netns keeps its namespace handles under /run/netns; tests write configs and logs to /tmp.
must mount -t tmpfs tmpfs /run
must mount -t tmpfs tmpfs /tmp
must mount -t bpf bpf /sys/fs/bpf
must mount -t cgroup2 cgroup2 /sys/fs/cgroup
# Only for debugging a failure by hand (trace_pipe); not every kernel config has it.
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
# Tests read the kernel's tracepoints (the shape of the skbs they send).
must mount -t tracefs tracefs /sys/kernel/tracing

for m in $MODULES; do
    case "$m" in
        # The hop-limit tests route frames in loops of up to 3 hops; can-gw's default is 1.
        */can-gw.ko) must insmod "$m" max_hops=6 ;;
        *) must insmod "$m" ;;
    esac
done
must /usr/local/bin/ip link set lo up

echo "EDGEPLANE-VM-BOOTED $(uname -r)"

# Centiseconds since boot, for the per-test time (busybox date has no sub-second format).
# /proc/uptime has two decimals; "1" in front keeps a fraction like "09" from reading as octal.
now_cs() {
    read -r up _ </proc/uptime
    echo "$((${up%.*} * 100 + 1${up#*.} - 100))"
}

# Every CPU's and every blocked task's stack, for a run that never ended.
dump_stacks() {
    echo l >/proc/sysrq-trigger
    echo w >/proc/sysrq-trigger
    for task in /proc/"$1"/task/*; do
        echo "stack of task ${task##*/} ($(cat "$task/comm" 2>/dev/null)):"
        cat "$task/stack" 2>/dev/null
    done
}

if [ "$setup_ok" = 1 ]; then
    for job in $JOBS; do
        t=${job%:*}
        run=${job##*:}
        echo "EDGEPLANE-VM-START: $t $run"
        start=$(now_cs)
        # One test at a time: under emulation parallel tests only compete for the two vCPUs,
        # and the end-to-end tests' timing assumptions get tighter.
        "/opt/edgeplane/tests/$t" --test-threads=1 --nocapture ${FILTER:+"$FILTER"} &
        pid=$!
        # The time limit ends the VM, not just the run: a task stuck in the kernel survives
        # SIGKILL, and whatever it holds would poison every later run.
        (
            sleep "$TEST_TIMEOUT"
            echo "EDGEPLANE-VM-STACKS: $t $run is over its ${TEST_TIMEOUT}s limit"
            dump_stacks "$pid"
            echo "EDGEPLANE-VM: $t $run TIMEOUT 124 $TEST_TIMEOUT"
            poweroff -f
        ) &
        watchdog=$!
        wait "$pid"
        rc=$?
        kill -KILL "$watchdog" 2>/dev/null
        cs=$(($(now_cs) - start))
        secs="$((cs / 100)).$((cs / 10 % 10))"
        if [ "$rc" = 0 ]; then
            result=PASS
        else
            result=FAIL
        fi
        echo "EDGEPLANE-VM: $t $run $result $rc $secs"
        # A failed test may leave agents and namespaces behind (a panic skips destructors):
        # start the next run from a clean system: every process but PID 1 (this shell) and
        # the test bed's holder of kernel paths under TCG (edgeplane_testbed::tcg), which
        # must not let them go while the kernel tears down this run's namespaces.
        holder=$(cat /run/edgeplane-tcg-holder.pid 2>/dev/null)
        for p in /proc/[0-9]*; do
            p=${p#/proc/}
            [ "$p" = 1 ] || [ "$p" = "$holder" ] || kill -KILL "$p" 2>/dev/null
        done
        /usr/local/bin/ip -all netns delete 2>/dev/null
    done
fi

echo "EDGEPLANE-VM-DONE"
poweroff -f
