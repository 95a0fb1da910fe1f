#!/bin/bash
# A generic ActionLoop action in bash: one JSON line in on stdin, one JSON
# line out on fd 3, forever. Logs go to stdout/stderr. Needs jq-free input:
# it pulls "name" out of the value with bash alone, to stay dependency-free.
if [ -n "$__OW_WAIT_FOR_ACK" ]; then echo '{"ok": true}' >&3; fi
while read -r line; do
  name="stranger"
  if [[ "$line" =~ \"value\":\{[^}]*\"name\":\"([^\"]*)\" ]]; then name="${BASH_REMATCH[1]}"; fi
  echo "hello.sh called with name=$name"
  echo "{\"greeting\": \"Hello, $name!\"}" >&3
done
