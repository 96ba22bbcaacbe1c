#!/usr/bin/env bash
# Installs one ferry role (coordinator or agent) on this host:
#   binaries -> /usr/local/bin, example config -> /etc/ferry/<role>.toml (only if absent),
#   systemd unit -> /etc/systemd/system/ferry-<role>.service, then `systemctl daemon-reload`.
# It never starts or enables the service and never overwrites an existing config.
#
# Usage: deploy/install.sh --role coordinator|agent [--bin-dir DIR] [--dry-run]
set -euo pipefail

PROG=${0##*/}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH

PREFIX_BIN=/usr/local/bin
ETC_DIR=/etc/ferry
PKI_DIR=$ETC_DIR/pki
UNIT_DIR=/etc/systemd/system
SERVICE_USER=ferry

role=""
# From a release tarball (deploy/release.sh) the binaries sit in ../bin beside this script;
# from a checkout, in ./target/release after `cargo build --release`.
if [ -d "$SCRIPT_DIR/../bin" ]; then
    bin_dir=$(cd "$SCRIPT_DIR/../bin" && pwd)
else
    bin_dir=./target/release
fi
dry_run=0

usage() {
    cat <<EOF
Usage: $PROG --role coordinator|agent [--bin-dir DIR] [--dry-run]

  --role ROLE     what to install on this host: coordinator or agent (required)
  --bin-dir DIR   directory holding the built binaries (default: ../bin beside this
                  script in a release tarball, else ./target/release)
  --dry-run       print the commands instead of running them
  -h, --help      show this help

Installs the binaries to $PREFIX_BIN, the example config to $ETC_DIR/ROLE.toml
(only if that file does not exist yet) and the systemd unit to $UNIT_DIR.
EOF
}

die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

usage_error() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    printf "Run '%s --help' for usage.\n" "$PROG" >&2
    exit 2
}

note() {
    printf '%s: %s\n' "$PROG" "$*"
}

# Runs a command, or prints it (shell-quoted) under --dry-run.
run() {
    if [ "$dry_run" -eq 1 ]; then
        local q
        printf -v q '%q ' "$@"
        printf '+ %s\n' "${q% }"
    else
        "$@"
    fi
}

# --- arguments --------------------------------------------------------------

while [ $# -gt 0 ]; do
    case $1 in
        --role)
            [ $# -ge 2 ] || usage_error "--role needs a value (coordinator or agent)"
            role=$2
            shift 2
            ;;
        --role=*)
            role=${1#--role=}
            shift
            ;;
        --bin-dir)
            [ $# -ge 2 ] || usage_error "--bin-dir needs a directory"
            bin_dir=$2
            shift 2
            ;;
        --bin-dir=*)
            bin_dir=${1#--bin-dir=}
            shift
            ;;
        --dry-run)
            dry_run=1
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            usage_error "unknown argument: $1"
            ;;
    esac
done

case $role in
    coordinator) binaries=(ferry-coordinator ferryctl) ;;
    agent) binaries=(ferry-agent) ;;
    "") usage_error "--role is required (coordinator or agent)" ;;
    *) usage_error "unknown role '$role' (expected 'coordinator' or 'agent')" ;;
esac

unit_name=ferry-$role.service
unit_src=$SCRIPT_DIR/systemd/$unit_name
config_src=$SCRIPT_DIR/config/$role.toml
config_dst=$ETC_DIR/$role.toml

# --- preflight (also under --dry-run) ---------------------------------------

[ -d "$bin_dir" ] || die "missing binary for role '$role': directory $bin_dir does not exist (needed: ${binaries[*]})
  Build first (cargo build --release) or pass --bin-dir DIR pointing at the built binaries."

missing=()
for b in "${binaries[@]}"; do
    if [ ! -f "$bin_dir/$b" ]; then
        missing+=("$bin_dir/$b (not found)")
    elif [ ! -x "$bin_dir/$b" ]; then
        missing+=("$bin_dir/$b (not executable)")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    die "missing binary for role '$role':$(printf '\n  %s' "${missing[@]}")
  Build first (cargo build --release) or pass --bin-dir DIR pointing at the built binaries."
fi

[ -f "$unit_src" ] || die "systemd unit not found: $unit_src (run this script from a complete ferry checkout)"
[ -f "$config_src" ] || die "example config not found: $config_src (run this script from a complete ferry checkout)"

if [ "$dry_run" -eq 1 ]; then
    note "dry run: printing commands, changing nothing"
    [ "$(id -u)" -eq 0 ] || note "(not running as root; a real install must run as root)"
else
    [ "$(id -u)" -eq 0 ] || die "must run as root (try: sudo $0 --role $role --bin-dir $bin_dir)"
    command -v systemctl >/dev/null 2>&1 || die "systemctl not found; this installer needs systemd"
fi

# --- install ----------------------------------------------------------------

# 1. The service user (coordinator only; the agent runs as root).
if [ "$role" = coordinator ]; then
    if getent passwd "$SERVICE_USER" >/dev/null 2>&1; then
        note "user '$SERVICE_USER' exists"
    else
        command -v useradd >/dev/null 2>&1 || die "useradd not found; create the system user '$SERVICE_USER' by hand"
        nologin=/usr/sbin/nologin
        if [ ! -x "$nologin" ] && [ -x /sbin/nologin ]; then
            nologin=/sbin/nologin
        fi
        if getent group "$SERVICE_USER" >/dev/null 2>&1; then
            group_opt=(--gid "$SERVICE_USER")
        else
            group_opt=(--user-group)
        fi
        run useradd --system --no-create-home --home-dir /var/lib/ferry-coordinator \
            --shell "$nologin" "${group_opt[@]}" "$SERVICE_USER"
    fi
fi

# 2. Binaries.
for b in "${binaries[@]}"; do
    run install -m 0755 "$bin_dir/$b" "$PREFIX_BIN/$b"
done

# 3. /etc/ferry and /etc/ferry/pki. Group ferry (when that group exists, i.e. a coordinator
#    is or will be installed here) so the coordinator can read its config and key; mode 0750.
etc_group=root
if [ "$role" = coordinator ] || getent group "$SERVICE_USER" >/dev/null 2>&1; then
    etc_group=$SERVICE_USER
fi
run install -d -m 0750 -o root -g "$etc_group" "$ETC_DIR" "$PKI_DIR"

# 4. Config: only if absent, never overwrite the operator's file.
if [ -e "$config_dst" ]; then
    note "keeping existing $config_dst (example left at $config_src)"
else
    run install -m 0640 -o root -g "$etc_group" "$config_src" "$config_dst"
fi

# 5. systemd unit (always replaced; put local changes in `systemctl edit $unit_name`). The unit
#    names /usr/bin, where the .deb puts the binaries; this script puts them in $PREFIX_BIN.
if [ "$dry_run" -eq 1 ]; then
    printf '+ sed %q %q > %q\n' "s|=/usr/bin/ferry-|=$PREFIX_BIN/ferry-|" "$unit_src" "$UNIT_DIR/$unit_name"
else
    sed "s|=/usr/bin/ferry-|=$PREFIX_BIN/ferry-|" "$unit_src" >"$UNIT_DIR/$unit_name"
    chmod 0644 "$UNIT_DIR/$unit_name"
fi
run systemctl daemon-reload

# --- next steps -------------------------------------------------------------

if [ "$dry_run" -eq 1 ]; then
    echo
    note "dry run finished; nothing was changed"
fi

echo
if [ "$dry_run" -eq 1 ]; then
    echo "After a real install of ferry $role, the next steps are:"
else
    echo "Installed ferry $role. Next steps:"
fi
if [ "$role" = coordinator ]; then
    # This node's key file, from node_id in the installed (or example) config.
    node_id=""
    if [ -r "$config_dst" ]; then
        node_id=$(sed -n 's/^[[:space:]]*node_id[[:space:]]*=[[:space:]]*\([0-9][0-9]*\).*/\1/p' "$config_dst" | head -n 1)
    fi
    node_key=$PKI_DIR/coordinator-${node_id:-1}.key
    cat <<EOF
  1. Edit $config_dst (node_id, listen, [tls] paths).
  2. On the FIRST coordinator only, create the cluster CA:
       ferry-coordinator pki init --dir $PKI_DIR
     Make sure this node's certificate and key named in [tls] exist
     (coordinator-<node_id>.pem/.key), and let the '$SERVICE_USER' user read the key:
       chgrp $SERVICE_USER $node_key && chmod 0640 $node_key
     Keep $PKI_DIR/ca.key root-only (0600) and on coordinators only.
  3. Issue one certificate per agent:
       ferry-coordinator pki issue --dir $PKI_DIR --agent NAME
     and copy ca.pem, agent-NAME.pem and agent-NAME.key to $PKI_DIR on that agent host
     (key mode 0600). Never copy ca.key to an agent.
  4. Start it:
       systemctl enable --now ferry-coordinator
       journalctl -u ferry-coordinator -f
EOF
else
    cat <<EOF
  1. Edit $config_dst: name, coordinator, [tls] paths.
     Source-only host: remove data_listen and root.
     Target host: set root, then let the service write there:
       systemctl edit ferry-agent      # add:  [Service]  ReadWritePaths=/srv/ferry
  2. On a coordinator, issue this agent's certificate (NAME = the 'name' in agent.toml):
       ferry-coordinator pki issue --dir $PKI_DIR --agent NAME
     then copy ca.pem, agent-NAME.pem and agent-NAME.key from the coordinator's $PKI_DIR
     to $PKI_DIR here (chmod 0600 the key).
  3. Start it:
       systemctl enable --now ferry-agent
       journalctl -u ferry-agent -f
EOF
fi
