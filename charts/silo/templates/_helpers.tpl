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

{{/*
Prefix of the names of the release's objects that live outside its namespace: ClusterRoles and
ClusterRoleBindings, and the Roles and RoleBindings it puts in other namespaces (the watched
namespace, the router's namespaces, the admin Secrets' namespaces). Two releases of the same
name in different namespaces then never claim the same object. Not cut: RBAC names may be 253
characters long, and 63 (namespace) + 40 (full name) + the longest suffix stay far below.
*/}}
{{- define "silo.clusterPrefix" -}}
{{- printf "%s-%s" .Release.Namespace (include "silo.fullname" .) }}
{{- end }}
{{- define "silo.controller.rbacName" -}}
{{- printf "%s-controller" (include "silo.clusterPrefix" .) }}
{{- end }}
{{- define "silo.router.rbacName" -}}
{{- printf "%s-router" (include "silo.clusterPrefix" .) }}
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
The namespaces whose Secrets may be named by a DatabaseServer's `adminSecretRef`, comma-separated:
the release namespace, then controller.adminSecretNamespaces.
*/}}
{{- define "silo.controller.adminSecretNamespaces" -}}
{{- prepend .Values.controller.adminSecretNamespaces .Release.Namespace | uniq | join "," }}
{{- end }}

{{/*
The namespaces whose Tenants and Secrets the router reads, comma-separated; empty means all:
router.namespaces, or else controller.watchNamespace.
*/}}
{{- define "silo.router.namespaces" -}}
{{- if .Values.router.namespaces }}
{{- .Values.router.namespaces | uniq | join "," }}
{{- else }}
{{- .Values.controller.watchNamespace }}
{{- end }}
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

{{- define "silo.backups.settings" -}}
{{- $b := .Values.backups -}}
{{- $settings := dict
  "destination" $b.destination
  "s3" $b.s3
  "maxConcurrentPerServer" (int $b.maxConcurrentPerServer)
  "schedule" $b.schedule
  "window" $b.window
  "retention" (dict "keepLast" (int $b.retention.keepLast) "maxAge" $b.retention.maxAge)
  "verifyEvery" (int $b.verifyEvery) -}}
{{- if $b.volume }}{{- $_ := set $settings "volume" $b.volume }}{{- end }}
{{- $settings | toPrettyJson }}
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
# Tenant credentials Secrets `<tenant>-db`: watched by label, created and patched. No `delete`:
# a Secret is owned by its Tenant (ownerReference), and Kubernetes' garbage collector removes it
# after the Tenant; the controller never needs to delete a Secret, so it cannot delete anyone's.
# `get` also reads the DatabaseServer admin Secrets found here, by name (the controller accepts
# only those in SILO_ADMIN_SECRET_NAMESPACES).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Watched by the SchemaRollout controller (and by the Tenant controller: a new tenant waits for
# its namespace's target); status written by server-side apply.
- apiGroups: ["silo.dev"]
  resources: ["schemarollouts"]
  verbs: ["list", "watch"]
- apiGroups: ["silo.dev"]
  resources: ["schemarollouts/status"]
  verbs: ["patch"]
# Migration, backup and restore Jobs: watched by label, one created per (tenant, version) or per
# backup, deleted once its outcome is recorded (or to retry a failure). `get`: a Snapshot deletion
# reads its final backup's Job by name in the final-backup namespace, which the watch may not
# cover. No `patch` or `update`.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
# TenantBackups: watched; the finalizer `silo.dev/backup-object` (deleting a TenantBackup deletes
# its object) added and removed by patch; created on the schedule and deleted by retention;
# status written by server-side apply. `get`: a Snapshot deletion reads its final TenantBackup by
# name (as for Jobs).
- apiGroups: ["silo.dev"]
  resources: ["tenantbackups"]
  verbs: ["get", "list", "watch", "patch", "create", "delete"]
- apiGroups: ["silo.dev"]
  resources: ["tenantbackups/status"]
  verbs: ["patch"]
# TenantRestores: watched (by the Tenant controller too: a running restore locks its tenant);
# status written by server-side apply.
- apiGroups: ["silo.dev"]
  resources: ["tenantrestores"]
  verbs: ["list", "watch"]
- apiGroups: ["silo.dev"]
  resources: ["tenantrestores/status"]
  verbs: ["patch"]
# A finished Job's termination message: a failed migration's last words (FallbackToLogsOnError),
# a backup runner's report. Listed once per finished Job; no `get` on pods/log.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
{{- end }}
