#!/bin/bash
# The lab scenario: imds-guard as an operator lives it, on this VM's kernel, in two boots.
# Each step is a function; `step` times it and records `name<TAB>pass|fail<TAB>seconds` in
# /lab/out/results.tsv (its output in /lab/out/<name>.log). The first failure ends the run.
# `cargo xtask lab` reads /lab/out back from the disk once the VM has powered off.
set -uo pipefail

LAB=/lab
OUT=$LAB/out
IMDS4=169.254.169.254
IMDS6=fd00:ec2::254
INSTANCE_ID=i-0123456789abcdef0
mkdir -p "$OUT"
install -m 755 "$LAB/lab.py" /usr/local/bin/lab.py

say() { echo "lab: $*" >/dev/console; }

# The end of a run: the journal kept beside the results, then off.
finish() {
    journalctl -b all -o short-monotonic --no-pager >"$OUT/journal.txt" 2>&1
    echo done >"$OUT/finished"
    sync
    systemctl poweroff
    exit 0
}

# Runs step NAME (a function) in a subshell, where the first failed `check` ends it.
step() {
    local name=$1 start end status
    shift
    say "step $name"
    start=$(date +%s%N)
    if ("$@") >"$OUT/$name.log" 2>&1; then status=pass; else status=fail; fi
    end=$(date +%s%N)
    printf '%s\t%s\t%d.%01d\n' "$name" "$status" $(((end - start) / 1000000000)) \
        $(((end - start) / 100000000 % 10)) >>"$OUT/results.tsv"
    say "step $name: $status"
    if [ "$status" = fail ]; then
        finish
    fi
}

# Ends the step (its subshell) with MESSAGE unless the command succeeds.
check() {
    local message=$1
    shift
    if ! "$@"; then
        echo "FAILED: $message"
        exit 1
    fi
    echo "ok: $message"
}

# Succeeds when COMMAND's output (shown) has a line matching the extended REGEX.
says() {
    local regex=$1 out
    shift
    out=$("$@")
    echo "$out"
    grep -qE "$regex" <<<"$out"
}

# Waits up to 15 s for the agent's events matching KEY=VALUE... to be in the journal.
await_events() {
    await_events_for 15 "$@"
}

# Waits up to SECONDS for the agent's events matching KEY=VALUE... to be in the journal.
await_events_for() {
    local seconds=$1
    shift
    for _ in $(seq $((seconds * 10))); do
        if lab.py events "$@" >/dev/null; then
            lab.py events "$@"
            return 0
        fi
        sleep 0.1
    done
    echo "FAILED: no event with $*"
    exit 1
}

probe_as() { # USER ADDR: what the user gets from IMDS
    if [ "$1" = root ]; then lab.py probe "$2"; else runuser -u "$1" -- lab.py probe "$2"; fi
}

expect_probe() { # USER ADDR EXPECTED (ok | EPERM)
    local got
    got=$(probe_as "$1" "$2")
    echo "$1 → $2: $got"
    if [ "$3" = ok ]; then
        [ "$got" = "ok $INSTANCE_ID" ]
    else
        [ "$got" = "errno $3" ]
    fi
}

# A container on Docker's default bridge (its traffic forwarded and NATed, as on EC2) asking
# IMDS; ARGS go to `docker run` (e.g. -u 1000). Prints the container id, then the reply.
container_probe() {
    rm -f /tmp/container.cid
    docker run --rm --cidfile /tmp/container.cid "$@" lab-busybox sh -c \
        "printf 'GET /latest/meta-data/instance-id HTTP/1.0\r\n\r\n' | nc -w 5 $IMDS4 80 2>&1"
    # The reply has no final newline.
    printf '\ncontainer %s\n' "$(cat /tmp/container.cid)"
}

agent_json() { imds-guard status --json; }

wait_posture() { # HTTP_TOKENS: until `status` shows the agent's posture check found it
    for _ in $(seq 100); do
        if imds-guard status | grep -q "^posture: http_tokens $1"; then
            imds-guard status | grep "^posture:"
            return 0
        fi
        sleep 0.1
    done
    imds-guard status
    return 1
}

wait_reloads() { # N: until the agent has taken N reloads
    for _ in $(seq 100); do
        if agent_json | python3 -c "import json,sys; sys.exit(json.load(sys.stdin)['agent']['reloads'] < $1)"; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

## Phase 1: the first boot.

step_install() {
    docker import --change "ENV PATH=/bin" /opt/lab/busybox.tar lab-busybox >/dev/null
    check "apt install" apt-get install -y "$LAB/imds-guard.deb"
    check "enabled" [ "$(systemctl is-enabled imds-guard)" = enabled ]
    check "active" systemctl is-active imds-guard
    imds-guard status | tee /tmp/status
    check "enforcing on /" grep -q "enforcement: in force on cgroup / " /tmp/status
    check "audit mode" grep -q "^mode: audit" /tmp/status
    # systemd's view of the order: before sysinit.target, which Docker comes after.
    check "before sysinit.target" says '(^| )sysinit\.target( |$)' systemctl show -p Before --value imds-guard
    check "docker after sysinit.target" says '(^| )sysinit\.target( |$)' systemctl show -p After --value docker
    # The packaged config checks the posture: the mock answers tokenless requests.
    check "posture in status" wait_posture optional
    # The mock answers with the kernel's default TTL; the unit's capabilities suffice to read it.
    check "hop limit in status" says '^posture: .*hop limit 64;' imds-guard status
    imds-guard posture --json | tee /tmp/posture.json
    check "posture command" grep -q '"http_tokens": "optional"' /tmp/posture.json
    check "posture command's hop limit" grep -q '"hop_limit": 64' /tmp/posture.json
    journalctl -u imds-guard -o cat --no-pager | grep "imds-guard is enforcing" | tail -1 >"$OUT/start-line.txt"
    # What this kernel must give the agent (a fallback would hide a verifier's refusal): from
    # Linux 5.11, tasks read by BTF-typed loads and fold windows on the coarse clock; before,
    # bpf_probe_read_kernel and the boot clock.
    if [ "$(printf '%s\n' 5.11 "$(uname -r)" | sort -V | head -1)" = 5.11 ]; then
        check "tasks read by BTF loads" grep -q 'containers_by="namespaces (BTF loads)' "$OUT/start-line.txt"
        check "fold windows on the coarse clock" grep -q 'fold_clock="CLOCK_MONOTONIC_COARSE"' "$OUT/start-line.txt"
        # `status` reads it from the programs in force (their TASK_LAYOUT, by their BTF).
        check "status reads the programs' task reads" grep -q '^containers: told by namespaces (BTF loads) and cgroup paths$' /tmp/status
    else
        check "tasks read by probe reads" grep -q 'containers_by="namespaces (probe reads)' "$OUT/start-line.txt"
        check "fold windows on the boot clock" grep -q 'fold_clock="CLOCK_BOOTTIME"' "$OUT/start-line.txt"
        check "status reads the programs' task reads" grep -q '^containers: told by namespaces (probe reads) and cgroup paths$' /tmp/status
    fi
    # The agent's log lines reach the journal at one priority: its warnings say WARN.
    journalctl -u imds-guard -o cat --no-pager | grep -E '^[^ ]+ +WARN ' >"$OUT/warnings.txt" || true
}

step_audit() {
    check "host root" expect_probe root $IMDS4 ok
    check "the unit's user" says "^ok $INSTANCE_ID\$" systemd-run --wait --pipe --quiet \
        --unit=lab-cwagent -p User=cwagent /usr/local/bin/lab.py probe $IMDS4
    check "alice" expect_probe alice $IMDS4 ok
    container_probe | tee /tmp/c0
    check "a container's root" grep -q $INSTANCE_ID /tmp/c0
    local root_cid
    root_cid=$(awk '/^container /{print $2}' /tmp/c0)
    container_probe -u 1000 | tee /tmp/c1000
    check "a container as uid 1000" grep -q $INSTANCE_ID /tmp/c1000
    local user_cid
    user_cid=$(awk '/^container /{print $2}' /tmp/c1000)
    await_events verdict=audit uid="$(id -u cwagent)" unit=lab-cwagent.service
    await_events verdict=audit uid=1000 in_container=false
    await_events verdict=audit uid=0 container.id="$root_cid" in_container=true
    await_events verdict=audit uid=1000 container.id="$user_cid"
    # Host root's rule lets its connects through unreported; the message layer still reads its
    # tokenless GET and names it (the migration to IMDSv2 is not done while these come).
    check "no connect event of host root" bash -c '! lab.py events uid=0 in_container=false verdict=audit'
    await_events hook=http imds_version=v1 verdict=allow uid=0 unit=lab-scenario.service
    await_events hook=http imds_version=v1 container.id="$root_cid"
    journalctl -u imds-guard -o export --no-pager | imds-guard report | tee /tmp/report
    for who in lab-cwagent.service "${root_cid:0:12}" "${user_cid:0:12}" alice; do
        check "report lists $who" grep -q "$who" /tmp/report
    done
    grep "still use IMDSv1:" /tmp/report >/tmp/v1-users
    for who in lab-cwagent.service lab-scenario.service "${root_cid:0:12}"; do
        check "report names $who as an IMDSv1 user" grep -q "$who" /tmp/v1-users
    done
    # Its own posture check is a tokenless request too, marked as such: not a workload's.
    await_events hook=http posture_check=true unit=imds-guard.service
    check "the agent is not named an IMDSv1 user" bash -c '! grep -q imds-guard.service /tmp/v1-users'
}

# `imds = "v2"` for the unit: its tokenless GET fails at once with EACCES, its token flow works.
step_imds_v2() {
    sed -i '/^unit = "lab-cwagent.service"$/a imds = "v2"' /etc/imds-guard/imds-guard.toml
    check "the rule says v2" grep -q '^imds = "v2"$' /etc/imds-guard/imds-guard.toml
    check "check-config" imds-guard check-config /etc/imds-guard/imds-guard.toml
    systemctl reload imds-guard
    check "reloaded" wait_reloads 2
    check "the unit's v1 GET refused" says "^errno EACCES\$" systemd-run --wait --pipe --quiet \
        --unit=lab-cwagent -p User=cwagent /usr/local/bin/lab.py probe $IMDS4
    check "the unit's v2 flow" says "^ok $INSTANCE_ID\$" systemd-run --wait --pipe --quiet \
        --unit=lab-cwagent -p User=cwagent /usr/local/bin/lab.py probe-v2 $IMDS4
    await_events hook=http verdict=deny refused=v1 unit=lab-cwagent.service
    # Host root's rule says nothing: its v1 GET still goes through.
    check "host root's v1 GET" expect_probe root $IMDS4 ok
}

# The host's old owner-match rules (root only, both families; Docker's bridge guarded in
# DOCKER-USER) translated by `imds-guard migrate`, enforced, and deleted with `--apply`; then
# the scenario's own policy again.
step_migrate() {
    cp /etc/imds-guard/imds-guard.toml /tmp/before-migrate.toml
    iptables -A OUTPUT -d $IMDS4 -m owner ! --uid-owner root -j DROP
    ip6tables -A OUTPUT -d $IMDS6 -m owner ! --uid-owner root -j DROP
    iptables -I DOCKER-USER -i docker0 -d $IMDS4 -j DROP
    iptables-save
    imds-guard migrate >/tmp/migrated.toml 2>/tmp/migrate.err
    check "migrate" [ $? = 0 ]
    cat /tmp/migrate.err /tmp/migrated.toml
    check "root alone" [ "$(grep -c '^uid = ' /tmp/migrated.toml)" = 1 ]
    check "root" grep -q '^uid = 0 ' /tmp/migrated.toml
    check "both addresses covered" grep -q "reaching: $IMDS4, $IMDS6\." /tmp/migrated.toml
    check "Docker's bridge rule named, kept" grep -q "filter DOCKER-USER): -A DOCKER-USER -d $IMDS4/32 -i docker0 -j DROP" /tmp/migrated.toml
    check "the OUTPUT rule's deletion" grep -q "#   iptables -D OUTPUT -d $IMDS4/32 -m owner ! --uid-owner 0 -j DROP" /tmp/migrated.toml
    check "the ip6tables rule's deletion" grep -q "#   ip6tables -D OUTPUT -d $IMDS6/128 -m owner ! --uid-owner 0 -j DROP" /tmp/migrated.toml
    check "nothing of Docker's deleted" bash -c '! grep -q -- "-D DOCKER" /tmp/migrated.toml'
    # The scenario's policy lets the unit's user through, which the rules stopped.
    check "--apply refuses a wider policy" bash -c '! imds-guard migrate --apply 2>/tmp/apply.err'
    cat /tmp/apply.err
    check "... saying what it lets through" grep -q "uid $(id -u cwagent)" /tmp/apply.err
    check "rules untouched" says "uid-owner 0 -j DROP" iptables-save
    cp /tmp/migrated.toml /etc/imds-guard/imds-guard.toml
    systemctl reload imds-guard
    check "reloaded" wait_reloads 3
    check "--check" imds-guard migrate --check
    check "--apply" imds-guard migrate --apply
    check "the OUTPUT rules gone" bash -c '! iptables-save | grep -q uid-owner && ! ip6tables-save | grep -q uid-owner'
    check "Docker's bridge rule kept" says "DOCKER-USER -d $IMDS4/32 -i docker0 -j DROP" iptables-save
    check "host root (IPv4)" expect_probe root $IMDS4 ok
    check "host root (IPv6)" expect_probe root $IMDS6 ok
    check "alice refused (IPv4)" expect_probe alice $IMDS4 EPERM
    check "alice refused (IPv6)" expect_probe alice $IMDS6 EPERM
    container_probe | tee /tmp/c0
    check "a container's root refused" grep -q "Operation not permitted" /tmp/c0
    iptables -D DOCKER-USER -i docker0 -d $IMDS4 -j DROP
    cp /tmp/before-migrate.toml /etc/imds-guard/imds-guard.toml
    systemctl reload imds-guard
    check "the scenario's policy again" wait_reloads 4
}

step_enforce() {
    journalctl -u imds-guard -o export --no-pager |
        imds-guard report --suggest-policy --config /etc/imds-guard/imds-guard.toml >/tmp/suggested.toml
    cat /tmp/suggested.toml
    check "suggests the unit" grep -q lab-cwagent.service /tmp/suggested.toml
    # The operator's review: only the unit's rule is kept.
    lab.py keep-rules /tmp/suggested.toml lab-cwagent.service >/etc/imds-guard/imds-guard.toml
    check "check-config" imds-guard check-config /etc/imds-guard/imds-guard.toml
    systemctl reload imds-guard
    check "reloaded" wait_reloads 1
    container_probe | tee /tmp/c0
    check "a container's root refused" grep -q "Operation not permitted" /tmp/c0
    check "alice refused (IPv4)" expect_probe alice $IMDS4 EPERM
    check "alice refused (IPv6)" expect_probe alice $IMDS6 EPERM
    check "host root (IPv4)" expect_probe root $IMDS4 ok
    check "host root (IPv6)" expect_probe root $IMDS6 ok
    check "the unit" says "^ok $INSTANCE_ID\$" systemd-run --wait --pipe --quiet \
        --unit=lab-cwagent -p User=cwagent /usr/local/bin/lab.py probe $IMDS4
    # The rule names the unit: the same user in another unit is refused.
    check "the user in another unit refused" says "^errno EPERM\$" systemd-run --wait --pipe \
        --quiet --unit=lab-other -p User=cwagent /usr/local/bin/lab.py probe $IMDS4
    await_events verdict=deny uid=1000 family=ipv6
    # A loop on connect() is folded by the kernel (timed by its fold clock: the coarse one from
    # Linux 5.11, the boot clock before): the first attempt reported at once, its 19 repeats as
    # one aggregate once the 10 s window has closed.
    check "alice's flood refused" says "^errno EPERM x20\$" runuser -u alice -- lab.py flood $IMDS4 20
    check "the flood's aggregate" await_events_for 30 verdict=deny uid="$(id -u alice)" \
        aggregated=true count=19
}

# Probers in a container (must always be refused) and as host root (must always get through)
# for SECONDS; prints `total wrong` for each. Used around restarts and upgrades.
start_probers() {
    rm -rf /tmp/probe && mkdir -p /tmp/probe
    docker run -d --rm -v /tmp/probe:/out lab-busybox sh -c "
        end=\$(( \$(date +%s) + $1 )); t=0; w=0
        while [ \$(date +%s) -lt \$end ]; do
            if printf 'GET /latest/meta-data/instance-id HTTP/1.0\r\n\r\n' | nc -w 2 $IMDS4 80 2>/dev/null | grep -q $INSTANCE_ID; then w=\$((w+1)); fi
            t=\$((t+1)); usleep 20000
        done
        echo \"\$t \$w\" > /out/container" >/dev/null
    lab.py prober $IMDS4 "$1" ok /tmp/probe/root &
}

probers_clean() {
    wait
    for _ in $(seq 100); do [ -s /tmp/probe/container ] && break; sleep 0.2; done
    echo "container prober (total wrong): $(cat /tmp/probe/container)"
    echo "host root prober (total wrong): $(cat /tmp/probe/root)"
    read -r ct cw </tmp/probe/container && read -r rt rw </tmp/probe/root &&
        [ "$ct" -gt 10 ] && [ "$rt" -gt 10 ] && [ "$cw" = 0 ] && [ "$rw" = 0 ]
}

step_restart() {
    start_probers 14
    sleep 2
    systemctl restart imds-guard
    check "active after restart" systemctl is-active imds-guard
    sleep 2
    local pid
    pid=$(cat /run/imds-guard/imds-guard.pid)
    kill -9 "$pid"
    # As long as systemd gives it: RestartSec (1 s) and TimeoutStartSec (60 s) of the unit. The
    # agent's start in a TCG VM takes seconds, tens of them on a busy host (10 s was too few).
    for _ in $(seq 650); do
        [ "$(cat /run/imds-guard/imds-guard.pid 2>/dev/null)" != "$pid" ] && systemctl is-active -q imds-guard && break
        sleep 0.1
    done
    check "restarted by systemd after kill -9" systemctl is-active imds-guard
    check "no wrong verdict" probers_clean
}

step_prepare_reboot() {
    # A workload as early as a service can be: it asks IMDS as alice, whom the policy refuses.
    cat >/etc/systemd/system/lab-early.service <<'UNIT'
[Unit]
Description=lab: a workload as early as systemd starts one
DefaultDependencies=no
After=sysinit.target lab-imds.service
Wants=lab-imds.service
[Service]
Type=oneshot
User=alice
ExecStart=/usr/local/bin/lab.py probe 169.254.169.254
StandardOutput=file:/var/lib/lab-early.out
[Install]
WantedBy=sysinit.target
UNIT
    systemctl enable lab-early.service
    echo 2 >"$LAB/phase"
}

## Phase 2: after a reboot.

step_boot() {
    check "the early unit ran" says '^success$' systemctl show -p Result --value lab-early
    cat /var/lib/lab-early.out
    check "the early unit was refused" grep -qx "errno EPERM" /var/lib/lab-early.out
    local guard docker early
    guard=$(systemctl show -p ActiveEnterTimestampMonotonic --value imds-guard)
    docker=$(systemctl show -p ExecMainStartTimestampMonotonic --value docker)
    early=$(systemctl show -p ExecMainStartTimestampMonotonic --value lab-early)
    echo "enforcing at ${guard} µs; docker started at ${docker} µs; the early unit at ${early} µs"
    check "enforcing before docker" [ "$guard" -lt "$docker" ]
    check "enforcing before the early unit" [ "$guard" -lt "$early" ]
    await_events verdict=deny uid=1000 unit=lab-early.service
}

step_upgrade() {
    start_probers 14
    sleep 2
    check "apt install the upgrade" apt-get install -y "$LAB/imds-guard-upgrade.deb"
    check "the new version" says 'lab\.upgrade' dpkg-query -W imds-guard
    check "active" systemctl is-active imds-guard
    journalctl -u imds-guard -o cat --no-pager | grep "imds-guard is enforcing" | tail -1 | tee /tmp/start
    check "adopted, no link created" grep -q "links_created=0 .*adopted=true" /tmp/start
    check "links updated in place" grep -qE "links_updated=[1-9]" /tmp/start
    check "no wrong verdict" probers_clean
}

step_hardening() {
    systemd-analyze security imds-guard --no-pager | tee /tmp/security
    local exposure
    exposure=$(grep -oE 'Overall exposure level for [^:]+: [0-9.]+' /tmp/security | awk '{print $NF}')
    echo "exposure: $exposure"
    check "exposure at most 4.0" python3 -c "import sys; sys.exit(not float('$exposure') <= 4.0)"
    imds-guard status | tee /tmp/status
    check "healthy" grep -q "healthy" /tmp/status
    check "no permission denied in the agent's journal" bash -c \
        "! journalctl -u imds-guard -o cat --no-pager | grep -iE 'not permitted|permission denied'"
}

step_remove() {
    check "apt remove" apt-get remove -y imds-guard
    check "inactive" bash -c '! systemctl is-active -q imds-guard'
    check "pins gone" bash -c '! test -e /sys/fs/bpf/imds-guard'
    check "alice gets through again" expect_probe alice $IMDS4 ok
    check "config kept" test -e /etc/imds-guard/imds-guard.toml
    check "apt purge" apt-get purge -y imds-guard
    check "config gone" bash -c '! test -e /etc/imds-guard'
}

phase=$(cat "$LAB/phase" 2>/dev/null || echo 1)
say "phase $phase on $(uname -r)"
if [ "$phase" = 1 ]; then
    step install step_install
    step audit step_audit
    step enforce step_enforce
    step imds-v2 step_imds_v2
    step migrate step_migrate
    step restart step_restart
    step_prepare_reboot >"$OUT/prepare-reboot.log" 2>&1
    sync
    systemctl reboot
else
    step boot step_boot
    step upgrade step_upgrade
    step hardening step_hardening
    step remove step_remove
    finish
fi
