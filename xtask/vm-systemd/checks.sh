#!/bin/bash
# The checks of `cargo xtask vm-systemd`, run inside a Debian VM with systemd as PID 1 by
# icmp-guard-vm-checks.service once the system has booted.
#
# It installs the agent as the README's systemd section says, then runs the checks named in
# run.env and reports each as one line on the serial console:
#   ICMP_GUARD_SYSTEMD <nonce> RESULT <check> PASS|FAIL <detail>
#   ICMP_GUARD_SYSTEMD <nonce> INFO <key> <value>
#   ICMP_GUARD_SYSTEMD <nonce> DONE
# The host (xtask/src/vm/systemd.rs) counts a check as passed only from its PASS line with this
# boot's nonce; a check without a line, or a run without DONE, is a failure.
set -u

HERE=/opt/icmp-guard-vm
# shellcheck source=/dev/null
. "$HERE/run.env" # NONCE, CHECKS, MAX_EXPOSURE

UNIT=icmp-guard
ALERTS=/var/log/icmp-guard/alerts.jsonl
WORK=/run/icmp-guard-vm
mkdir -p "$WORK"
failed=0

say() { echo "ICMP_GUARD_SYSTEMD $NONCE $*"; }
pass() { say RESULT "$1" PASS "${*:2}"; }
fail() {
    say RESULT "$1" FAIL "${*:2}"
    failed=1
}
info() { say INFO "$@"; }
wanted() { case " $CHECKS " in *" $1 "*) return 0 ;; *) return 1 ;; esac }
now() { date +%s.%N | cut -c1-14; }
main_pid() { systemctl show -P MainPID "$UNIT"; }

# Waits until the unit's current main process has logged that it enforces (the agent's
# READY line, "enforcing with the ... enforcer") and prints its pid, or fails after $2 s.
# $1: a pid that does not count (the process before a restart), or 0.
wait_enforcing() {
    local old=$1 limit=$2 start pid
    start=$(date +%s)
    while [ $(($(date +%s) - start)) -lt "$limit" ]; do
        # A unit that failed (and will not be restarted) will not enforce.
        [ "$(systemctl show -P ActiveState "$UNIT")" = failed ] && return 1
        pid=$(main_pid)
        if [ "$pid" != 0 ] && [ "$pid" != "$old" ] &&
            journalctl -q -o cat "_PID=$pid" 2>/dev/null | grep -q "enforcing with"; then
            echo "$pid"
            return 0
        fi
        sleep 0.2
    done
    return 1
}

# The enforcer the current main process reported ("lsm" or "cgroup").
enforcer_of() {
    journalctl -q -o cat "_PID=$1" | grep -o "enforcing with the [a-z]* enforcer" | awk '{print $4}' | head -n1
}

# Opens one socket of the given kind as python3; prints "opened" or the errno name.
try_socket() {
    python3 - "$1" <<'EOF'
import errno, socket, sys
kinds = {
    "icmp": (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
    "icmpv6": (socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6),
    "raw": (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW),
    "packet": (socket.AF_PACKET, socket.SOCK_RAW, 0),
}
try:
    socket.socket(*kinds[sys.argv[1]]).close()
    print("opened")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
EOF
}

loop_start() {
    rm -f "$WORK/loop.result" "$WORK/loop.ready"
    python3 "$HERE/socket_loop.py" "$WORK/loop.result" "$WORK/loop.ready" &
    LOOP_PID=$!
    local i
    for i in $(seq 100); do
        [ -s "$WORK/loop.ready" ] && break
        sleep 0.1
    done
    LOOP_FIRST=$(cat "$WORK/loop.ready" 2>/dev/null || echo "never-ran")
}

# Stops the loop and leaves its summary in LOOP_RESULT and the number of opened sockets in
# LOOP_OPENED.
loop_stop() {
    kill -TERM "$LOOP_PID" 2>/dev/null
    wait "$LOOP_PID" 2>/dev/null
    LOOP_RESULT=$(cat "$WORK/loop.result" 2>/dev/null || echo "no-result")
    LOOP_OPENED=$(echo "$LOOP_RESULT" | tr ' ' '\n' | sed -n 's/^opened=//p')
}

# The gap checks: a loop of refused socket() calls runs across an interruption ($2 is the
# command) and until the agent enforces again; any socket it opened is a gap.
gap_check() {
    local name=$1 old pid t0 t1
    shift
    old=$(main_pid)
    loop_start
    if [ "$LOOP_FIRST" != refused ]; then
        loop_stop
        fail "$name" "the loop's first socket was '$LOOP_FIRST', not refused: the agent was not enforcing before the $name"
        return
    fi
    t0=$(now)
    "$@"
    if ! pid=$(wait_enforcing "$old" 120); then
        loop_stop
        fail "$name" "the agent did not enforce again within 120 s after '$*' (unit $(systemctl show -P ActiveState $UNIT)); loop: $LOOP_RESULT"
        return
    fi
    t1=$(now)
    # A margin after the new agent's READY line: a gap right after it counts too.
    sleep 1
    loop_stop
    info "${name}_seconds_to_enforcing_again" "$(echo "$t1 - $t0" | awk '{printf "%.1f", $1 - $3}')"
    if [ -z "$LOOP_OPENED" ]; then
        fail "$name" "the loop reported nothing: $LOOP_RESULT"
    elif [ "$LOOP_OPENED" -eq 0 ]; then
        pass "$name" "no refused socket got through across '$*' (old pid $old, new pid $pid; $LOOP_RESULT; t0=$t0)"
    else
        fail "$name" "$LOOP_OPENED sockets that the policy refuses were opened across '$*' (old pid $old, new pid $pid; $LOOP_RESULT; command at t0=$t0, enforcing again at $t1)"
    fi
}

systemctl is-system-running --wait >/dev/null 2>&1
info system_state "$(systemctl is-system-running)"
info kernel "$(uname -r)"
info lsm "$(cat /sys/kernel/security/lsm)"
info systemd "$(systemctl --version | head -n1)"

# A copy of ping in a directory only nobody may enter, allowed by private-ping.yaml: the
# agent resolves its path only with CAP_DAC_READ_SEARCH.
PRIVATE_PING=/srv/icmp-guard-vm/private/ping
install -d -m 0755 /srv/icmp-guard-vm
install -d -m 0700 -o nobody -g nogroup /srv/icmp-guard-vm/private
install -m 0755 -o nobody -g nogroup /usr/bin/ping "$PRIVATE_PING"

# ---- install, as the README's systemd section says --------------------------------------
install -m 0755 "$HERE/icmp-guard" /usr/local/bin/icmp-guard
install -d /etc/icmp-guard/policies
install -m 0644 "$HERE"/policies/*.yaml /etc/icmp-guard/policies/
install -m 0644 /dev/null /etc/icmp-guard/config.yaml
install -m 0644 "$HERE/icmp-guard.service" /etc/systemd/system/icmp-guard.service
systemctl daemon-reload
t0=$(date +%s.%N)
systemctl enable --now "$UNIT" 2>&1
info installed "$(/usr/local/bin/icmp-guard --version)"

# ---- start: systemctl start enforces with the LSM enforcer --------------------------------
if pid=$(wait_enforcing 0 180); then
    t1=$(date +%s.%N)
    info start_seconds "$(echo "$t0 $t1" | awk '{printf "%.1f", $2 - $1}')"
    enforcer=$(enforcer_of "$pid")
    refused=$(try_socket icmp)
    # The unit keeps /sys/fs/cgroup writable for workload cgroups: see it from inside.
    cgroup_opts=$(awk '$5 == "/sys/fs/cgroup" {print $6}' "/proc/$pid/mountinfo" | tail -n1)
    if wanted start; then
        if [ "$enforcer" = lsm ] && [ "$refused" = EPERM ] && [ "${cgroup_opts%%,*}" = rw ]; then
            pass start "active (pid $pid), enforcing with the lsm enforcer; python3's raw ICMP socket: EPERM; /sys/fs/cgroup is $cgroup_opts for the agent"
        else
            fail start "pid $pid enforces with '$enforcer' (want lsm); python3's raw ICMP socket: $refused (want EPERM); /sys/fs/cgroup is '$cgroup_opts' for the agent (want rw)"
        fi
    fi
else
    wanted start && fail start "not enforcing within 180 s: unit $(systemctl show -P ActiveState $UNIT)/$(systemctl show -P SubState $UNIT), result $(systemctl show -P Result $UNIT)"
fi

# ---- ping: ping works, hping3 is refused with an alert in the unit's log directory ---------
if wanted ping; then
    logs=$(systemctl show -P LogsDirectory "$UNIT")
    [ "$logs" = icmp-guard ] || fail ping "LogsDirectory is '$logs', expected icmp-guard"
    ping_out=$(ping -c 1 -W 5 127.0.0.1 2>&1)
    ping_rc=$?
    private_out=$("$PRIVATE_PING" -c 1 -W 5 127.0.0.1 2>&1)
    private_rc=$?
    hping_out=$(hping3 -c 1 127.0.0.1 2>&1)
    hping_rc=$?
    alert=""
    for _ in $(seq 50); do
        alert=$(grep '"ProcessName":"/usr/sbin/hping3"' "$ALERTS" 2>/dev/null | grep '"Action":"Block"' | head -n1)
        [ -n "$alert" ] && break
        sleep 0.2
    done
    ping_alert=$(grep -c '"ProcessName":"/usr/bin/ping"' "$ALERTS" 2>/dev/null)
    if [ "$ping_rc" -ne 0 ]; then
        fail ping "ping -c 1 127.0.0.1 failed ($ping_rc): $ping_out"
    elif [ "$private_rc" -ne 0 ]; then
        fail ping "$PRIVATE_PING (allowed by private-ping.yaml) failed ($private_rc): $private_out"
    elif [ "$hping_rc" -eq 0 ] || ! echo "$hping_out" | grep -q "Operation not permitted"; then
        fail ping "hping3 was not refused (exit $hping_rc): $hping_out"
    elif [ -z "$alert" ]; then
        fail ping "hping3 was refused but $ALERTS has no Block alert for it"
    elif [ "${ping_alert:-0}" != 0 ]; then
        fail ping "ping raised $ping_alert alert(s)"
    else
        pass ping "ping and $PRIVATE_PING ok; hping3: $(echo "$hping_out" | grep -m1 'Operation not permitted'); alert in $ALERTS: $(echo "$alert" | grep -o '"Resource":"[^"]*"')"
    fi
fi

# ---- restart: no gap across systemctl restart ---------------------------------------------
if wanted restart; then
    gap_check restart systemctl restart "$UNIT"
fi

# ---- kill: enforcing until systemd has restarted the agent --------------------------------
if wanted kill; then
    restarts_before=$(systemctl show -P NRestarts "$UNIT")
    gap_check kill systemctl kill -s KILL "$UNIT"
    info kill_restarts "NRestarts $restarts_before -> $(systemctl show -P NRestarts "$UNIT")"
fi

# ---- caps: every capability of the bounding set is needed by one enforcer or the other ----
# For each enforcer (the LSM one, and the cgroup one the agent falls back to where the kernel
# refuses LSM programs), the agent must work with the unit's own set; then each capability is
# dropped in turn (a runtime drop-in) and the agent must fail to start, to enforce, or to let
# the allowed pings through. A capability neither enforcer misses is reported as not needed.
caps_probe() { # $1: the pid before the restart; prints why the agent does not work, if so
    local pid
    if ! pid=$(wait_enforcing "$1" 120); then
        echo "the agent did not start: $(journalctl -q -o cat -u "$UNIT" -n 30 --no-pager | grep "icmp-guard: error" | tail -n1 | cut -c1-240)"
    elif [ "$(try_socket icmp)" != EPERM ]; then
        echo "python3's raw ICMP socket was not refused"
    elif ! ping -c 1 -W 5 127.0.0.1 >/dev/null 2>&1; then
        echo "ping failed"
    elif ! "$PRIVATE_PING" -c 1 -W 5 127.0.0.1 >/dev/null 2>&1; then
        echo "$PRIVATE_PING was refused: $(journalctl -q -o cat "_PID=$pid" | grep -m1 "private" | cut -c1-200)"
    fi
}
caps_run() { # $1: enforcer, $2: bounding set; prints caps_probe's complaint
    local old
    mkdir -p /run/systemd/system/icmp-guard.service.d
    printf '[Service]\nExecStart=\nExecStart=%s --enforcer %s\nCapabilityBoundingSet=\nCapabilityBoundingSet=%s\nRestart=no\n' \
        "$exec_start" "$1" "$2" >/run/systemd/system/icmp-guard.service.d/zz-caps.conf
    systemctl daemon-reload
    old=$(main_pid)
    systemctl restart "$UNIT"
    caps_probe "$old"
}
if wanted caps; then
    caps=$(systemctl show -P CapabilityBoundingSet "$UNIT")
    exec_start=$(sed -n 's/^ExecStart=//p' /etc/systemd/system/icmp-guard.service)
    declare -A needed_by=()
    caps_ok=1
    for enforcer in lsm cgroup; do
        why=$(caps_run "$enforcer" "$caps")
        if [ -n "$why" ]; then
            caps_ok=0
            info cap "the $enforcer enforcer does not work with the unit's set ($caps): $why"
            continue
        fi
        for cap in $caps; do
            why=$(caps_run "$enforcer" "$(echo "$caps" | tr ' ' '\n' | grep -vx "$cap" | tr '\n' ' ')")
            if [ -n "$why" ]; then
                info cap "$enforcer needs $cap: $why"
                needed_by[$cap]="${needed_by[$cap]:-}$enforcer "
            else
                info cap "$enforcer works without $cap"
            fi
        done
    done
    rm -f /run/systemd/system/icmp-guard.service.d/zz-caps.conf
    systemctl daemon-reload
    old=$(main_pid)
    systemctl restart "$UNIT"
    wait_enforcing "$old" 120 >/dev/null || info caps_restore "the agent did not come back with the unit as installed"
    unneeded=""
    summary=""
    for cap in $caps; do
        if [ -z "${needed_by[$cap]:-}" ]; then
            unneeded="$unneeded $cap"
        else
            summary="$summary $cap (${needed_by[$cap]% })"
        fi
    done
    if [ "$caps_ok" = 0 ]; then
        fail caps "the agent does not work with the unit's own capabilities (see the INFO cap lines)"
    elif [ -n "$unneeded" ]; then
        fail caps "not needed by either enforcer on $(uname -r):$unneeded; needed:$summary"
    else
        pass caps "each capability is needed on $(uname -r):$summary"
    fi
fi

# ---- stop: systemctl stop gives every socket back -----------------------------------------
if wanted stop; then
    systemctl stop "$UNIT"
    state="$(systemctl show -P ActiveState "$UNIT") $(systemctl show -P Result "$UNIT")"
    # The pinned programs keep deciding for the stop grace (the unit's --stop-grace-secs 10),
    # for a restarted agent to take over; then every socket is allowed again.
    sleep 11
    results=""
    all=1
    for kind in icmp icmpv6 raw packet; do
        r=$(try_socket "$kind")
        results="$results $kind=$r"
        [ "$r" = opened ] || all=0
    done
    hping_out=$(hping3 -c 1 127.0.0.1 2>&1)
    hping_rc=$?
    stopped=$(journalctl -q -o cat -u "$UNIT" --no-pager | grep -c "then every socket is allowed again")
    if [ "$all" = 1 ] && [ "$hping_rc" -eq 0 ] && [ "$state" = "inactive success" ] && [ "$stopped" -ge 1 ]; then
        pass stop "unit $state;$results; hping3 -c 1 127.0.0.1 exit 0; the agent logged that every socket is allowed again after the stop grace"
    else
        fail stop "unit $state;$results; hping3 exit $hping_rc ($(echo "$hping_out" | tail -n1)); 'then every socket is allowed again' logged $stopped times"
    fi
fi

# ---- security: systemd-analyze security scores the unit ----------------------------------
if wanted security; then
    sec=$(systemd-analyze security --no-pager "$UNIT" 2>&1)
    echo "$sec" | grep -v "^✓" | sed 's/^/  security: /'
    score=$(echo "$sec" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
    if [ -z "$score" ]; then
        fail security "systemd-analyze security printed no overall exposure level"
    else
        info security_score "$score $(echo "$sec" | sed -n 's/.*Overall exposure level for [^:]*: [0-9.]* \([A-Z]*\).*/\1/p')"
        if awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN {exit !(s <= m)}'; then
            pass security "exposure $score (at most $MAX_EXPOSURE allowed)"
        else
            fail security "exposure $score is above $MAX_EXPOSURE: the unit lost hardening"
        fi
    fi
fi

if [ "$failed" = 1 ]; then
    echo "---- journalctl -u $UNIT (last 40 lines) ----"
    journalctl -u "$UNIT" --no-pager -n 40
    echo "---- $ALERTS (last 5 lines) ----"
    tail -n 5 "$ALERTS" 2>/dev/null
fi
say DONE
# The unit's SuccessAction/FailureAction would power off too, but a successful exit did not
# (systemd 252 under TCG); immediate: the disk is thrown away.
sync
systemctl poweroff --force --force
exit "$failed"
