{{/* Names and labels. */}}
{{- define "pat-rotator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pat-rotator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pat-rotator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pat-rotator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pat-rotator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "pat-rotator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "pat-rotator.controlSecretName" -}}
{{- .Values.controlSecret.existingSecret | default (printf "%s-control" (include "pat-rotator.fullname" .)) -}}
{{- end -}}

{{/* PAT_CONTROL_SECRET from the chart-managed (or an existing) Secret. */}}
{{- define "pat-rotator.controlSecretEnv" -}}
- name: PAT_CONTROL_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "pat-rotator.controlSecretName" . }}
      key: control-secret
{{- end -}}

{{- define "pat-rotator.serviceAccountName" -}}
{{- .Values.serviceAccount.name | default (include "pat-rotator.fullname" .) -}}
{{- end -}}

{{- define "pat-rotator.leaseName" -}}
{{- .Values.cluster.leaseName | default (printf "%s-rotation" .Values.databricks.bootstrapSecret.name) -}}
{{- end -}}

{{- define "pat-rotator.configFile" -}}
{{ .Values.configDir }}/databrickscfg
{{- end -}}

{{/*
pat-rotator.sidecar: the sidecar container, for this chart and for other charts that add
pat-rotator to their own pods. Put it under `initContainers` when sidecarMode is native
(it then carries restartPolicy: Always) or under `containers` otherwise, and add the
volume from "pat-rotator.volumes" and the environment from "pat-rotator.workloadEnv" to the
workload container. Usage: {{ include "pat-rotator.sidecar" . | nindent 8 }}
*/}}
{{- define "pat-rotator.sidecar" -}}
{{- if not .Values.databricks.host }}{{ fail "databricks.host is required: the workspace URL" }}{{ end -}}
{{- if and (eq .Values.sidecarMode "native") (semverCompare "<1.29.0-0" .Capabilities.KubeVersion.Version) }}{{ fail (printf "sidecarMode native needs Kubernetes 1.29 or later (native sidecars); this cluster is %s: set sidecarMode=container" .Capabilities.KubeVersion.Version) }}{{ end -}}
{{- $m2m := eq .Values.databricks.credential "oauth-m2m" -}}
{{- if and (not .Values.databricks.bootstrapSecret.name) (or (not $m2m) (eq .Values.store "kubernetes")) }}{{ fail "databricks.bootstrapSecret.name is required: an existing Secret with the bootstrap token (with store: kubernetes, the store Secret)" }}{{ end -}}
{{- if and $m2m (not .Values.databricks.oauth.clientId) }}{{ fail "databricks.oauth.clientId is required with credential: oauth-m2m: the service principal's application id" }}{{ end -}}
{{- if and $m2m (not .Values.databricks.oauth.clientSecret.name) }}{{ fail "databricks.oauth.clientSecret.name is required with credential: oauth-m2m: an existing Secret with the service principal's OAuth secret" }}{{ end -}}
- name: pat-rotator
  image: "{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if eq .Values.sidecarMode "native" }}
  restartPolicy: Always
  {{- end }}
  args: ["run"]
  env:
    - name: DATABRICKS_HOST
      value: {{ .Values.databricks.host | quote }}
    {{- if eq .Values.store "kubernetes" }}
    {{- if ne .Values.databricks.bootstrapSecret.key "token" }}{{ fail "with store: kubernetes the bootstrap Secret is the store Secret: its key must be token" }}{{ end }}
    - name: PAT_STORE
      value: kubernetes
    - name: PAT_KUBE_SECRET
      value: {{ .Values.databricks.bootstrapSecret.name | quote }}
    - name: PAT_KUBE_LEASE
      value: {{ include "pat-rotator.leaseName" . | quote }}
    - name: PAT_KUBE_NAMESPACE
      valueFrom:
        fieldRef:
          fieldPath: metadata.namespace
    - name: PAT_REVOKE_SEED
      value: {{ .Values.cluster.revokeSeed | quote }}
    {{- else if not $m2m }}
    - name: DATABRICKS_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ .Values.databricks.bootstrapSecret.name }}
          key: {{ .Values.databricks.bootstrapSecret.key }}
    {{- end }}
    {{- if $m2m }}
    - name: PAT_CREDENTIAL
      value: oauth-m2m
    - name: DATABRICKS_CLIENT_ID
      value: {{ .Values.databricks.oauth.clientId | quote }}
    - name: DATABRICKS_CLIENT_SECRET
      valueFrom:
        secretKeyRef:
          name: {{ .Values.databricks.oauth.clientSecret.name }}
          key: {{ .Values.databricks.oauth.clientSecret.key }}
    {{- end }}
    - name: DATABRICKS_CONFIG_FILE
      value: {{ include "pat-rotator.configFile" . | quote }}
    - name: DATABRICKS_CONFIG_PROFILE
      value: {{ .Values.databricks.profile | quote }}
    - name: PAT_TOKEN_LIFETIME
      value: {{ .Values.rotation.tokenLifetime | quote }}
    - name: PAT_ROTATION_INTERVAL
      value: {{ .Values.rotation.rotationInterval | quote }}
    - name: PAT_REVOKE_GRACE
      value: {{ .Values.rotation.revokeGrace | quote }}
    - name: PAT_SKIP_WHEN_IDLE
      value: {{ .Values.rotation.skipWhenIdle | quote }}
    - name: PAT_HTTP_TIMEOUT
      value: {{ .Values.rotation.httpTimeout | quote }}
    - name: PAT_WRITE_LOCK_WAIT
      value: {{ .Values.rotation.writeLockWait | quote }}
    - name: PAT_SESSION_TTL
      value: {{ .Values.rotation.sessionTtl | quote }}
    - name: PAT_TOKEN_COMMENT
      value: {{ .Values.rotation.tokenComment | quote }}
    - name: PAT_LOG_FORMAT
      value: {{ .Values.rotation.logFormat | quote }}
    - name: RUST_LOG
      value: {{ .Values.rotation.logFilter | quote }}
    {{- with .Values.rotation.onRotate }}
    - name: PAT_ON_ROTATE
      value: {{ . | quote }}
    {{- end }}
    - name: PAT_LISTEN
      value: "0.0.0.0:{{ .Values.ports.metrics }}"
    - name: PAT_CONTROL_LISTEN
      value: "127.0.0.1:{{ .Values.ports.control }}"
    {{- include "pat-rotator.controlSecretEnv" . | nindent 4 }}
    # One identity per pod: a rotator reaps only tokens carrying its own instance.
    - name: PAT_INSTANCE
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
  ports:
    - name: metrics
      containerPort: {{ .Values.ports.metrics }}
      protocol: TCP
  startupProbe:
    httpGet:
      path: /readyz
      port: metrics
    periodSeconds: 2
    failureThreshold: 60
  readinessProbe:
    httpGet:
      path: /readyz
      port: metrics
    periodSeconds: 10
  livenessProbe:
    httpGet:
      path: /healthz
      port: metrics
    periodSeconds: 20
    failureThreshold: 3
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: databricks-config
      mountPath: {{ .Values.configDir }}
{{- end -}}

{{/* The shared config directory: an emptyDir, mounted as a directory (never subPath). */}}
{{- define "pat-rotator.volumes" -}}
- name: databricks-config
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- end -}}

{{/* Environment for the workload container: the SDKs ask the sidecar for fresh tokens. */}}
{{- define "pat-rotator.workloadEnv" -}}
- name: DATABRICKS_HOST
  value: {{ .Values.databricks.host | quote }}
- name: DATABRICKS_CONFIG_FILE
  value: {{ include "pat-rotator.configFile" . | quote }}
- name: DATABRICKS_CONFIG_PROFILE
  value: {{ .Values.databricks.profile | quote }}
{{ include "pat-rotator.controlSecretEnv" . }}
# Kubernetes expands $(PAT_CONTROL_SECRET) from the variable above.
- name: DATABRICKS_METADATA_SERVICE_URL
  value: "http://127.0.0.1:{{ .Values.ports.control }}/$(PAT_CONTROL_SECRET)/v1/databricks/token"
# The config file also holds a token: name the method so the SDKs do not see two.
- name: DATABRICKS_AUTH_TYPE
  value: metadata-service
{{- end -}}
