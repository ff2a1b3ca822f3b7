#!/usr/bin/env bash
# Installs the C API: the shared and static library, the header and a pkg-config file.
#
#   scripts/install-lib.sh [--profile release|debug] [--no-build] [--from DIR] PREFIX
#
# then build C programs with
#
#   PKG_CONFIG_PATH=PREFIX/lib/pkgconfig cc prog.c $(pkg-config --cflags --libs hetccl)
#
# Layout: PREFIX/lib/libhetccl.so, PREFIX/lib/libhetccl.a, PREFIX/include/hetccl.h,
# PREFIX/lib/pkgconfig/hetccl.pc. Extra cargo flags (e.g. --features mpi) can be
# passed in CARGO_FLAGS. --no-build installs what target/<profile>/ already holds;
# --from DIR (implies --no-build) takes libhetccl.so and libhetccl.a from DIR instead.
set -euo pipefail

profile=release
build=1
prefix=
from=
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --no-build) build=0; shift ;;
    --from) from="$2"; build=0; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) echo "install-lib.sh: unknown option $1" >&2; exit 2 ;;
    *) prefix="$1"; shift ;;
  esac
done
if [ -z "$prefix" ]; then
  echo "usage: scripts/install-lib.sh [--profile release|debug] [--no-build] [--from DIR] PREFIX" >&2
  exit 2
fi
case "$profile" in
  release) cargo_profile=(--release) ;;
  debug) cargo_profile=() ;;
  *) echo "install-lib.sh: --profile is release or debug, not $profile" >&2; exit 2 ;;
esac

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${from:-${CARGO_TARGET_DIR:-$repo/target}/$profile}"
if [ "$build" = 1 ]; then
  # shellcheck disable=SC2086
  (cd "$repo" && cargo build -p hetccl --lib "${cargo_profile[@]}" ${CARGO_FLAGS:-})
fi
for f in libhetccl.so libhetccl.a; do
  [ -f "$target/$f" ] || { echo "install-lib.sh: $target/$f is missing (build first)" >&2; exit 1; }
done

version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n1)"
mkdir -p "$prefix/lib/pkgconfig" "$prefix/include"
prefix="$(cd "$prefix" && pwd)"
install -m 0755 "$target/libhetccl.so" "$prefix/lib/libhetccl.so"
install -m 0644 "$target/libhetccl.a" "$prefix/lib/libhetccl.a"
install -m 0644 "$repo/bindings/hetccl.h" "$prefix/include/hetccl.h"
sed -e "s|@PREFIX@|$prefix|g" -e "s|@VERSION@|$version|g" \
  "$repo/bindings/hetccl.pc.in" > "$prefix/lib/pkgconfig/hetccl.pc"
echo "installed hetccl $version ($profile) under $prefix"
