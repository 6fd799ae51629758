#!/usr/bin/env bash
# A lab certificate authority, a SuperLink TLS certificate and the SuperExec secret, with openssl.
#
#   FEDSIM_TLS_HOSTS="superlink.lab.example,192.168.1.10" deploy/make-certs.sh [OUT_DIR]
#
# FEDSIM_TLS_HOSTS: the names and IP addresses under which SuperNodes and `flwr` reach the SuperLink,
#   separated by commas or spaces. `localhost`, `127.0.0.1`, `::1` and `superlink` (the service name inside
#   the compose network, used by the ServerApp's SuperExec and the health check) are always added.
# FEDSIM_CERT_DAYS: validity of the server certificate in days (default 365; the CA gets 10 years).
# OUT_DIR (default deploy/certificates) receives:
#   ca.crt      the lab CA: copy it to every client host and to every machine that runs `flwr`
#   ca.key      the CA's private key: keep it on the server host (or offline); it only signs
#   server.pem  the SuperLink's certificate (signed by the CA, with the SANs above)
#   server.key  the SuperLink's private key (mode 600)
#   superexec.secret  shared by the SuperLink and the ServerApp's SuperExec (--superexec-auth-secret-file), so
#               that nothing else can take ServerApp tasks from the SuperLink's port; made once, kept (mode 600)
# An existing CA in OUT_DIR is reused, so re-running the script (e.g. with another host name) only
# re-issues the server certificate and clients keep their ca.crt. Set FEDSIM_NEW_CA=1 to replace the CA.
set -euo pipefail
set -f # no globbing: host names are split on commas and spaces, never expanded

out="${1:-$(cd "$(dirname "$0")" && pwd)/certificates}"
days="${FEDSIM_CERT_DAYS:-365}"
hosts="${FEDSIM_TLS_HOSTS:-}"

command -v openssl >/dev/null || { echo "error: openssl is not installed" >&2; exit 2; }
[[ "$days" =~ ^[0-9]+$ ]] || { echo "error: FEDSIM_CERT_DAYS must be a number of days, got '$days'" >&2; exit 2; }

umask 077

# Subject alternative names: every entry of FEDSIM_TLS_HOSTS plus the local names, without duplicates.
sans=()
seen=" "
for entry in ${hosts//,/ } localhost 127.0.0.1 ::1 superlink; do
    [[ "$seen" == *" $entry "* ]] && continue
    seen="$seen$entry "
    if [[ "$entry" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ || "$entry" == *:* ]]; then
        sans+=("IP:$entry")
    elif [[ "$entry" =~ ^[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]]; then
        sans+=("DNS:$entry")
    else
        echo "error: '$entry' in FEDSIM_TLS_HOSTS is neither a host name nor an IP address" >&2
        exit 2
    fi
done
san_list="$(IFS=,; echo "${sans[*]}")"
mkdir -p "$out"
first_name="${hosts//,/ }"; first_name="${first_name%% *}"; first_name="${first_name:-localhost}"

if [[ "${FEDSIM_NEW_CA:-0}" == 1 || ! -s "$out/ca.key" || ! -s "$out/ca.crt" ]]; then
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out "$out/ca.key" 2>/dev/null
    openssl req -x509 -new -key "$out/ca.key" -sha384 -days 3650 -subj "/O=fedsim lab/CN=fedsim lab CA" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" \
        -out "$out/ca.crt"
    echo "made a new lab CA: $out/ca.crt"
else
    echo "reusing the lab CA in $out"
fi

openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out "$out/server.key" 2>/dev/null
openssl req -new -key "$out/server.key" -subj "/O=fedsim lab/CN=$first_name" -out "$out/server.csr"
extfile="$(mktemp)"
trap 'rm -f "$extfile" "$out/server.csr" "$out/ca.srl"' EXIT
cat >"$extfile" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
subjectAltName=$san_list
EXT
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
    -sha384 -days "$days" -extfile "$extfile" -out "$out/server.pem" 2>/dev/null
openssl verify -CAfile "$out/ca.crt" "$out/server.pem" >/dev/null

if [[ ! -s "$out/superexec.secret" ]]; then
    openssl rand -hex 32 | tr -d '\n' >"$out/superexec.secret"
    echo "made the SuperExec secret $out/superexec.secret"
fi

chmod 600 "$out/ca.key" "$out/server.key" "$out/superexec.secret"
chmod 644 "$out/ca.crt" "$out/server.pem"
echo "SuperLink certificate $out/server.pem (key server.key), valid $days days, for: $san_list"
