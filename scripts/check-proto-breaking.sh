#!/usr/bin/env bash
# Runs `buf breaking` on the protos of the working tree (proto/, config:
# proto/buf.yaml, rules `breaking: use: [FILE]`) against the protos of an
# earlier git commit of the same repository, with the buf installed by
# scripts/install-tools.sh (installing it first if needed). A renamed field,
# a changed field number, a deleted message... fail; additions pass.
#
#   scripts/check-proto-breaking.sh [extra `buf breaking` arguments]
#
# Environment:
#   PROTO_BREAKING_AGAINST  the commit to compare against (any git revision:
#                           HEAD~1, origin/main, a hash...). Default: HEAD~1,
#                           the previous commit. Set it to the branch point
#                           (e.g. "$(git merge-base origin/main HEAD)") to check
#                           a whole branch, or when HEAD~1 does not exist.
#   PROTO_BREAKING_HISTORY  "all" (default): also compare against every
#                           earlier commit that changed proto/, so a break made
#                           in one commit of a push and hidden by a later one is
#                           caught too (v1 packages only grow, so the protos
#                           must be compatible with all of them); "off": only
#                           PROTO_BREAKING_AGAINST.
#   PROTO_ROOT              the repository (or directory inside one) holding
#                           proto/. Default: this script's repository. The
#                           scripts' tests point it at throw-away repositories.
#
# What is compared: the input is the directory proto/ as it is on disk
# (uncommitted edits included); the against-input is buf's git input
# `<git dir>#ref=<full commit hash>,subdir=<path of proto/>`, i.e. the
# protos as committed in that commit. If the commit is missing from a
# shallow clone, one `git fetch --deepen=1` is tried; if it is still
# missing, the check fails (it is never skipped).
set -euo pipefail

me="check-proto-breaking"
log() { printf '%s: %s\n' "$me" "$*" >&2; }
die() { printf '%s: error: %s\n' "$me" "$*" >&2; exit 1; }

script_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="$(cd "${PROTO_ROOT:-$script_root}" && pwd)" || die "PROTO_ROOT=${PROTO_ROOT:-} is not a directory"
proto_dir="$root/proto"
[[ -f "$proto_dir/buf.yaml" ]] || die "$proto_dir/buf.yaml not found"
against="${PROTO_BREAKING_AGAINST:-HEAD~1}"
[[ -n "$against" ]] || die "PROTO_BREAKING_AGAINST is set but empty"

command -v git >/dev/null 2>&1 || die "git not found"
err="$(git -C "$root" rev-parse --git-dir 2>&1 >/dev/null)" \
    || die "$root: not a usable git repository: ${err:-git rev-parse failed}"
# The objects live in the common git dir (a linked worktree's .git is a
# file); buf clones from it.
git_dir="$(git -C "$root" rev-parse --path-format=absolute --git-common-dir)" \
    || die "cannot find the git directory of $root"
# proto/'s path inside the repository (PROTO_ROOT may be a subdirectory).
subdir="$(git -C "$root" rev-parse --show-prefix)proto"

resolve() { git -C "$root" rev-parse --verify --quiet "$against^{commit}"; }
if ! commit="$(resolve)"; then
    if [[ "$(git -C "$root" rev-parse --is-shallow-repository)" == true ]]; then
        log "$against is not in this shallow clone; trying git fetch --deepen=1"
        git -C "$root" fetch --quiet --deepen=1 >/dev/null 2>&1 || log "git fetch --deepen=1 failed"
    fi
    commit="$(resolve)" || die "commit '$against' not found in $root (a repository with a single commit, or a shallow clone?); fetch more history (git fetch --deepen=1 / --unshallow) or set PROTO_BREAKING_AGAINST to an existing commit, e.g. PROTO_BREAKING_AGAINST=origin/main"
fi
subject="$(git -C "$root" log -1 --format='%h %s' "$commit")"

# Nothing to break if that commit had no protos at all (only ever true of
# commits before proto/ was added).
if ! git -C "$root" cat-file -e "$commit:$subdir" 2>/dev/null; then
    log "ok: $against ($subject) has no $subdir/: nothing to compare against"
    exit 0
fi
# Without a buf.yaml there, buf takes that proto/ as one module with the
# default layout, as ours is (the rules are always the input's: FILE).
if ! git -C "$root" cat-file -e "$commit:$subdir/buf.yaml" 2>/dev/null; then
    log "note: $against ($subject) has no $subdir/buf.yaml; buf reads its $subdir/ as a single module"
fi

bin_dir="$("$script_root/scripts/install-tools.sh" | tail -n 1)" || die "scripts/install-tools.sh failed"
buf="$bin_dir/buf"
[[ -x "$buf" ]] || die "buf not found at $buf"

dirty=""
if [[ -n "$(git -C "$root" status --porcelain -- "$proto_dir" 2>/dev/null)" ]]; then
    dirty=" (working tree, with uncommitted changes)"
fi
log "buf breaking in $proto_dir$dirty ($("$buf" --version 2>&1))"
log "against $against = $commit: $subject"
cd "$proto_dir"
# compare COMMIT NAME: buf breaking of the working tree against COMMIT.
compare() {
    local rev="$1" name="$2" what rc=0
    what="$(git -C "$root" log -1 --format='%h %s' "$rev")"
    "$buf" breaking . --against "$git_dir#ref=$rev,subdir=$subdir" "${@:3}" || rc=$?
    ((rc == 0)) && return 0
    # buf exits 100 for violations, 1 for anything else (a build error...).
    ((rc == 100)) || die "buf breaking failed (exit $rc) against $name ($what)"
    die "buf breaking reported breaking changes against $name ($what) (exit $rc); a wire change that must break goes into a new package version (e.g. .v2)"
}
compare "$commit" "$against" "$@"
log "ok: no breaking changes against $against ($subject)"

history="${PROTO_BREAKING_HISTORY:-all}"
case "$history" in
    off) ;;
    all)
        # Earlier commits that changed proto/ (as far as this clone's history
        # goes), the one already compared left out.
        checked=0
        while read -r earlier; do
            [[ -n "$earlier" && "$earlier" != "$commit" ]] || continue
            git -C "$root" cat-file -e "$earlier:$subdir/buf.yaml" 2>/dev/null || continue
            compare "$earlier" "$earlier" "$@"
            checked=$((checked + 1))
        done < <(git -C "$root" rev-list "$commit" -- "$subdir")
        log "ok: no breaking changes against the $checked earlier commits that changed $subdir/ either"
        ;;
    *) die "PROTO_BREAKING_HISTORY must be all or off, not '$history'" ;;
esac
