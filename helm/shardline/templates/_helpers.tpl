{{/* Names, labels and the pieces every shardline workload shares. */}}

{{- define "shardline.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* `<release>-<chart>` (or just the release when it already names the chart), 63 chars. */}}
{{- define "shardline.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "shardline.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object; `component` names the part (coordinator, worker, etcd). */}}
{{- define "shardline.labels" -}}
helm.sh/chart: {{ include "shardline.chart" .root }}
{{ include "shardline.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: shardline
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The labels selectors match on: name, instance, component (and pool for workers). */}}
{{- define "shardline.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shardline.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- with .pool }}
shardline.io/pool: {{ . }}
{{- end }}
{{- end }}

{{- define "shardline.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "shardline.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* image: repository:tag of the shardline image, a pool's override first. */}}
{{- define "shardline.image" -}}
{{- $repo := .root.Values.image.repository }}
{{- $tag := default .root.Chart.AppVersion .root.Values.image.tag }}
{{- with .override }}
{{- if .repository }}{{ $repo = .repository }}{{ end }}
{{- if .tag }}{{ $tag = .tag }}{{ end }}
{{- end }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}

{{- define "shardline.etcdName" -}}
{{- printf "%s-etcd" (include "shardline.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Comma-separated etcd client endpoints: each bundled member, or the external ones. */}}
{{- define "shardline.etcdEndpoints" -}}
{{- if .Values.etcd.enabled }}
{{- $name := include "shardline.etcdName" . }}
{{- $urls := list }}
{{- range $i := until (int .Values.etcd.replicas) }}
{{- $urls = append $urls (printf "http://%s-%d.%s-headless.%s.svc:2379" $name $i $name $.Release.Namespace) }}
{{- end }}
{{- join "," $urls }}
{{- else }}
{{- if not .Values.etcd.external.endpoints }}
{{- fail "etcd.enabled is false: set etcd.external.endpoints to the etcd the cluster uses" }}
{{- end }}
{{- join "," .Values.etcd.external.endpoints }}
{{- end }}
{{- end }}

{{/* The etcd client's TLS and auth flags (external etcd only; the bundled one is
reached inside the namespace, behind the network policy). */}}
{{- define "shardline.etcdSecurityArgs" -}}
{{- $e := .Values.etcd.external }}
{{- if not .Values.etcd.enabled }}
{{- if $e.tls.existingSecret }}
{{- range $e.endpoints }}
{{- if not (hasPrefix "https://" .) }}
{{- fail (printf "etcd.external.tls.existingSecret is set: etcd endpoint %s must be https://" .) }}
{{- end }}
{{- end }}
- --etcd-ca=/etc/shardline/etcd-tls/ca.crt
{{- if $e.tls.clientCert }}
- --etcd-cert=/etc/shardline/etcd-tls/tls.crt
- --etcd-key=/etc/shardline/etcd-tls/tls.key
{{- end }}
{{- else if $e.tls.clientCert }}
{{- fail "etcd.external.tls.clientCert needs etcd.external.tls.existingSecret (the Secret with ca.crt, tls.crt, tls.key)" }}
{{- end }}
{{- if $e.auth.username }}
{{- if not $e.auth.existingSecret }}
{{- fail "etcd.external.auth.username needs etcd.external.auth.existingSecret (the Secret with the password under `password`)" }}
{{- end }}
- --etcd-user={{ $e.auth.username }}
- --etcd-password-file=/etc/shardline/etcd-auth/password
{{- end }}
{{- end }}
{{- end }}

{{/* Mounts of the etcd client's certificate and password Secrets. */}}
{{- define "shardline.etcdSecurityMounts" -}}
{{- $e := .Values.etcd.external }}
{{- if and (not .Values.etcd.enabled) $e.tls.existingSecret }}
- name: etcd-tls
  mountPath: /etc/shardline/etcd-tls
  readOnly: true
{{- end }}
{{- if and (not .Values.etcd.enabled) $e.auth.username }}
- name: etcd-auth
  mountPath: /etc/shardline/etcd-auth
  readOnly: true
{{- end }}
{{- end }}

{{/* Volumes of the etcd client's certificate and password Secrets. */}}
{{- define "shardline.etcdSecurityVolumes" -}}
{{- $e := .Values.etcd.external }}
{{- if and (not .Values.etcd.enabled) $e.tls.existingSecret }}
- name: etcd-tls
  secret:
    secretName: {{ $e.tls.existingSecret }}
{{- end }}
{{- if and (not .Values.etcd.enabled) $e.auth.username }}
- name: etcd-auth
  secret:
    secretName: {{ $e.auth.existingSecret }}
    items:
      - key: password
        path: password
{{- end }}
{{- end }}

{{/* Name of the Secret that holds the API key ("" when the API is open). */}}
{{- define "shardline.apiKeySecret" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecret }}
{{- else if .Values.auth.apiKey }}
{{- printf "%s-auth" (include "shardline.fullname" .) }}
{{- end }}
{{- end }}

{{/* A pool's settings: workers.defaults overridden by the pool's own keys. */}}
{{- define "shardline.pool" -}}
{{- $pool := mergeOverwrite (deepCopy .root.Values.workers.defaults) (deepCopy (default dict .values)) }}
{{- toYaml $pool }}
{{- end }}

{{/* Refuses settings the workers would refuse at start, with the reason. */}}
{{- define "shardline.checkPool" -}}
{{- $tp := int .pool.tp }}
{{- $heads := int .root.Values.model.attentionHeads }}
{{- if and (gt $heads 0) (ne (mod $heads $tp) 0) }}
{{- fail (printf "workers.pools.%s.tp=%d must divide model.attentionHeads=%d (each rank takes whole query heads)" .name $tp $heads) }}
{{- end }}
{{- $gpus := int .pool.gpusPerNode }}
{{- if and .pool.gpu (gt $gpus 0) (ne (mod $gpus $tp) 0) }}
{{- fail (printf "workers.pools.%s.tp=%d must divide workers.pools.%s.gpusPerNode=%d (a group's GPUs are on one node)" .name $tp .name $gpus) }}
{{- end }}
{{- if and .pool.gpu (gt $gpus 0) (gt $tp $gpus) }}
{{- fail (printf "workers.pools.%s.tp=%d is more than gpusPerNode=%d" .name $tp $gpus) }}
{{- end }}
{{- if and .pool.gpu (ne (toString .pool.kvCacheDtype) "f32") }}
{{- fail (printf "workers.pools.%s.kvCacheDtype=%s is for CPU pools: a gpu pool keeps its KV cache in the device's dtype (leave f32)" .name (toString .pool.kvCacheDtype)) }}
{{- end }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" .name) }}
{{- fail (printf "workers.pools: %q is not a valid pool name (lower-case letters, digits and '-')" .name) }}
{{- end }}
{{- end }}

{{/* The topology spread constraints of a workload, with its selector filled in. */}}
{{- define "shardline.topologySpread" -}}
{{- range .constraints }}
{{- $c := deepCopy . }}
{{- if not $c.labelSelector }}
{{- $_ := set $c "labelSelector" (dict "matchLabels" (include "shardline.selectorLabels" $.labels | fromYaml)) }}
{{- end }}
- {{ toYaml $c | nindent 2 | trim }}
{{- end }}
{{- end }}

{{/* Volumes of the model in a worker pod. */}}
{{- define "shardline.modelVolume" -}}
{{- $v := .Values.model.volume }}
{{- if eq $v.type "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-models" (include "shardline.fullname" .)) $v.pvc.claimName }}
    readOnly: {{ not .Values.model.download.enabled }}
{{- else if eq $v.type "hostPath" }}
{{- if not $v.hostPath.path }}
{{- fail "model.volume.type=hostPath needs model.volume.hostPath.path" }}
{{- end }}
- name: model
  hostPath:
    path: {{ $v.hostPath.path }}
    type: {{ $v.hostPath.type }}
{{- else if eq $v.type "emptyDir" }}
- name: model
  emptyDir: {{ ternary (dict "sizeLimit" $v.emptyDir.sizeLimit) dict (ne $v.emptyDir.sizeLimit "") | toJson }}
{{- else if eq $v.type "image" }}
{{- if not $v.image.reference }}
{{- fail "model.volume.type=image needs model.volume.image.reference" }}
{{- end }}
- name: model
  image:
    reference: {{ $v.image.reference }}
    pullPolicy: {{ $v.image.pullPolicy }}
{{- end }}
{{- end }}
