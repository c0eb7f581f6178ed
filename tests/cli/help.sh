# help.sh - `kfac --help` and every command's --help print usage and exit
# 0; misuse prints usage and exits 2.
. "$(dirname "$0")/testlib.bash"
check "kfac --help exits 0" "$kfac" --help
check "kfac --help lists train" sh -c "'$kfac' --help | grep -q '^  train'"
for cmd in train prep stage; do
  check "kfac --help lists $cmd" sh -c "'$kfac' --help | grep -q '^  $cmd '"
  check "kfac $cmd --help exits 0 with usage" sh -c "'$kfac' $cmd --help | grep -q '^usage: kfac $cmd'"
done
check "kfac train --help shows --set" sh -c "'$kfac' train --help | grep -q -- '--set KEY=VALUE'"
check "--help-keys lists every section" sh -c "'$kfac' train --help-keys | grep -q '^output.metrics'"
rc=0; "$kfac" >/dev/null 2>&1 || rc=$?; check "no command: exit 2" test $rc -eq 2
rc=0; "$kfac" frobnicate >/dev/null 2>&1 || rc=$?; check "unknown command: exit 2" test $rc -eq 2
rc=0; "$kfac" train >/dev/null 2>&1 || rc=$?; check "train without job: exit 2" test $rc -eq 2
summary
