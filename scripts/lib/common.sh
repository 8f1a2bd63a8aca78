# shellcheck shell=bash
# Helpers shared by guest-images/build and scripts/testhost. Sourced, not run.
# Every message goes to stderr: callers keep stdout for their own output.

# The name messages are prefixed with; callers set it before sourcing.
: "${PROG:=$(basename "$0")}"

say() { printf '%s: %s\n' "$PROG" "$*" >&2; }

# die [STATUS] MESSAGE: one clear line on stderr, then exit (default 1).
die() {
    local status=1
    if [ $# -gt 1 ]; then status=$1; shift; fi
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit "$status"
}

# ensure_tools STATUS COMMAND:PACKAGE...
# Installs, with apt, the packages of the commands that are missing, then
# dies with STATUS if any is still missing. A fresh CI machine runs as root
# and has none of qemu, lz4 or cpio.
ensure_tools() {
    local status=$1; shift
    local pair cmd missing=() pkgs=()
    for pair in "$@"; do
        cmd=${pair%%:*}
        command -v "$cmd" >/dev/null 2>&1 && continue
        missing+=("$cmd")
        pkgs+=("${pair#*:}")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing ${pkgs[*]} (missing: ${missing[*]})"
        local log
        log=$(mktemp)
        if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -q --no-install-recommends "${pkgs[@]}"; } \
                >"$log" 2>&1; then
            tail -n 20 "$log" >&2
        fi
        rm -f "$log"
    fi
    for cmd in "${missing[@]}"; do
        command -v "$cmd" >/dev/null 2>&1 ||
            die "$status" "'$cmd' is missing and could not be installed (apt-get install ${pkgs[*]})"
    done
}

# Seconds since the epoch with microseconds, for timings.
now() { printf '%s' "${EPOCHREALTIME:-$(date +%s.%N)}"; }

# elapsed START: seconds since START (from now), with two decimals.
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

# ensure_packages PACKAGE...
# Installs, with apt, the Debian packages that are not installed yet (for
# libraries, which have no command to look for); dies if that fails.
ensure_packages() {
    local pkg missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "missing packages: ${missing[*]} (apt-get install ${missing[*]} as root)"
    say "installing ${missing[*]}"
    local log
    log=$(mktemp)
    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -q --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        rm -f "$log"
        die "apt-get install ${missing[*]} failed"
    fi
    rm -f "$log"
}

# The test host's L1 CPU model (QEMU -cpu): STASIS_TESTHOST_CPU, or QEMU's
# `max` without ERMS and FSRM (why: docs/testhost.md, "The L1's CPU").
testhost_cpu_model() { echo "${STASIS_TESTHOST_CPU:-max,-erms,-fsrm}"; }

# Whether the test host's L1 randomizes the address space (1) or not (0,
# the default): STASIS_TESTHOST_ASLR (why: docs/testhost.md, "Address
# space randomization off in the L1").
testhost_aslr() { echo "${STASIS_TESTHOST_ASLR:-0}"; }

# Prints the `outer` line each benchmark script prints first: the machine
# that runs the test host, and the test host's settings. $1: its memory
# (MiB); $2, when given: its vCPUs.
print_outer_line() {
    local cpu kvm cpus_field=
    cpu=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//; s/"/'"'"'/g')
    if [ -e /sys/module/kvm_pvm ]; then kvm=kvm_pvm; elif [ -e /dev/kvm ]; then kvm=other; else kvm=none; fi
    [ $# -lt 2 ] || cpus_field=" testhost_cpus=$2"
    printf 'outer kernel=%s cpu="%s" cpus=%s kvm=%s runs=testhost testhost_memory_mib=%s%s testhost_cpu_model=%s testhost_aslr=%s\n' \
        "$(uname -r)" "$cpu" "$(nproc)" "$kvm" "$1" "$cpus_field" "$(testhost_cpu_model)" "$(testhost_aslr)"
}
