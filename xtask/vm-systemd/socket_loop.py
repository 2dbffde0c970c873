#!/usr/bin/python3
"""Gap detector for `cargo xtask vm-systemd` (run by checks.sh inside the VM).

Opens a socket the installed policy refuses (raw ICMP from python3, not ping) about every
millisecond until SIGTERM, and records every attempt that was NOT refused, with its time. While
the agent enforces, each attempt fails with EPERM; any success is a moment without enforcement.

    socket_loop.py RESULT_FILE READY_FILE

READY_FILE is written after the first attempt, with that attempt's outcome, so the caller knows
the loop runs and that it started from an enforced state. RESULT_FILE gets one line of
key=value pairs at the end.
"""

import errno
import signal
import socket
import sys
import time

result_path, ready_path = sys.argv[1], sys.argv[2]
stop = False


def on_term(_signum, _frame):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)

attempts = refused = 0
opened = []
other = {}
while not stop:
    now = time.time()
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    except OSError as e:
        if e.errno == errno.EPERM:
            refused += 1
            outcome = "refused"
        else:
            other[e.errno] = other.get(e.errno, 0) + 1
            outcome = "error-" + errno.errorcode.get(e.errno, str(e.errno))
    else:
        s.close()
        opened.append(now)
        outcome = "opened"
    attempts += 1
    if attempts == 1:
        with open(ready_path, "w") as f:
            f.write(outcome + "\n")
    time.sleep(0.001)

with open(result_path, "w") as f:
    f.write(
        "attempts=%d refused=%d opened=%d first_opened=%s last_opened=%s other=%s\n"
        % (
            attempts,
            refused,
            len(opened),
            "%.3f" % opened[0] if opened else "-",
            "%.3f" % opened[-1] if opened else "-",
            ",".join("%s:%d" % (errno.errorcode.get(k, k), v) for k, v in sorted(other.items()))
            or "-",
        )
    )
