{{/* Chart name, truncated to a DNS label. */}}
{{- define "lmkube.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release name, plus the chart name unless the release name already contains it. */}}
{{- define "lmkube.fullname" -}}
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

{{- define "lmkube.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of the operator's pods. Distinct from the model-server pods' labels
(component=model-server), which the operator itself sets. */}}
{{- define "lmkube.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lmkube.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels of everything the release creates (LocalModels from `models` included). */}}
{{- define "lmkube.commonLabels" -}}
helm.sh/chart: {{ include "lmkube.chart" . }}
app.kubernetes.io/name: {{ include "lmkube.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels of the operator's own objects. */}}
{{- define "lmkube.labels" -}}
{{ include "lmkube.commonLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "lmkube.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lmkube.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lmkube.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "lmkube.serverRepository" -}}
{{- default .Values.image.repository .Values.serverImage.repository }}
{{- end }}

{{/* The model servers' tag: serverImage.tag, else image.tag, else the chart's appVersion. */}}
{{- define "lmkube.serverTag" -}}
{{- default (default .Chart.AppVersion .Values.image.tag) .Values.serverImage.tag }}
{{- end }}

{{- define "lmkube.serverImage" -}}
{{- printf "%s:%s" (include "lmkube.serverRepository" .) (include "lmkube.serverTag" .) }}
{{- end }}

{{- define "lmkube.serverCudaImage" -}}
{{- $tag := include "lmkube.serverTag" . }}
{{- printf "%s:%s" (include "lmkube.serverRepository" .) (default (printf "%s-cuda" $tag) .Values.serverImage.cudaTag) }}
{{- end }}

{{/* The namespaces the operator watches; empty means all (cluster-wide RBAC). */}}
{{- define "lmkube.clusterWide" -}}
{{- if empty .Values.operator.watchNamespaces }}true{{ end }}
{{- end }}

{{/* Selector labels of the gateway's pods (component=gateway). */}}
{{- define "lmkube.gatewaySelectorLabels" -}}
app.kubernetes.io/name: {{ include "lmkube.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "lmkube.gatewayLabels" -}}
{{ include "lmkube.commonLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "lmkube.gatewayFullname" -}}
{{- printf "%s-gateway" (include "lmkube.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Secret holding the credential the gateway sends to the model servers. */}}
{{- define "lmkube.gatewayCredential" -}}
{{- printf "%s-upstream" (include "lmkube.gatewayFullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
