#!/bin/bash
# Boot a throwaway systemd in fresh namespaces and run blobd.service under
# it, sandbox and all, to prove the unit works, not just that it parses.
#
#   sudo [SERVER=blobd] systemd/trial/run-trial.sh [service|socket|watchdog|wedge|stop]
#
#   service   start blobd.service, print what the sandbox allows
#   socket    start only blobd.socket; the first connection activates blobd
#   watchdog  WatchdogSec=3s: the pings keep it alive (NRestarts stays 0)
#   wedge     WatchdogSec=3s and a blocked event loop: systemd restarts it
#             (stand-in only)
#   stop      (SERVER=blobd) systemctl stop with an upload in flight
#
# The server is stand_in.py (an aiohttp app using blobd.sdnotify that
# reports what it can and cannot do), or with SERVER=blobd the real
# `blobd serve`, exercised by exercise.py. Needs root, cgroup2 and
# namespaces; manual on purpose. The host is left alone: /etc and /var are overlays, /run and
# /tmp are tmpfs, and units that would touch the kernel or devices
# (sysctl, udev, modules, binfmt, ...) are masked inside the trial.
set -euo pipefail
MODE=${1:-service}
SERVER=${SERVER:-stand-in}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$(dirname "$HERE")")
# ProtectHome=yes hides /root and /home, so the interpreter must live
# elsewhere: the system python3, with the project's site-packages.
PYTHON=${PYTHON:-/usr/bin/python3}
SITE=${SITE:-$("${VENV_PYTHON:-$ROOT/.venv/bin/python}" -c 'import aiohttp, os; print(os.path.dirname(os.path.dirname(aiohttp.__file__)))')}
CG=/sys/fs/cgroup/unified
[ -d $CG ] || CG=/sys/fs/cgroup

if [ "${1:-}" = --inside ]; then
  MODE=$2
  mount -t proc proc /proc
  mount -t tmpfs tmpfs /run
  mkdir -p /run/stage && cp "$HERE/stand_in.py" /run/stage/
  mount -t tmpfs tmpfs /tmp
  for d in etc var; do
    mkdir -p /run/ov/$d/u /run/ov/$d/w
    mount -t overlay overlay -o lowerdir=/$d,upperdir=/run/ov/$d/u,workdir=/run/ov/$d/w /$d
  done
  umount -R /sys/fs/cgroup
  mount -t cgroup2 cgroup2 /sys/fs/cgroup

  systemd-sysusers "$ROOT/systemd/blobd.sysusers"
  mkdir -p /etc/blobd
  # In socket mode the config names another port: serving on 8420 anyway
  # shows the socket came from systemd.
  port=8420; [ "$MODE" = socket ] && port=8421
  printf '[server]\ndata_dir = "/var/lib/blobd"\nport = %s\nshutdown_timeout_seconds = 3\n' \
    $port > /etc/blobd/blobd.toml
  chown root:blobd /etc/blobd/blobd.toml && chmod 0640 /etc/blobd/blobd.toml

  U=/etc/systemd/system
  exec_start="$PYTHON /run/stage/stand_in.py"
  [ "$SERVER" = blobd ] && exec_start="$PYTHON -m blobd"
  sed "s|^ExecStart=/opt/blobd/venv/bin/blobd|ExecStart=${STAND_IN:-$exec_start}|" \
      "$ROOT/systemd/blobd.service" > $U/blobd.service
  cp "$ROOT/systemd/blobd.socket" $U/blobd.socket
  mkdir -p $U/blobd.service.d
  printf '[Service]\nEnvironment=BLOBD_TRIAL_PATH=%s:%s PYTHONPATH=%s:%s\n' \
    "$ROOT" "$SITE" "$ROOT" "$SITE" > $U/blobd.service.d/path.conf
  case $MODE in
    watchdog) printf '[Service]\nWatchdogSec=3s\n' > $U/blobd.service.d/fast.conf ;;
    wedge) printf '[Service]\nWatchdogSec=3s\nEnvironment=WEDGE=1\n' > $U/blobd.service.d/fast.conf ;;
  esac
  for u in systemd-sysctl.service systemd-modules-load.service systemd-binfmt.service \
           systemd-udevd.service systemd-udev-trigger.service systemd-udev-settle.service \
           systemd-random-seed.service systemd-pstore.service systemd-timesyncd.service \
           systemd-repart.service systemd-firstboot.service systemd-machine-id-commit.service \
           systemd-pcrphase.service systemd-pcrphase-sysinit.service kmod-static-nodes.service \
           systemd-tmpfiles-setup-dev.service systemd-tmpfiles-setup.service \
           systemd-hwdb-update.service systemd-remount-fs.service systemd-journal-flush.service \
           dev-hugepages.mount dev-mqueue.mount sys-kernel-config.mount sys-kernel-debug.mount \
           sys-kernel-tracing.mount sys-fs-fuse-connections.mount proc-sys-fs-binfmt_misc.automount \
           systemd-update-utmp.service systemd-sysusers.service cryptsetup.target \
           integritysetup.target veritysetup.target swap.target local-fs.target \
           systemd-ask-password-console.path getty.target console-getty.service; do
    ln -sf /dev/null $U/$u
  done
  want=blobd.service; [ "$MODE" = socket ] && want=blobd.socket
  printf '[Unit]\nDescription=blobd trial\nWants=%s\n' "$want" > $U/blobd-trial.target
  exec env -i container=blobd-trial PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    /lib/systemd/systemd --unit=blobd-trial.target --log-target=console --show-status=no
fi

[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
LOG=$(mktemp)
mkdir -p $CG/blobd-trial
( echo $BASHPID > $CG/blobd-trial/cgroup.procs
  exec unshare --mount --pid --fork --net --uts --ipc --cgroup --propagation private \
    env SITE="$SITE" SERVER="$SERVER" "$0" --inside "$MODE" ) > "$LOG" 2>&1 &
UNSHARE=$!
cleanup() {
  [ -n "${PID1:-}" ] && kill -9 "$PID1" 2>/dev/null
  wait $UNSHARE 2>/dev/null || true
  find $CG/blobd-trial -depth -type d -exec rmdir {} \; 2>/dev/null || true
  rm -f "$LOG"
}
trap cleanup EXIT
for _ in $(seq 100); do PID1=$(pgrep -P $UNSHARE || true); [ -n "$PID1" ] && break; sleep 0.1; done
[ -n "$PID1" ] || { cat "$LOG"; exit 1; }
IN="nsenter -t $PID1 -m -n -p -u -i -C"
for _ in $(seq 100); do
  state=$($IN systemctl is-system-running 2>/dev/null || true)
  case $state in running|degraded) break ;; esac; sleep 0.1
done
echo "system: $state"
fetch='import json, urllib.request; print(json.dumps(json.load(urllib.request.urlopen("http://127.0.0.1:8420/", timeout=10)), indent=1))'
health='import urllib.request; print("GET /healthz:", urllib.request.urlopen("http://127.0.0.1:8420/healthz", timeout=10).read().decode())'
as_blobd="runuser -u blobd -- env PYTHONPATH=$ROOT:$SITE $PYTHON"
journal() {
  $IN journalctl -u blobd.service -o json --no-pager \
    | "$PYTHON" -c 'import json, sys; [print("journal: PRIORITY=%s %s" % (e.get("PRIORITY"), e.get("MESSAGE"))) for e in map(json.loads, sys.stdin) if e.get("_COMM") != "systemd"]'
}
if [ "$SERVER" = blobd ]; then
  case $MODE in
    service)
      $IN "$PYTHON" -c "$health" || echo "health check failed"
      TOKEN=$($IN $as_blobd -m blobd token create -c /etc/blobd/blobd.toml --owner trial | tail -1)
      $IN "$PYTHON" "$HERE/exercise.py" put-get "$TOKEN" ;;
    socket)
      echo "before connecting: blobd.service $($IN systemctl is-active blobd.service || true)"
      $IN "$PYTHON" -c "$health" || echo "health check failed"
      echo "after connecting: blobd.service $($IN systemctl is-active blobd.service || true)" ;;
    stop)
      TOKEN=$($IN $as_blobd -m blobd token create -c /etc/blobd/blobd.toml --owner trial | tail -1)
      $IN "$PYTHON" "$HERE/exercise.py" stall "$TOKEN" & CLIENT=$!
      sleep 2
      started=$(date +%s.%N)
      $IN systemctl stop blobd.service
      echo "systemctl stop took $(echo "$(date +%s.%N) - $started" | bc)s"
      wait $CLIENT || true
      echo "left in /var/lib/blobd/tmp: [$($IN ls -A /var/lib/blobd/tmp)]" ;;
    watchdog) sleep 14 ;;
    *) echo "mode $MODE is for the stand-in only"; exit 2 ;;
  esac
else
  case $MODE in
    service) $IN "$PYTHON" -c "$fetch" 2>&1 | tail -n 40 || echo "fetch failed" ;;
    socket)
      echo "before connecting: blobd.service $($IN systemctl is-active blobd.service || true)"
      $IN "$PYTHON" -c "$fetch" | grep -A2 listen_fds
      echo "after connecting: blobd.service $($IN systemctl is-active blobd.service || true)" ;;
    watchdog|wedge) sleep 14 ;;
  esac
fi
$IN systemctl show blobd.service -p ActiveState -p SubState -p Result -p StatusText \
  -p NRestarts -p User -p WatchdogUSec -p WatchdogTimestamp -p ExecMainStatus
if [ "$MODE" = service ]; then
  $IN systemctl stop blobd.service
  $IN systemctl show blobd.service -p ActiveState -p Result -p ExecMainStatus | sed 's/^/after stop: /'
fi
[ "$SERVER" = blobd ] && journal
exit 0
