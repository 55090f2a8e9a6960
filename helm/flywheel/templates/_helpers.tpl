{{/*
Names, labels, images, secrets and environment of the flywheel chart: defined here once and
included everywhere else.
*/}}

{{/* Chart name. */}}
{{- define "flywheel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name prefix of every resource. Kept to 40 characters because KubeRay derives longer names
from it (`<name>-serve-head-svc`, `<name>-train-head-svc`) that must stay under 63.
*/}}
{{- define "flywheel.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Chart label value. */}}
{{- define "flywheel.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that pick out this release's pods (used by selectors and NetworkPolicies). */}}
{{- define "flywheel.releaseSelectorLabels" -}}
app.kubernetes.io/name: {{ include "flywheel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of one component: include with (dict "root" $ "component" "redis"). */}}
{{- define "flywheel.selectorLabels" -}}
{{ include "flywheel.releaseSelectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Full labels of one component: include with (dict "root" $ "component" "redis"). */}}
{{- define "flywheel.labels" -}}
{{ include "flywheel.selectorLabels" . }}
helm.sh/chart: {{ include "flywheel.chart" .root }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: flywheel
{{- end }}

{{/* Resource names -------------------------------------------------------------------------- */}}
{{- define "flywheel.serveName" -}}{{ include "flywheel.fullname" . }}-serve{{- end }}
{{- define "flywheel.trainName" -}}{{ include "flywheel.fullname" . }}-train{{- end }}
{{- define "flywheel.mlflowName" -}}{{ include "flywheel.fullname" . }}-mlflow{{- end }}
{{- define "flywheel.redisName" -}}{{ include "flywheel.fullname" . }}-redis{{- end }}
{{- define "flywheel.postgresqlName" -}}{{ include "flywheel.fullname" . }}-postgresql{{- end }}
{{- define "flywheel.airflowName" -}}{{ include "flywheel.fullname" . }}-airflow{{- end }}
{{- define "flywheel.homeClaimName" -}}
{{- .Values.home.persistence.existingClaim | default (printf "%s-home" (include "flywheel.fullname" .)) }}
{{- end }}
{{- define "flywheel.mlflowClaimName" -}}
{{- .Values.mlflow.artifacts.pvc.existingClaim | default (printf "%s-artifacts" (include "flywheel.mlflowName" .)) }}
{{- end }}

{{/* Service account name. */}}
{{- define "flywheel.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "flywheel.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Images: the tag defaults to the chart appVersion; `latest` is refused. */}}
{{- define "flywheel.imageTag" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion | toString }}
{{- if eq $tag "latest" }}
{{- fail "image.tag: `latest` is not allowed; pin a version (default: the chart appVersion)" }}
{{- end }}
{{- $tag }}
{{- end }}
{{- define "flywheel.image" -}}
{{- printf "%s:%s" .Values.image.repository (include "flywheel.imageTag" .) }}
{{- end }}
{{- define "flywheel.gpuImage" -}}
{{- printf "%s:%s%s" .Values.image.repository (include "flywheel.imageTag" .) .Values.image.gpuTagSuffix }}
{{- end }}

{{/*
Pod-level settings of every pod: service account, security context, pull secrets, scheduling.
include with (dict "root" $ "scheduling" <values with nodeSelector/tolerations/affinity>
["securityContext" <override>]).
*/}}
{{- define "flywheel.podCommon" -}}
{{- $root := .root -}}
{{- $spec := dict "serviceAccountName" (include "flywheel.serviceAccountName" $root) "securityContext" (.securityContext | default $root.Values.podSecurityContext) -}}
{{- $pullSecrets := list -}}
{{- range $root.Values.imagePullSecrets }}
{{- $pullSecrets = append $pullSecrets (dict "name" .) -}}
{{- end }}
{{- if $pullSecrets }}
{{- $_ := set $spec "imagePullSecrets" $pullSecrets -}}
{{- end }}
{{- range $key := list "nodeSelector" "tolerations" "affinity" }}
{{- with index $.scheduling $key }}
{{- $_ := set $spec $key . -}}
{{- end }}
{{- end }}
{{- toYaml $spec }}
{{- end }}

{{/* Secrets ------------------------------------------------------------------------------------ */}}

{{/*
Value for a Secret's `data`: the one already in the cluster (so upgrades keep passwords), else
`fresh` (already base64). include with (dict "root" $ "name" "<secret>" "key" "<key>" "fresh" "<b64>").
*/}}
{{- define "flywheel.secretData" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .name }}
{{- if and $existing $existing.data (hasKey $existing.data .key) }}
{{- index $existing.data .key }}
{{- else }}
{{- .fresh }}
{{- end }}
{{- end }}

{{- define "flywheel.rayAuthSecretName" -}}
{{- .Values.ray.auth.existingSecret | default (printf "%s-ray-auth" (include "flywheel.fullname" .)) }}
{{- end }}
{{- define "flywheel.redisSecretName" -}}
{{- .Values.redis.auth.existingSecret | default (printf "%s-auth" (include "flywheel.redisName" .)) }}
{{- end }}
{{- define "flywheel.postgresqlSecretName" -}}
{{- .Values.postgresql.auth.existingSecret | default (printf "%s-auth" (include "flywheel.postgresqlName" .)) }}
{{- end }}
{{- define "flywheel.mlflowSecretName" -}}
{{- .Values.mlflow.auth.existingSecret | default (printf "%s-auth" (include "flywheel.mlflowName" .)) }}
{{- end }}
{{- define "flywheel.airflowSecretName" -}}
{{- .Values.airflow.existingSecret | default (printf "%s-secrets" (include "flywheel.airflowName" .)) }}
{{- end }}

{{/* Service addresses ------------------------------------------------------------------------- */}}
{{- define "flywheel.mlflowUrl" -}}
{{- printf "http://%s.%s.svc:%d" (include "flywheel.mlflowName" .) .Release.Namespace (int .Values.mlflow.port) }}
{{- end }}
{{- define "flywheel.trainJobsUrl" -}}
{{- printf "http://%s-head-svc.%s.svc:8265" (include "flywheel.trainName" .) .Release.Namespace }}
{{- end }}
{{- define "flywheel.airflowApiUrl" -}}
{{- printf "http://%s-api-server.%s.svc:8080" (include "flywheel.airflowName" .) .Release.Namespace }}
{{- end }}

{{/*
Database URL variables. include with (dict "root" $ "vars" (list (dict "name" "ENV" "db" "mlflow")…)).
In-cluster PostgreSQL: the password comes from its Secret and Kubernetes expands `$(…)` into the
URL, so no password is ever written into a manifest. External: each URL comes from the user's
Secret as a whole.
*/}}
{{- define "flywheel.dbEnv" -}}
{{- $root := .root -}}
{{- if $root.Values.postgresql.enabled }}
- name: FLYWHEEL_DB_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "flywheel.postgresqlSecretName" $root }}
      key: password
{{- end }}
{{- range .vars }}
- name: {{ .name }}
{{- if $root.Values.postgresql.enabled }}
  value: {{ printf "postgresql+psycopg://%s:$(FLYWHEEL_DB_PASSWORD)@%s.%s.svc:%d/%s" $root.Values.postgresql.auth.username (include "flywheel.postgresqlName" $root) $root.Release.Namespace (int $root.Values.postgresql.port) (index $root.Values.postgresql.databases .db) | quote }}
{{- else }}
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.externalDatabase.existingSecret }}
      key: {{ index $root.Values.externalDatabase.keys .db }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Environment every flywheel container reads (all FLYWHEEL_*; see components/settings.py).
include with (dict "root" $ "airflow" true|false): Airflow pods also get the training cluster's
Jobs API address and the Ray token to call it.
*/}}
{{- define "flywheel.appEnv" -}}
{{- $root := .root -}}
- name: FLYWHEEL_HOME
  value: {{ $root.Values.home.path | quote }}
- name: FLYWHEEL_MODEL_NAME
  value: {{ $root.Values.model.name | quote }}
- name: FLYWHEEL_SERVE_PORT
  value: {{ $root.Values.serve.port | int | quote }}
- name: FLYWHEEL_MLFLOW_TRACKING_URI
  value: {{ include "flywheel.mlflowUrl" $root | quote }}
- name: FLYWHEEL_MLFLOW_ARTIFACT_URI
  value: {{ $root.Values.mlflow.clientArtifactUri | quote }}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ include "flywheel.mlflowSecretName" $root }}
      key: admin-username
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "flywheel.mlflowSecretName" $root }}
      key: admin-password
- name: FLYWHEEL_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "flywheel.redisSecretName" $root }}
      key: redis-password
- name: FLYWHEEL_REDIS_URL
  value: {{ printf "redis://:$(FLYWHEEL_REDIS_PASSWORD)@%s.%s.svc:%d/0" (include "flywheel.redisName" $root) $root.Release.Namespace (int $root.Values.redis.port) | quote }}
{{- $dbVars := list (dict "name" "FLYWHEEL_FEEDBACK_DB_URL" "db" "feedback") }}
{{- if .airflow }}
{{- $dbVars = append $dbVars (dict "name" "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" "db" "airflow") }}
{{- end }}
{{- include "flywheel.dbEnv" (dict "root" $root "vars" $dbVars) }}
{{- if and .airflow $root.Values.train.enabled }}
- name: FLYWHEEL_RAY_ADDRESS
  value: {{ include "flywheel.trainJobsUrl" $root | quote }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "flywheel.rayAuthSecretName" $root }}
      key: auth_token
{{- end }}
{{- with $root.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volume holding FLYWHEEL_HOME. */}}
{{- define "flywheel.homeVolume" -}}
- name: flywheel-home
{{- if .Values.home.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "flywheel.homeClaimName" . }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}
{{- define "flywheel.homeVolumeMount" -}}
- name: flywheel-home
  mountPath: {{ .Values.home.path }}
{{- end }}

{{/* Ray --------------------------------------------------------------------------------------- */}}

{{/*
Probes of a Ray container. The dashboard agent's `/api/healthz` (port 52365) checks the raylet and,
on the head, the GCS; it stays public under token auth. Serving workers are ready only when their
Serve proxy answers, so a draining node leaves the Service at once (as KubeRay itself does).
include with (dict "serveWorker" true|false).
*/}}
{{- define "flywheel.rayProbes" -}}
livenessProbe:
  httpGet:
    path: /api/healthz
    port: 52365
  initialDelaySeconds: 30
  periodSeconds: 5
  timeoutSeconds: 5
  failureThreshold: 120
readinessProbe:
{{- if .serveWorker }}
  httpGet:
    path: /-/healthz
    port: serve
  initialDelaySeconds: 10
  periodSeconds: 5
  timeoutSeconds: 2
  failureThreshold: 1
{{- else }}
  httpGet:
    path: /api/healthz
    port: 52365
  initialDelaySeconds: 10
  periodSeconds: 5
  timeoutSeconds: 5
  failureThreshold: 10
{{- end }}
{{- end }}

{{/*
Pod template of a Ray node. include with (dict "root" $ "component" "ray-serve" "group" <values>
"head" bool "serve" bool "gpu" bool "autoscaling" bool).
*/}}
{{- define "flywheel.rayPodTemplate" -}}
{{- $root := .root -}}
metadata:
  labels:
    {{- include "flywheel.labels" (dict "root" $root "component" .component) | nindent 4 }}
spec:
  {{- include "flywheel.podCommon" (dict "root" $root "scheduling" .group) | nindent 2 }}
  {{- if .autoscaling }}
  # The autoscaler sidecar KubeRay adds to the head calls the Kubernetes API (KubeRay binds
  # its Role to this service account); other pods get no token.
  automountServiceAccountToken: true
  {{- end }}
  containers:
    - name: {{ if .head }}ray-head{{ else }}ray-worker{{ end }}
      image: {{ if .gpu }}{{ include "flywheel.gpuImage" $root }}{{ else }}{{ include "flywheel.image" $root }}{{ end }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      ports:
        {{- if .head }}
        - name: gcs-server
          containerPort: 6379
        - name: dashboard
          containerPort: 8265
        - name: client
          containerPort: 10001
        {{- end }}
        {{- if .serve }}
        - name: serve
          containerPort: {{ $root.Values.serve.port }}
        {{- end }}
        - name: metrics
          containerPort: 8080
      env:
        {{- include "flywheel.appEnv" (dict "root" $root "airflow" false) | nindent 8 }}
      {{- $resources := deepCopy .group.resources }}
      {{- if .gpu }}
      {{- $_ := set $resources "limits" (merge (dict "nvidia.com/gpu" (int .group.gpus)) ($resources.limits | default dict)) }}
      {{- $_ := set $resources "requests" (merge (dict "nvidia.com/gpu" (int .group.gpus)) ($resources.requests | default dict)) }}
      {{- end }}
      resources:
        {{- toYaml $resources | nindent 8 }}
      {{- include "flywheel.rayProbes" (dict "serveWorker" (and .serve (not .head))) | nindent 6 }}
      volumeMounts:
        {{- include "flywheel.homeVolumeMount" $root | nindent 8 }}
  volumes:
    {{- include "flywheel.homeVolume" $root | nindent 4 }}
{{- end }}

{{/*
Worker group. include with (dict "root" $ "component" … "name" "cpu" "group" <values> "serve" bool
"gpu" bool).
*/}}
{{- define "flywheel.rayWorkerGroup" -}}
- groupName: {{ .name }}
  replicas: {{ .group.replicas }}
  minReplicas: {{ .group.minReplicas }}
  maxReplicas: {{ .group.maxReplicas }}
  rayStartParams: {{- with .group.rayStartParams }}{{ toYaml . | nindent 4 }}{{ else }} {}{{ end }}
  template:
    {{- include "flywheel.rayPodTemplate" (dict "root" .root "component" .component "group" .group "head" false "serve" .serve "gpu" .gpu "autoscaling" false) | nindent 4 }}
{{- end }}

{{/*
Cluster spec shared by the RayService and the RayCluster. include with (dict "root" $ "component"
"ray-serve"|"ray-train" "values" .Values.serve|.Values.train "serve" bool "autoscaling" bool).
*/}}
{{- define "flywheel.rayClusterSpec" -}}
{{- $root := .root -}}
rayVersion: {{ $root.Values.ray.version | quote }}
authOptions:
  mode: token
  secretName: {{ include "flywheel.rayAuthSecretName" $root }}
enableInTreeAutoscaling: {{ .autoscaling }}
{{- if .autoscaling }}
autoscalerOptions:
  upscalingMode: Default
  idleTimeoutSeconds: 120
  securityContext:
    {{- toYaml $root.Values.securityContext | nindent 4 }}
  resources:
    {{- toYaml $root.Values.initResources | nindent 4 }}
{{- end }}
headGroupSpec:
  # The head Service (dashboard 8265, GCS 6379, client 10001) stays inside the cluster.
  serviceType: ClusterIP
  rayStartParams:
    dashboard-host: "0.0.0.0"
    {{- with .values.head.rayStartParams }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  template:
    {{- include "flywheel.rayPodTemplate" (dict "root" $root "component" .component "group" .values.head "head" true "serve" .serve "gpu" false "autoscaling" .autoscaling) | nindent 4 }}
workerGroupSpecs:
  {{- include "flywheel.rayWorkerGroup" (dict "root" $root "component" .component "name" "cpu" "group" .values.workers "serve" .serve "gpu" false) | nindent 2 }}
  {{- if .values.gpuWorkers.enabled }}
  {{- include "flywheel.rayWorkerGroup" (dict "root" $root "component" .component "name" "gpu" "group" .values.gpuWorkers "serve" .serve "gpu" true) | nindent 2 }}
  {{- end }}
{{- end }}

{{/*
Serve config (serveConfigV2) of the RayService: one application built by
`serving.app:build_app` from typed args.
*/}}
{{- define "flywheel.serveConfig" -}}
{{- $s := .Values.serve }}
{{- $args := dict "model_name" .Values.model.name "model_alias" .Values.model.alias "max_batch_size" (int $s.maxBatchSize) "max_ongoing_requests" (int $s.maxOngoingRequests) }}
{{- if $s.autoscaling.enabled }}
{{- $_ := set $args "autoscaling_config" (dict "min_replicas" (int $s.autoscaling.minReplicas) "max_replicas" (int $s.autoscaling.maxReplicas) "target_ongoing_requests" $s.autoscaling.targetOngoingRequests) }}
{{- else }}
{{- $_ := set $args "num_replicas" (int $s.numReplicas) }}
{{- end }}
{{- $args = mergeOverwrite $args (deepCopy $s.extraArgs) }}
{{- $app := dict "name" $s.appName "route_prefix" "/" "import_path" "serving.app:build_app" "args" $args }}
{{- with $s.deployments }}
{{- $_ := set $app "deployments" . }}
{{- end }}
{{- $config := dict "proxy_location" "EveryNode" "http_options" (dict "host" "0.0.0.0" "port" (int $s.port)) "applications" (list $app) }}
{{- toYaml $config }}
{{- end }}

{{/* Airflow ----------------------------------------------------------------------------------- */}}

{{/* Environment of every Airflow container. */}}
{{- define "flywheel.airflowEnv" -}}
{{- $root := . -}}
{{- include "flywheel.appEnv" (dict "root" $root "airflow" true) }}
# psycopg 3 serves both the sync and the async engine, so asyncpg is not needed.
- name: AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC
  value: $(AIRFLOW__DATABASE__SQL_ALCHEMY_CONN)
- name: AIRFLOW_HOME
  value: /opt/airflow
- name: AIRFLOW__CORE__DAGS_FOLDER
  value: /opt/flywheel/dags
- name: AIRFLOW__CORE__EXECUTOR
  value: LocalExecutor
- name: AIRFLOW__CORE__PARALLELISM
  value: {{ $root.Values.airflow.parallelism | int | quote }}
- name: AIRFLOW__CORE__LOAD_EXAMPLES
  value: "False"
- name: AIRFLOW__CORE__EXECUTION_API_SERVER_URL
  value: {{ printf "%s/execution/" (include "flywheel.airflowApiUrl" $root) | quote }}
# Task logs are served by the scheduler's log server; pod IPs resolve where pod names do not.
- name: AIRFLOW__CORE__HOSTNAME_CALLABLE
  value: airflow.utils.net.get_host_ip_address
- name: AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS
  value: admin:admin
- name: AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE
  value: /opt/airflow/auth/passwords.json
- name: AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK
  value: "True"
- name: AIRFLOW__CORE__FERNET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "flywheel.airflowSecretName" $root }}
      key: fernet-key
- name: AIRFLOW__API__SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "flywheel.airflowSecretName" $root }}
      key: api-secret-key
- name: AIRFLOW__API_AUTH__JWT_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "flywheel.airflowSecretName" $root }}
      key: jwt-secret
{{- with $root.Values.airflow.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
An Airflow component Deployment. include with (dict "root" $ "component" "scheduler" "values"
<values> "command" (list …) "ports" (list …) "probe" <probe handler dict> "migrate" bool
"auth" bool).
*/}}
{{- define "flywheel.airflowDeployment" -}}
{{- $root := .root -}}
{{- $component := printf "airflow-%s" .component }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "flywheel.airflowName" $root }}-{{ .component }}
  labels:
    {{- include "flywheel.labels" (dict "root" $root "component" $component) | nindent 4 }}
spec:
  replicas: {{ .values.replicas }}
  selector:
    matchLabels:
      {{- include "flywheel.selectorLabels" (dict "root" $root "component" $component) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "flywheel.labels" (dict "root" $root "component" $component) | nindent 8 }}
    spec:
      {{- include "flywheel.podCommon" (dict "root" $root "scheduling" $root.Values.airflow) | nindent 6 }}
      initContainers:
        - name: {{ if .migrate }}migrate-db{{ else }}wait-for-migrations{{ end }}
          image: {{ include "flywheel.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          {{- if .migrate }}
          # `db migrate` takes a database lock, so it is safe with more than one scheduler.
          command: ["airflow", "db", "migrate"]
          {{- else }}
          command: ["airflow", "db", "check-migrations", "--migration-wait-timeout", "600"]
          {{- end }}
          env:
            {{- include "flywheel.airflowEnv" $root | nindent 12 }}
          resources:
            {{- toYaml $root.Values.initResources | nindent 12 }}
          volumeMounts:
            - name: airflow-home
              mountPath: /opt/airflow
        {{- if .auth }}
        # The auth manager opens its passwords file read-write, so copy it out of the Secret.
        - name: copy-passwords
          image: {{ include "flywheel.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          command: ["sh", "-c", "mkdir -p /opt/airflow/auth && cp /etc/airflow-secrets/passwords.json /opt/airflow/auth/passwords.json"]
          resources:
            {{- toYaml $root.Values.initResources | nindent 12 }}
          volumeMounts:
            - name: airflow-home
              mountPath: /opt/airflow
            - name: airflow-secrets
              mountPath: /etc/airflow-secrets
              readOnly: true
        {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ include "flywheel.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          command:
            {{- toYaml .command | nindent 12 }}
          {{- with .ports }}
          ports:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          env:
            {{- include "flywheel.airflowEnv" $root | nindent 12 }}
          resources:
            {{- toYaml .values.resources | nindent 12 }}
          livenessProbe:
            {{- toYaml .probe | nindent 12 }}
            initialDelaySeconds: 30
            periodSeconds: 30
            timeoutSeconds: 20
            failureThreshold: 5
          readinessProbe:
            {{- toYaml .probe | nindent 12 }}
            initialDelaySeconds: 15
            periodSeconds: 15
            timeoutSeconds: 20
            failureThreshold: 3
          volumeMounts:
            - name: airflow-home
              mountPath: /opt/airflow
            {{- include "flywheel.homeVolumeMount" $root | nindent 12 }}
      volumes:
        # Logs and the copied passwords file; DAGs come from the image.
        - name: airflow-home
          emptyDir: {}
        {{- include "flywheel.homeVolume" $root | nindent 8 }}
        {{- if .auth }}
        - name: airflow-secrets
          secret:
            secretName: {{ include "flywheel.airflowSecretName" $root }}
            items:
              - key: passwords.json
                path: passwords.json
        {{- end }}
{{- end }}

{{/* Validation: stop bad value combinations at render time. */}}
{{- define "flywheel.validate" -}}
{{- if and .Values.postgresql.enabled .Values.externalDatabase.existingSecret }}
{{- fail "postgresql.enabled and externalDatabase.existingSecret are both set: use the in-cluster PostgreSQL or an external one, not both" }}
{{- end }}
{{- if and (not .Values.postgresql.enabled) (not .Values.externalDatabase.existingSecret) }}
{{- fail "no database: set postgresql.enabled=true or externalDatabase.existingSecret (a Secret with SQLAlchemy URLs)" }}
{{- end }}
{{- range $name, $tag := dict "redis.image.tag" .Values.redis.image.tag "postgresql.image.tag" .Values.postgresql.image.tag }}
{{- if eq (toString $tag) "latest" }}
{{- fail (printf "%s: `latest` is not allowed; pin a version" $name) }}
{{- end }}
{{- end }}
{{- if lt (int .Values.serve.maxOngoingRequests) (int .Values.serve.maxBatchSize) }}
{{- fail (printf "serve.maxOngoingRequests (%d) must be >= serve.maxBatchSize (%d): @serve.batch never fills a batch larger than the requests a replica accepts" (int .Values.serve.maxOngoingRequests) (int .Values.serve.maxBatchSize)) }}
{{- end }}
{{- if and .Values.serve.autoscaling.enabled (gt (int .Values.serve.autoscaling.minReplicas) (int .Values.serve.autoscaling.maxReplicas)) }}
{{- fail "serve.autoscaling.minReplicas must be <= serve.autoscaling.maxReplicas" }}
{{- end }}
{{- range $name, $group := dict "serve.workers" .Values.serve.workers "serve.gpuWorkers" .Values.serve.gpuWorkers "train.workers" .Values.train.workers "train.gpuWorkers" .Values.train.gpuWorkers }}
{{- if or (gt (int $group.minReplicas) (int $group.replicas)) (gt (int $group.replicas) (int $group.maxReplicas)) }}
{{- fail (printf "%s: need minReplicas <= replicas <= maxReplicas (got %d, %d, %d)" $name (int $group.minReplicas) (int $group.replicas) (int $group.maxReplicas)) }}
{{- end }}
{{- end }}
{{- if and .Values.ingress.enabled (not .Values.serve.enabled) }}
{{- fail "ingress.enabled needs serve.enabled: the Ingress only routes to the inference API" }}
{{- end }}
{{- if eq .Values.mlflow.artifacts.type "s3" }}
{{- $_ := required "mlflow.artifacts.s3.bucket is required with mlflow.artifacts.type=s3" .Values.mlflow.artifacts.s3.bucket }}
{{- end }}
{{- if and (gt (int .Values.mlflow.replicas) 1) (eq .Values.mlflow.artifacts.type "pvc") (has "ReadWriteOnce" .Values.mlflow.artifacts.pvc.accessModes) }}
{{- fail "mlflow.replicas > 1 with a ReadWriteOnce artifact claim: use mlflow.artifacts.type=s3 or a ReadWriteMany claim" }}
{{- end }}
{{- end }}
