#!/usr/bin/env bash
# User-space instructions per proxied request, portcullis and nginx doing the API-key job of
# benches/compare.sh, counted by callgrind: repeatable whatever else the machine is doing, so
# it shows what a code change costs or saves where req/s on this shared box cannot.
#
#   benches/instructions.sh            (needs valgrind, nginx, wrk: Debian packages)
#
# Each proxy runs under `valgrind --tool=callgrind` on core 0 (the backend, nginx `return 200`,
# and wrk -t1 -c32 on core 1); counting starts after a 2 s warm-up and covers 5 s of load.
# valgrind hides the CPU's SHA extensions, so portcullis' SHA-256 of the key runs in software
# here (about 7,000 instructions of its count).
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in valgrind callgrind_control callgrind_annotate wrk taskset; do
  command -v "$tool" >/dev/null || { echo "missing: $tool (apt-get install valgrind wrk util-linux)" >&2; exit 1; }
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || { echo "missing: nginx (apt-get install nginx)" >&2; exit 1; }
cargo build --release --quiet
PORTCULLIS=$PWD/target/release/portcullis

work=$(mktemp -d)
chmod 755 "$work"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

nginx_conf() { # file, pid name, http block contents
  cat > "$1" <<EOF
worker_processes 1;
daemon off;
master_process off;
pid $work/$2.pid;
error_log $work/$2.err warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $work/body; proxy_temp_path $work/proxy; fastcgi_temp_path $work/fcgi;
  uwsgi_temp_path $work/uwsgi; scgi_temp_path $work/scgi;
  $3
}
EOF
}

wait_port() {
  for _ in $(seq 300); do
    (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $1" >&2
  cat "$work"/*.log "$work"/*.err >&2 2>/dev/null || true
  exit 1
}

KEY=$("$PORTCULLIS" keygen | head -1)
nginx_conf "$work/backend.conf" backend "server { listen 127.0.0.1:18280; location / { return 200 \"ok\n\"; } }"
taskset -c 1 "$NGINX" -c "$work/backend.conf" & pids+=($!)
wait_port 18280

# The same job as compare.sh's apikey scenario.
nginx_conf "$work/proxy.conf" proxy "
  upstream backend { server 127.0.0.1:18280; keepalive 64; }
  map_hash_bucket_size 128;
  map \$http_authorization \$ok { \"Bearer $KEY\" 1; default 0; }
  limit_req_zone \$http_authorization zone=bench:10m rate=100000r/s;
  server { listen 127.0.0.1:18281; location / { if (\$ok = 0) { return 401; }
    proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\";
    proxy_set_header X-Forwarded-For \$remote_addr; proxy_set_header X-Real-IP \$remote_addr;
    proxy_set_header X-Forwarded-Proto \$scheme; proxy_set_header X-Forwarded-Host \$host;
    proxy_set_header X-Request-Id \$request_id; proxy_set_header Authorization \"\";
    proxy_set_header X-Authenticated-User bench;
    add_header X-Request-Id \$request_id always; add_header X-Frame-Options DENY always;
    add_header X-Content-Type-Options nosniff always; add_header Referrer-Policy no-referrer always;
    limit_req zone=bench burst=100000 nodelay; } }"
printf '[[keys]]\nname = "bench"\napi_key = "%s"\n' "$KEY" > "$work/keys.toml"
cat > "$work/proxy.toml" <<EOF
[server]
listen = "127.0.0.1:18282"
admin_listen = "127.0.0.1:18283"
[upstream]
url = "http://127.0.0.1:18280"
[auth]
keys_file = "$work/keys.toml"
[ban]
enabled = false
[rate_limit]
requests_per_second = 100000
burst = 100000
[log]
level = "warn"
access_log = "off"
EOF

count() { # name, port, command...
  local name=$1 port=$2; shift 2
  taskset -c 0 valgrind --tool=callgrind --callgrind-out-file="$work/cg.$name" "$@" \
    >> "$work/$name.log" 2>&1 &
  local pid=$!
  pids+=("$pid")
  wait_port "$port"
  taskset -c 1 wrk -t1 -c32 -d2s -H "Authorization: Bearer $KEY" "http://127.0.0.1:$port/" >/dev/null
  callgrind_control -z "$pid" >/dev/null
  local out n ir
  out=$(taskset -c 1 wrk -t1 -c32 -d5s -H "Authorization: Bearer $KEY" "http://127.0.0.1:$port/")
  callgrind_control -d "$pid" >/dev/null
  if grep -q "Non-2xx" <<<"$out"; then echo "$name answered errors: $out" >&2; exit 1; fi
  n=$(awk '/requests in/ {print $1}' <<<"$out")
  ir=$(callgrind_annotate "$work/cg.$name.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
  printf '%-11s %8d requests  %12d instructions  %7d per request\n' "$name" "$n" "$ir" $(( ir / n ))
  kill "$pid"
}

count portcullis 18282 "$PORTCULLIS" --config "$work/proxy.toml"
count nginx 18281 "$NGINX" -c "$work/proxy.conf"
