# Sourced by scripts that run Python with packages of their own
# (python-client.sh, trace-check.sh); needs their `log` and `die`.
#
#   ensure_venv VENV REQUIREMENTS [PYTHON]
#
# Makes the virtualenv VENV once (on Debian, installing python3-venv when
# running as root and `python -m venv` lacks ensurepip), and pip-installs
# REQUIREMENTS into it again only when that file changed since the last
# install.
ensure_venv() {
    local venv="$1" requirements="$2" python="${3:-python3}"
    make_venv() { rm -rf "$venv" && "$python" -m venv "$venv" >&2; }
    if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import sys' 2>/dev/null; then
        log "creating virtualenv $venv"
        mkdir -p "$(dirname "$venv")"
        if ! make_venv; then
            # Debian's python3 has no ensurepip without python3-venv.
            if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
                log "$python -m venv failed: apt-get install python3-venv"
                { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv; } >&2 \
                    || die "apt-get install python3-venv failed"
                make_venv || die "$python -m venv $venv failed even with python3-venv"
            else
                die "$python -m venv $venv failed (on Debian/Ubuntu: apt-get install python3-venv)"
            fi
        fi
    fi
    local stamp="$venv/.maitre-requirements"
    if ! cmp -s "$requirements" "$stamp"; then
        log "pip install -r $requirements into $venv"
        PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/python" -m pip install --quiet -r "$requirements" >&2 \
            || die "pip install -r $requirements failed"
        cp "$requirements" "$stamp"
    else
        log "virtualenv $venv is up to date"
    fi
}
