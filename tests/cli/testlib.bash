# testlib.bash - helpers for the command-line tests (sourced, not a test).
# Each test is called as: bash TEST.sh KFAC_BINARY SOURCE_DIR FMNIST_DIR
kfac=$1 src=$2 fmnist=$3
passed=0 failed=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

check() { # check DESCRIPTION COMMAND...: passes when the command succeeds
  local what=$1; shift
  if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAIL: $what" >&2; fi
}

# expect_error DESCRIPTION PATTERN ARGS...: kfac exits non-zero with exactly
# one line on stderr matching the extended regex PATTERN.
expect_error() {
  local what=$1 pattern=$2; shift 2
  local rc=0
  "$kfac" "$@" >"$tmp/out" 2>"$tmp/err" || rc=$?
  check "$what: exit status non-zero (got $rc)" test "$rc" -ne 0
  check "$what: one line on stderr: $(cat "$tmp/err")" test "$(wc -l <"$tmp/err")" -eq 1
  check "$what: message matches '$pattern': $(cat "$tmp/err")" grep -Eq -e "$pattern" "$tmp/err"
}

summary() {
  echo "$(basename "$0" .sh): $passed passed, $failed failed"
  [ "$failed" -eq 0 ]
}
