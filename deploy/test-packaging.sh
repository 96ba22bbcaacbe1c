#!/usr/bin/env bash
# Issue 15's packaging checks, run by .ci/run as root on a machine where ferry is not installed:
#   1. builds the three .debs (cargo deb) and installs them with dpkg;
#   2. checks what they installed: binaries, units (systemd-analyze verify), the ferry user,
#      conffiles and modes;
#   3. lints the Ansible role and runs it with -c local: it installs the agent package, issues
#      and copies the agent's certificate from a CA on this machine, writes the config; a second
#      run changes nothing;
#   4. starts the installed coordinator (as user ferry) and the agent from the role's config, and
#      waits for the agent's /readyz (registered) and metrics. Where systemd runs the machine,
#      the units start them instead;
#   5. removes the packages (dpkg -r, then --purge) and checks nothing is left behind;
#   6. checks the cloud-init user-data (cloud-init schema) and that install.sh finds the
#      binaries of a release tarball (deploy/release.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

say() { printf '== %s\n' "$*"; }
die() { printf 'test-packaging: FAILED: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (dpkg -i)"
for p in ferry-agent ferry-coordinator ferryctl; do
    if dpkg -s "$p" >/dev/null 2>&1; then
        die "package $p is already installed on this machine; this test installs and removes it"
    fi
done
for f in /usr/bin/ferry-agent /usr/bin/ferry-coordinator /usr/bin/ferryctl /etc/ferry/agent.toml /etc/ferry/coordinator.toml; do
    [ ! -e "$f" ] || die "$f exists already; this test would overwrite it"
done

# What this test leaves must go again: the user the package creates (when it did), the files
# the Ansible role copies into /etc/ferry/pki (no package owns them).
had_user=0
getent passwd ferry >/dev/null && had_user=1
had_etc=0
[ -e /etc/ferry ] && had_etc=1
work=$(mktemp -d /tmp/ferry-packaging.XXXXXX)
chmod 0755 "$work"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    for p in ferry-agent ferry-coordinator ferryctl; do
        dpkg --purge "$p" >/dev/null 2>&1 || true
    done
    rm -rf "$work" /srv/ferry-ansible-test /var/cache/ferry-agent.deb \
        /etc/systemd/system/ferry-agent.service.d /var/lib/ferry-agent
    rm -f /etc/ferry/pki/ca.pem /etc/ferry/pki/agent-ansible-target.pem /etc/ferry/pki/agent-ansible-target.key
    if [ $had_etc -eq 0 ]; then
        rmdir /etc/ferry/pki /etc/ferry 2>/dev/null || true
    fi
    if [ $had_user -eq 0 ] && getent passwd ferry >/dev/null; then
        userdel ferry 2>/dev/null || true
        groupdel ferry 2>/dev/null || true
        rm -rf /var/lib/ferry-coordinator
    fi
}
trap cleanup EXIT

# Where a daemon says it listens ("<message> … addr=HOST:PORT"), within 30 s.
logged_addr() {
    local log=$1 message=$2 i
    for i in $(seq 300); do
        if grep -q "$message" "$log" 2>/dev/null; then
            grep "$message" "$log" | head -n 1 | sed -n 's/.*addr=\([0-9.:]*\).*/\1/p'
            return 0
        fi
        sleep 0.1
    done
    cat "$log" >&2
    die "no '$message' in $log"
}

# Polls `curl URL` until it answers 200, within 30 s.
wait_200() {
    local url=$1 i
    for i in $(seq 300); do
        if curl -fsS "$url" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    curl -sS "$url" >&2 || true
    die "$url did not answer 200"
}

say "1. building the packages"
for p in ferry-coordinator ferry-agent ferryctl; do
    cargo deb --strip -p "$p" --output "$work/debs/" >/dev/null
done
ls "$work/debs"
coord_deb=$(ls "$work"/debs/ferry-coordinator_*.deb)
agent_deb=$(ls "$work"/debs/ferry-agent_*.deb)
ctl_deb=$(ls "$work"/debs/ferryctl_*.deb)

say "2. installing the coordinator and ferryctl packages"
dpkg -i "$coord_deb" "$ctl_deb"
for b in ferry-coordinator ferryctl; do
    [ -x /usr/bin/$b ] || die "/usr/bin/$b not installed"
    /usr/bin/$b --version
done
getent passwd ferry >/dev/null || die "the package did not create user ferry"
[ "$(stat -c %a:%G /etc/ferry)" = 750:ferry ] || die "/etc/ferry is $(stat -c %a:%G /etc/ferry), want 750:ferry"
[ "$(stat -c %a:%G /etc/ferry/coordinator.toml)" = 640:ferry ] || die "coordinator.toml mode"
grep -qx /etc/ferry/coordinator.toml /var/lib/dpkg/info/ferry-coordinator.conffiles || die "coordinator.toml is not a conffile"
[ -f /usr/lib/systemd/system/ferry-coordinator.service ] || die "no coordinator unit"
grep -q '^ExecStart=/usr/bin/ferry-coordinator run' /usr/lib/systemd/system/ferry-coordinator.service || die "the unit does not start /usr/bin/ferry-coordinator"

say "3. the Ansible role: lint, then a local run that installs and enrols a target agent"
pki=$work/pki
/usr/bin/ferry-coordinator pki init --dir "$pki"
/usr/bin/ferry-coordinator pki issue --dir "$pki" --coordinator 1
/usr/bin/ferry-coordinator pki issue --dir "$pki" --admin ops
chgrp -R ferry "$pki" && chmod 0750 "$pki" && chmod 0640 "$pki"/coordinator-1.key
cat >"$work/coordinator.toml" <<EOF
node_id = 1
listen = "127.0.0.1:0"
data_dir = "$work/coordinator-data"
metrics_listen = "127.0.0.1:0"
[tls]
ca = "$pki/ca.pem"
cert = "$pki/coordinator-1.pem"
key = "$pki/coordinator-1.key"
EOF
install -d -o ferry -g ferry "$work/coordinator-data"
chmod 0644 "$work/coordinator.toml"
# The installed coordinator, as the package's user.
runuser -u ferry -- /usr/bin/ferry-coordinator run --config "$work/coordinator.toml" >"$work/coordinator.log" 2>&1 &
pids+=($!)
coord=$(logged_addr "$work/coordinator.log" "Coordinator serving.")
coord_metrics=$(logged_addr "$work/coordinator.log" "Metrics serving.")
wait_200 "http://$coord_metrics/readyz"
say "coordinator (user ferry) at $coord, ready"

(cd deploy/ansible && ansible-lint --profile production --nocolor)
# Debian's Python, which has python3-apt for the apt module (the PATH may lead elsewhere).
run_role() {
    (cd deploy/ansible && ANSIBLE_NOCOLOR=1 ansible-playbook -i localhost, -c local test/local.yml \
        -e "ferry_agent_deb=$agent_deb" -e "ferry_agent_coordinator=$coord" -e "ferry_agent_ca_dir=$pki" \
        -e "ferry_agent_start=$1" -e ansible_python_interpreter=/usr/bin/python3)
}
systemd_runs=0
[ -d /run/systemd/system ] && systemd_runs=1
start=false
[ $systemd_runs -eq 1 ] && start=true
run_role $start | tee "$work/ansible-1.log"
grep -q 'failed=0' "$work/ansible-1.log" || die "the role failed"
dpkg -s ferry-agent | grep -q '^Status: install ok installed' || die "the role did not install ferry-agent"
grep -q '^name = "ansible-target"' /etc/ferry/agent.toml || die "the role did not write the config"
[ "$(stat -c %a /etc/ferry/pki/agent-ansible-target.key)" = 600 ] || die "the agent's key is not 0600"
cmp "$pki/ca.pem" /etc/ferry/pki/ca.pem || die "ca.pem not copied"
[ -f "$pki/agent-ansible-target.pem" ] || die "the certificate was not issued on the CA host"
grep -q 'ReadWritePaths=/srv/ferry-ansible-test' /etc/systemd/system/ferry-agent.service.d/ferry-root.conf \
    || die "no drop-in for the target root"
run_role $start | tee "$work/ansible-2.log"
grep -Eq 'ok=[0-9]+ +changed=0 ' "$work/ansible-2.log" || die "a second run of the role changed something"

say "4. the agent, from the role's config and certificate, registers"
if [ $systemd_runs -eq 1 ]; then
    systemctl is-active ferry-agent || die "the role did not start ferry-agent"
    agent_log=$work/agent.log
    journalctl -u ferry-agent --no-pager >"$agent_log"
else
    agent_log=$work/agent.log
    /usr/bin/ferry-agent run --config /etc/ferry/agent.toml >"$agent_log" 2>&1 &
    pids+=($!)
fi
agent_metrics=$(logged_addr "$agent_log" "Metrics serving.")
wait_200 "http://$agent_metrics/readyz"
curl -fsS "http://$agent_metrics/metrics" | grep -q '^ferry_bytes_received_total 0$' || die "no agent metrics"
/usr/bin/ferryctl --coordinator "$coord" --pki-dir "$pki" --admin ops agents list | tee "$work/agents.txt"
grep -q ansible-target "$work/agents.txt" || die "the coordinator does not list the agent"

say "   units: systemd-analyze verify"
systemd-analyze verify /usr/lib/systemd/system/ferry-agent.service /usr/lib/systemd/system/ferry-coordinator.service

say "5. removing the packages"
for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
pids=()
dpkg -r ferry-agent ferry-coordinator ferryctl
for f in /usr/bin/ferry-agent /usr/bin/ferry-coordinator /usr/bin/ferryctl \
    /usr/lib/systemd/system/ferry-agent.service /usr/lib/systemd/system/ferry-coordinator.service; do
    [ ! -e "$f" ] || die "$f is left after dpkg -r"
done
[ -f /etc/ferry/agent.toml ] || die "dpkg -r removed a conffile (only --purge should)"
dpkg --purge ferry-agent ferry-coordinator ferryctl
for f in /etc/ferry/agent.toml /etc/ferry/coordinator.toml; do
    [ ! -e "$f" ] || die "$f is left after dpkg --purge"
done
for p in ferry-agent ferry-coordinator ferryctl; do
    if dpkg -s "$p" >/dev/null 2>&1; then die "$p still known to dpkg"; fi
done

say "6. cloud-init user-data, and a release tarball's install.sh"
cloud-init schema --config-file deploy/cloud-init/target-agent.yaml
tarball=$(deploy/release.sh --out "$work/dist")
tar -C "$work" -xzf "$tarball"
dir=$(basename "$tarball" .tar.gz)
"$work/$dir/deploy/install.sh" --role agent --dry-run | tee "$work/install.txt"
grep -q "install -m 0755 $work/$dir/bin/ferry-agent /usr/local/bin/ferry-agent" "$work/install.txt" \
    || die "install.sh from the tarball did not use its bin/"
grep -q "ExecStart=/usr/bin/ferry-agent" "$repo/deploy/systemd/ferry-agent.service"

say "packaging: all checks passed"
