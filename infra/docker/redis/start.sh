#!/bin/sh
# Redis for docker-compose.yml with the ACL users of users.acl. The passwords come from compose
# secrets and enter the ACL file only as SHA-256 hashes (the form Redis keeps them in); then
# the image's own entrypoint starts redis-server as the redis user. Arguments: redis-server's.
set -eu
hash() { tr -d '\r\n' < "$1" | sha256sum | cut -d' ' -f1; }
acl=/tmp/users.acl
sed -e '/^#/d' -e '/^$/d' \
    -e "s/@WRITER_SHA256@/$(hash /run/secrets/redis-writer-password)/" \
    -e "s/@READER_SHA256@/$(hash /run/secrets/redis-reader-password)/" \
    /etc/ctr/redis/users.acl > "$acl"
chown redis:redis "$acl"
chmod 600 "$acl"
exec docker-entrypoint.sh redis-server --aclfile "$acl" "$@"
