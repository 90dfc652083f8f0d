#!/usr/bin/env bash
# Load comparison: portcullis against nginx doing the same job, side by side on this machine.
#
#   benches/compare.sh [SCENARIO ...]      (default: basic-bcrypt10 noauth)
#
# Scenarios:
#   basic-bcrypt10   HTTP Basic, one user hashed with bcrypt cost 10 (htpasswd -B -C 10);
#                    nginx: auth_basic + auth_basic_user_file with the same file
#   basic-apr1       the same with htpasswd -m (Apache MD5)
#   apikey           the sidecar's job: Authorization: Bearer checked, security headers added,
#                    X-Request-Id / X-Forwarded-* set, and a per-key rate limit high enough
#                    never to fire; nginx: a `map` on the header (401 otherwise), four
#                    `add_header ... always`, `proxy_set_header`s, `limit_req` on the header
#   apikey-tls       the same over TLS 1.3 (keep-alive), both with the same certificate
#   jwt              the apikey job with an OAuth JWT access token (RS256, 2048-bit) instead of
#                    a key: portcullis checks it against a jwks_file ([auth.jwt]); the token
#                    and key set come from the test OAuth server (tests/peers/idp.mjs; run
#                    `npm ci` in tests/peers first). nginx has no JWT check (nginx Plus
#                    does): it does the apikey job with the whole token as the key. Compare
#                    portcullis' row with its apikey row: the ratio is the token's cost
#   mcp              an MCP tools/call (POST /mcp, a 130-byte JSON-RPC body) with the apikey job;
#                    portcullis with [mcp] on the path and tool rules off; nginx the apikey job
#   mcp-policy       the cost of MCP tool rules: the same call through two portcullis
#                    processes (both on core 0, loaded one at a time, alternating in every
#                    round), one with [mcp] tool_policy = true and the key limited to
#                    tools = ["search_*", "get_*"] (the body read whole, parsed strictly,
#                    judged, forwarded as judged), one with the rules off; reports both and
#                    the ratios of req/s and of CPU per request
#   instances        the cost of balancing: the apikey job through two portcullis processes
#                    (both on core 0, loaded in turn within every round), one with
#                    `url` (one instance), one with `urls` listing two (the backend nginx on two
#                    ports), `health_path` checks every 5 s and MCP session affinity on; reports
#                    both and the ratios of req/s and of CPU per request
#   forward-auth     nginx deciding with portcullis' [forward_auth] listener (auth_request, the
#                    recipe of examples/forward-auth/nginx-locations.conf, with a keep-alive
#                    upstream for the checks) against nginx doing the apikey job's `map` check
#                    itself; both nginx and portcullis on core 0, loaded in turn within each
#                    round; CPU per request counts nginx and portcullis together
#   flood            head-of-line under a flood, portcullis alone and free to use both cores (as
#                    most people run it): API-key req/s while 16 connections send random wrong
#                    Basic passwords for a bcrypt-10 user, against API-key req/s while 16
#                    connections send random invalid API keys (no hash); the two floods take
#                    turns within each round; reports the ratio (1.0: a password flood costs the
#                    key traffic no more than a flood that needs no hash). Bans are off, so
#                    the flood is never cut short
#   noauth           no authentication (portcullis anonymous = true; nginx plain proxy_pass)
#   idle10k          10,000 idle keep-alive connections held open: resident memory of each
#                    proxy (RSS after minus before), not throughput
#   latency2k        the apikey job at a fixed, moderate rate (at most 2,000 req/s: 20
#                    connections, each waiting 10 ms after every response, wrk's delay()
#                    hook; the rate reached is printed): p50/p99 of direct, nginx and
#                    portcullis, and the latency each proxy adds at p50: the median over
#                    rounds of its p50 minus direct's p50 in the same round
#   instructions     user-space instructions per proxied request of the apikey job, each
#                    proxy under valgrind --tool=callgrind (after a 2 s warm-up, over
#                    DURATION of load): repeatable whatever else the machine does, so it
#                    shows what a code change costs where req/s here cannot. valgrind hides
#                    the CPU's SHA extensions: portcullis' SHA-256 of the key runs in
#                    software here (about 7,000 instructions of its count)
#   reload10k        the worst request latency while a 10,000-key keys file is swapped by
#                    rename every second (portcullis alone, on core 0 as a sidecar with a
#                    1-CPU limit runs; one connection sending back to back from core 1):
#                    wrk's max and p99 over DURATION×4 with the swaps, and without them in
#                    the same sitting; every response must be a 200
#   websocket        WebSocket echo messages/s: 32 sessions opened with the API key, each
#                    sending a 64-byte text message and waiting for its echo (the load tool
#                    and the echo backend are benches/wsload.rs, built as an example); nginx:
#                    the same `map` check and `proxy_set_header Upgrade/Connection`
#
# Layout (see docs/benchmarks.md): the proxy under test alone on core 0
# (taskset -c 0; nginx worker_processes 1; portcullis then sees one CPU), the backend (nginx,
# one worker, `return 200`) and wrk -t1 on core 1. Each round runs direct, nginx, portcullis one
# after another; the table reports medians over ROUNDS rounds of DURATION each at CONNS
# connections, and the ratios portcullis / nginx and portcullis / direct.
#
# Every throughput run also reports wrk's p50 and p99 latency, and the CPU time each proxy
# (nginx's worker included) spent per request, from /proc: steadier than req/s here. The table is printed, and written
# with an SVG bar chart to target/compare/ (compare.md, compare.svg).
#
# Environment: ROUNDS (5), DURATION (5s), CONNS (32), INSTANCES (2: portcullis balances every
# scenario's requests over two instances, the backend nginx on two ports, with health checks;
# e.g. `INSTANCES=2 compare.sh instructions` against `compare.sh instructions` counts what
# balancing costs per request), PORTCULLIS (the binary; default: built
# with cargo build --release), KEEP_WORK (set: the work directory, with every process's log,
# is copied to /tmp/compare-work at exit). Needs nginx, wrk, htpasswd and taskset: Debian packages nginx,
# wrk, apache2-utils, util-linux, and valgrind for `instructions` (installed when missing and
# running as root).
set -euo pipefail

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5s}
CONNS=${CONNS:-32}
cd "$(dirname "$0")/.."

need=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
command -v htpasswd >/dev/null || need+=(apache2-utils)
command -v taskset >/dev/null || need+=(util-linux)
command -v bc >/dev/null || need+=(bc)
command -v openssl >/dev/null || need+=(openssl)
command -v python3 >/dev/null || need+=(python3)
if [[ " $* " == *" instructions "* ]]; then command -v valgrind >/dev/null || need+=(valgrind); fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  else
    echo "missing: ${need[*]} (apt-get install ${need[*]})" >&2
    exit 1
  fi
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

if [ -z "${PORTCULLIS:-}" ]; then
  cargo build --release --quiet
  PORTCULLIS=target/release/portcullis
fi
if [[ " $* " == *" websocket "* ]]; then
  cargo build --release --quiet --example wsload
fi
WSLOAD=target/release/examples/wsload

work=$(mktemp -d)
chmod 755 "$work"   # nginx workers run as an unprivileged user and must read the htpasswd file
pids=()
cleanup() {
  [ -n "${KEEP_WORK:-}" ] && { cp -r "$work" /tmp/compare-work 2>/dev/null || true; }
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

BACKEND_PORT=18180 NGINX_PORT=18181 PORTCULLIS_PORT=18182 ADMIN_PORT=18183 WS_PORT=18184
OFF_PORT=18185 OFF_ADMIN_PORT=18186 FA_PORT=18187 BACKEND2_PORT=18188

nginx_conf() { # name, server block; NGINX_MAIN: more main-context directives
  mkdir -p "$work/$1"
  cat > "$work/$1/nginx.conf" <<EOF
worker_processes 1;
daemon off;
${NGINX_MAIN:-}
pid $work/$1/nginx.pid;
error_log $work/$1/error.log warn;
worker_rlimit_nofile 30000;
events { worker_connections 20000; }
http {
  access_log off;
  client_body_temp_path $work/$1/body;
  proxy_temp_path $work/$1/proxy;
  fastcgi_temp_path $work/$1/fastcgi;
  uwsgi_temp_path $work/$1/uwsgi;
  scgi_temp_path $work/$1/scgi;
  upstream backend { server 127.0.0.1:$BACKEND_PORT; keepalive 256; }
  $2
}
EOF
}

start() { # core, command...
  local core=$1; shift
  taskset -c "$core" "$@" >> "$work/processes.log" 2>&1 &
  pids+=($!)
}

wait_port() {
  for _ in $(seq 600); do
    (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on $1" >&2
  cat "$work/processes.log" "$work"/*/error.log >&2 2>/dev/null || true
  exit 1
}

stop_all_but_backend() {
  local keep=${pids[0]}
  for p in "${pids[@]:1}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  pids=("$keep")
}

# wrk's latency ("812.00us", "1.20ms", "2.1s") in microseconds.
to_us() { awk '{v=$1; u=v; gsub(/[0-9.]/,"",u); gsub(/[a-z]/,"",v);
  m=(u=="us")?1:(u=="ms")?1000:(u=="s")?1000000:1; printf "%.0f\n", v*m}'; }

rps() { # url, header...: "req/s p50_us p99_us"; every response must be a 200
  local url=$1; shift
  local args=()
  for h in "$@"; do args+=(-H "$h"); done
  if [ -n "${PACE:-}" ]; then args+=(-s "$PACE"); fi
  local out
  out=$(taskset -c 1 wrk -t1 -c"${RUN_CONNS:-$CONNS}" -d"$DURATION" --latency "${args[@]}" "$url")
  if grep -q "Non-2xx" <<<"$out"; then
    echo "$url answered errors during the run:" >&2
    echo "$out" >&2
    exit 1
  fi
  local r p50 p99
  r=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out" | to_us)
  p99=$(awk '$1=="99%" {print $2}' <<<"$out" | to_us)
  echo "$r $p50 $p99"
}

# The sum of a number read from /proc for a process and its children (nginx's worker):
# tree_sum PID FILE AWK-PROGRAM, where the program prints the number.
tree_sum() {
  local total=0 p
  for p in "$1" $(pgrep -P "$1"); do
    total=$(( total + $(awk "$3" "/proc/$p/$2") ))
  done
  echo "$total"
}

# Resident memory (kB).
rss_kb() { tree_sum "$1" status '/^VmRSS:/ {print $2}'; }

# Hold N idle keep-alive connections (each sent one request) to a port; print when ready,
# exit when stdin closes.
hold_idle() { # port, count, header
  python3 - "$@" <<'PY'
import socket, sys
port, n, header = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
req = ("GET / HTTP/1.1\r\nHost: bench\r\n" + (header + "\r\n" if header else "") + "\r\n").encode()
conns = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(req)
    conns.append(s)
for s in conns:
    s.recv(4096)
print("ready", flush=True)
sys.stdin.read()
PY
}

# Wait (up to 15 s) until core 0 is idle: nginx keeps hashing queued bcrypt requests after wrk
# stops, which would otherwise be charged to the next run.
idle_gate() {
  for _ in $(seq 30); do
    a=($(grep '^cpu0 ' /proc/stat)); sleep 0.5; b=($(grep '^cpu0 ' /proc/stat))
    busy=$(( (b[1]+b[2]+b[3]+b[6]+b[7]) - (a[1]+a[2]+a[3]+a[6]+a[7]) ))
    total=$(( busy + (b[4]+b[5]) - (a[4]+a[5]) ))
    [ "$total" -gt 0 ] && [ $(( busy * 100 / total )) -lt 10 ] && return 0
  done
  echo "warning: core 0 did not become idle" >&2
}

# CPU time used so far (clock ticks).
cpu_ticks() { tree_sum "$1" stat '{print $14 + $15}'; }
TICK_US=$(( 1000000 / $(getconf CLK_TCK) ))

# Run a measurement (which prints "rate p50 p99") and append the CPU the process PID spent per
# request (or message) meanwhile, in µs: steadier on a shared machine than the rate.
with_cpu() { # pid, command...
  local pid=$1; shift
  local before after line
  before=$(cpu_ticks "$pid")
  line=$("$@")
  after=$(cpu_ticks "$pid")
  echo "$line $(echo "($after - $before) * $TICK_US / (${line%% *} * ${DURATION%s})" | bc -l)"
}

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# The backend, for every scenario.
# A second port for the `instances` scenario's second instance.
nginx_conf backend "server { listen 127.0.0.1:$BACKEND_PORT; listen 127.0.0.1:$BACKEND2_PORT; location / { return 200 \"ok\n\"; } }"
start 1 "$NGINX" -c "$work/backend/nginx.conf"
wait_port $BACKEND_PORT

KEY=$("$PORTCULLIS" keygen | head -1)
PROXY_LOCATION="proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header X-Forwarded-For \$remote_addr;"
# What portcullis does on every request, done by nginx.
JOB="proxy_set_header X-Real-IP \$remote_addr; proxy_set_header X-Forwarded-Proto \$scheme;
  proxy_set_header X-Forwarded-Host \$host; proxy_set_header X-Request-Id \$request_id;
  proxy_set_header Authorization \"\"; proxy_set_header X-Authenticated-User bench;
  add_header X-Request-Id \$request_id always; add_header X-Frame-Options DENY always;
  add_header X-Content-Type-Options nosniff always; add_header Referrer-Policy no-referrer always;
  limit_req zone=bench burst=100000 nodelay;"
JOB_HTTP="map_hash_bucket_size 128; map \$http_authorization \$bench_ok { \"Bearer $KEY\" 1; default 0; }
  limit_req_zone \$http_authorization zone=bench:10m rate=100000r/s;"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
  -keyout "$work/tls.key" -out "$work/tls.crt" 2>/dev/null
mkdir -p target/compare
report=target/compare/compare.md
printf '| scenario | direct req/s | nginx req/s | portcullis req/s | portcullis / nginx | nginx p50 / p99 (µs) | portcullis p50 / p99 (µs) | nginx CPU µs/req | portcullis CPU µs/req |\n|---|---|---|---|---|---|---|---|---|\n' > "$report"
: > "$work/chart"

printf '\n%-14s %9s %9s %9s %8s %8s %15s %15s %13s\n' scenario direct nginx portcullis "p/nginx" "p/direct" "nginx p50/p99" "portc. p50/p99" "CPU µs/req n/p"
for scenario in "${@:-basic-bcrypt10 noauth}"; do
  for s in $scenario; do
    dir="$work/$s"; mkdir -p "$dir"
    upstream_port=$BACKEND_PORT
    auth_header=()
    rate="enabled = false"
    tls=""
    extra=""
    urlpath=""
    script=""
    scheme=http
    case $s in
      basic-bcrypt10|basic-apr1)
        if [ "$s" = basic-bcrypt10 ]; then flag=(-B -C 10); else flag=(-m); fi
        htpasswd -cb "${flag[@]}" "$dir/htpasswd" bench 'bench password' 2>/dev/null
        auth_header=("Authorization: Basic $(printf %s 'bench:bench password' | base64)")
        nginx_conf "$s-nginx" "server { listen 127.0.0.1:$NGINX_PORT; location / { auth_basic bench; auth_basic_user_file $dir/htpasswd; $PROXY_LOCATION } }"
        auth="htpasswd_file = \"$dir/htpasswd\""
        ;;
      flood)
        htpasswd -cb -B -C 10 "$dir/htpasswd" bench 'bench password' 2>/dev/null
        printf '[[keys]]\nname = "bench"\napi_key = "%s"\n' "$KEY" > "$dir/keys.toml"
        auth_header=("Authorization: Bearer $KEY")
        auth="keys_file = \"$dir/keys.toml\"
htpasswd_file = \"$dir/htpasswd\""
        rate="requests_per_second = 100000
burst = 100000"
        ;;
      apikey|apikey-tls|idle10k|latency2k|websocket|instructions|reload10k|mcp|mcp-policy|forward-auth|instances)
        printf '[[keys]]\nname = "bench"\napi_key = "%s"\n' "$KEY" > "$dir/keys.toml"
        if [ "$s" = mcp ] || [ "$s" = mcp-policy ]; then
          urlpath=mcp
          script="$dir/call.lua"
          cat > "$script" <<'LUA'
wrk.method = "POST"
wrk.body = '{"jsonrpc":"2.0","id":42,"method":"tools/call","params":{"name":"search_docs","arguments":{"query":"quarterly report","limit":10}}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json, text/event-stream"
LUA
          extra="[mcp]
path = \"/mcp\""
          if [ "$s" = mcp-policy ]; then
            extra="$extra
tool_policy = true"
            printf 'tools = ["search_*", "get_*"]\n' >> "$dir/keys.toml"
          fi
        fi
        if [ "$s" = reload10k ]; then
          # Two versions of a 10,000-key file, each with the bench key: swapping them changes
          # the content, so every swap is a full reload.
          for v in a b; do
            python3 - "$v" >> "$dir/keys.$v" <<'PY'
import secrets, sys
for i in range(9999):
    print(f'[[keys]]\nname = "client-{sys.argv[1]}-{i}"\napi_key = "mas_{secrets.token_urlsafe(40)}"\n')
PY
            cat "$dir/keys.toml" >> "$dir/keys.$v"
          done
          cp "$dir/keys.a" "$dir/keys.toml"
        fi
        auth_header=("Authorization: Bearer $KEY")
        listen="listen 127.0.0.1:$NGINX_PORT"
        if [ "$s" = apikey-tls ]; then
          listen="$listen ssl; ssl_certificate $work/tls.crt; ssl_certificate_key $work/tls.key; ssl_protocols TLSv1.2 TLSv1.3"
          tls="[tls]
cert = \"$work/tls.crt\"
key = \"$work/tls.key\""
          scheme=https
        fi
        location="$PROXY_LOCATION"
        if [ "$s" = websocket ]; then
          location="proxy_pass http://127.0.0.1:$WS_PORT; proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade; proxy_set_header Connection upgrade;
            proxy_set_header X-Forwarded-For \$remote_addr;"
          upstream_port=$WS_PORT
          start 1 "$WSLOAD" echo "127.0.0.1:$WS_PORT"   # stopped with the proxies
          wait_port $WS_PORT
        fi
        # Under callgrind, the process that serves must be the one valgrind started.
        main=""; [ "$s" = instructions ] && main="master_process off;"
        NGINX_MAIN=$main nginx_conf "$s-nginx" "$JOB_HTTP
          server { $listen; location / { if (\$bench_ok = 0) { return 401; } $location $JOB } }"
        auth="keys_file = \"$dir/keys.toml\""
        rate="requests_per_second = 100000
burst = 100000"
        ;;
      jwt)
        [ -d tests/peers/node_modules/oauth2-mock-server ] || { echo "jwt: run npm ci in tests/peers first" >&2; exit 1; }
        coproc IDP { exec node tests/peers/idp.mjs; }
        read -r _ idp_url <&"${IDP[0]}"
        token=$(curl -s -X POST "$idp_url/test/token" \
          -d '{"claims": {"aud": "bench", "sub": "bench"}, "expiresIn": 86400}' |
          python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])')
        curl -s -X POST "$idp_url/test/jwks" > "$dir/jwks.json"
        kill "$IDP_PID"
        auth_header=("Authorization: Bearer $token")
        job_http=${JOB_HTTP//$KEY/$token}
        NGINX_MAIN="" nginx_conf "$s-nginx" "${job_http/map_hash_bucket_size 128/map_hash_bucket_size 2048}
          server { listen 127.0.0.1:$NGINX_PORT; location / { if (\$bench_ok = 0) { return 401; } $PROXY_LOCATION $JOB } }"
        auth="[auth.jwt]
issuer = \"$idp_url\"
jwks_file = \"$dir/jwks.json\"
audiences = [\"bench\"]"
        rate="requests_per_second = 100000
burst = 100000"
        ;;
      noauth)
        nginx_conf "$s-nginx" "server { listen 127.0.0.1:$NGINX_PORT; location / { $PROXY_LOCATION } }"
        auth="anonymous = true"
        ;;
      *) echo "unknown scenario $s" >&2; exit 1 ;;
    esac
    cat > "$dir/proxy.toml" <<EOF
[server]
listen = "127.0.0.1:$PORTCULLIS_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
max_connections = 20000
max_connections_per_ip = 20000
[upstream]
url = "http://127.0.0.1:$upstream_port"
[auth]
$auth
$tls
[ban]
enabled = false
# A limit never reached where nginx has one (limit_req), none where it has none.
[rate_limit]
$rate
[log]
level = "warn"
access_log = "off"
$extra
EOF
    if [ "${INSTANCES:-1}" = 2 ] && [ "$upstream_port" = "$BACKEND_PORT" ] && [ "$s" != instances ]; then
      sed -i "s#^url = .*#urls = [\"http://127.0.0.1:$BACKEND_PORT\", \"http://127.0.0.1:$BACKEND2_PORT\"]\nhealth_path = \"/\"#" "$dir/proxy.toml"
    fi
    under=()
    if [ "$s" = instructions ]; then
      under=(valgrind --tool=callgrind "--callgrind-out-file=$dir/cg.%p")
    fi
    if [ "$s" = reload10k ]; then
      # portcullis alone: nginx has no keys file to reload.
      sed -i 's/^level = "warn"/level = "info"/' "$dir/proxy.toml"
      start 0 "$PORTCULLIS" --config "$dir/proxy.toml"
      wait_port $PORTCULLIS_PORT
      url="http://127.0.0.1:$PORTCULLIS_PORT/"
      DURATION=1s RUN_CONNS=1 rps "$url" "${auth_header[@]}" >/dev/null
      secs=$(( ${DURATION%s} * 4 ))
      max_latency() { # with_swaps (0|1): "max_us p99_us requests reloads"
        local before swapper out
        before=$(grep -c '"keys reloaded"' "$work/processes.log" || true)
        if [ "$1" = 1 ]; then
          ( v=b; while :; do cp "$dir/keys.$v" "$dir/keys.next"; mv "$dir/keys.next" "$dir/keys.toml"
              [ $v = a ] && v=b || v=a; sleep 1; done ) &
          swapper=$!
        fi
        out=$(taskset -c 1 wrk -t1 -c1 -d"${secs}s" --latency "${auth_header[@]/#/-H}" "$url")
        [ "$1" = 1 ] && { kill "$swapper"; wait "$swapper" 2>/dev/null || true; }
        if grep -q "Non-2xx\|Socket errors" <<<"$out"; then echo "$out" >&2; exit 1; fi
        sleep 0.5   # the last swap's log line
        echo "$(awk '$1=="Latency" {print $4; exit}' <<<"$out" | to_us) $(awk '$1=="99%" {print $2}' <<<"$out" | to_us)" \
          "$(awk '/requests in/ {print $1}' <<<"$out")" \
          "$(( $(grep -c '"keys reloaded"' "$work/processes.log" || true) - before ))"
      }
      max_latency 0 > "$dir/quiet"
      max_latency 1 > "$dir/swaps"
      read -r q_max q_p99 q_n _ < "$dir/quiet"
      read -r s_max s_p99 s_n s_reloads < "$dir/swaps"
      taken=$(grep '"keys reloaded"' "$work/processes.log" | tail -n "$s_reloads" | grep -o '"duration_ms":[0-9]*' | cut -d: -f2 | sort -n | tail -1)
      printf '%-14s worst request: %s µs during %s reloads (p99 %s µs, %s requests, every one 200); without reloads %s µs (p99 %s µs); slowest reload %s ms\n' \
        "$s" "$s_max" "$s_reloads" "$s_p99" "$s_n" "$q_max" "$q_p99" "${taken:-?}"
      printf '| %s | | | | | | worst request during %s reloads of 10,000 keys: %s µs (p99 %s); without reloads: %s µs (p99 %s) | | |\n' \
        "$s" "$s_reloads" "$s_max" "$s_p99" "$q_max" "$q_p99" >> "$report"
      stop_all_but_backend
      continue
    fi
    if [ "$s" = flood ]; then
      # Random credentials per request: wrong passwords for the bcrypt user, or keys that
      # match nothing.
      cat > "$dir/flood.lua" <<'LUA'
local b = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local function base64(s)
  return ((s:gsub(".", function(x)
    local r, c = "", x:byte()
    for i = 8, 1, -1 do r = r .. (c % 2 ^ i - c % 2 ^ (i - 1) > 0 and "1" or "0") end
    return r
  end) .. "0000"):gsub("%d%d%d?%d?%d?%d?", function(x)
    if #x < 6 then return "" end
    local c = 0
    for i = 1, 6 do c = c + (x:sub(i, i) == "1" and 2 ^ (6 - i) or 0) end
    return b:sub(c + 1, c + 1)
  end) .. ({ "", "==", "=" })[#s % 3 + 1])
end
local kind = os.getenv("FLOOD")
math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)"), 16) % 100000)
request = function()
  local n = tostring(math.random(1, 2 ^ 31)) .. tostring(math.random(1, 2 ^ 31))
  local h
  if kind == "password" then
    h = "Basic " .. base64("bench:" .. n)
  else
    h = "Bearer mas_" .. n .. "0000000000000000000000000000000000000"
  end
  return wrk.format(nil, nil, { ["Authorization"] = h })
end
LUA
      taskset -c 0,1 "$PORTCULLIS" --config "$dir/proxy.toml" >> "$work/processes.log" 2>&1 &
      pids+=($!)
      wait_port $PORTCULLIS_PORT
      url="http://127.0.0.1:$PORTCULLIS_PORT/"
      flood_secs=$(( ${DURATION%s} + 2 ))
      under_flood() { # password|key: API-key "rate p50 p99" measured while the flood runs
        FLOOD=$1 taskset -c 0,1 wrk -t1 -c16 -d"${flood_secs}s" -s "$dir/flood.lua" "$url" > "$dir/flood-$1.out" &
        local flooder=$!
        sleep 1
        rps "$url" "${auth_header[@]}"
        wait "$flooder"
      }
      DURATION=1s rps "$url" "${auth_header[@]}" >/dev/null
      : > "$dir/password"; : > "$dir/key"
      for _ in $(seq "$ROUNDS"); do
        idle_gate; under_flood key >> "$dir/key"
        idle_gate; under_flood password >> "$dir/password"
      done
      col() { awk -v c="$2" '{print $c}' "$1" | median; }
      k=$(col "$dir/key" 1); pw=$(col "$dir/password" 1)
      rr=$(paste -d' ' "$dir/key" "$dir/password" | awk '{print $4 / $1}' | median)
      printf '%-14s API-key req/s during an invalid-key flood %.0f (%s/%s µs p50/p99), during a bcrypt-10 password flood %.0f (%s/%s µs): %.2fx (median of per-round ratios)\n' \
        "$s" "$k" "$(col "$dir/key" 2)" "$(col "$dir/key" 3)" "$pw" "$(col "$dir/password" 2)" "$(col "$dir/password" 3)" "$rr"
      printf '| %s | | invalid-key flood: %.0f | password flood: %.0f | %.2f× (head-of-line ratio) | %s / %s | %s / %s | | |\n' \
        "$s" "$k" "$pw" "$rr" "$(col "$dir/key" 2)" "$(col "$dir/key" 3)" "$(col "$dir/password" 2)" "$(col "$dir/password" 3)" >> "$report"
      stop_all_but_backend
      continue
    fi
    if [ "$s" = forward-auth ]; then
      printf '[forward_auth]\nlisten = "127.0.0.1:%s"\n' "$FA_PORT" >> "$dir/proxy.toml"
      sed -i 's/^max_connections_per_ip = 20000/&\ntrusted_proxies = ["127.0.0.1\/32"]/' "$dir/proxy.toml"
      recipe=$(sed -e "s#http://127.0.0.1:9902/auth#http://portcullis_check/auth;\n        proxy_http_version 1.1;\n        proxy_set_header Connection \"\"#" \
        examples/forward-auth/nginx-locations.conf)
      recipe=${recipe/proxy_pass http:\/\/backend;/$PROXY_LOCATION}
      NGINX_MAIN="" nginx_conf "$s-auth-request" "upstream portcullis_check { server 127.0.0.1:$FA_PORT; keepalive 64; }
        server { listen 127.0.0.1:$OFF_PORT; $recipe }"
      start 0 "$NGINX" -c "$work/$s-nginx/nginx.conf"; map_pid=${pids[-1]}
      start 0 "$NGINX" -c "$work/$s-auth-request/nginx.conf"; ar_pid=${pids[-1]}
      start 0 "$PORTCULLIS" --config "$dir/proxy.toml"; fa_pid=${pids[-1]}
      wait_port $NGINX_PORT; wait_port $OFF_PORT; wait_port $FA_PORT
      run() { rps "$1/" "${auth_header[@]}"; }
      DURATION=1s run "http://127.0.0.1:$NGINX_PORT" >/dev/null
      DURATION=1s run "http://127.0.0.1:$OFF_PORT" >/dev/null
      : > "$dir/map"; : > "$dir/ar"
      for _ in $(seq "$ROUNDS"); do
        idle_gate; with_cpu "$map_pid" run "http://127.0.0.1:$NGINX_PORT" >> "$dir/map"
        idle_gate
        b1=$(cpu_ticks "$ar_pid"); b2=$(cpu_ticks "$fa_pid")
        line=$(run "http://127.0.0.1:$OFF_PORT")
        a1=$(cpu_ticks "$ar_pid"); a2=$(cpu_ticks "$fa_pid")
        echo "$line $(echo "($a1 - $b1 + $a2 - $b2) * $TICK_US / (${line%% *} * ${DURATION%s})" | bc -l) $(echo "($a2 - $b2) * $TICK_US / (${line%% *} * ${DURATION%s})" | bc -l)" >> "$dir/ar"
      done
      col() { awk -v c="$2" '{print $c}' "$1" | median; }
      m=$(col "$dir/map" 1); a=$(col "$dir/ar" 1)
      mcpu=$(printf '%.1f' "$(col "$dir/map" 4)"); acpu=$(printf '%.1f' "$(col "$dir/ar" 4)"); pcpu=$(printf '%.1f' "$(col "$dir/ar" 5)")
      rr=$(paste -d' ' "$dir/map" "$dir/ar" | awk '{print $5 / $1}' | median)
      printf '%-14s nginx map check %.0f req/s (%s/%s µs p50/p99, %s CPU µs/req); nginx + auth_request + portcullis %.0f req/s (%s/%s µs, %s CPU µs/req, of which portcullis %s): %.2fx req/s (median of per-round ratios); portcullis decisions/s: %.0f\n' \
        "$s" "$m" "$(col "$dir/map" 2)" "$(col "$dir/map" 3)" "$mcpu" "$a" "$(col "$dir/ar" 2)" "$(col "$dir/ar" 3)" "$acpu" "$pcpu" "$rr" "$a"
      printf '| %s | | nginx map: %.0f | nginx + auth_request + portcullis: %.0f | %.2f× | %s / %s | %s / %s | %s | %s (portcullis %s) |\n' \
        "$s" "$m" "$a" "$rr" "$(col "$dir/map" 2)" "$(col "$dir/map" 3)" "$(col "$dir/ar" 2)" "$(col "$dir/ar" 3)" "$mcpu" "$acpu" "$pcpu" >> "$report"
      stop_all_but_backend
      continue
    fi
    if [ "$s" = mcp-policy ] || [ "$s" = instances ]; then
      # Two portcullis processes on ports of their own, loaded in turn within each round:
      # "a" the baseline, "b" with the feature measured.
      sed -e "s/^listen = .*/listen = \"127.0.0.1:$OFF_PORT\"/" \
          -e "s/^admin_listen = .*/admin_listen = \"127.0.0.1:$OFF_ADMIN_PORT\"/" \
          -e "/^tool_policy = true/d" "$dir/proxy.toml" > "$dir/proxy-off.toml"
      if [ "$s" = instances ]; then
        a_name="one instance"; b_name="two instances"
        sed -i -e "s#^url = .*#urls = [\"http://127.0.0.1:$BACKEND_PORT\", \"http://127.0.0.1:$BACKEND2_PORT\"]\nhealth_path = \"/\"#" "$dir/proxy.toml"
      else
        a_name="rules off"; b_name="rules on"
      fi
      start 0 "$PORTCULLIS" --config "$dir/proxy.toml"; on_pid=${pids[-1]}
      start 0 "$PORTCULLIS" --config "$dir/proxy-off.toml"; off_pid=${pids[-1]}
      wait_port $PORTCULLIS_PORT; wait_port $OFF_PORT
      run() { PACE="$script" rps "$1/$urlpath" "${auth_header[@]}"; }
      DURATION=1s run "http://127.0.0.1:$PORTCULLIS_PORT" >/dev/null
      DURATION=1s run "http://127.0.0.1:$OFF_PORT" >/dev/null
      : > "$dir/off"; : > "$dir/on"
      for _ in $(seq "$ROUNDS"); do
        idle_gate; with_cpu "$off_pid" run "http://127.0.0.1:$OFF_PORT" >> "$dir/off"
        idle_gate; with_cpu "$on_pid" run "http://127.0.0.1:$PORTCULLIS_PORT" >> "$dir/on"
      done
      col() { awk -v c="$2" '{print $c}' "$1" | median; }
      # Per-round ratios (b / a), then their median: each pair ran back to back.
      ratio_of() { paste -d' ' "$dir/off" "$dir/on" | awk -v c="$1" -v n="$2" '{print $(c+n) / $c}' | median; }
      f=$(col "$dir/off" 1); o=$(col "$dir/on" 1)
      fcpu=$(printf '%.1f' "$(col "$dir/off" 4)"); ocpu=$(printf '%.1f' "$(col "$dir/on" 4)")
      rr=$(ratio_of 1 4); cr=$(ratio_of 4 4)
      printf '%-14s %s %.0f req/s (%s/%s µs p50/p99, %s CPU µs/req); %s %.0f req/s (%s/%s µs, %s CPU µs/req); b/a: req/s %.2fx, CPU per request %.2fx (medians of per-round ratios)\n' \
        "$s" "$a_name" "$f" "$(col "$dir/off" 2)" "$(col "$dir/off" 3)" "$fcpu" "$b_name" "$o" "$(col "$dir/on" 2)" "$(col "$dir/on" 3)" "$ocpu" "$rr" "$cr"
      printf '| %s | | %s: %.0f | %s: %.0f | %.2f× req/s, %.2f× CPU per request | %s / %s | %s / %s | %s | %s |\n' \
        "$s" "$a_name" "$f" "$b_name" "$o" "$rr" "$cr" "$(col "$dir/off" 2)" "$(col "$dir/off" 3)" "$(col "$dir/on" 2)" "$(col "$dir/on" 3)" "$fcpu" "$ocpu" >> "$report"
      stop_all_but_backend
      continue
    fi
    start 0 "${under[@]}" "$NGINX" -c "$work/$s-nginx/nginx.conf"
    nginx_pid=${pids[-1]}
    start 0 "${under[@]}" "$PORTCULLIS" --config "$dir/proxy.toml"
    portcullis_pid=${pids[-1]}
    wait_port $NGINX_PORT
    wait_port $PORTCULLIS_PORT
    if [ "$s" = instructions ]; then
      for who in nginx portcullis; do
        pid_var=${who}_pid; pid=${!pid_var}
        port=$NGINX_PORT; [ $who = portcullis ] && port=$PORTCULLIS_PORT
        DURATION=2s rps "http://127.0.0.1:$port/" "${auth_header[@]}" >/dev/null
        callgrind_control -z "$pid" >/dev/null
        read -r rate _ < <(rps "http://127.0.0.1:$port/" "${auth_header[@]}")
        callgrind_control -d "$pid" >/dev/null
        ir=$(callgrind_annotate "$dir/cg.$pid.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
        echo "$(echo "$ir / ($rate * ${DURATION%s})" | bc)" > "$dir/$who"
      done
      n=$(cat "$dir/nginx"); p=$(cat "$dir/portcullis")
      printf '%-14s instructions per request: nginx %s, portcullis %s (%.2fx)\n' "$s" "$n" "$p" "$(echo "$p / $n" | bc -l)"
      printf '| %s | | | | %.2f× | user-space instructions per request: %s | %s | | |\n' \
        "$s" "$(echo "$p / $n" | bc -l)" "$n" "$p" >> "$report"
      stop_all_but_backend
      continue
    fi
    if [ "$s" = idle10k ]; then
      for who in nginx portcullis; do
        pid_var=${who}_pid; pid=${!pid_var}
        port=$NGINX_PORT; [ $who = portcullis ] && port=$PORTCULLIS_PORT
        before=$(rss_kb "$pid")
        coproc HOLD { hold_idle "$port" 10000 "${auth_header[0]}"; }
        read -r _ <&"${HOLD[0]}"
        after=$(rss_kb "$pid")
        echo "$(( (after - before) * 1024 / 10000 )) $after" > "$dir/$who"
        eval "exec ${HOLD[1]}>&-"; wait "$HOLD_PID" 2>/dev/null || true
      done
      read -r n_per n_total < "$dir/nginx"; read -r p_per p_total < "$dir/portcullis"
      printf '%-14s %9s %9s %9s %8s %8s   bytes/conn: nginx %s, portcullis %s; RSS after: nginx %s kB, portcullis %s kB\n' \
        "$s" - - - - - "$n_per" "$p_per" "$n_total" "$p_total"
      printf '| %s | | | | | 10,000 idle connections: %s bytes each, RSS %s kB | %s bytes each, RSS %s kB |\n' \
        "$s" "$n_per" "$n_total" "$p_per" "$p_total" >> "$report"
      stop_all_but_backend
      continue
    fi
    # One measured run against a base URL: "rate p50_us p99_us".
    case $s in
      websocket)
        run() { taskset -c 1 "$WSLOAD" load "${1/http/ws}/" "$CONNS" "${DURATION%s}" "${auth_header[0]}"; } ;;
      latency2k)
        echo 'function delay() return 10 end' > "$dir/pace.lua"
        run() { PACE="$dir/pace.lua" RUN_CONNS=20 rps "$1/" "${auth_header[@]}"; } ;;
      *)
        run() { PACE="$script" rps "$1/$urlpath" "${auth_header[@]}"; } ;;
    esac
    # Warm-up: connections, pools, and (for Basic) portcullis' verification cache: 32
    # concurrent first requests with the same credentials, every one of which must be a 200.
    DURATION=1s run "$scheme://127.0.0.1:$PORTCULLIS_PORT" >/dev/null
    : > "$dir/direct"; : > "$dir/nginx"; : > "$dir/portcullis"
    for _ in $(seq "$ROUNDS"); do
      idle_gate; run "http://127.0.0.1:$upstream_port" >> "$dir/direct"
      idle_gate; with_cpu "$nginx_pid" run "$scheme://127.0.0.1:$NGINX_PORT" >> "$dir/nginx"
      idle_gate; with_cpu "$portcullis_pid" run "$scheme://127.0.0.1:$PORTCULLIS_PORT" >> "$dir/portcullis"
    done
    col() { awk -v c="$2" '{print $c}' "$1" | median; }
    d=$(col "$dir/direct" 1); n=$(col "$dir/nginx" 1); p=$(col "$dir/portcullis" 1)
    d50=$(col "$dir/direct" 2); d99=$(col "$dir/direct" 3)
    n50=$(col "$dir/nginx" 2); n99=$(col "$dir/nginx" 3)
    p50=$(col "$dir/portcullis" 2); p99=$(col "$dir/portcullis" 3)
    ncpu=$(printf '%.1f' "$(col "$dir/nginx" 4)"); pcpu=$(printf '%.1f' "$(col "$dir/portcullis" 4)")
    # Added latency: the median over rounds of (proxy p50 - direct p50) in the same round.
    added() { paste -d' ' "$dir/direct" "$1" | awk '{print $5 - $2}' | median; }
    if [ "$s" = latency2k ]; then
      printf '%-14s at %.0f req/s, p50/p99 µs: direct %s/%s, nginx %s/%s, portcullis %s/%s; added at p50 (median of rounds): nginx %s µs, portcullis %s µs; CPU µs/req: nginx %s, portcullis %s\n' \
        "$s" "$p" "$d50" "$d99" "$n50" "$n99" "$p50" "$p99" "$(added "$dir/nginx")" "$(added "$dir/portcullis")" "$ncpu" "$pcpu"
      printf '| %s | p50 / p99 %s / %s µs | at %.0f req/s | | added at p50: nginx %s µs, portcullis %s µs | %s / %s | %s / %s | %s | %s |\n' \
        "$s" "$d50" "$d99" "$p" "$(added "$dir/nginx")" "$(added "$dir/portcullis")" "$n50" "$n99" "$p50" "$p99" "$ncpu" "$pcpu" >> "$report"
      stop_all_but_backend
      continue
    fi
    ratio=$(echo "$p / $n" | bc -l)
    printf '%-14s %9.0f %9.0f %9.0f %7.2fx %7.2fx %15s %15s %13s\n' "$s" "$d" "$n" "$p" \
      "$ratio" "$(echo "$p / $d" | bc -l)" "$n50/$n99" "$p50/$p99" "$ncpu/$pcpu"
    printf '| %s | %.0f | %.0f | %.0f | %.2f× | %s / %s | %s / %s | %s | %s |\n' "$s" "$d" "$n" "$p" "$ratio" \
      "$n50" "$n99" "$p50" "$p99" "$ncpu" "$pcpu" >> "$report"
    echo "$s $n $p" >> "$work/chart"
    stop_all_but_backend
  done
done
note="medians of $ROUNDS rounds of $DURATION at -c$CONNS; proxies on core 0, backend and wrk on core 1"
echo
echo "$note"
printf '\n%s, %s, %s, `benches/compare.sh %s`\n' "$(date -u +%Y-%m-%d)" "$(nproc) CPUs ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo))" "$note" "$*" >> "$report"

# A bar chart of req/s: nginx and portcullis side by side, per scenario.
awk -v title="req/s, nginx (grey) and portcullis (blue); $(date -u +%Y-%m-%d)" '
  { name[NR]=$1; n[NR]=$2; p[NR]=$3; if ($2>max) max=$2; if ($3>max) max=$3 }
  END {
    if (NR == 0) exit
    w = 140 * NR + 60; h = 260
    printf "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" font-size=\"12\">\n", w, h
    printf "<text x=\"10\" y=\"18\">%s</text>\n", title
    for (i = 1; i <= NR; i++) {
      x = 40 + (i-1) * 140
      hn = 180 * n[i] / max; hp = 180 * p[i] / max
      printf "<rect x=\"%d\" y=\"%.0f\" width=\"50\" height=\"%.0f\" fill=\"#999\"/>\n", x, 220-hn, hn
      printf "<rect x=\"%d\" y=\"%.0f\" width=\"50\" height=\"%.0f\" fill=\"#3b73b9\"/>\n", x+55, 220-hp, hp
      printf "<text x=\"%d\" y=\"%.0f\">%.0f</text>\n", x, 215-hn, n[i]
      printf "<text x=\"%d\" y=\"%.0f\">%.0f</text>\n", x+55, 215-hp, p[i]
      printf "<text x=\"%d\" y=\"240\">%s</text>\n", x, name[i]
    }
    print "</svg>"
  }' "$work/chart" > target/compare/compare.svg
echo "written: $report, target/compare/compare.svg"
