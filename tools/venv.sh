# shellcheck shell=bash
# Sourced by tools/test and tools/demo: make sure .venv exists and holds the project
# with the given extras. Works on a fresh Debian/Ubuntu machine that has only python3:
# installs python3-venv with apt when the interpreter lacks ensurepip.
#   ensure_venv "test"                      -> .venv with `pip install -e .[test]`
#   ensure_venv "test" python3.9 .venv39    -> the same for another interpreter, in another venv
ensure_venv() {
    local extras="$1" root py stamp want
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    py="${2:-${PYTHON:-python3}}"
    VENV="$root/${3:-.venv}"
    if [ ! -x "$VENV/bin/python" ]; then
        if ! "$py" -c 'import ensurepip, venv' 2>/dev/null; then
            echo "venv: $py has no ensurepip; installing python3-venv" >&2
            as_root apt-get install -y -qq python3-venv >/dev/null || {
                echo "venv: cannot install python3-venv (need root or sudo)" >&2; return 1; }
        fi
        "$py" -m venv "$VENV" || return 1
    fi
    # Reinstall only when the metadata or the wanted extras changed.
    want="$(cat "$root/setup.cfg" "$root/pyproject.toml" | sha256sum | cut -c1-16)-$extras"
    stamp="$VENV/.installed"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "venv: installing modbus-agent[$extras] into $VENV" >&2
        "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null || return 1
        "$VENV/bin/python" -m pip install -q -e "$root[$extras]" || return 1
        echo "$want" > "$stamp"
    fi
    export PATH="$VENV/bin:$PATH"
}

# Run a command as root: directly, through sudo, or fail.
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
    else return 1
    fi
}

# Install Debian packages that tests use when they are missing (best effort: a test
# whose peer is missing skips and says why). apt-get update runs at most once a day.
ensure_debs() {
    local missing=() pkg
    command -v apt-get >/dev/null 2>&1 || return 0
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "system: installing ${missing[*]}" >&2
    if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
        as_root apt-get update -qq >/dev/null 2>&1 || true
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        >/dev/null 2>&1 || echo "system: could not install ${missing[*]}; tests that need them will skip" >&2
}
