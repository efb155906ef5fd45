#!/usr/bin/env bash
# A private 3-node RabbitMQ cluster on this machine, for failover tests. Never touches the
# shared node rabbit@localhost: each node has its own name, ports, data and config.
#
#   scripts/cluster.sh up        start 3 nodes, join them, print one AMQP URL per line
#   scripts/cluster.sh status    cluster status, and the members of every quorum queue
#   scripts/cluster.sh stop N    halt node N (1-3), e.g. to test failover
#   scripts/cluster.sh start N   boot node N again (it rejoins the cluster from its data)
#   scripts/cluster.sh urls      print the AMQP URLs
#   scripts/cluster.sh down      halt every node and delete the data directory
#
# Settings (environment):
#   QWC_NAME  node name prefix (default qwc: nodes qwc1@localhost, qwc2@localhost, qwc3@localhost)
#   QWC_PORT  AMQP port of node 1 (default 5681; nodes use PORT, PORT+1, PORT+2, and
#             PORT+20000.. for Erlang distribution)
#   QWC_DIR   data, logs and config (default /tmp/qworker-cluster-$QWC_NAME)
# Every wait is bounded; URLs go to stdout, progress to stderr.
set -euo pipefail

NAME="${QWC_NAME:-qwc}"
PORT="${QWC_PORT:-5681}"
DIR="${QWC_DIR:-/tmp/qworker-cluster-$NAME}"
SERVER=/usr/lib/rabbitmq/bin/rabbitmq-server
COOKIE=/var/lib/rabbitmq/.erlang.cookie
NODES=(1 2 3)

log() { echo "cluster.sh: $*" >&2; }
node() { echo "${NAME}$1@localhost"; }
amqp_port() { echo $((PORT + $1 - 1)); }
dist_port() { echo $((PORT + 20000 + $1 - 1)); }
ctl() { local n="$1"; shift; timeout 120 rabbitmqctl -n "$(node "$n")" -q "$@"; }
answers() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

urls() {
  for n in "${NODES[@]}"; do echo "amqp://guest:guest@127.0.0.1:$(amqp_port "$n")/"; done
}

write_config() {
  local n="$1" d="$DIR/$1"
  mkdir -p "$d/home" "$d/mnesia" "$d/log"
  chmod 755 "$DIR" "$d"
  if [ ! -f "$d/home/.erlang.cookie" ]; then
    cp "$COOKIE" "$d/home/.erlang.cookie"
    chmod 400 "$d/home/.erlang.cookie"
  fi
  cat >"$d/rabbitmq.conf" <<CONF
listeners.tcp.1 = 127.0.0.1:$(amqp_port "$n")
loopback_users.guest = true
log.console = false
cluster_partition_handling = pause_minority
CONF
  echo "[]." >"$d/enabled_plugins"
  : >"$d/rabbitmq-env.conf"
}

start_node() {
  local n="$1" d="$DIR/$1"
  if answers "$(amqp_port "$n")"; then
    if ctl "$n" status >/dev/null 2>&1; then log "$(node "$n") already running"; return 0; fi
    log "port $(amqp_port "$n") is taken by something else"; return 1
  fi
  write_config "$n"
  log "starting $(node "$n") on 127.0.0.1:$(amqp_port "$n")"
  (
    cd "$d"
    env HOME="$d/home" \
      RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf" \
      RABBITMQ_NODENAME="$(node "$n")" \
      RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
      RABBITMQ_NODE_PORT="$(amqp_port "$n")" \
      RABBITMQ_DIST_PORT="$(dist_port "$n")" \
      RABBITMQ_MNESIA_BASE="$d/mnesia" \
      RABBITMQ_LOG_BASE="$d/log" \
      RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
      RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" \
      RABBITMQ_PID_FILE="$d/pid" \
      ERL_EPMD_ADDRESS=127.0.0.1 \
      RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="+S 1:1 -kernel inet_dist_use_interface {127,0,0,1}" \
      "$SERVER" -detached
  )
  await_node "$n"
}

await_node() {
  local n="$1" i
  for i in $(seq 1 120); do
    if ctl "$n" await_startup --timeout 5 >/dev/null 2>&1 && answers "$(amqp_port "$n")"; then
      return 0
    fi
    sleep 1
  done
  log "$(node "$n") did not start; log tail:"
  tail -n 30 "$DIR/$n/log/$(node "$n").log" >&2 || true
  return 1
}

stop_node() {
  local n="$1" pid="" i
  [ -f "$DIR/$n/pid" ] && pid="$(cat "$DIR/$n/pid" 2>/dev/null || true)"
  log "stopping $(node "$n")"
  ctl "$n" stop >/dev/null 2>&1 || true
  if [ -n "$pid" ]; then
    for i in $(seq 1 60); do
      kill -0 "$pid" 2>/dev/null || return 0
      sleep 0.5
    done
    log "$(node "$n") (pid $pid) still running: kill -9"
    kill -9 "$pid" 2>/dev/null || true
  fi
}

joined() {
  # node N lists node 1 among its running nodes
  ctl "$1" cluster_status --formatter json 2>/dev/null | grep -q "\"$(node 1)\""
}

up() {
  mkdir -p "$DIR"
  for n in "${NODES[@]}"; do start_node "$n"; done
  for n in 2 3; do
    if joined "$n"; then continue; fi
    log "joining $(node "$n") to $(node 1)"
    ctl "$n" stop_app
    ctl "$n" join_cluster "$(node 1)"
    ctl "$n" start_app
  done
  local running
  running="$(ctl 1 cluster_status --formatter json)"
  for n in "${NODES[@]}"; do
    echo "$running" | grep -q "\"$(node "$n")\"" || { log "$(node "$n") not in the cluster"; exit 1; }
  done
  log "3 nodes up and clustered"
  urls
}

down() {
  for n in "${NODES[@]}"; do stop_node "$n"; done
  case "$DIR" in
    /tmp/*) rm -rf "$DIR" ;;
    *) log "not deleting $DIR (outside /tmp)" ;;
  esac
}

status() {
  ctl 1 cluster_status
  echo "quorum queues (name, members, leader):"
  ctl 1 list_queues name type members leader | awk '$2 == "quorum"' || true
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  urls) urls ;;
  stop) stop_node "${2:?node number 1-3}" ;;
  start) start_node "${2:?node number 1-3}" ;;
  *) echo "usage: $0 up|down|status|urls|stop N|start N" >&2; exit 2 ;;
esac
