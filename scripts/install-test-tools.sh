#!/usr/bin/env bash
# Debian tools some tests use: a real Prometheus server (tests/test_prometheus.py) and kubectl for
# `kubectl kustomize` (tests/test_k8s.py). Installs what is missing when it can (root, or sudo without
# a password); where it cannot, it says so and those tests skip with a message naming the tool.
set -u
want=()
command -v prometheus >/dev/null 2>&1 || want+=(prometheus)
command -v kubectl >/dev/null 2>&1 || want+=(kubectl)
[ ${#want[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else
  echo "install-test-tools: cannot install ${want[*]} without root; the tests that need them will skip" >&2; exit 0; fi
export DEBIAN_FRONTEND=noninteractive
install() { $sudo apt-get install -y -q --no-install-recommends "$@" >/dev/null; }
for pkg in "${want[@]}"; do
  install "$pkg" || { $sudo apt-get update -q >/dev/null && install "$pkg"; } ||
    { [ "$pkg" = kubectl ] && install kubernetes-client; } ||
    echo "install-test-tools: could not install $pkg; the tests that need it will skip" >&2
done
exit 0
