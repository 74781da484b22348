{{- define "wardgate.name" -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "wardgate.labels" -}}
app.kubernetes.io/name: wardgate
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "wardgate.selector" -}}
app.kubernetes.io/name: wardgate
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "wardgate.secretName" -}}
{{- if .Values.secrets.existingSecret -}}{{ .Values.secrets.existingSecret }}{{- else -}}{{ include "wardgate.name" . }}{{- end -}}
{{- end -}}
