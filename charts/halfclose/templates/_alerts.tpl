{{/*
The alert rules: a Prometheus rule file's `groups`, parameterised by
.Values.alerts and .Values.metrics. The PrometheusRule embeds it; the plain rule
file files/alerts.yaml is this rendered with the default values
(hack/readme.py writes it, a test fails on drift, and the promtool unit tests
in tests/chart/promtool/ run against it).

Annotations hold Prometheus templates ({{ $labels.x }}, {{ $value }}): they are
written as Go raw strings so that Helm passes them through untouched.
*/}}
{{- define "halfclose.alertGroups" -}}
{{- $a := .Values.alerts }}
{{- $m := .Values.metrics }}
{{- $extra := $a.additionalRuleLabels }}
{{- $ignored := "" }}
{{- if $a.scanErrorsIgnoredReasons }}
{{- $ignored = printf "{reason!~%q}" (join "|" $a.scanErrorsIgnoredReasons) }}
{{- end }}
groups:
  - name: halfclose
    rules:
      - alert: HalfCloseLeakedSockets
        # max, not sum: while an agent restarts, the old and the new target may
        # both report the same pod for a scrape or two.
        expr: max by (namespace, pod) (halfclose_leaked_sockets) >= {{ $a.leakedSocketsThreshold }}
        for: {{ $a.leakedSocketsFor }}
        labels:
          severity: warning
          {{- with $extra }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        annotations:
          summary: {{`Pod {{ $labels.namespace }}/{{ $labels.pod }} holds {{ $value }} leaked half-closed sockets.`}}
          description: >-
            {{`The sidecar of pod {{ $labels.namespace }}/{{ $labels.pod }} has held {{ $value }}`}}
            leaked FIN_WAIT2 sockets (their conntrack NAT entry is gone, the
            app's FIN can never arrive) for {{ $a.leakedSocketsFor }}. Each pins an
            ephemeral port of the app: a new connection that reuses one times
            out. No policy kills them, or kills are failing or rate-limited.
          runbook_url: {{ printf "%s#halfcloseleakedsockets" $a.runbookBaseUrl }}
      - alert: HalfCloseCollision
        # istio#43301: an app's new connection met a leaked proxy socket on its
        # own port and hung. Each one is an outage for that request, so no
        # "for": a single collision in the window is enough. Under KillSockets
        # the agent unblocks it within a second (still worth knowing: the app
        # closes connections late); otherwise it hangs until the proxy's idle
        # timeout.
        expr: sum by (namespace, pod) (increase(halfclose_collisions_total[15m])) > 0
        labels:
          severity: warning
          {{- with $extra }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        annotations:
          summary: {{`New connections of pod {{ $labels.namespace }}/{{ $labels.pod }} met stale proxy sockets on their own port.`}}
          description: >-
            {{`In the last 15 minutes about {{ $value | humanize }} new connections of pod {{ $labels.namespace }}/{{ $labels.pod }}`}}
            reused the port of a leaked FIN_WAIT2 proxy socket and were answered
            by it, not by the listener (istio#43301): they hang until the stale
            socket goes. A KillSockets policy kills it at once (the pod's
            CollisionUnblocked Events name each connection); under any other
            action they wait for the proxy's idle timeout.
          runbook_url: {{ printf "%s#halfclosecollision" $a.runbookBaseUrl }}
      - alert: HalfCloseAgentDown
        expr: up{job="{{ $m.agentJob }}"} == 0
        for: 5m
        labels:
          severity: warning
          {{- with $extra }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        annotations:
          summary: {{`halfclose agent {{ $labels.pod }} ({{ $labels.instance }}) is down.`}}
          description: >-
            {{`Prometheus has failed to scrape the halfclose agent {{ $labels.pod }} at {{ $labels.instance }}`}}
            for 5 minutes. Leaks on its node are neither detected nor repaired
            while it is down.
          runbook_url: {{ printf "%s#halfcloseagentdown" $a.runbookBaseUrl }}
      - alert: HalfCloseAgentAbsent
        expr: absent(up{job="{{ $m.agentJob }}"})
        for: 15m
        labels:
          severity: warning
          {{- with $extra }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        annotations:
          summary: No halfclose agent is being scraped.
          description: >-
            Prometheus has no target with job="{{ $m.agentJob }}": the agent
            DaemonSet has no pods, or nothing scrapes them. Leaks go undetected
            on every node.
          runbook_url: {{ printf "%s#halfcloseagentabsent" $a.runbookBaseUrl }}
      - alert: HalfCloseKillFailures
        # A failure now and then (a socket that closed between scan and kill
        # is not even counted as one) does not page: only failures that keep
        # coming for 10 minutes do.
        expr: sum by (namespace, pod, reason) (rate(halfclose_kill_failures_total[5m])) > 0
        for: 10m
        labels:
          severity: warning
          {{- with $extra }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        annotations:
          summary: {{`Killing leaked sockets in {{ $labels.namespace }}/{{ $labels.pod }} keeps failing ({{ $labels.reason }}).`}}
          description: >-
            {{`SOCK_DESTROY has failed with {{ $labels.reason }} for pod {{ $labels.namespace }}/{{ $labels.pod }}`}}
            for 10 minutes. The leaks it should remove stay until the proxy's
            own idle timeout.
          runbook_url: {{ printf "%s#halfclosekillfailures" $a.runbookBaseUrl }}
      - alert: HalfCloseScanErrors
        expr: sum by (namespace, pod, instance, reason) (rate(halfclose_scan_errors_total{{ $ignored }}[10m])) > {{ $a.scanErrorsPerSecond }}
        for: 15m
        labels:
          severity: warning
          {{- with $extra }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        annotations:
          summary: {{`halfclose agent {{ $labels.pod }} fails scans ({{ $labels.reason }}).`}}
          description: >-
            {{`The halfclose agent {{ $labels.pod }} ({{ $labels.instance }}) has failed {{ printf "%.2f" $value }} scans per second with reason {{ $labels.reason }}`}}
            for 15 minutes (threshold {{ $a.scanErrorsPerSecond }}/s). Pods
            whose scans fail are not protected.
          runbook_url: {{ printf "%s#halfclosescanerrors" $a.runbookBaseUrl }}
      - alert: HalfCloseScanIncomplete
        # A gauge, not a rate: scans that run but may miss leaks (unreadable NAT
        # rules) do not fail, so the error counter rises once per netns; the
        # state lasts as long as its cause, whatever the scan interval.
        expr: max by (namespace, pod) (halfclose_scan_incomplete) > 0
        for: 15m
        labels:
          severity: warning
          {{- with $extra }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        annotations:
          summary: {{`halfclose cannot fully scan {{ $labels.namespace }}/{{ $labels.pod }}.`}}
          description: >-
            {{`The halfclose agent's scans of {{ $labels.namespace }}/{{ $labels.pod }} have run`}}
            for 15 minutes without everything a leak proof needs (a NAT rule
            source it cannot read, or no conntrack to prove with): leaks there
            may go unseen.
          runbook_url: {{ printf "%s#halfclosescanincomplete" $a.runbookBaseUrl }}
{{- end }}
