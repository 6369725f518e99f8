{{/* Names ------------------------------------------------------------------------------------------ */}}

{{- define "optiserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "optiserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The objects of one variant: <fullname>-<variant name>, at most 63 characters. */}}
{{- define "optiserve.variantFullname" -}}
{{- printf "%s-%s" (include "optiserve.fullname" .root) .v.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "optiserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "optiserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels ----------------------------------------------------------------------------------------- */}}

{{- define "optiserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "optiserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "optiserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "optiserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Every serving pod of the release (the entry Service, the NetworkPolicy, the ServiceMonitor). */}}
{{- define "optiserve.serverSelectorLabels" -}}
{{ include "optiserve.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end -}}

{{/* The pods of one variant (its Deployment, Service, PDB, spread constraint). Argument: dict root v. */}}
{{- define "optiserve.variantSelectorLabels" -}}
{{ include "optiserve.serverSelectorLabels" .root }}
optiserve.io/variant-name: {{ .v.name }}
{{- end -}}

{{/* Its identity, the same four labels as the metrics contract (optiserve/metrics.py). */}}
{{- define "optiserve.variantLabels" -}}
{{ include "optiserve.labels" .root }}
app.kubernetes.io/component: server
optiserve.io/variant-name: {{ .v.name }}
optiserve.io/model: {{ .v.model | quote }}
optiserve.io/variant: {{ .v.variantId | quote }}
optiserve.io/runtime: {{ .v.runtime | quote }}
optiserve.io/precision: {{ .v.precision | default "fp32" | quote }}
{{- end -}}

{{/* Per-variant values ---------------------------------------------------------------------------- */}}

{{/*
A variant's values: `defaults`, overridden key by key (two levels deep) by the variant's own. Sprig's
mergeOverwrite would not let `false` or `0` override a default, hence this explicit merge. Returns YAML:
  {{- $v := include "optiserve.variant" (dict "root" $ "v" .) | fromYaml }}
*/}}
{{- define "optiserve.variant" -}}
{{- $out := deepCopy .root.Values.defaults -}}
{{- range $key, $value := .v -}}
{{- $current := index $out $key -}}
{{- if and (kindIs "map" $value) (kindIs "map" $current) -}}
{{- $merged := deepCopy $current -}}
{{- range $k, $x := $value }}{{ $_ := set $merged $k $x }}{{ end -}}
{{- $_ := set $out $key $merged -}}
{{- else -}}
{{- $_ := set $out $key $value -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* The variants' names, for checking references to them. */}}
{{- define "optiserve.variantNames" -}}
{{- $names := list -}}
{{- range .Values.variants }}{{ $names = append $names .name }}{{ end -}}
{{- toJson $names -}}
{{- end -}}

{{/*
Rules JSON Schema cannot express (it cannot sum or cross-reference); every message names the field.
Included once, from the Deployments template, so any install with bad values fails.
*/}}
{{- define "optiserve.validate" -}}
{{- $names := include "optiserve.variantNames" . | fromJsonArray -}}
{{- $seen := dict -}}
{{- range $i, $raw := .Values.variants -}}
{{- if hasKey $seen $raw.name -}}
{{- fail (printf "variants[%d].name: %q is used by more than one variant (names must be unique)" $i $raw.name) -}}
{{- end -}}
{{- $_ := set $seen $raw.name true -}}
{{- $v := include "optiserve.variant" (dict "root" $ "v" $raw) | fromYaml -}}
{{- if and (eq $v.runtime "tensorrt") (lt (int $v.gpu) 1) -}}
{{- fail (printf "variants[%d].gpu: runtime tensorrt (variant %s) needs gpu >= 1" $i $v.name) -}}
{{- end -}}
{{- if and (eq $v.artifact.source "url") (not $v.artifact.url) -}}
{{- fail (printf "variants[%d].artifact.url: required when artifact.source is url (variant %s)" $i $v.name) -}}
{{- end -}}
{{- if and (eq $v.artifact.source "pvc") (not $v.artifact.claimName) -}}
{{- fail (printf "variants[%d].artifact.claimName: required when artifact.source is pvc (variant %s)" $i $v.name) -}}
{{- end -}}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) -}}
{{- fail (printf "variants[%d].autoscaling.minReplicas: %d is above maxReplicas %d" $i (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) -}}
{{- end -}}
{{- if and $v.autoscaling.enabled (not $v.autoscaling.targetCPUUtilizationPercentage) (not $v.autoscaling.requestsPerSecond) -}}
{{- fail (printf "variants[%d].autoscaling: enabled, but neither targetCPUUtilizationPercentage nor requestsPerSecond is set" $i) -}}
{{- end -}}
{{- end -}}
{{- $weights := .Values.traffic.weights | default dict -}}
{{- if $weights -}}
{{- $sum := 0 -}}
{{- range $name, $w := $weights -}}
{{- if not (has $name $names) -}}
{{- fail (printf "traffic.weights.%s: no variant is named %q (variants: %s)" $name $name (join ", " $names)) -}}
{{- end -}}
{{- $sum = add $sum (int $w) -}}
{{- end -}}
{{- if ne (int $sum) 100 -}}
{{- fail (printf "traffic.weights: the weights must sum to 100, they sum to %d (%s)" (int $sum) (include "optiserve.weightsText" $weights)) -}}
{{- end -}}
{{- end -}}
{{- with .Values.traffic.mirror -}}
{{- if not (has . $names) -}}
{{- fail (printf "traffic.mirror: no variant is named %q (variants: %s)" . (join ", " $names)) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.traffic.gateway.enabled (not .Values.traffic.gateway.name) -}}
{{- fail "traffic.gateway.name: required when traffic.gateway.enabled is true (the Gateway the HTTPRoute attaches to)" -}}
{{- end -}}
{{- if .Values.loadgen.enabled -}}
{{- if not (has .Values.loadgen.target $names) -}}
{{- fail (printf "loadgen.target: no variant is named %q (variants: %s)" .Values.loadgen.target (join ", " $names)) -}}
{{- end -}}
{{- if not .Values.loadgen.payloads -}}
{{- fail "loadgen.payloads: required when loadgen.enabled is true (OIP requests, one JSON line each; `optiserve deploy` writes them)" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "optiserve.weightsText" -}}
{{- $parts := list -}}
{{- range $name, $w := . }}{{ $parts = append $parts (printf "%s=%d" $name (int $w)) }}{{ end -}}
{{- join ", " $parts -}}
{{- end -}}

{{/*
A variant's traffic weight: its entry in traffic.weights (0 when absent), or, with no weights, an equal
share of 100 (the first variants take the remainder, so the shares sum to 100 as Istio expects).
Argument: dict root i v.
*/}}
{{- define "optiserve.weight" -}}
{{- $weights := .root.Values.traffic.weights | default dict -}}
{{- if $weights -}}
{{- int (index $weights .v.name | default 0) -}}
{{- else -}}
{{- $n := len .root.Values.variants -}}
{{- add (div 100 $n) (ternary 1 0 (lt (int .i) (int (mod 100 $n)))) -}}
{{- end -}}
{{- end -}}

{{/* Security ---------------------------------------------------------------------------------------- */}}

{{/* Pod Security "restricted": every pod runs as the non-root BentoML user with the runtime's seccomp. */}}
{{- define "optiserve.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: {{ .Values.podSecurity.seccompProfile }}
  {{- if eq .Values.podSecurity.seccompProfile "Localhost" }}
  localhostProfile: {{ required "podSecurity.localhostProfile: required when seccompProfile is Localhost" .Values.podSecurity.localhostProfile }}
  {{- end }}
{{- end -}}

{{- define "optiserve.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: {{ .Values.podSecurity.seccompProfile }}
  {{- if eq .Values.podSecurity.seccompProfile "Localhost" }}
  localhostProfile: {{ .Values.podSecurity.localhostProfile }}
  {{- end }}
{{- end -}}

{{/* Writable scratch space under a read-only root filesystem. */}}
{{- define "optiserve.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
- name: bentoml-home
  emptyDir:
    sizeLimit: 1Gi
{{- end -}}

{{- define "optiserve.image" -}}
{{- printf "%s:%s" .repository (toString .tag) -}}
{{- end -}}

{{/* Where BentoML's container keeps the Bento, and the variant directory inside it. */}}
{{- define "optiserve.bentoModelDir" -}}
/home/bentoml/bento/src/model/{{ .variantId }}
{{- end -}}

{{/*
The init container that fetches a variant's artifact into the `model` emptyDir, by the URL's scheme:
http(s):// a tar.gz of the variant directory (curl), s3:// a prefix holding the directory (aws s3 sync),
oci:// an artifact holding its files (oras pull). Argument: dict root v.
*/}}
{{- define "optiserve.fetchContainer" -}}
{{- $root := .root -}}
{{- $v := .v -}}
{{- $url := $v.artifact.url -}}
{{- $scheme := regexFind "^[a-z0-9]+" $url -}}
{{- $kind := ternary "http" $scheme (or (eq $scheme "https") (eq $scheme "http")) -}}
{{- $fetcher := index $root.Values.artifactFetchers $kind -}}
- name: fetch-model
  image: {{ $fetcher.image | quote }}
  imagePullPolicy: IfNotPresent
  {{- if eq $kind "http" }}
  command: [sh, -ec]
  args:
    - curl -fsSL --retry 3 -o /tmp/model.tar.gz "$ARTIFACT_URL" && tar -xzf /tmp/model.tar.gz -C /model && rm /tmp/model.tar.gz
  {{- else if eq $kind "s3" }}
  command: [aws]
  args: [s3, sync, --only-show-errors, "$(ARTIFACT_URL)", /model]
  {{- else }}
  command: [oras]
  args: [pull, "$(ARTIFACT_REF)", --output, /model]
  {{- end }}
  env:
    - name: ARTIFACT_URL
      value: {{ $url | quote }}
    {{- if eq $kind "oci" }}
    - name: ARTIFACT_REF
      value: {{ trimPrefix "oci://" $url | quote }}
    {{- end }}
    - name: HOME
      value: /tmp
  resources:
    requests: {cpu: 100m, memory: 128Mi}
    limits: {cpu: "1", memory: 512Mi}
  securityContext:
    {{- include "optiserve.containerSecurityContext" $root | nindent 4 }}
  volumeMounts:
    - {name: tmp, mountPath: /tmp}
    - {name: model, mountPath: /model}
{{- end -}}
