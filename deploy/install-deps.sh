#!/usr/bin/env bash
# Debian packages Skyferry needs on a fresh machine (idempotent; quiet when all are present).
set -euo pipefail
need=()
# iproute2: ip (namespaces, links), bridge and tc for the lab and the VNA agent. The lab's reachability
# probes and the tests' broadcasts are plain Python (deploy/lab/probe.py, AF_PACKET), so the overlay e2e
# tests need no ping (iputils-ping) or arping binary.
command -v ip >/dev/null 2>&1 || need+=(iproute2)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
# The tunnels' native fast path (vna_agent/dataplane/_fastpath.c, built by pip): a C compiler,
# OpenSSL's libcrypto headers and the Python headers. Without them the package still installs and
# the tunnels forward frames in Python.
command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)
[[ -f /usr/include/openssl/evp.h ]] || need+=(libssl-dev)
py=$(command -v python3.11 || command -v python3)
"$py" -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  >/dev/null 2>&1 || need+=(python3-dev)
if ((${#need[@]})); then
  if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
# Overlay benchmark (bench/bench_overlay.py): iperf3, OpenVPN and tinc 1.0 (sbin tools: check the path too).
bench=()
command -v iperf3 >/dev/null 2>&1 || bench+=(iperf3)
command -v openvpn >/dev/null 2>&1 || [[ -x /usr/sbin/openvpn ]] || bench+=(openvpn)
command -v tincd >/dev/null 2>&1 || [[ -x /usr/sbin/tincd ]] || bench+=(tinc)
if ((${#bench[@]})); then
  if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${bench[@]}" >/dev/null
fi
# Fuzzing the native fast path (tests/fuzz/native, `make fuzz` and `make test`): clang with libFuzzer and
# the address/undefined-behaviour sanitizers (Debian 12 ships them in libclang-rt-14-dev).
fuzz=()
command -v clang >/dev/null 2>&1 || fuzz+=(clang)
compgen -G '/usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-*.a' >/dev/null || fuzz+=(libclang-rt-dev)
if ((${#fuzz[@]})); then
  if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${fuzz[@]}" >/dev/null
fi
