#!/usr/bin/env bash
# Starts a simulated BMC (ipmi_sim from the openipmi package) for one demo or test node.
#   deploy/bmc-sim/start.sh DIR IP PORT PASSWORD [NETNS]
# Writes DIR/{lan.conf,bmc.emu,chassis.sh,power,bmc.pass}, starts ipmi_sim in the background
# (inside NETNS if given) with its pid in DIR/ipmi_sim.pid, and waits until it answers.
# Chassis power off kills -9 every pid listed in DIR/kill.*.pid (the node's herd daemon ...);
# power on runs DIR/boot.sh if present. User "admin", cipher suite 3 (ipmitool -I lanplus -C 3).
set -euo pipefail
DIR=$1 IP=$2 PORT=$3 PASSWORD=$4 NETNS=${5:-}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$DIR/state"
DIR=$(cd "$DIR" && pwd)
cat >"$DIR/lan.conf" <<CONF
name "bmc"
set_working_mc 0x20
  startlan 1
    addr $IP $PORT
    priv_limit admin
    allowed_auths_callback none md2 md5 straight
    allowed_auths_user none md2 md5 straight
    allowed_auths_operator none md2 md5 straight
    allowed_auths_admin none md2 md5 straight
    guid a123456789abcdefa123456789abcdef
  endlan
  chassis_control "$DIR/chassis.sh"
  user 2 true "admin" "$PASSWORD" admin 10 none md2 md5 straight
CONF
printf 'mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02\nmc_enable 0x20\n' >"$DIR/bmc.emu"
install -m 755 "$HERE/chassis.sh" "$DIR/chassis.sh"
echo 1 >"$DIR/power"
(umask 077; echo "$PASSWORD" >"$DIR/bmc.pass")
prefix=(); [ -n "$NETNS" ] && prefix=(ip netns exec "$NETNS")
cd "$DIR"
"${prefix[@]}" ipmi_sim -c lan.conf -f bmc.emu -s state -n </dev/null >"$DIR/ipmi_sim.log" 2>&1 &
echo $! >"$DIR/ipmi_sim.pid"
disown
for i in $(seq 100); do
  "${prefix[@]}" ipmitool -I lanplus -C 3 -H "$IP" -p "$PORT" -U admin -P "$PASSWORD" -N 1 -R 1 \
    chassis power status >/dev/null 2>&1 && exit 0
  sleep 0.05
done
echo "simulated BMC at $IP:$PORT did not answer; see $DIR/ipmi_sim.log" >&2
exit 1
