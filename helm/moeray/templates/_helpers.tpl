{{/* Names, labels and the pieces every Ray pod shares. */}}

{{- define "moeray.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/* Full name, kept to 40 characters: KubeRay appends suffixes (cluster id, group, pod hash) to it. */}}
{{- define "moeray.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else if contains (include "moeray.name" .) .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "moeray.name" .) | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "moeray.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moeray.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "moeray.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "moeray.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "moeray.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "moeray.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "moeray.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret the pods read credentials from; empty when there is none. */}}
{{- define "moeray.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else if .Values.secrets.create }}
{{- include "moeray.fullname" . }}
{{- end }}
{{- end }}

{{/* Environment of every Ray container: S3 settings, then the user's extras. */}}
{{- define "moeray.env" -}}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.s3.region | quote }}
{{- if .Values.s3.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ .Values.s3.endpointUrl | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
A Kubernetes CPU quantity for a Ray CPU count: whole numbers stay whole ("2"), fractions become
millicores ("1500m"). moeray.platform.kube formats the same way, so both build identical RayJobs.
*/}}
{{- define "moeray.cpuQuantity" -}}
{{- $cpus := float64 . }}
{{- if eq $cpus (floor $cpus) }}{{ int64 $cpus }}{{ else }}{{ mulf $cpus 1000 | floor | int64 }}m{{ end }}
{{- end }}

{{/*
Container resources of a serving worker group: the group's requests/limits plus `gpus` GPUs
(requests and limits must be equal for extended resources).
*/}}
{{- define "moeray.workerResources" -}}
{{- $resources := deepCopy .group.resources }}
{{- if gt (int .group.gpus) 0 }}
{{- $requests := default dict $resources.requests }}
{{- $limits := default dict $resources.limits }}
{{- $_ := set $requests .gpuResourceName (int .group.gpus) }}
{{- $_ := set $limits .gpuResourceName (int .group.gpus) }}
{{- $_ := set $resources "requests" $requests }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/*
Pod template of a serving Ray node. Arguments (a dict): root (the chart context), container
(container name), role (moeray.io/role label), resources (rendered YAML), group (nodeSelector,
tolerations, affinity), ports (bool: head ports), automountToken (bool: the head's autoscaler
sidecar talks to the API server; no other container does).
*/}}
{{- define "moeray.servingPodTemplate" -}}
{{- $root := .root -}}
metadata:
  labels:
    {{- include "moeray.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: serving
    moeray.io/role: {{ .role }}
    {{- with $root.Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $root.Values.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "moeray.serviceAccountName" $root }}
  automountServiceAccountToken: {{ .automountToken }}
  # Long enough for Serve to drain a replica's open streams before Kubernetes kills the pod.
  terminationGracePeriodSeconds: {{ add (int $root.Values.serving.gracefulShutdownTimeoutSeconds) 30 }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .container }}
      image: {{ include "moeray.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      securityContext:
        {{- toYaml $root.Values.containerSecurityContext | nindent 8 }}
      env:
        {{- include "moeray.env" $root | nindent 8 }}
      {{- with include "moeray.secretName" $root }}
      envFrom:
        - secretRef:
            name: {{ . }}
      {{- end }}
      {{- if .ports }}
      ports:
        - {name: gcs-server, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        - {name: client, containerPort: 10001}
        - {name: serve, containerPort: {{ $root.Values.serving.port }}}
        - {name: metrics, containerPort: 8080}
      {{- end }}
      resources:
        {{- .resources | nindent 8 }}
      volumeMounts:
        - name: shared-memory
          mountPath: /dev/shm
  volumes:
    - name: shared-memory
      emptyDir:
        medium: Memory
        sizeLimit: {{ $root.Values.head.sharedMemorySize }}
{{- end }}
