{{/*
Names, labels and small shared fragments.
*/}}

{{- define "halfclose.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: "<release>-<chart>", or the release name alone when it already holds
the chart name. Truncated so "-operator"/"-agent" suffixes still fit in 63.
*/}}
{{- define "halfclose.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "halfclose.operator.fullname" -}}
{{- printf "%s-operator" (include "halfclose.fullname" .) }}
{{- end }}

{{- define "halfclose.agent.fullname" -}}
{{- printf "%s-agent" (include "halfclose.fullname" .) }}
{{- end }}

{{- define "halfclose.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "halfclose.labels" -}}
helm.sh/chart: {{ include "halfclose.chart" . }}
app.kubernetes.io/name: {{ include "halfclose.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: halfclose
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels: stable across upgrades (a Deployment's selector is immutable). */}}
{{- define "halfclose.selectorLabels" -}}
app.kubernetes.io/name: {{ include "halfclose.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "halfclose.operator.selectorLabels" -}}
{{ include "halfclose.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "halfclose.agent.selectorLabels" -}}
{{ include "halfclose.selectorLabels" . }}
app.kubernetes.io/component: agent
{{- end }}

{{- define "halfclose.operator.labels" -}}
{{ include "halfclose.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "halfclose.agent.labels" -}}
{{ include "halfclose.labels" . }}
app.kubernetes.io/component: agent
{{- end }}

{{- define "halfclose.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "halfclose.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "halfclose.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create }}
{{- default (include "halfclose.agent.fullname" .) .Values.agent.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.agent.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "halfclose.peeringName" -}}
{{- default (include "halfclose.fullname" .) .Values.operator.leaderElection.peeringName }}
{{- end }}

{{/* A program's image (agent.image or operator.image, passed as "image" with the
root context as "root"): repository:tag, or repository@digest when a digest is given. */}}
{{- define "halfclose.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{/* Both monitors at once would scrape every target twice. */}}
{{- define "halfclose.validateValues" -}}
{{- if and .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled }}
{{- fail "metrics.serviceMonitor.enabled and metrics.podMonitor.enabled are exclusive: enable one (each scrapes every target)" }}
{{- end }}
{{- if and .Values.operator.enabled (gt (int .Values.operator.replicas) 1) (not .Values.operator.leaderElection.enabled) }}
{{- fail "operator.replicas > 1 needs operator.leaderElection.enabled: replicas without peering would all act at once" }}
{{- end }}
{{- end }}
