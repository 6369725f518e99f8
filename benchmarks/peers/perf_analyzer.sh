#!/usr/bin/env bash
# Run Triton's perf_analyzer (PyPI `perf-analyzer`) on Debian bookworm.
#
# Why: the wheel is tagged manylinux_2_38; its ELF binary needs GLIBC_2.38 and
# GLIBCXX_3.4.32, but bookworm ships glibc 2.36 / libstdc++ from gcc 12. We fetch
# Debian trixie's libc6, libstdc++6 and libgcc-s1 .debs, unpack them into a
# private sysroot, and start the binary through trixie's loader:
#   $SYSROOT/ld-linux-x86-64.so.2 --library-path $SYSROOT:/lib/x86_64-linux-gnu BIN
# (libssl3 / zlib1g come from the host). The system's apt sources are untouched.
#
# Usage:
#   perf_analyzer.sh --install [DIR]   # idempotent; DIR defaults to $PERF_ANALYZER_HOME
#   perf_analyzer.sh ARGS...           # runs perf_analyzer ARGS... (note: it has no
#                                      # --help; run with no args to print usage)
# Env: PERF_ANALYZER_HOME (default /opt/peers/perf_analyzer),
#      PERF_ANALYZER_VERSION (default 2.60.0), PYTHON (default python3).
set -euo pipefail
HOME_DIR="${PERF_ANALYZER_HOME:-/opt/peers/perf_analyzer}"

if [[ "${1:-}" == "--install" ]]; then
  DIR="$(mkdir -p "${2:-$HOME_DIR}" && cd "${2:-$HOME_DIR}" && pwd)"
  VER="${PERF_ANALYZER_VERSION:-2.60.0}"
  if [[ "$(cat "$DIR/.installed" 2>/dev/null)" == "$VER" ]]; then
    echo "perf_analyzer $VER already installed in $DIR"; exit 0
  fi
  TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
  # 1) the wheel (pip refuses the manylinux_2_38 tag on this host unless told the platform)
  "${PYTHON:-python3}" -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux_2_38_x86_64 "perf-analyzer==$VER" -d "$TMP/whl"
  "${PYTHON:-python3}" -m zipfile -e "$TMP"/whl/perf_analyzer-*.whl "$TMP/wheel"
  mkdir -p "$DIR/bin"
  install -m 755 "$TMP/wheel/perf_analyzer/bin/perf_analyzer" "$DIR/bin/perf_analyzer.bin"
  # 2) trixie runtime libs via a private apt state dir (no change to /etc/apt)
  A="$TMP/apt"; mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$A/pref" "$TMP/debs"
  echo 'deb http://deb.debian.org/debian trixie main' > "$A/sources.list"
  APT=(-o Dir::Etc::sourcelist="$A/sources.list" -o Dir::Etc::sourceparts=-
       -o Dir::Etc::preferencesparts="$A/pref" -o Dir::State::Lists="$A/lists"
       -o Dir::Cache="$A/cache" -o Dir::State::status=/dev/null
       -o APT::Sandbox::User=root -qq)
  apt-get "${APT[@]}" update
  (cd "$TMP/debs" && apt-get "${APT[@]}" download libc6 libstdc++6 libgcc-s1)
  rm -rf "$DIR/sysroot"; for d in "$TMP"/debs/*.deb; do dpkg-deb -x "$d" "$DIR/sysroot"; done
  ls "$TMP"/debs > "$DIR/sysroot/DEBS"
  echo "$VER" > "$DIR/.installed"
  echo "installed perf_analyzer $VER into $DIR"
  exit 0
fi

LIB="$HOME_DIR/sysroot/usr/lib/x86_64-linux-gnu"
if [[ ! -f "$HOME_DIR/.installed" || ! -x "$LIB/ld-linux-x86-64.so.2" ]]; then
  echo "perf_analyzer not installed in $HOME_DIR; run: $0 --install $HOME_DIR" >&2; exit 127
fi
exec "$LIB/ld-linux-x86-64.so.2" --library-path "$LIB:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu" \
  "$HOME_DIR/bin/perf_analyzer.bin" "$@"
