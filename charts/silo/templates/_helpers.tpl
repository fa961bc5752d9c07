{{/*
The chart name, or nameOverride.
*/}}
{{- define "silo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name, the prefix of every resource name: fullnameOverride, or
`<release>-<name>`, or `<release>` when the release name already contains the chart name. Cut
to 40 characters, so that the longest suffix (`-router-http`) still fits a DNS label and no two
objects' names can end up equal.
*/}}
{{- define "silo.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Names of the components' objects, within the 63 characters of a DNS label. */}}
{{- define "silo.controller.fullname" -}}
{{- printf "%s-controller" (include "silo.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- define "silo.router.fullname" -}}
{{- printf "%s-router" (include "silo.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- define "silo.jobs.fullname" -}}
{{- printf "%s-jobs" (include "silo.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* `helm.sh/chart`: name and version. */}}
{{- define "silo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object of the release. */}}
{{- define "silo.labels" -}}
helm.sh/chart: {{ include "silo.chart" . }}
{{ include "silo.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: silo
{{- end }}

{{/* Labels that identify the release's objects; never change them, selectors are immutable. */}}
{{- define "silo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "silo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "silo.controller.labels" -}}
{{ include "silo.labels" . }}
app.kubernetes.io/component: controller
{{- end }}
{{- define "silo.controller.selectorLabels" -}}
{{ include "silo.selectorLabels" . }}
app.kubernetes.io/component: controller
{{- end }}

{{- define "silo.router.labels" -}}
{{ include "silo.labels" . }}
app.kubernetes.io/component: router
{{- end }}
{{- define "silo.router.selectorLabels" -}}
{{ include "silo.selectorLabels" . }}
app.kubernetes.io/component: router
{{- end }}

{{- define "silo.jobs.labels" -}}
{{ include "silo.labels" . }}
app.kubernetes.io/component: job
{{- end }}

{{/* The image holding both binaries. */}}
{{- define "silo.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* ServiceAccount names. */}}
{{- define "silo.controller.serviceAccountName" -}}
{{- if .Values.controller.serviceAccount.create }}
{{- .Values.controller.serviceAccount.name | default (include "silo.controller.fullname" .) }}
{{- else }}
{{- required "controller.serviceAccount.name is required when controller.serviceAccount.create is false" .Values.controller.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "silo.router.serviceAccountName" -}}
{{- if .Values.router.serviceAccount.create }}
{{- .Values.router.serviceAccount.name | default (include "silo.router.fullname" .) }}
{{- else }}
{{- required "router.serviceAccount.name is required when router.serviceAccount.create is false" .Values.router.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Lease the controller replicas elect their leader with. */}}
{{- define "silo.leaseName" -}}
{{- .Values.controller.leaderElection.leaseName | default (include "silo.controller.fullname" .) }}
{{- end }}

{{/*
The router's address for the tenant Secrets' `router-uri`: controller.routerAddress, or this
release's router Service; empty without a router.
*/}}
{{- define "silo.routerAddress" -}}
{{- if .Values.controller.routerAddress }}
{{- .Values.controller.routerAddress }}
{{- else if .Values.router.enabled }}
{{- printf "%s.%s.svc:%d" (include "silo.router.fullname" .) .Release.Namespace (int .Values.router.service.port) }}
{{- end }}
{{- end }}

{{/* Settings of the Jobs the controller creates, as the controller reads them (jobs.json). */}}
{{- define "silo.jobs.settings" -}}
{{- $jobs := .Values.jobs -}}
{{- dict
  "image" ($jobs.image | default (include "silo.image" .))
  "imagePullPolicy" ($jobs.imagePullPolicy | default .Values.image.pullPolicy)
  "imagePullSecrets" .Values.imagePullSecrets
  "serviceAccountName" $jobs.serviceAccountName
  "hostNetwork" $jobs.hostNetwork
  "ttlSecondsAfterFinished" (int $jobs.ttlSecondsAfterFinished)
  "activeDeadlineSeconds" (int $jobs.activeDeadlineSeconds)
  "backoffLimit" (int $jobs.backoffLimit)
  "resources" $jobs.resources
  "nodeSelector" $jobs.nodeSelector
  "tolerations" $jobs.tolerations
  "affinity" $jobs.affinity
  "podLabels" $jobs.podLabels
  "podAnnotations" $jobs.podAnnotations
  | toPrettyJson }}
{{- end }}

{{/*
The controller's rights on Tenants and their Secrets: cluster-wide, or in controller.watchNamespace.
*/}}
{{- define "silo.controller.tenantRules" -}}
# Watched by the Tenant controller; the finalizer `silo.dev/cleanup` is added and removed by patch.
- apiGroups: ["silo.dev"]
  resources: ["tenants"]
  verbs: ["list", "watch", "patch"]
# Status written by server-side apply.
- apiGroups: ["silo.dev"]
  resources: ["tenants/status"]
  verbs: ["patch"]
# Tenant credentials Secrets `<tenant>-db` (owned, watched by label; created, patched, deleted),
# and DatabaseServer admin Secrets (read by name).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
{{- end }}
