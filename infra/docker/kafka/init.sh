#!/usr/bin/env bash
# One-shot (compose service kafka-init): the SCRAM users and ACLs of acls.conf. It shares the
# kafka container's network and talks to the broker's loopback listener (INTERNAL, plaintext,
# reachable from inside that network namespace only), whose anonymous principal is the super
# user. Re-running it is harmless: a credential is overwritten, an ACL added twice is one ACL.
set -euo pipefail
BIN=/opt/kafka/bin
BOOTSTRAP=127.0.0.1:9095
ACLS=/etc/ctr/kafka/acls.conf
private=$(mktemp -d)  # the credential files (mode 0600), so no password is on a command line
trap 'rm -rf "$private"' EXIT
umask 077

for user in $(awk '!/^#/ && NF {print $1}' "$ACLS" | sort -u); do
  secret=/run/secrets/kafka-$user-password
  if [[ ! -s $secret ]]; then
    echo "missing secret $secret (ctr secrets ./secrets; docs/deployment.md)" >&2
    exit 1
  fi
  printf 'SCRAM-SHA-512=iterations=8192,password=%s\n' "$(tr -d '\r\n' < "$secret")" > "$private/$user"
  "$BIN/kafka-configs.sh" --bootstrap-server "$BOOTSTRAP" --alter --entity-type users --entity-name "$user" \
    --add-config-file "$private/$user" > /dev/null
  rm -f "$private/$user"
  echo "SCRAM-SHA-512 credential set for $user"
done

while read -r principal operations resource pattern name; do
  [[ -z ${principal:-} || $principal == \#* ]] && continue
  ops=()
  for op in ${operations//,/ }; do ops+=(--operation "$op"); done
  "$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --add --allow-principal "User:$principal" "${ops[@]}" \
    "--$resource" "$name" --resource-pattern-type "$pattern" > /dev/null
  echo "allowed User:$principal $operations on $resource $pattern:$name"
done < "$ACLS"
