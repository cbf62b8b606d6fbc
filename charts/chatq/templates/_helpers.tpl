{{/* Names, labels and shared pieces of chatq's templates. */}}

{{- define "chatq.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-chatq, or the release name alone when it already contains the chart name. */}}
{{- define "chatq.fullname" -}}
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

{{/* Name of one component's objects: (dict "ctx" $ "component" "api"). */}}
{{- define "chatq.componentName" -}}
{{- printf "%s-%s" (include "chatq.fullname" .ctx | trunc 50 | trimSuffix "-") .component }}
{{- end }}

{{- define "chatq.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "chatq.labels" -}}
helm.sh/chart: {{ include "chatq.chart" . }}
app.kubernetes.io/name: {{ include "chatq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: chatq
{{- end }}

{{/* Labels of one component: (dict "ctx" $ "component" "api"). */}}
{{- define "chatq.componentLabels" -}}
{{ include "chatq.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Selector labels of one component; never change them (Deployment selectors are immutable). */}}
{{- define "chatq.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chatq.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "chatq.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "chatq.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "chatq.operatorServiceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "chatq.componentName" (dict "ctx" . "component" "operator")) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* An image reference: (dict "ctx" $ "image" .Values.image.api). The tag defaults to appVersion. */}}
{{- define "chatq.image" -}}
{{- $tag := .image.tag | default .ctx.Chart.AppVersion | toString }}
{{- if eq $tag "latest" }}
{{- fail "image tags must be pinned: `latest` is not allowed (leave the tag empty for the chart's appVersion)" }}
{{- end }}
{{- $repo := .image.repository }}
{{- with .ctx.Values.image.registry }}
{{- $repo = printf "%s/%s" (trimSuffix "/" .) $repo }}
{{- end }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}

{{- define "chatq.secretName" -}}
{{- default (include "chatq.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/* The Redis URL: the value, or the in-chart Redis in dev, or a clear failure. */}}
{{- define "chatq.redisUrl" -}}
{{- if .Values.redis.url }}
{{- .Values.redis.url }}
{{- else if .Values.dev.enabled }}
{{- printf "redis://%s:6379/0" (include "chatq.componentName" (dict "ctx" . "component" "redis")) }}
{{- end }}
{{- end }}

{{- define "chatq.sqsEndpoint" -}}
{{- if .Values.queue.sqs.endpoint }}
{{- .Values.queue.sqs.endpoint }}
{{- else if .Values.dev.enabled }}
{{- printf "http://%s:9324" (include "chatq.componentName" (dict "ctx" . "component" "elasticmq")) }}
{{- end }}
{{- end }}

{{/* The file store in use: s3, or local (asked for, or s3 without a bucket: dev, trials). */}}
{{- define "chatq.filesStore" -}}
{{- if and (eq .Values.files.store "s3") (not .Values.files.s3.bucket) }}
{{- "local" }}
{{- else }}
{{- .Values.files.store }}
{{- end }}
{{- end }}

{{/* Checks of value combinations the schema cannot express; included by the ConfigMap. */}}
{{- define "chatq.validate" -}}
{{- if and (not .Values.redis.url) (not .Values.redis.existingSecret) (not .Values.dev.enabled) }}
{{- fail "chatq needs Redis: set redis.url (or redis.existingSecret), or dev.enabled=true for an in-chart Redis" }}
{{- end }}
{{- if and (eq (include "chatq.filesStore" .) "local") .Values.api.autoscaling.enabled }}
{{- fail "the local file store (files.store=local, or s3 without files.s3.bucket) lives on one API pod, so the api runs one replica: set files.store=s3 with files.s3.bucket, or turn api.autoscaling off" }}
{{- end }}
{{- if le (int .Values.api.terminationGracePeriodSeconds) (int .Values.api.preStopSeconds) }}
{{- fail "api.terminationGracePeriodSeconds must be longer than api.preStopSeconds, or Kubernetes kills the api before it drains its requests" }}
{{- end }}
{{- if le (int .Values.worker.terminationGracePeriodSeconds) (int .Values.worker.graceSeconds) }}
{{- fail "worker.terminationGracePeriodSeconds must be longer than worker.graceSeconds, or Kubernetes kills workers before they hand their jobs back" }}
{{- end }}
{{- if and .Values.worker.queueScaler.enabled (not .Values.operator.enabled) }}
{{- fail "worker.queueScaler.enabled needs operator.enabled (nothing else reads QueueScalers)" }}
{{- end }}
{{- if and .Values.worker.queueScaler.enabled (gt (int .Values.worker.queueScaler.minReplicas) (int .Values.worker.queueScaler.maxReplicas)) }}
{{- fail "worker.queueScaler.minReplicas must not exceed maxReplicas" }}
{{- end }}
{{- if and .Values.queue.sqs.url (ne .Values.queue.backend "sqs") }}
{{- fail "queue.sqs.url is set but queue.backend is not sqs" }}
{{- end }}
{{- end }}

{{/* Environment shared by the API, workers and operator: secrets and OTEL_*.
(dict "ctx" $ "service" "chatq-api"); "noAppSecrets" true leaves out the LLM and API keys. */}}
{{- define "chatq.commonEnv" -}}
{{- $ := .ctx }}
{{- if not .noAppSecrets }}
- name: CHATQ_LLM_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "chatq.secretName" $ }}
      key: llm-api-key
      optional: true
- name: CHATQ_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "chatq.secretName" $ }}
      key: api-keys
      optional: true
{{- end }}
{{- if $.Values.redis.existingSecret }}
- name: CHATQ_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.redis.existingSecret }}
      key: {{ $.Values.redis.existingSecretKey }}
{{- end }}
{{- if and $.Values.dev.enabled (eq $.Values.queue.backend "sqs") }}
# ElasticMQ accepts any credentials, but the AWS SDK wants some.
- name: AWS_ACCESS_KEY_ID
  value: dev
- name: AWS_SECRET_ACCESS_KEY
  value: dev
{{- end }}
{{- if $.Values.otel.enabled }}
- name: OTEL_SERVICE_NAME
  value: {{ .service }}
{{- with $.Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ $.Values.otel.protocol | quote }}
{{- if not $.Values.otel.logs }}
- name: OTEL_LOGS_EXPORTER
  value: "none"
{{- else if $.Values.otel.logsEndpoint }}
# Logs to their own store (Loki 3's /otlp, VictoriaLogs' /insert/opentelemetry), over HTTP.
- name: OTEL_EXPORTER_OTLP_LOGS_ENDPOINT
  value: {{ $.Values.otel.logsEndpoint | quote }}
- name: OTEL_EXPORTER_OTLP_LOGS_PROTOCOL
  value: "http/protobuf"
{{- end }}
- name: OTEL_K8S_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "service.namespace=%s,k8s.namespace.name=%s,k8s.pod.name=$(OTEL_K8S_POD_NAME)" $.Release.Namespace $.Release.Namespace }}{{ range $k, $v := $.Values.otel.resourceAttributes }},{{ $k }}={{ $v }}{{ end }}
{{- end }}
{{- end }}

{{/* Pod-level scheduling: (dict "ctx" $ "values" .Values.api "component" "api"). */}}
{{- define "chatq.scheduling" -}}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml .values.topologySpreadConstraints | nindent 2 }}
{{- else if and (hasKey .values "topologySpreadConstraints") .ctx.Values.topologySpread.enabled }}
topologySpreadConstraints:
  {{- range list "kubernetes.io/hostname" "topology.kubernetes.io/zone" }}
  - maxSkew: {{ $.ctx.Values.topologySpread.maxSkew }}
    topologyKey: {{ . }}
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "chatq.selectorLabels" (dict "ctx" $.ctx "component" $.component) | nindent 8 }}
  {{- end }}
{{- end }}
{{- end }}

{{/* Volumes every chatq container gets: a writable /tmp on a read-only root. */}}
{{- define "chatq.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end }}
