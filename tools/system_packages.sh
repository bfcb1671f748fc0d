#!/usr/bin/env bash
# Installs the Debian packages some tests need, when they are missing and we may:
#   fuse3 and libfuse2  for the tests on a real FUSE mount (a Drive that blocks in the kernel)
#   postgresql          for the tests of a sweep shared through a database server
#   rsync               the reference of the folder benchmarks (tools/bench_copy.py)
# Without them those tests skip, saying what is missing. Run as root or with sudo.
set -euo pipefail

as_root=()
if [ "$(id -u)" != 0 ]; then
    if ! sudo -n true 2>/dev/null; then
        echo "not root and no sudo: the FUSE and PostgreSQL tests may skip" >&2
        exit 0
    fi
    as_root=(sudo -n)
fi
command -v apt-get >/dev/null 2>&1 || exit 0

fuse_missing() {
    [ -e /dev/fuse ] || return 1  # no FUSE in this kernel: nothing to install would help
    command -v fusermount3 >/dev/null 2>&1 || return 0
    local lib
    for lib in /lib/*/libfuse.so.2 /usr/lib/*/libfuse.so.2 /usr/lib/libfuse.so.2; do
        [ -e "$lib" ] && return 1
    done
    return 0
}
postgres_missing() {
    local dir
    for dir in /usr/lib/postgresql/*/bin; do
        [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && return 1
    done
    ! { command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; }
}

packages=()
if fuse_missing; then packages+=(fuse3 libfuse2); fi
if postgres_missing; then packages+=(postgresql); fi
if ! command -v rsync >/dev/null 2>&1; then packages+=(rsync); fi
[ ${#packages[@]} -eq 0 ] && exit 0

install=("${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}")
if ! "${install[@]}" >/dev/null 2>&1; then
    "${as_root[@]}" apt-get update -q >/dev/null 2>&1 || true
    "${install[@]}" >/dev/null 2>&1 || echo "could not install ${packages[*]}: some tests will skip" >&2
fi
