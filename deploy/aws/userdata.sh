#!/bin/bash
# fedyolo on EC2: the user data of a __ROLE__ instance of deployment __NAME__, rendered by
# deploy/aws/userdata.py. No secret is in it: TLS material and keys come from SSM Parameter Store
# through the instance role, the clients' images from S3, at boot.
#
# cloud-init runs this once. It installs Docker and the CloudWatch agent (which ships the boot
# log to CloudWatch Logs), writes the boot script below as the systemd unit fedyolo-boot, and
# starts it. The unit retries until the boot script succeeds (an image not pushed yet, data not
# uploaded yet, the server's interface still held by the instance it replaces): nothing is lost
# to a boot that came too early, and no operator has to act.
#
# FEDYOLO_ROOT, FEDYOLO_IMDS and FEDYOLO_LOG_DRIVER are unset on an instance. `fedyolo deploy aws
# rehearse` sets them to run this same file on one machine (a folder per stand-in instance, its
# own metadata endpoint, Docker's json-file logs); AWS_ENDPOINT_URL points the AWS CLI at moto.
set -euo pipefail

ROOT="${FEDYOLO_ROOT:-}"
BOOT="${ROOT}/usr/local/libexec/fedyolo-boot"
install -d "${ROOT}/usr/local/libexec" "${ROOT}/etc/systemd/system" "${ROOT}/var/log" \
  "${ROOT}/etc/fedyolo"

dnf install -y docker amazon-cloudwatch-agent
systemctl enable --now docker

# the boot log in CloudWatch Logs: /fedyolo/__NAME__, stream <instance id>-boot
cat > "${ROOT}/etc/fedyolo/cloudwatch-agent.json" <<'AGENT'
{"logs": {"logs_collected": {"files": {"collect_list": [
  {"file_path": "/var/log/fedyolo-boot.log", "log_group_name": "/fedyolo/__NAME__",
   "log_stream_name": "{instance_id}-boot"}]}}}}
AGENT
amazon-cloudwatch-agent-ctl -a fetch-config -m ec2 -s \
  -c "file:${ROOT}/etc/fedyolo/cloudwatch-agent.json"

cat > "${BOOT}" <<'FEDYOLO_BOOT'
#!/bin/bash
# shellcheck disable=SC2034 # the deployment's facts below: each role's script uses some
# fedyolo-boot (__ROLE__): idempotent; the unit runs it again until it succeeds. A client's ends
# once its SuperNode runs (Docker restarts it); the server's ends with the federation's run.
set -euo pipefail

DEPLOYMENT="__NAME__"
REGION="__REGION__"
ROLE="__ROLE__"
IMAGE="__IMAGE__"
SERVER_IP="__SERVER_IP__"
INTERFACE="__INTERFACE__"
FLEET_PORT="__FLEET_PORT__"
SLOTS="__SLOTS__"
DATA_PATH="__DATA_PATH__"
RUN_NAME="__RUN_NAME__"
# the server's run directory after every round (deploy/aws/s3state.py); resume=s3://... reads it
STATE_URL="__STATE_URL__"
BUCKET="${STATE_URL#s3://}"
STATE_PREFIX="${BUCKET#*/}"
BUCKET="${BUCKET%%/*}"
LOG_GROUP="/fedyolo/${DEPLOYMENT}"
ROOT="${FEDYOLO_ROOT:-}"
IMDS="${FEDYOLO_IMDS:-http://169.254.169.254}"
SECRETS="${ROOT}/etc/fedyolo/secrets"
HOME_DIR="${ROOT}/var/lib/fedyolo"
USER_ID=10001  # the images' user (Dockerfile.server, Dockerfile.client)

log() { echo "$(date -u +%FT%TZ) fedyolo-boot ${ROLE}: $*"; }

TOKEN="$(curl -sSf -X PUT "${IMDS}/latest/api/token" \
  -H 'X-aws-ec2-metadata-token-ttl-seconds: 300')"
INSTANCE_ID="$(curl -sSf -H "X-aws-ec2-metadata-token: ${TOKEN}" \
  "${IMDS}/latest/meta-data/instance-id")"
log "instance ${INSTANCE_ID}"

install -d -m 0700 "${SECRETS}"
# this role's parameters: its instance role reads /fedyolo/<name>/<role>/ and nothing else
param() {
  aws ssm get-parameter --region "${REGION}" --with-decryption \
    --name "/fedyolo/${DEPLOYMENT}/${ROLE}/$1" --query Parameter.Value --output text
}
# a secret the container user (not root) reads: the containers run as USER_ID
secret() {
  param "$1" > "${SECRETS}/$2.tmp"
  install -m "$3" -o "${USER_ID}" -g "${USER_ID}" "${SECRETS}/$2.tmp" "${SECRETS}/$2"
  rm -f "${SECRETS}/$2.tmp"
}
secret tls/ca.crt ca.crt 0444

aws ecr get-login-password --region "${REGION}" |
  docker login --username AWS --password-stdin "${IMAGE%%/*}"
docker pull "${IMAGE}"  # not pushed yet: this fails, and the unit tries again

if [ "${FEDYOLO_LOG_DRIVER:-awslogs}" = awslogs ]; then
  LOGS=(--log-driver awslogs --log-opt "awslogs-region=${REGION}"
    --log-opt "awslogs-group=${LOG_GROUP}" --log-opt "awslogs-stream=${ROLE}-${INSTANCE_ID}")
else
  LOGS=(--log-driver "${FEDYOLO_LOG_DRIVER}")
fi
# the rehearsal's endpoint and credentials, where set (never on an instance: the role's)
AWS_ENV=(-e "AWS_REGION=${REGION}" -e "AWS_DEFAULT_REGION=${REGION}")  # boto3 reads the second
if [ -n "${AWS_ENDPOINT_URL:-}" ]; then AWS_ENV+=(-e AWS_ENDPOINT_URL); fi
if [ -n "${AWS_ACCESS_KEY_ID:-}" ]; then AWS_ENV+=(-e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY); fi
# the containers: their image's unprivileged user, no capability, no new privileges, bounded
# processes and memory (3/4 of the instance's)
MEMORY="$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) * 3 / 4))k"
HARDENED=(--security-opt no-new-privileges --cap-drop ALL --pids-limit 1024 --memory "${MEMORY}")

# a prefix of s3://<bucket>/data/ (`fedyolo deploy aws data upload`) into a folder, checked
# against its SHA256SUMS; none yet: this fails, and the unit tries again
data_from_s3() {
  install -d -m 0755 "$2"
  aws s3 sync --region "${REGION}" --only-show-errors --delete "s3://${BUCKET}/data/$1/" "$2/"
  if [ ! -f "$2/data.yaml" ] || [ ! -f "$2/SHA256SUMS" ]; then
    log "no data at s3://${BUCKET}/data/$1/ (fedyolo deploy aws data upload)"
    return 1
  fi
  (cd "$2" && sha256sum --check --quiet --strict SHA256SUMS)
}

if [ "${ROLE}" = server ]; then
  # The SuperLink's fixed address: the interface a replaced server instance held. Wait until
  # that instance has let it go (it is released when the instance terminates), then take it.
  attached=""
  for _ in $(seq 1 60); do
    read -r status owner <<< "$(aws ec2 describe-network-interfaces --region "${REGION}" \
      --network-interface-ids "${INTERFACE}" --output text \
      --query 'NetworkInterfaces[0].[Status,Attachment.InstanceId]')"
    if [ "${owner}" = "${INSTANCE_ID}" ]; then attached=yes; break; fi
    if [ "${status}" = available ]; then
      aws ec2 attach-network-interface --region "${REGION}" --device-index 1 \
        --network-interface-id "${INTERFACE}" --instance-id "${INSTANCE_ID}" > /dev/null || true
    else
      log "interface ${INTERFACE} is ${status} (instance ${owner}): waiting"
    fi
    sleep 5
  done
  if [ -z "${attached}" ]; then
    log "interface ${INTERFACE} not attached to ${INSTANCE_ID}"
    exit 1
  fi
  secret tls/superlink.crt superlink.crt 0444
  secret tls/superlink.key superlink.key 0400
  # the SuperLink's database and the run directory: owned by the container user
  install -d -m 0700 -o "${USER_ID}" -g "${USER_ID}" "${HOME_DIR}/state" "${HOME_DIR}/runs"
  # the held-out images the server evaluates on (`fedyolo deploy aws data upload`); never a
  # client's
  data_from_s3 server "${HOME_DIR}/data/server"
  # node authentication: every client slot's public key may join
  install -d -m 0755 "${HOME_DIR}/keys"
  for i in $(seq 0 $((SLOTS - 1))); do
    param "clients/${i}/pub" > "${HOME_DIR}/keys/${i}.pub"
  done
  SUPERLINK="fedyolo-superlink-${INSTANCE_ID}"
  DRIVER="fedyolo-driver-${INSTANCE_ID}"
  docker rm -f "${SUPERLINK}" "${DRIVER}" > /dev/null 2>&1 || true
  # Flower 1.41 serves Fleet and Control on this one port (no separate control port), opened on
  # the instance's own network: no Docker proxy that would accept the clients' connections
  # before the SuperLink listens (a TLS error, on which a SuperNode stops retrying). The
  # ServerApp runs in this container; it writes the run directory and, after every round, its
  # copy in S3 (the instance role, through instance metadata: hop limit 2 for this role only).
  docker run -d --name "${SUPERLINK}" --restart unless-stopped "${LOGS[@]}" "${HARDENED[@]}" \
    --network host --health-cmd "python3 -m deploy.health 127.0.0.1:${FLEET_PORT}" \
    "${AWS_ENV[@]}" \
    -e FLWR_TELEMETRY_ENABLED=0 -e FEDYOLO_AWS_DEPLOYMENT="${DEPLOYMENT}" \
    -e FEDYOLO_STATE_URL="${STATE_URL}" \
    -e FEDYOLO_STATE_KEY_PARAMETER="/fedyolo/${DEPLOYMENT}/server/state/key" \
    -v "${SECRETS}/ca.crt:/secrets/ca.crt:ro" \
    -v "${SECRETS}/superlink.crt:/secrets/superlink.crt:ro" \
    -v "${SECRETS}/superlink.key:/secrets/superlink.key:ro" \
    -v "${HOME_DIR}/state:/state" \
    -v "${HOME_DIR}/runs:/var/lib/fedyolo/runs" \
    -v "${HOME_DIR}/data/server:/var/lib/fedyolo/data/server:ro" \
    "${IMAGE}" \
__SERVER_ARGS__ \
    "--port=${FLEET_PORT}"
  # The driver: registers the slots' keys and submits the run through the SuperLink's port,
  # then follows it to its end (engine=superlink), in the foreground: this script ends with the
  # run. A copy of the run in S3 means a round has finished before (this instance replaces one
  # that ran it, or the driver stopped): the run resumes from its last finished round. No copy
  # means no round finished: the run starts (again) from the beginning, losing nothing.
  if aws s3api head-object --region "${REGION}" --bucket "${BUCKET}" \
    --key "${STATE_PREFIX}/${RUN_NAME}/sync.json" > /dev/null 2>&1; then
    log "resuming ${RUN_NAME} from ${STATE_URL}/${RUN_NAME}"
    RUN=("resume=${STATE_URL}/${RUN_NAME}")
  else
    log "starting ${RUN_NAME}"
    RUN=(
__RUN_ARGS__
    )
  fi
  docker run --rm --name "${DRIVER}" --no-healthcheck "${LOGS[@]}" "${HARDENED[@]}" \
    --network host "${AWS_ENV[@]}" \
    -e FEDYOLO_STATE_KEY_PARAMETER="/fedyolo/${DEPLOYMENT}/server/state/key" \
    -v "${SECRETS}/ca.crt:/secrets/ca.crt:ro" \
    -v "${HOME_DIR}/keys:/keys:ro" \
    -v "${HOME_DIR}/runs:/var/lib/fedyolo/runs" \
    -v "${HOME_DIR}/data/server:/var/lib/fedyolo/data/server:ro" \
    -w /var/lib/fedyolo --entrypoint fedyolo \
    "${IMAGE}" \
    run "${RUN[@]}" \
__DRIVER_ARGS__
  log "${RUN_NAME} ended"
else # @client: rendered for one role only (userdata.py)
  # a key slot of its own: the first free claim parameter; a claim whose instance is gone
  # (a spot interruption or a crash that skipped the release) is taken over
  SLOT=""
  for i in $(seq 0 $((SLOTS - 1))); do
    claim="/fedyolo/${DEPLOYMENT}/client/claims/${i}"
    if aws ssm put-parameter --region "${REGION}" --type String --value "${INSTANCE_ID}" \
      --name "${claim}" > /dev/null 2>&1; then
      SLOT="${i}"
      break
    fi
    holder="$(aws ssm get-parameter --region "${REGION}" --name "${claim}" \
      --query Parameter.Value --output text)"
    if [ "${holder}" = "${INSTANCE_ID}" ]; then SLOT="${i}"; break; fi
    state="$(aws ec2 describe-instances --region "${REGION}" --instance-ids "${holder}" \
      --query 'Reservations[0].Instances[0].State.Name' --output text 2>/dev/null || echo gone)"
    case "${state}" in
      gone | terminated | shutting-down | stopped | stopping | None)
        log "slot ${i}: its holder ${holder} is ${state}: taking it over"
        aws ssm put-parameter --region "${REGION}" --type String --overwrite \
          --value "${INSTANCE_ID}" --name "${claim}" > /dev/null
        SLOT="${i}"
        break
        ;;
    esac
  done
  if [ -z "${SLOT}" ]; then
    log "no free client key slot of ${SLOTS} (claims under /fedyolo/${DEPLOYMENT}/client/claims/)"
    exit 1
  fi
  log "slot ${SLOT}"
  # a graceful stop (scale-in, a spot interruption's notice) gives the slot back
  cat > "${ROOT}/etc/systemd/system/fedyolo-release-slot.service" <<UNIT
[Unit]
Description=fedyolo: release client key slot ${SLOT}
After=network-online.target
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/true
ExecStop=/usr/bin/aws ssm delete-parameter --region ${REGION} --name /fedyolo/${DEPLOYMENT}/client/claims/${SLOT}
[Install]
WantedBy=multi-user.target
UNIT
  systemctl daemon-reload
  systemctl enable --now fedyolo-release-slot.service
  secret "slots/${SLOT}/key" node.key 0400
  # this slot's images (`fedyolo deploy aws data upload`), read-only in the container
  DATA="${ROOT}${DATA_PATH}"
  data_from_s3 "slot-${SLOT}" "${DATA}"
  PARTITION_ID="${SLOT}"
  SUPERNODE="fedyolo-supernode-${INSTANCE_ID}"
  docker rm -f "${SUPERNODE}" > /dev/null 2>&1 || true
  # the container's /state: the node ID its entry point signs off after a crash or a restart,
  # so the SuperLink takes the key back at once (deploy/supernode.py)
  install -d -m 0700 -o "${USER_ID}" -g "${USER_ID}" "${HOME_DIR}/node-state"
  # unless-stopped: a SuperNode that gave up on its SuperLink (replaced, or keys not registered
  # yet) exits 0; a fleet's client runs until its instance is retired
  docker run -d --name "${SUPERNODE}" --restart unless-stopped "${LOGS[@]}" "${HARDENED[@]}" \
    -e FLWR_TELEMETRY_ENABLED=0 -e OMP_NUM_THREADS="$(nproc)" \
    -e FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1 \
    -v "${SECRETS}/ca.crt:/secrets/ca.crt:ro" \
    -v "${SECRETS}/node.key:/secrets/node.key:ro" \
    -v "${DATA}:/data:ro" \
    -v "${HOME_DIR}/node-state:/state" \
    "${IMAGE}" \
__CLIENT_ARGS__
fi # @end
log "up"
FEDYOLO_BOOT
chmod 0755 "${BOOT}"

cat > "${ROOT}/etc/systemd/system/fedyolo-boot.service" <<UNIT
[Unit]
Description=fedyolo: boot this __ROLE__ instance into the federation
Wants=network-online.target docker.service
After=network-online.target docker.service
StartLimitIntervalSec=0
[Service]
Type=simple
RemainAfterExit=yes
ExecStart=/usr/local/libexec/fedyolo-boot
Restart=on-failure
RestartSec=15
StandardOutput=append:/var/log/fedyolo-boot.log
StandardError=append:/var/log/fedyolo-boot.log
[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now --no-block fedyolo-boot.service
