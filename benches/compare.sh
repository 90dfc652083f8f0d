#!/usr/bin/env bash
# Load comparison: portcullis against nginx doing the same job, side by side on this machine.
#
#   benches/compare.sh [SCENARIO ...]      (default: basic-bcrypt10 noauth)
#
# Scenarios:
#   basic-bcrypt10   HTTP Basic, one user hashed with bcrypt cost 10 (htpasswd -B -C 10);
#                    nginx: auth_basic + auth_basic_user_file with the same file
#   basic-apr1       the same with htpasswd -m (Apache MD5)
#   apikey           Authorization: Bearer; nginx: a `map` on the header, 401 otherwise
#   noauth           no authentication (portcullis anonymous = true; nginx plain proxy_pass)
#
# Layout (see BENCHMARKING notes in the README): the proxy under test alone on core 0
# (taskset -c 0; nginx worker_processes 1; portcullis then sees one CPU), the backend (nginx,
# one worker, `return 200`) and wrk -t1 on core 1. Each round runs direct, nginx, portcullis one
# after another; the table reports medians over ROUNDS rounds of DURATION each at CONNS
# connections, and the ratios portcullis / nginx and portcullis / direct.
#
# Environment: ROUNDS (5), DURATION (5s), CONNS (32), PORTCULLIS (the binary; default: built
# with cargo build --release). Needs nginx, wrk, htpasswd and taskset: Debian packages nginx,
# wrk, apache2-utils, util-linux (installed when missing and running as root).
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

work=$(mktemp -d)
chmod 755 "$work"   # nginx workers run as an unprivileged user and must read the htpasswd file
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

BACKEND_PORT=18180 NGINX_PORT=18181 PORTCULLIS_PORT=18182 ADMIN_PORT=18183

nginx_conf() { # name, server block
  mkdir -p "$work/$1"
  cat > "$work/$1/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $work/$1/nginx.pid;
error_log $work/$1/error.log warn;
events { worker_connections 4096; }
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
  for _ in $(seq 100); do
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

rps() { # url, header...: requests per second; every response must be a 200
  local url=$1; shift
  local args=()
  for h in "$@"; do args+=(-H "$h"); done
  local out
  out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"$DURATION" "${args[@]}" "$url")
  if grep -q "Non-2xx" <<<"$out"; then
    echo "$url answered errors during the run:" >&2
    echo "$out" >&2
    exit 1
  fi
  awk '/Requests\/sec/ {print $2}' <<<"$out"
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

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# The backend, for every scenario.
nginx_conf backend "server { listen 127.0.0.1:$BACKEND_PORT; location / { return 200 \"ok\n\"; } }"
start 1 "$NGINX" -c "$work/backend/nginx.conf"
wait_port $BACKEND_PORT

KEY=$("$PORTCULLIS" keygen | head -1)
PROXY_LOCATION="proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header X-Forwarded-For \$remote_addr;"

printf '\n%-16s %12s %12s %12s %10s %10s\n' scenario direct nginx portcullis "p/nginx" "p/direct"
for scenario in "${@:-basic-bcrypt10 noauth}"; do
  for s in $scenario; do
    dir="$work/$s"; mkdir -p "$dir"
    auth_header=()
    case $s in
      basic-bcrypt10|basic-apr1)
        if [ "$s" = basic-bcrypt10 ]; then flag=(-B -C 10); else flag=(-m); fi
        htpasswd -cb "${flag[@]}" "$dir/htpasswd" bench 'bench password' 2>/dev/null
        auth_header=("Authorization: Basic $(printf %s 'bench:bench password' | base64)")
        nginx_conf "$s-nginx" "server { listen 127.0.0.1:$NGINX_PORT; location / { auth_basic bench; auth_basic_user_file $dir/htpasswd; $PROXY_LOCATION } }"
        auth="htpasswd_file = \"$dir/htpasswd\""
        ;;
      apikey)
        printf '[[keys]]\nname = "bench"\napi_key = "%s"\n' "$KEY" > "$dir/keys.toml"
        auth_header=("Authorization: Bearer $KEY")
        nginx_conf "$s-nginx" "map_hash_bucket_size 128; map \$http_authorization \$bench_ok { \"Bearer $KEY\" 1; default 0; }
          server { listen 127.0.0.1:$NGINX_PORT; location / { if (\$bench_ok = 0) { return 401; } $PROXY_LOCATION } }"
        auth="keys_file = \"$dir/keys.toml\""
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
[upstream]
url = "http://127.0.0.1:$BACKEND_PORT"
[auth]
$auth
[ban]
enabled = false
# nginx has no limit in these scenarios: neither has portcullis.
[rate_limit]
enabled = false
[log]
level = "warn"
access_log = "off"
EOF
    start 0 "$NGINX" -c "$work/$s-nginx/nginx.conf"
    start 0 "$PORTCULLIS" --config "$dir/proxy.toml"
    wait_port $NGINX_PORT
    wait_port $PORTCULLIS_PORT
    # Warm-up: connections, pools, and (for Basic) portcullis' verification cache.
    taskset -c 1 wrk -t1 -c"$CONNS" -d1s ${auth_header[@]+-H "${auth_header[0]}"} "http://127.0.0.1:$PORTCULLIS_PORT/" >/dev/null
    : > "$dir/direct"; : > "$dir/nginx"; : > "$dir/portcullis"
    for _ in $(seq "$ROUNDS"); do
      idle_gate; rps "http://127.0.0.1:$BACKEND_PORT/" >> "$dir/direct"
      idle_gate; rps "http://127.0.0.1:$NGINX_PORT/" "${auth_header[@]}" >> "$dir/nginx"
      idle_gate; rps "http://127.0.0.1:$PORTCULLIS_PORT/" "${auth_header[@]}" >> "$dir/portcullis"
    done
    d=$(median < "$dir/direct"); n=$(median < "$dir/nginx"); p=$(median < "$dir/portcullis")
    printf '%-16s %12.0f %12.1f %12.0f %9.1fx %9.2fx\n' "$s" "$d" "$n" "$p" \
      "$(echo "$p / $n" | bc -l)" "$(echo "$p / $d" | bc -l)"
    stop_all_but_backend
  done
done
echo
echo "medians of $ROUNDS rounds of $DURATION at -c$CONNS; proxies on core 0, backend and wrk on core 1"
