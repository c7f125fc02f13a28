#!/usr/bin/env bash
# Credentials for a secured fedrec deployment, for tests and for users:
#   - a certificate authority (ca.crt, ca.key) and the SuperLink's TLS certificate signed by it
#     (superlink.crt, superlink.key), valid for localhost, 127.0.0.1, the host name `superlink`
#     (docker/compose.yml) and every extra name or IP given with --san;
#   - with --nodes N, one SuperNode authentication key pair per node (supernode-<i>, OpenSSH
#     ECDSA P-384 private key, supernode-<i>.pub public key), for Flower's node authentication:
#     register each public key with `flwr supernode register supernode-<i>.pub <connection>`
#     and start the SuperNode with `--auth-supernode-private-key supernode-<i>`.
#
#   bash scripts/make_certs.sh [--out DIR] [--nodes N] [--san NAME_OR_IP]... [--days D]
#
# DIR defaults to certificates/ (git-ignored). Existing files in DIR are replaced. Needs
# openssl and ssh-keygen. The CA key stays in DIR: keep it off the SuperNodes' machines, which
# need only ca.crt (and their own key).
set -euo pipefail
OUT=certificates
NODES=0
DAYS=365
SANS=("DNS:localhost" "IP:127.0.0.1" "DNS:superlink")
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --nodes) NODES=$2; shift 2 ;;
    --days) DAYS=$2; shift 2 ;;
    --san)
      if [[ "$2" =~ ^[0-9.]+$ || "$2" == *:*:* ]]; then SANS+=("IP:$2"); else SANS+=("DNS:$2"); fi
      shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "make_certs: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$NODES" in ''|*[!0-9]*) echo "make_certs: --nodes wants a number, got $NODES" >&2; exit 2 ;; esac
for tool in openssl ssh-keygen; do
  command -v "$tool" >/dev/null || { echo "make_certs: $tool not found" >&2; exit 2; }
done
mkdir -p "$OUT"
cd "$OUT"
SAN_LIST=$(IFS=,; echo "${SANS[*]}")

openssl req -x509 -newkey rsa:3072 -nodes -sha256 -days "$DAYS" -keyout ca.key -out ca.crt \
  -subj "/CN=fedrec test CA" -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey rsa:3072 -nodes -sha256 -keyout superlink.key -out superlink.csr \
  -subj "/CN=superlink" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$SAN_LIST" > superlink.ext
openssl x509 -req -in superlink.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days "$DAYS" \
  -sha256 -extfile superlink.ext -out superlink.crt 2>/dev/null
rm -f superlink.csr superlink.ext ca.srl
chmod 600 ca.key superlink.key

for ((i = 0; i < NODES; i++)); do
  rm -f "supernode-$i" "supernode-$i.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedrec supernode $i" -f "supernode-$i"
done
echo "make_certs: CA, SuperLink certificate ($SAN_LIST) and $NODES SuperNode key pair(s) in $(pwd)"
