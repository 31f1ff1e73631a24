{{/* Names and labels shared by the templates. */}}

{{- /*
The release's name prefix, as Helm's own starter chart makes it: the release
name when it already contains the chart's name (release `godwit` gives
`godwit-operator`), else `<release>-godwit`; at most 63 characters less the
longest suffix the templates add (`-node-restriction`, 17), so every derived
name is a valid object name. fullnameOverride replaces it.
*/ -}}
{{- define "godwit.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 46 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 46 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 46 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- /* The labels selectors match on (never change across upgrades). */ -}}
{{- define "godwit.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "godwit.labels" -}}
{{ include "godwit.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- /*
Cluster-scoped objects (ClusterRoles, their bindings, the node restriction
policy) are named after the release, so two releases with different names
never collide. Two releases of the same name in two namespaces would: the
second install stops here with a message saying so, instead of Helm's
ownership error. `lookup` finds nothing in `helm template`, so rendering is
unaffected.
*/ -}}
{{- define "godwit.checkClusterNames" -}}
{{- $role := printf "%s-operator" (include "godwit.fullname" .) -}}
{{- $existing := lookup "rbac.authorization.k8s.io/v1" "ClusterRole" "" $role -}}
{{- if $existing -}}
{{- $owner := index ($existing.metadata.annotations | default dict) "meta.helm.sh/release-namespace" | default "" -}}
{{- if and $owner (ne $owner .Release.Namespace) -}}
{{- fail (printf "ClusterRole %s already belongs to the release %s in namespace %s: cluster-scoped object names derive from the release name, which must be unique in the cluster; install this one under another name (e.g. helm install %s-%s ...) or set fullnameOverride" $role .Release.Name $owner .Release.Name .Release.Namespace) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "godwit.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
