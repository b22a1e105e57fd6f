# shellcheck shell=bash disable=SC2154
# Part of docker/smoke_test.sh (sourced by it, not run on its own): the private Docker daemon.
#
# A dockerd of its own (socket, exec-root $RUN_DIR/exec and data-root $DATA_ROOT; no docker0 bridge,
# no iptables rules; its containers in the cgroup /$CGROUP_PARENT; BuildKit with a bounded build
# cache), the Debian packages it needs, and everything to leave the machine as it was: stopping the
# daemon by its PID, its containerd and shims, the processes of its containers, unmounting, and
# removing the network links, iptables rules and runtime directories that appeared during the run,
# also those of a previous run that was killed.
#
# Uses from smoke_test.sh: RUN_DIR DATA_ROOT CACHE LOG_DIR DOCKER DOCKERD RUN_PATHS CGROUP_PARENT and the state
# variables DOCKERD_PID LINKS_BEFORE IPT_BEFORE IP_FORWARD_BEFORE RUN_PATHS_BEFORE COMPOSE;
# log, die, compose (SC2154 above: set there).

# processes whose command line names this run's exec-root (containerd, shims): ours by construction
our_pids() {
    local pid
    # shellcheck disable=SC2010   # /proc's process entries are plain numbers
    for pid in $(ls /proc | grep -E '^[0-9]+$'); do
        [ "$pid" = "$$" ] && continue
        { tr '\0' ' ' < "/proc/$pid/cmdline"; } 2>/dev/null | grep -qF "$RUN_DIR/" && echo "$pid"
    done
    return 0
}

# processes in the cgroups of this dockerd's containers (--cgroup-parent /$CGROUP_PARENT): when a
# daemon or its shims are killed (a killed run), the containers' processes outlive them, reparented to
# PID 1; they are ours by their cgroup, whatever their command line
our_container_pids() {
    local f pid
    for f in /proc/[0-9]*/cgroup; do
        pid=${f#/proc/}; pid=${pid%/cgroup}
        [ "$pid" = "$$" ] && continue
        grep -qE ":/${CGROUP_PARENT}/" "$f" 2>/dev/null && echo "$pid"
    done
    return 0
}

stop_container_processes() {   # stop_container_processes WHY: TERM, then KILL what is left after 5 s
    local pid pids
    pids=$(our_container_pids)
    [ -n "$pids" ] || return 0
    for pid in $pids; do log "stopping container process $pid ($1): $({ tr '\0' ' ' < "/proc/$pid/cmdline"; } 2>/dev/null | cut -c1-80)"; kill -TERM "$pid" 2>/dev/null; done
    for _ in $(seq 1 10); do [ -n "$(our_container_pids)" ] || return 0; sleep 0.5; done
    for pid in $(our_container_pids); do kill -KILL "$pid" 2>/dev/null; done
    return 0
}

stop_dockerd() {   # stop_dockerd PID
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then log "dockerd $pid did not stop in 30 s: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || true
    log "dockerd (pid $pid) stopped"
}

iptables_state() {   # the rules of the filter and nat tables, if iptables is installed
    if command -v iptables-save >/dev/null 2>&1; then
        { iptables-save -t filter; iptables-save -t nat; } 2>/dev/null | grep -E '^(\*|:|-A)' || true
    fi
}

remove_new_iptables_rules() {   # delete the rules and chains that appeared since IPT_BEFORE
    command -v iptables-save >/dev/null 2>&1 || return 0
    local table line chain
    for table in filter nat; do
        local before after
        before=$(printf '%s\n' "$IPT_BEFORE" | awk -v t="*$table" '/^\*/ { on = ($0 == t); next } on')
        after=$(iptables-save -t "$table" 2>/dev/null | grep -E '^(:|-A)' || true)
        # rules first (last added first), then the chains
        printf '%s\n' "$after" | grep '^-A' | grep -vxF -f <(printf '%s\n' "$before" | grep '^-A' || true) | tac |
            while read -r line; do
                [ -n "$line" ] || continue
                log "iptables -t $table: removing rule ${line}"
                eval "iptables -t $table -D ${line#-A }" || true
            done
        printf '%s\n' "$after" | grep '^:' | awk '{ print $1 }' | sed 's/^://' |
            grep -vxF -f <(printf '%s\n' "$before" | grep '^:' | awk '{ print $1 }' | sed 's/^://' || true) |
            while read -r chain; do
                [ -n "$chain" ] || continue
                log "iptables -t $table: removing chain $chain"
                iptables -t "$table" -F "$chain" || true
                iptables -t "$table" -X "$chain" || true
            done
    done
}

unmount_under() {   # unmount everything mounted below the given directories (deepest first)
    local dir target
    for dir in "$@"; do
        [ -n "$dir" ] || continue
        awk '{ print $5 }' /proc/self/mountinfo | grep -E "^${dir}(/|$)" | sort -r |
            while read -r target; do umount -l "$target" 2>/dev/null && log "unmounted $target"; done || true
    done
    return 0
}

# preflight: a previous run that was killed may have left its daemon behind: stop it first (rerunnable)
cleanup_previous_run() {
    local old pid path
    if [ -f "$RUN_DIR/dockerd.pid" ]; then
        old=$(cat "$RUN_DIR/dockerd.pid")
        if kill -0 "$old" 2>/dev/null && { tr '\0' ' ' < "/proc/$old/cmdline"; } 2>/dev/null | grep -qF "$RUN_DIR"; then
            log "stopping the dockerd of a previous run (pid $old)"
            stop_dockerd "$old"
        fi
    fi
    for pid in $(our_pids); do log "stopping leftover process $pid of a previous run"; kill -KILL "$pid" 2>/dev/null || true; done
    stop_container_processes "a previous run"
    unmount_under "$RUN_DIR" "$DATA_ROOT" "$CACHE/base/rootfs"
    if [ -f "$RUN_DIR/run-paths-before" ]; then   # that run's daemon created these outside its exec-root
        for path in $RUN_PATHS; do
            if [ -e "$path" ] && ! grep -qxF "$path" "$RUN_DIR/run-paths-before"; then rm -rf "$path"; log "removed $path (previous run)"; fi
        done
    fi
    rm -rf "$RUN_DIR" "$CACHE/base/rootfs"
}

# phase "packages (apt)": docker.io, debootstrap, curl, compose (docker compose or docker-compose)
install_packages() {
    local need=() made_policy
    [ -x "$DOCKERD" ] && [ -x "$DOCKER" ] || need+=(docker.io)
    command -v debootstrap >/dev/null || need+=(debootstrap)
    command -v curl >/dev/null || need+=(curl)
    if ! "$DOCKER" compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then need+=(docker-compose); fi
    if [ ${#need[@]} -gt 0 ]; then
        log "installing ${need[*]}"
        # keep the packages' init scripts from starting a system-wide dockerd
        made_policy=0
        if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made_policy=1; fi
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >"$LOG_DIR/apt.log" 2>&1 ||
            { tail -n 30 "$LOG_DIR/apt.log"; [ $made_policy -eq 1 ] && rm -f /usr/sbin/policy-rc.d; die "apt-get install failed"; }
        [ $made_policy -eq 1 ] && rm -f /usr/sbin/policy-rc.d
    else
        log "docker.io, debootstrap, curl and compose are installed"
    fi
    if "$DOCKER" compose version >/dev/null 2>&1; then COMPOSE=("$DOCKER" compose); else COMPOSE=(docker-compose); fi
    log "docker:  $("$DOCKER" --version)"
    log "compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || "${COMPOSE[@]}" version | head -n 1))"
}

# phase "start dockerd": records the network, iptables and /run state first (teardown_dockerd
# restores it), then starts the daemon and points the docker client (DOCKER_HOST) at it
start_dockerd() {
    local p
    LINKS_BEFORE=$(ip -o link show | awk -F': ' '{ print $2 }' | sed 's/@.*//')
    IPT_BEFORE=$(iptables_state)
    IP_FORWARD_BEFORE=$(cat /proc/sys/net/ipv4/ip_forward)
    RUN_PATHS_BEFORE=$(for p in $RUN_PATHS; do [ -e "$p" ] && echo "$p"; done; true)
    mkdir -p "$RUN_DIR" "$DATA_ROOT"
    printf '%s\n' "$RUN_PATHS_BEFORE" > "$RUN_DIR/run-paths-before"   # for the next run, should this one be killed
    # not /etc/docker/daemon.json: BuildKit's build cache is garbage-collected above 10 GB (the GPU
    # image's build stage alone holds ~5 GB)
    echo '{"builder": {"gc": {"enabled": true, "defaultKeepStorage": "10GB"}}}' > "$RUN_DIR/daemon.json"
    export DOCKER_HOST=unix://$RUN_DIR/docker.sock
    export DOCKER_CONFIG=$CACHE/docker-cli   # the client's config too: nothing written to ~/.docker
    # the Dockerfiles need BuildKit (the build secret pip_ca); compose only starts the built images
    export DOCKER_BUILDKIT=1
    export COMPOSE_DOCKER_CLI_BUILD=1
    "$DOCKERD" --config-file "$RUN_DIR/daemon.json" \
        --host "$DOCKER_HOST" --pidfile "$RUN_DIR/dockerd.pid" \
        --exec-root "$RUN_DIR/exec" --data-root "$DATA_ROOT" \
        --storage-driver overlay2 --bridge none --iptables=false --ip-forward=false --ip-masq=false \
        --cgroup-parent "/$CGROUP_PARENT" \
        --log-level warn >"$LOG_DIR/dockerd.log" 2>&1 9>&- &   # 9: smoke_test.sh's lock, not for the daemon
    DOCKERD_PID=$!
    log "dockerd pid $DOCKERD_PID, socket $DOCKER_HOST, data-root $DATA_ROOT (log: $LOG_DIR/dockerd.log)"
    for _ in $(seq 1 120); do
        "$DOCKER" version >/dev/null 2>&1 && break
        kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -n 30 "$LOG_DIR/dockerd.log" >&2; die "dockerd exited"; }
        sleep 0.5
    done
    "$DOCKER" version >/dev/null 2>&1 || die "dockerd did not answer within 60 s"
    log "engine $("$DOCKER" version -f '{{.Server.Version}}'), storage driver $("$DOCKER" info -f '{{.Driver}}')"
    # leftovers of an interrupted run (containers, the volumes, also the profile scale's) go before the test starts
    compose --profile scale down -v --remove-orphans --timeout 5 >/dev/null 2>&1 || true
}

# teardown (after compose down): the daemon, its leftovers, the mounts, the network state, /run
teardown_dockerd() {   # teardown_dockerd EXIT_STATUS
    local rc=$1 pid link path
    if [ -n "$DOCKERD_PID" ]; then
        if [ "$rc" -ne 0 ] && [ -f "$LOG_DIR/dockerd.log" ]; then
            log "dockerd log (last 20 lines):"; tail -n 20 "$LOG_DIR/dockerd.log" | sed 's/^/      /'
        fi
        stop_dockerd "$DOCKERD_PID"
    fi
    # containerd and shims started by that dockerd, if any survived it
    for pid in $(our_pids); do log "stopping leftover process $pid: $({ tr '\0' ' ' < "/proc/$pid/cmdline"; } 2>/dev/null | cut -c1-100)"; kill -TERM "$pid" 2>/dev/null; done
    sleep 0.5
    for pid in $(our_pids); do kill -KILL "$pid" 2>/dev/null; done
    stop_container_processes "its daemon is gone"
    unmount_under "$RUN_DIR" "$DATA_ROOT" "$CACHE/base/rootfs"
    # network: links (bridges, veths) and iptables rules that appeared during this run
    if [ -n "$LINKS_BEFORE" ]; then
        for link in $(ip -o link show | awk -F': ' '{ print $2 }' | sed 's/@.*//'); do
            if ! grep -qxF "$link" <<<"$LINKS_BEFORE" && [[ $link =~ ^(docker0|br-[0-9a-f]{12}|veth[0-9a-f]+)$ ]]; then
                ip link delete "$link" && log "deleted network link $link"
            fi
        done
        remove_new_iptables_rules
        if [ -n "$IP_FORWARD_BEFORE" ] && [ "$(cat /proc/sys/net/ipv4/ip_forward)" != "$IP_FORWARD_BEFORE" ]; then
            echo "$IP_FORWARD_BEFORE" > /proc/sys/net/ipv4/ip_forward && log "net.ipv4.ip_forward restored to $IP_FORWARD_BEFORE"
        fi
    fi
    # runtime directories the daemon created outside its exec-root (containerd's shim sockets)
    for path in $RUN_PATHS; do
        if [ -e "$path" ] && ! grep -qxF "$path" <<<"$RUN_PATHS_BEFORE" && [ -n "$DOCKERD_PID" ]; then
            rm -rf "$path" && log "removed $path"
        fi
    done
}
