#!/usr/bin/env bash
# SuperNode authentication keys: one ECDSA P-384 key pair per SuperNode, in OpenSSH format (what
# `flower-supernode --auth-supernode-private-key` reads and `flwr supernode register` accepts).
#
#   deploy/make-supernode-keys.sh [NAME ...]        default NAME: supernode-0 supernode-1
#   FEDSIM_KEYS_DIR=/path deploy/make-supernode-keys.sh hospital-a
#
# FEDSIM_KEYS_DIR (default deploy/keys) receives, for each NAME:
#   NAME      the private key (mode 600): stays on the client host that runs that SuperNode
#   NAME.pub  the public key: send it to the SuperLink's operator, who registers it with
#             `flwr supernode register NAME.pub <connection>`
# Existing keys are never overwritten (delete them first to rotate a key, then register the new one).
set -euo pipefail

out="${FEDSIM_KEYS_DIR:-$(cd "$(dirname "$0")" && pwd)/keys}"
command -v ssh-keygen >/dev/null || { echo "error: ssh-keygen (OpenSSH client) is not installed" >&2; exit 2; }
[[ $# -gt 0 ]] || set -- supernode-0 supernode-1

for name in "$@"; do
    [[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || { echo "error: key name '$name' may use letters, digits, . _ -" >&2; exit 2; }
done
mkdir -p "$out"
chmod 700 "$out"
for name in "$@"; do
    if [[ -e "$out/$name" ]]; then
        echo "keeping the existing key $out/$name"
        continue
    fi
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedsim-$name" -f "$out/$name"
    chmod 600 "$out/$name"
    chmod 644 "$out/$name.pub"
    echo "made $out/$name (private, stays with the SuperNode) and $out/$name.pub (register it on the SuperLink)"
done
