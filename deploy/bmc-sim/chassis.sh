#!/bin/bash
# ipmi_sim's chassis_control script (see ipmi_sim_cmd(5)): get power / set power 0|1 / set reset 1.
# ipmi_sim waits for this script before it answers anything else, so the power queries fork
# nothing (bash builtins only): on a busy host every fork of a normal-priority process can wait
# hundreds of milliseconds, and the BMC then looks dead.
case $0 in */*) DIR=${0%/*} ;; *) DIR=. ;; esac
echo "$EPOCHREALTIME $*" >> "$DIR/chassis.log"
# Sets P to the power state (1 unless the file says otherwise).
power() { P=1; [ -r "$DIR/power" ] && read -r P < "$DIR/power"; }
power_off() {
  local f pid
  for f in "$DIR"/kill.*.pid; do
    # A pid file may lack a final newline: read then fails but has set pid.
    pid=; [ -f "$f" ] && read -r pid < "$f"
    [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null
    rm -f "$f"
  done
  echo 0 > "$DIR/power"
}
# With a file off_delay (seconds), the BMC acknowledges a power-off at once and carries it out
# that much later, as real BMCs do.
off() {
  if [ -f "$DIR/off_delay" ]; then
    ( for f in /proc/$BASHPID/fd/*; do f=${f##*/}; [ "$f" -gt 2 ] && eval "exec $f>&-"; done
      sleep "$(cat "$DIR/off_delay")"; power_off ) >/dev/null 2>&1 </dev/null &
  else
    power_off
  fi
}
on() {
  power
  [ "$P" = 1 ] && return 0
  echo 1 > "$DIR/power"
  if [ -x "$DIR/boot.sh" ]; then
    # Close every fd inherited from ipmi_sim (its UDP socket is not close-on-exec).
    ( for f in /proc/$BASHPID/fd/*; do f=${f##*/}; [ "$f" -gt 2 ] && eval "exec $f>&-"; done
      # A BMC simulator may run in real time (the busy benchmark's do): the host it boots not.
      command -v chrt >/dev/null && chrt -o -p 0 $BASHPID >/dev/null 2>&1
      exec setsid "$DIR/boot.sh" ) >/dev/null 2>&1 </dev/null &
  fi
}
op=$1; shift
case "$op" in
  get) for item in "$@"; do case "$item" in
         power) power; echo "power:$P" ;;
         boot) echo "boot:default" ;; esac; done ;;
  set) while [ $# -ge 2 ]; do case "$1" in
         power) if [ "$2" = 1 ]; then on; else off; fi ;;
         reset) off; on ;;
         shutdown) off ;; esac; shift 2; done ;;
esac
exit 0
