#!/usr/bin/env bash
# Set up a Skyferry installation on this host: the keys and NATS users (python -m deploy.keys init),
# the env files and nats.conf the units read, the skyferry system user and the systemd units.
# Safe to re-run: an existing key or config file is never overwritten (nats.env is re-derived
# from the seeds), so re-running after an upgrade only adds what is new (e.g. a new role's key).
#
#   deploy/install.sh [--etc DIR] [--var DIR] [--prefix DIR] [--unit-dir DIR] [--no-system]
#                     [-- options of `python -m deploy.keys init`, e.g. --vna-id vna1 --nats-url URL]
#
#   --etc DIR       config directory (default $SKYFERRY_ETC or /etc/skyferry)
#   --var DIR       state directory the env files point at (default /var/lib/skyferry)
#   --prefix DIR    where Skyferry and its .venv live (default /opt/skyferry)
#   --unit-dir DIR  where the units go (default /etc/systemd/system)
#   --no-system     only keys and config files: no user, no chown, no units, no systemctl
#
# Then: systemctl enable --now skyferry-nats skyferry-manager skyferry-saga [skyferry-vna-agent]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
etc=${SKYFERRY_ETC:-/etc/skyferry}
var=/var/lib/skyferry
prefix=/opt/skyferry
unit_dir=/etc/systemd/system
system=1
while [[ $# -gt 0 ]]; do
  case $1 in
    --etc) etc=$2; shift 2 ;;
    --var) var=$2; shift 2 ;;
    --prefix) prefix=$2; shift 2 ;;
    --unit-dir) unit_dir=$2; shift 2 ;;
    --no-system) system=0; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

python=${PYTHON:-}
if [[ -z $python ]]; then
  for candidate in "$prefix/.venv/bin/python" "$repo/.venv/bin/python"; do
    if [[ -x $candidate ]]; then python=$candidate; break; fi
  done
fi
python=${python:-python3}

PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$python" -m deploy.keys init --etc "$etc" --var "$var" "$@"

if [[ $system -eq 0 ]]; then
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "install.sh: run as root to create the user and install the units (or pass --no-system)" >&2
  exit 1
fi
if ! id skyferry >/dev/null 2>&1; then
  useradd --system --home-dir "$var" --shell /usr/sbin/nologin skyferry
fi
install -d -o skyferry -g skyferry -m 0750 "$var"
# The manager and the coordinator run as skyferry and read their seeds; root-run daemons read anyway.
chown -R skyferry:skyferry "$etc/keys"
chmod 0700 "$etc/keys"
install -d "$unit_dir"
for unit in "$here"/systemd/*.service; do
  sed -e "s#/opt/skyferry#$prefix#g" -e "s#/etc/skyferry#$etc#g" -e "s#/var/lib/skyferry#$var#g" "$unit" \
    > "$unit_dir/$(basename "$unit")"
  chmod 0644 "$unit_dir/$(basename "$unit")"
done
if command -v systemctl >/dev/null 2>&1; then
  systemctl daemon-reload
fi
echo "installed; start with: systemctl enable --now skyferry-nats skyferry-manager skyferry-saga skyferry-vna-agent"
