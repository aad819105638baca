{{/*
Labels Helm adds to every object, besides app.kubernetes.io/name (which selectors use and
deploy/ carries too).
*/}}
{{- define "twosite.helmLabels" -}}
app.kubernetes.io/part-of: twosite
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "twosite.controllerImage" -}}
{{ .Values.image.controller.repository }}:{{ .Values.image.controller.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "twosite.agentImage" -}}
{{ .Values.image.agent.repository }}:{{ .Values.image.agent.tag | default .Chart.AppVersion }}
{{- end -}}

{{/*
Refuses settings the binaries cannot honour yet, with the reason, instead of ignoring them.
*/}}
{{- define "twosite.refuseUnsupported" -}}
{{- if .Values.preferredRoom -}}
{{- fail "preferredRoom: the twosite controller and agent have no preferred-room setting yet; leave it empty. With a witness, set the room that wins a tie at the witness (charts/twosite-witness, preferredRoom)." -}}
{{- end -}}
{{- if and .Values.witness.url (not .Values.witness.clusterName) -}}
{{- fail "witness.clusterName is required with witness.url (the name this cluster's token is registered under at the witness)" -}}
{{- end -}}
{{- end -}}

{{/* The witness flags both binaries take. */}}
{{- define "twosite.witnessArgs" -}}
{{- if .Values.witness.url }}
- {{ printf "--witness-url=%s" .Values.witness.url | toJson }}
- --witness-token-file=/etc/twosite/witness/token
{{- if .Values.witness.caConfigMap }}
- --witness-ca-file=/etc/twosite/witness-ca/ca.crt
{{- end }}
{{- end }}
{{- end -}}

{{- define "twosite.witnessEnv" -}}
{{- if .Values.witness.url }}
- name: CLUSTER_NAME
  value: {{ .Values.witness.clusterName | toJson }}
{{- end }}
{{- end -}}

{{- define "twosite.witnessMounts" -}}
{{- if .Values.witness.url }}
- name: witness-token
  mountPath: /etc/twosite/witness
  readOnly: true
{{- if .Values.witness.caConfigMap }}
- name: witness-ca
  mountPath: /etc/twosite/witness-ca
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{/* mode: 0440 (288) for the non-root controller with fsGroup, 0400 (256) for the agent. */}}
{{- define "twosite.witnessVolumes" -}}
{{- if .root.Values.witness.url }}
- name: witness-token
  secret:
    secretName: {{ .root.Values.witness.tokenSecret }}
    defaultMode: {{ .mode }}
{{- if .root.Values.witness.caConfigMap }}
- name: witness-ca
  configMap:
    name: {{ .root.Values.witness.caConfigMap }}
{{- end }}
{{- end }}
{{- end -}}
