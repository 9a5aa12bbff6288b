#!/bin/sh
# Start Redis for hermes-worker: fill the passwords from the environment into the ACL file
# (users.acl beside this script), turn TLS on when a certificate is mounted, then exec
# redis-server with redis.conf; any arguments are passed on to redis-server.
#
#   REDIS_DEFAULT_PASSWORD   the admin (default user): operators, Flower
#   REDIS_WORKER_PASSWORD    user `worker`: hermes-worker run / health
#   REDIS_GATEWAY_PASSWORD   user `gateway`: hermes-worker gateway / keys
#   REDIS_PRODUCER_PASSWORD  user `producer`: HermesClient, the queue CLI commands;
#       optional: unset, there is no producer user (callers use the gateway)
#       each at least 16 of A-Z a-z 0-9 _ - (they go into HERMES_REDIS_URL unescaped),
#       e.g. `openssl rand -hex 24`
#   REDIS_DATA_DIR  (default /data) the append-only file's folder
#   REDIS_TLS_DIR   (default /tls) holding ca.crt, redis.crt, redis.key: TLS on when present
#   REDIS_TLS_PORT  (default 6380)
#   REDIS_ACL_OUT   (default /tmp/hermes-users.acl) where the filled-in ACL file is written
set -eu

here=$(cd "$(dirname "$0")" && pwd)
acl_out=${REDIS_ACL_OUT:-/tmp/hermes-users.acl}
tls_dir=${REDIS_TLS_DIR:-/tls}

check_password() {  # NAME VALUE
    case "$2" in
        "") echo "start.sh: $1 is not set" >&2; exit 64 ;;
        *[!A-Za-z0-9_-]*) echo "start.sh: $1 may hold only A-Z a-z 0-9 _ -" >&2; exit 64 ;;
    esac
    if [ "${#2}" -lt 16 ]; then
        echo "start.sh: $1 must be at least 16 characters" >&2
        exit 64
    fi
}
check_password REDIS_DEFAULT_PASSWORD "${REDIS_DEFAULT_PASSWORD:-}"
check_password REDIS_WORKER_PASSWORD "${REDIS_WORKER_PASSWORD:-}"
check_password REDIS_GATEWAY_PASSWORD "${REDIS_GATEWAY_PASSWORD:-}"
without_producer='/^user producer /d'
if [ -n "${REDIS_PRODUCER_PASSWORD:-}" ]; then
    check_password REDIS_PRODUCER_PASSWORD "$REDIS_PRODUCER_PASSWORD"
    without_producer='/^$/d'
fi

# Redis ACL files take no comments: drop them and blank lines while filling in.
umask 077
sed -e '/^[[:space:]]*#/d' -e '/^[[:space:]]*$/d' -e "$without_producer" \
    -e "s/@DEFAULT_PASSWORD@/$REDIS_DEFAULT_PASSWORD/" \
    -e "s/@WORKER_PASSWORD@/$REDIS_WORKER_PASSWORD/" \
    -e "s/@GATEWAY_PASSWORD@/$REDIS_GATEWAY_PASSWORD/" \
    -e "s/@PRODUCER_PASSWORD@/${REDIS_PRODUCER_PASSWORD:-}/" \
    "$here/users.acl" > "$acl_out"

set -- "$here/redis.conf" --dir "${REDIS_DATA_DIR:-/data}" --aclfile "$acl_out" "$@"
if [ -f "$tls_dir/redis.crt" ]; then
    # Clients verify the server against ca.crt; a client certificate is optional (the
    # password authenticates), but one that is presented must be signed by ca.crt.
    set -- "$@" --tls-port "${REDIS_TLS_PORT:-6380}" \
        --tls-cert-file "$tls_dir/redis.crt" --tls-key-file "$tls_dir/redis.key" \
        --tls-ca-cert-file "$tls_dir/ca.crt" --tls-auth-clients optional
fi
exec redis-server "$@"
