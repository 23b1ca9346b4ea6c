{{/* Names and labels. */}}
{{- define "ferrite.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" }}{{- end -}}
{{- end -}}
{{- define "ferrite.router" -}}{{ include "ferrite.fullname" . }}-router{{- end -}}
{{- define "ferrite.routerPeers" -}}{{ include "ferrite.fullname" . }}-router-raft{{- end -}}
{{- define "ferrite.worker" -}}{{ include "ferrite.fullname" . }}-worker{{- end -}}
{{- define "ferrite.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
{{- define "ferrite.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}
{{- define "ferrite.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "ferrite.fullname" .) .Values.serviceAccount.name }}
{{- else -}}{{ default "default" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}
{{- define "ferrite.image" -}}
{{- $img := index .root.Values.image .which -}}
{{ $img.repository }}:{{ default .root.Chart.AppVersion $img.tag }}
{{- end -}}
{{- define "ferrite.apiKeySecret" -}}
{{- default (printf "%s-api-keys" (include "ferrite.fullname" .)) .Values.apiKeys.existingSecret -}}
{{- end -}}

{{/* The cluster DNS suffix of a headless Service's pods. */}}
{{- define "ferrite.podDomain" -}}
{{ .svc }}.{{ .root.Release.Namespace }}.svc.cluster.local
{{- end -}}

{{/* Raft peers: ID=router-N.peers:PORT, ids = StatefulSet ordinal + 1. */}}
{{- define "ferrite.raftPeers" -}}
{{- $root := . -}}
{{- $peers := list -}}
{{- range $i := until (int .Values.router.replicas) -}}
{{- $host := printf "%s-%d.%s" (include "ferrite.router" $root) $i (include "ferrite.podDomain" (dict "svc" (include "ferrite.routerPeers" $root) "root" $root)) -}}
{{- $peers = append $peers (printf "%d=%s:%d" (add $i 1) $host (int $root.Values.router.raft.port)) -}}
{{- end -}}
{{- join "," $peers -}}
{{- end -}}

{{/* Without raft: every worker pod's gRPC address, for the routers' static `--worker` list. */}}
{{- define "ferrite.staticWorkers" -}}
{{- $root := . -}}
{{- $ws := list -}}
{{- range $i := until (int .Values.worker.replicas) -}}
{{- $host := printf "%s-%d.%s" (include "ferrite.worker" $root) $i (include "ferrite.podDomain" (dict "svc" (include "ferrite.worker" $root) "root" $root)) -}}
{{- $ws = append $ws (printf "http://%s:%d" $host (int $root.Values.worker.grpcPort)) -}}
{{- end -}}
{{- join "," $ws -}}
{{- end -}}

{{/* The `--model` path inside the pod, or empty for the default model. */}}
{{- define "ferrite.modelPath" -}}
{{- $m := .Values.model -}}
{{- if eq $m.source "default" -}}
{{- else if eq $m.source "download" -}}/models/model
{{- else if has $m.source (list "pvc" "hostPath") -}}{{ required "model.path is required for model.source pvc/hostPath" $m.path | printf "/models/%s" }}
{{- else -}}{{ fail (printf "model.source must be default, pvc, hostPath or download (got %q)" $m.source) }}
{{- end -}}
{{- end -}}

{{/* Environment shared by routers and workers. */}}
{{- define "ferrite.commonEnv" -}}
- name: FERRITE_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
- name: HOME
  value: /tmp
- name: FERRITE_MODEL_DIR
  value: /var/cache/ferrite/models
{{- with (include "ferrite.modelPath" .) }}
- name: FERRITE_MODEL
  value: {{ . | quote }}
{{- end }}
{{- if .Values.model.maxModelLen }}
- name: FERRITE_MAX_MODEL_LEN
  value: {{ .Values.model.maxModelLen | quote }}
{{- end }}
{{- end -}}

{{/* Model volumes (mounted at /models) and the model cache (default model). `files` narrows a download to what a
router needs (tokenizer and config). */}}
{{- define "ferrite.modelVolumes" -}}
{{- $m := .root.Values.model -}}
- name: cache
  emptyDir: {}
- name: tmp
  emptyDir: {}
{{- if eq $m.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ required "model.pvc.claimName is required for model.source=pvc" $m.pvc.claimName }}
    readOnly: true
{{- else if eq $m.source "hostPath" }}
- name: model
  hostPath:
    path: {{ required "model.hostPath is required for model.source=hostPath" $m.hostPath }}
    type: Directory
{{- else if eq $m.source "download" }}
- name: model
  emptyDir:
    sizeLimit: {{ $m.download.size }}
{{- end }}
{{- end -}}
{{- define "ferrite.modelMounts" -}}
- name: cache
  mountPath: /var/cache/ferrite
- name: tmp
  mountPath: /tmp
{{- if has .Values.model.source (list "pvc" "hostPath" "download") }}
- name: model
  mountPath: /models
  readOnly: {{ ne .Values.model.source "download" }}
{{- end }}
{{- end -}}
{{- define "ferrite.downloadInit" -}}
{{- $m := .root.Values.model -}}
{{- if eq $m.source "download" }}
- name: download-model
  image: {{ $m.download.image }}
  command: [sh, -c]
  args:
    - >-
      pip install --no-cache-dir --target /tmp/hf huggingface_hub &&
      PYTHONPATH=/tmp/hf python -c 'import os; from huggingface_hub import snapshot_download;
      snapshot_download(os.environ["HF_REPO"], revision=os.environ["HF_REVISION"], local_dir="/models/model",
      allow_patterns=os.environ.get("HF_PATTERNS") and os.environ["HF_PATTERNS"].split(","))'
  env:
    - name: HF_REPO
      value: {{ required "model.download.repo is required for model.source=download" $m.download.repo | quote }}
    - name: HF_REVISION
      value: {{ $m.download.revision | quote }}
    - name: HOME
      value: /tmp
    {{- if .tokenizerOnly }}
    - name: HF_PATTERNS
      value: "*.json,*.model,*.jinja"
    {{- end }}
    {{- with $m.download.tokenSecret }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef: {name: {{ . }}, key: token}
    {{- end }}
  securityContext:
    {{- toYaml .root.Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: model
      mountPath: /models
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end -}}
