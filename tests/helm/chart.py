#!/usr/bin/env python3
"""The Helm chart's offline checks and renderer, with Helm's own engine (PyPI
`helm-python-sdk`, which embeds Helm's Go SDK) and the Kubernetes OpenAPI schemas (PyPI
`kubernetes-validate`). The Rust tests in tests/e2e/chart.rs and tests/e2e/kube.rs call it.

  chart.py check                      lint, render every example and the option matrix,
                                      validate every object (Kubernetes 1.31-1.34, strict),
                                      refuse bad values, check the README documents every value
  chart.py containers                 JSON: every shardline container of every rendering
                                      (its workload, args and env), for the CLI check
  chart.py render VALUES [JSON]       the manifests of VALUES (+ a JSON object of overrides),
                                      as one YAML stream
  chart.py podman VALUES [JSON] DIR   like render, adapted to `podman kube play` (see
                                      for_podman), one file per workload in DIR
"""

import copy
import json
import os
import re
import sys

try:
    import helm_python as helm
    import jsonschema
    import kubernetes_validate
    import yaml
except ImportError as e:  # the tests must fail, not skip, without their tools
    sys.exit(
        f"chart.py: missing Python module ({e}): "
        "pip install helm-python-sdk kubernetes-validate (deploy/setup.sh installs them)"
    )

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHART = os.path.join(ROOT, "helm", "shardline")
EXAMPLES = os.path.join(CHART, "examples")
HERE = os.path.dirname(os.path.abspath(__file__))
# At least three minor versions, strict (unknown fields fail).
KUBE_VERSIONS = ["1.31.0", "1.32.0", "1.33.0", "1.34.0"]
RELEASE, NAMESPACE = "demo", "inference"

# Option combinations rendered on top of the chart's defaults (and validated like the
# examples): each switches on features the defaults leave off.
MATRIX = {
    "defaults": {},
    "etcd-3-hard-external-secret": {
        "etcd": {"replicas": 3, "podAntiAffinity": "hard", "persistence": {"enabled": False}},
        "auth": {"existingSecret": "team-keys", "secretKey": "key", "keysSecret": "tenant-keys"},
    },
    "external-etcd-apikey-netpol-monitor": {
        "etcd": {"enabled": False, "external": {"endpoints": ["http://etcd.infra:2379", "http://etcd-2.infra:2379"]}},
        "auth": {"apiKey": "sk-test"},
        "tls": {"existingSecret": "shardline-tls", "requireClientCert": True},
        "networkPolicy": {"enabled": True, "apiFrom": [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}],
                          "metricsFrom": [{"namespaceSelector": {"matchLabels": {"team": "monitoring"}}}]},
        "monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                       "podMonitor": {"enabled": True, "labels": {"release": "prom"}},
                       "dashboard": {"enabled": True}},
        "model": {"servedName": "smollm2"},
        "logFormat": "json", "otlpEndpoint": "http://otel-collector.observability:4317",
    },
    "autoscaled-keda": {
        "coordinator": {"autoscaling": {"enabled": True}, "service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.0/8"]}},
        "workers": {"defaults": {"autoscaling": {"enabled": True, "type": "keda"}}},
    },
    "autoscaled-hpa-deployment": {
        "workers": {"defaults": {"kind": "Deployment", "autoscaling": {"enabled": True, "type": "hpa", "behavior": {"scaleDown": {"stabilizationWindowSeconds": 600}}}}},
        "coordinator": {"pdb": {"maxUnavailable": 1}, "service": {"type": "NodePort", "nodePorts": {"http": 30080, "grpc": 30051}}},
    },
    "hostpath-download-extras": {
        "model": {"volume": {"type": "emptyDir", "emptyDir": {"sizeLimit": "30Gi"}},
                  "download": {"enabled": True, "image": "curlimages/curl:8.10.1",
                               "command": ["sh", "-c", "test -f \"$MODEL_PATH\" || curl -fsSLo \"$MODEL_PATH\" \"$MODEL_URL\""],
                               "env": [{"name": "MODEL_URL", "value": "https://models.example/smollm2.gguf"}]}},
        "imagePullSecrets": [{"name": "regcred"}],
        "commonLabels": {"team": "ml"},
        "coordinator": {
            "extraArgs": ["--max-num-seqs=32"], "extraEnv": [{"name": "SHARDLINE_TENANT_RATE", "value": "5"}],
            "extraEnvFrom": [{"configMapRef": {"name": "shardline-extra"}}],
            "extraVolumes": [{"name": "extra", "configMap": {"name": "shardline-extra"}}],
            "extraVolumeMounts": [{"name": "extra", "mountPath": "/etc/extra"}],
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}],
            "priorityClassName": "inference", "runtimeClassName": "gvisor",
            "nodeSelector": {"pool": "cpu"}, "tolerations": [{"key": "dedicated", "operator": "Exists"}],
            "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "preference": {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["cpu"]}]}}]}},
            "podLabels": {"a": "b"}, "podAnnotations": {"c": "d"}, "labels": {"e": "f"}, "annotations": {"g": "h"},
            "config": {"tenantBurst": 10, "defaultTimeoutSeconds": 30, "runtimeThreads": 2},
        },
        "workers": {"defaults": {
            "kvBlocks": 2048, "maxContext": 4096, "threads": 8,
            "extraArgs": ["--block-size=32"], "extraEnv": [{"name": "SHARDLINE_TP_TIMEOUT_SECS", "value": "10"}],
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule"}],
            "podLabels": {"a": "b"}, "labels": {"e": "f"},
        }},
    },
    "pvc-existing-image-volume": {
        "model": {"volume": {"type": "image", "image": {"reference": "registry.example/models/smollm2:1"}}},
        "workers": {"pools": {"default": {"enabled": False}, "small": {"replicas": 3}, "big": {"tp": 3, "threads": 12}}},
    },
    "external-etcd-tls-auth-worker-mtls": {
        "etcd": {"enabled": False, "external": {
            "endpoints": ["https://etcd-0.infra:2379", "https://etcd-1.infra:2379"],
            "tls": {"existingSecret": "etcd-client-tls", "clientCert": True},
            "auth": {"username": "shardline", "existingSecret": "etcd-password"}}},
        "workerTls": {"existingSecret": "shardline-worker-tls"},
        "workers": {"pools": {"small": {"replicas": 2}}},
    },
    "existing-claim": {
        "model": {"volume": {"type": "pvc", "pvc": {"claimName": "models", "create": False}}},
    },
}

# Values the schema or the templates must refuse, each with words the refusal must say.
REFUSED = {
    "negative coordinator replicas": ({"coordinator": {"replicas": -1}}, "/coordinator/replicas"),
    "negative worker replicas": ({"workers": {"pools": {"a": {"replicas": -2}}}}, "replicas"),
    "unknown top-level key": ({"replica": 2}, "'replica' not allowed"),
    "unknown coordinator key": ({"coordinator": {"replica": 2}}, "'replica' not allowed"),
    "tp zero": ({"workers": {"defaults": {"tp": 0}}}, "/workers/defaults/tp"),
    "tp not dividing the heads": ({"model": {"attentionHeads": 9}, "workers": {"pools": {"default": {"tp": 2}}}},
                                  "tp=2 must divide model.attentionHeads=9"),
    "tp not dividing the node's GPUs": ({"workers": {"pools": {"default": {"gpu": True, "tp": 3, "gpusPerNode": 8}}}},
                                        "tp=3 must divide workers.pools.default.gpusPerNode=8"),
    "two etcd members": ({"etcd": {"replicas": 2}}, "/etcd/replicas"),
    "external etcd without endpoints": ({"etcd": {"enabled": False}}, "/etcd/external/endpoints"),
    "bad pool name": ({"workers": {"pools": {"Big_GPUs": {}}}}, "Big_GPUs"),
    "bad KV cache dtype": ({"workers": {"defaults": {"kvCacheDtype": "fp8"}}}, "/workers/defaults/kvCacheDtype"),
    "16-bit KV cache on a gpu pool": ({"workers": {"pools": {"default": {"gpu": True, "kvCacheDtype": "bf16"}}}},
                                      "kvCacheDtype=bf16 is for CPU pools"),
    "bad workload kind": ({"workers": {"defaults": {"kind": "DaemonSet"}}}, "/workers/defaults/kind"),
    "lease TTL below 2 s": ({"workers": {"defaults": {"leaseTtlSeconds": 1}}}, "leaseTtlSeconds"),
    "hostPath without a path": ({"model": {"volume": {"type": "hostPath"}}}, "model.volume.hostPath.path"),
    "download without an image": ({"model": {"download": {"enabled": True}}}, "model.download.image"),
    "port out of range": ({"coordinator": {"httpPort": 70000}}, "/coordinator/httpPort"),
    "string replicas": ({"coordinator": {"replicas": "two"}}, "/coordinator/replicas"),
    "etcd TLS over http://": ({"etcd": {"enabled": False, "external": {"endpoints": ["http://etcd:2379"], "tls": {"existingSecret": "t"}}}},
                              "must be https://"),
    "etcd client cert without the Secret": ({"etcd": {"enabled": False, "external": {"endpoints": ["https://etcd:2379"], "tls": {"clientCert": True}}}},
                                            "etcd.external.tls.clientCert needs"),
    "etcd user without its password": ({"etcd": {"enabled": False, "external": {"endpoints": ["http://etcd:2379"], "auth": {"username": "u"}}}},
                                       "etcd.external.auth.username needs"),
    "worker mTLS on a Deployment": ({"workerTls": {"existingSecret": "w"}, "workers": {"defaults": {"kind": "Deployment"}}},
                                    "workerTls.existingSecret needs StatefulSet workers"),
}


def load_values(path):
    with open(path) as f:
        return yaml.safe_load(f) or {}


def merge(base, over):
    """Helm's merge of values: maps merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def render(values):
    """The chart's objects for `values` (merged over values.yaml by Helm) and NOTES.txt."""
    rendered = helm.Chart.load(CHART).render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects, notes = [], ""
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt"):
            notes = text
            continue
        for obj in yaml.safe_load_all(text):
            if obj:
                objects.append((template, obj))
    return objects, notes


def renderings():
    """Every (name, values) the checks cover: each example file, then the matrix."""
    out = []
    for f in sorted(os.listdir(EXAMPLES)):
        if f.endswith(".yaml"):
            out.append((f"examples/{f}", load_values(os.path.join(EXAMPLES, f))))
    out.append(("tests/helm/values-podman.yaml", merge(load_values(os.path.join(HERE, "values-podman.yaml")), {
        "etcd": {"external": {"endpoints": ["http://127.0.0.1:2379"]}},
        "model": {"volume": {"hostPath": {"path": "/srv/models"}}},
    })))
    out += [(f"matrix/{k}", v) for k, v in MATRIX.items()]
    return out


# Custom resources the Kubernetes schemas do not know: the fields the chart uses, strict.
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
        "properties": {
            "apiVersion": {}, "kind": {}, "metadata": {"type": "object"},
            "spec": {"type": "object", "required": ["selector", "endpoints"], "additionalProperties": False, "properties": {
                "selector": {"type": "object", "properties": {"matchLabels": {"type": "object"}}, "additionalProperties": False},
                "namespaceSelector": {"type": "object", "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}}, "additionalProperties": False},
                "endpoints": {"type": "array", "minItems": 1, "items": {"type": "object", "additionalProperties": False, "properties": {
                    "port": {"type": "string"}, "path": {"type": "string"},
                    "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                    "scrapeTimeout": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"}}}}}}}},
    ("monitoring.coreos.com/v1", "PodMonitor"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
        "properties": {
            "apiVersion": {}, "kind": {}, "metadata": {"type": "object"},
            "spec": {"type": "object", "required": ["selector", "podMetricsEndpoints"], "additionalProperties": False, "properties": {
                "selector": {"type": "object", "properties": {"matchLabels": {"type": "object"}}, "additionalProperties": False},
                "namespaceSelector": {"type": "object", "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}}, "additionalProperties": False},
                "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {"type": "object", "additionalProperties": False, "properties": {
                    "port": {"type": "string"}, "path": {"type": "string"},
                    "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                    "scrapeTimeout": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"}}}}}}}},
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
        "properties": {
            "apiVersion": {}, "kind": {}, "metadata": {"type": "object"},
            "spec": {"type": "object", "required": ["scaleTargetRef", "triggers"], "additionalProperties": False, "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
                    "apiVersion": {"type": "string"}, "kind": {"enum": ["Deployment", "StatefulSet"]}, "name": {"type": "string"}}},
                "minReplicaCount": {"type": "integer", "minimum": 0}, "maxReplicaCount": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "triggers": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["type", "metadata"], "additionalProperties": False, "properties": {
                    "type": {"const": "prometheus"},
                    "metadata": {"type": "object", "required": ["serverAddress", "query", "threshold"], "additionalProperties": False, "properties": {
                        "serverAddress": {"type": "string"}, "query": {"type": "string"}, "threshold": {"type": "string", "pattern": "^[0-9.]+$"}}}}}}}}}},
}


def validate(obj):
    """Problems of one rendered object against every Kubernetes version (or its CRD)."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in CRD_SCHEMAS:
        errors = sorted(jsonschema.Draft7Validator(CRD_SCHEMAS[key]).iter_errors(obj), key=str)
        return [f"{key[1]}: {e.message} at {list(e.absolute_path)}" for e in errors]
    problems = []
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"Kubernetes {version}: {e.message} at {list(e.path)}")
        except Exception as e:  # no schema for the kind: a typo in apiVersion / kind
            problems.append(f"Kubernetes {version}: {type(e).__name__} {e}")
    return problems


def structural_checks(name, objects):
    """What schemas cannot see: selectors that match, autoscaled workloads without
    replicas, probes on the real endpoints, the security context everywhere."""
    problems = []
    scaled = {(o["spec"]["scaleTargetRef"]["kind"], o["spec"]["scaleTargetRef"]["name"])
              for _, o in objects if o["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")}
    names = {(o["kind"], o["metadata"]["name"]) for _, o in objects}
    for t, o in objects:
        kind, meta = o["kind"], o["metadata"]
        where = f"{name}: {kind} {meta['name']}"
        if meta.get("namespace") != NAMESPACE and kind not in ("ClusterRole",):
            problems.append(f"{where}: namespace {meta.get('namespace')!r}, want the release's")
        if kind in ("Deployment", "StatefulSet"):
            spec = o["spec"]
            labels = spec["template"]["metadata"]["labels"]
            for k, v in spec["selector"]["matchLabels"].items():
                if labels.get(k) != v:
                    problems.append(f"{where}: selector {k}={v} does not match the pod labels")
            if (kind, meta["name"]) in scaled and "replicas" in spec:
                problems.append(f"{where}: an autoscaler owns it, yet replicas is rendered")
            if (kind, meta["name"]) not in scaled and "replicas" not in spec:
                problems.append(f"{where}: no autoscaler, yet no replicas")
            pod = spec["template"]["spec"]
            if kind == "StatefulSet" and ("Service", spec["serviceName"]) not in names:
                problems.append(f"{where}: serviceName {spec['serviceName']} is not rendered")
            for c in pod["containers"] + pod.get("initContainers", []):
                sc = c.get("securityContext", {})
                if sc.get("allowPrivilegeEscalation") is not False or sc.get("readOnlyRootFilesystem") is not True \
                        or sc.get("capabilities", {}).get("drop") != ["ALL"]:
                    problems.append(f"{where}: container {c['name']} lacks the hardened security context")
            if pod.get("securityContext", {}).get("runAsNonRoot") is not True:
                problems.append(f"{where}: pod not runAsNonRoot")
            volumes = {v["name"] for v in pod.get("volumes", [])} | {
                t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
            for c in pod["containers"] + pod.get("initContainers", []):
                for m in c.get("volumeMounts", []):
                    if m["name"] not in volumes:
                        problems.append(f"{where}: container {c['name']} mounts undefined volume {m['name']}")
            for c in pod["containers"]:
                for a in c.get("args", []):
                    path = a.split("=", 1)[1] if a.startswith("--") and "=" in a else ""
                    if path.startswith("/etc/shardline/") and not any(
                            path.startswith(m["mountPath"] + "/") for m in c.get("volumeMounts", [])):
                        problems.append(f"{where}: {a} names a file no volume mounts")
                if c["name"] == "coordinator":
                    if any(a.startswith("--tls-client-ca=") for a in c["args"]):
                        # Kubelet has no client certificate: only the port can be probed.
                        if "tcpSocket" not in c["readinessProbe"] or "tcpSocket" not in c["livenessProbe"]:
                            problems.append(f"{where}: coordinator with client certificates not probed on TCP")
                    elif c["readinessProbe"].get("httpGet", {}).get("path") != "/health" \
                            or c["livenessProbe"].get("httpGet", {}).get("path") != "/livez":
                        problems.append(f"{where}: coordinator probes not on /health and /livez")
                    elif any(a.startswith("--tls-cert=") for a in c["args"]) \
                            and c["readinessProbe"]["httpGet"].get("scheme") != "HTTPS":
                        problems.append(f"{where}: coordinator serves TLS but is probed over HTTP")
                if c["name"] == "worker":
                    if any(a.startswith("--tls-client-ca=") for a in c["args"]):
                        # Mutual TLS: the kubelet has no client certificate.
                        if any("tcpSocket" not in c.get(p, {}) for p in ("startupProbe", "readinessProbe", "livenessProbe")):
                            problems.append(f"{where}: worker with mutual TLS not probed on TCP")
                    elif c["readinessProbe"]["grpc"]["service"] != "shardline.worker.v1.Worker" or "startupProbe" not in c:
                        problems.append(f"{where}: worker probes not on the worker's gRPC health")
                    drain = next((int(a.split("=", 1)[1]) for a in c["args"] if a.startswith("--drain-timeout-secs=")), None)
                    if drain is None or pod["terminationGracePeriodSeconds"] <= drain:
                        problems.append(f"{where}: terminationGracePeriodSeconds not above the drain timeout")
                    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
                    if mounts.get("/dev/shm") != "shm":
                        problems.append(f"{where}: no memory /dev/shm for the ranks")
        if kind == "ConfigMap" and meta["name"].endswith("-dashboard"):
            shipped = json.load(open(os.path.join(ROOT, "deploy", "grafana", "shardline.json")))
            if json.loads(o["data"]["shardline.json"]) != shipped:
                problems.append(f"{where}: the dashboard differs from deploy/grafana/shardline.json")
        if kind in ("Service", "PodDisruptionBudget", "NetworkPolicy"):
            sel = o["spec"].get("selector") or o["spec"].get("podSelector")
            sel = sel.get("matchLabels", sel) if isinstance(sel, dict) else sel
            if not sel or not any(
                all(tpl.get(k) == v for k, v in sel.items())
                for _, w in objects if w["kind"] in ("Deployment", "StatefulSet")
                for tpl in [w["spec"]["template"]["metadata"]["labels"]]
            ):
                problems.append(f"{where}: selects no pod the chart renders")
    return problems


def documented_values():
    """Problems: a value in values.yaml that the chart's README does not mention."""
    readme = open(os.path.join(CHART, "README.md")).read()
    missing = []

    def walk(prefix, node):
        for k, v in node.items():
            path = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict) and v and path not in ("podSecurityContext", "securityContext") \
                    and not path.endswith((".resources", "probes.startup", "probes.readiness", "probes.liveness")):
                walk(path, v)
            elif f"`{path}`" not in readme:
                missing.append(path)
    walk("", load_values(os.path.join(CHART, "values.yaml")))
    return [f"README.md does not document `{m}`" for m in missing]


def check():
    failures, counted = [], 0
    lint = helm.lint(CHART, strict=True)
    failures += [f"lint: {e}" for e in lint.get("errors", [])]
    failures += [f"lint {m['path']}: {m['error']}" for m in lint.get("messages", []) if m["severity"] >= 2]
    for name, values in renderings():
        lint = helm.lint(CHART, values, strict=True)
        failures += [f"lint {name}: {m['path']}: {m['error']}" for m in lint.get("messages", []) if m["severity"] >= 2]
        try:
            objects, notes = render(values)
        except Exception as e:
            failures.append(f"{name}: does not render: {e}")
            continue
        if "port-forward" not in notes:
            failures.append(f"{name}: NOTES.txt does not say how to reach the API")
        for template, obj in objects:
            counted += 1
            failures += [f"{name} {template} {obj['kind']} {obj['metadata']['name']}: {p}" for p in validate(obj)]
        failures += structural_checks(name, objects)
        print(f"chart: {name}: {len(objects)} objects ({', '.join(sorted({o['kind'] for _, o in objects}))})")
    for what, (values, words) in REFUSED.items():
        try:
            render(values)
            failures.append(f"refused values: {what}: rendered anyway")
        except Exception as e:
            if words not in str(e):
                failures.append(f"refused values: {what}: refused, but the message does not say {words!r}: {e}")
            else:
                print(f"chart: refused {what}: {str(e).strip().splitlines()[-1].strip()}")
    failures += documented_values()
    print(f"chart: {counted} objects validated against Kubernetes {', '.join(KUBE_VERSIONS)}, "
          f"{len(REFUSED)} bad values refused")
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


def containers():
    """Every shardline container of every rendering, for the CLI check."""
    out = []
    for name, values in renderings():
        objects, _ = render(values)
        for _, o in objects:
            if o["kind"] not in ("Deployment", "StatefulSet"):
                continue
            for c in o["spec"]["template"]["spec"]["containers"]:
                if c["image"].split("/")[-1].split(":")[0] != "etcd":
                    out.append({"rendering": name, "workload": o["metadata"]["name"], "container": c["name"],
                                "args": c.get("args", []), "env": c.get("env", [])})
                else:
                    out.append({"rendering": name, "workload": o["metadata"]["name"], "container": "etcd",
                                "args": c.get("args", []), "env": c.get("env", []), "etcd": True})
    json.dump(out, sys.stdout, indent=1)
    return 0


def for_podman(objects):
    """The rendered workloads as `podman kube play` (4.3) runs them. It runs Pods and
    Deployments, not StatefulSets or Services, and differs from Kubernetes in three ways
    the chart need not follow; each is changed here and nowhere else:
    - it refuses `ports` on a pod with host networking ("PortMappings can only be used with
      Bridge or slirp4netns networking"); Kubernetes takes them (as host ports);
    - it does not support the downward API's `status.podIP`: the workers' advertised host
      becomes 127.0.0.1 (all pods share the host's network here);
    - probes become podman health checks that need systemd, which this machine lacks: they
      are dropped (they are covered by rendering and schema validation)."""
    out = {}
    for _, o in objects:
        if o["kind"] not in ("Deployment",):
            continue
        o = copy.deepcopy(o)
        pod = o["spec"]["template"]["spec"]
        for c in pod["containers"]:
            if pod.get("hostNetwork"):
                c.pop("ports", None)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                c.pop(probe, None)
            for e in c.get("env", []):
                if e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP":
                    del e["valueFrom"]
                    e["value"] = "127.0.0.1"
        out[o["metadata"]["name"]] = o
    return out


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "check":
        return check()
    if cmd == "containers":
        return containers()
    if cmd in ("render", "podman"):
        values = load_values(rest[0])
        if len(rest) > 1 and rest[1].startswith("{"):
            values = merge(values, json.loads(rest[1]))
        objects, _ = render(values)
        if cmd == "render":
            yaml.safe_dump_all([o for _, o in objects], sys.stdout, sort_keys=False)
            return 0
        outdir = rest[-1]
        os.makedirs(outdir, exist_ok=True)
        for name, o in for_podman(objects).items():
            with open(os.path.join(outdir, f"{name}.yaml"), "w") as f:
                yaml.safe_dump(o, f, sort_keys=False)
            print(os.path.join(outdir, f"{name}.yaml"))
        return 0
    print(f"chart.py: unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
