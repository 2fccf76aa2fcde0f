{{/* Names: everything is prefixed with the release, so several shops can share a namespace. */}}
{{- define "selaras.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "selaras.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Labels of every object; selectorLabels (with a component) select one process's pods. */}}
{{- define "selaras.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: selaras
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "selaras.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "selaras.secretName" -}}
{{- .Values.apiKeys.existingSecret | default (printf "%s-api-keys" (include "selaras.fullname" .)) -}}
{{- end -}}

{{- define "selaras.offlineClaim" -}}
{{- .Values.offlineStore.existingClaim | default (printf "%s-offline" (include "selaras.fullname" .)) -}}
{{- end -}}

{{/* Settings reach every Selaras container the same way: the ConfigMap, then the API keys. */}}
{{- define "selaras.envFrom" -}}
- configMapRef:
    name: {{ include "selaras.fullname" . }}-config
- secretRef:
    name: {{ include "selaras.secretName" . }}
{{- end -}}

{{/* Scraped by pod annotations unless a ServiceMonitor does it (never both: every sample would count twice). */}}
{{- define "selaras.scrapeAnnotations" -}}
{{- if not .root.Values.metrics.serviceMonitor.enabled }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{/* Probes of a long-running Selaras process: alive = /healthz, ready = /readyz (store reachable, model and
caches loaded). The startup probe gives a cold start (Feast registry, model compile) three minutes. */}}
{{- define "selaras.probes" -}}
startupProbe:
  httpGet:
    path: /healthz
    port: http
  periodSeconds: 5
  failureThreshold: 36
livenessProbe:
  httpGet:
    path: /healthz
    port: http
  periodSeconds: 10
  timeoutSeconds: 2
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: /readyz
    port: http
  periodSeconds: 5
  timeoutSeconds: 2
  failureThreshold: 2
{{- end -}}

{{/* Writable scratch on a read-only root: /data (the Feast registry is a local file of each process), /tmp,
and the shared offline store when the process reads or writes it. */}}
{{- define "selaras.volumeMounts" -}}
- name: data
  mountPath: /data
- name: tmp
  mountPath: /tmp
{{- if .offline }}
- name: offline
  mountPath: /data/offline
{{- end }}
{{- end -}}

{{- define "selaras.volumes" -}}
- name: data
  emptyDir: {}
- name: tmp
  emptyDir: {}
{{- if .offline }}
- name: offline
  persistentVolumeClaim:
    claimName: {{ include "selaras.offlineClaim" .root }}
{{- end }}
{{- end -}}

{{- define "selaras.redisUrl" -}}
{{- if .Values.redis.enabled -}}
redis://{{ include "selaras.fullname" . }}-redis:6379/0
{{- else -}}
{{- required "redis.url is required when redis.enabled is false" .Values.redis.url -}}
{{- end -}}
{{- end -}}
