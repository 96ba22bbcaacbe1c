#!/usr/bin/env bash
# Makes a release tarball that installs without a Rust toolchain:
#   ferry-<version>-<arch>-linux/{bin/ferry-agent,bin/ferry-coordinator,bin/ferryctl,deploy/…}
# On the host: tar xzf ferry-….tar.gz && sudo ferry-…/deploy/install.sh --role agent
#
# Usage: deploy/release.sh [--bin-dir DIR] [--out DIR]   (defaults: target/release, target/dist)
# Build first: cargo build --release -p ferry-agent -p ferry-coordinator -p ferryctl
set -euo pipefail
cd "$(dirname "$0")/.."
bin_dir=target/release
out=target/dist
while [ $# -gt 0 ]; do
    case $1 in
        --bin-dir) bin_dir=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        -h | --help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "release.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
name=ferry-$version-$(uname -m)-linux
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/$name/bin" "$stage/$name/deploy"
for b in ferry-agent ferry-coordinator ferryctl; do
    [ -x "$bin_dir/$b" ] || { echo "release.sh: $bin_dir/$b is missing; build it first (cargo build --release)" >&2; exit 1; }
    install -m 0755 "$bin_dir/$b" "$stage/$name/bin/$b"
    strip "$stage/$name/bin/$b"
done
cp -r deploy/install.sh deploy/README.md deploy/systemd deploy/config deploy/monitoring "$stage/$name/deploy/"
mkdir -p "$out"
tar -C "$stage" -czf "$out/$name.tar.gz" "$name"
echo "$out/$name.tar.gz"
